"""An account's facts, derived once and reused while the account's data does not change.

A tick derives from each account its positions per instrument family (what pair rules and the
account's counts read) and its working orders. Brokers resend every account on every tick,
mostly unchanged: the same positions, the same orders, only `updated_at` and the P&L moved. So
what depends only on `positions` + `overnight` (families, contract counts, undeclared
positions) and on `orders` (working orders, the leader's protective stop) is kept per account
and reused while those fields are equal to the last tick's; everything that depends on the
snapshot's time (data age, stale, reachable, a position's age) or on money is recomputed every
tick, from these facts.

Equal means equal as the rules could tell: the same values of the same types, and a zero of the
same sign (`-0.0 == 0.0`, yet a message shows them differently).

The one derivation of an account's exposure per instrument family (`family_exposure`) and of
whether an account can take orders (`reachable`) lives here: the engine, the pre-trade gate, the
enforcer and the built-in copier all read them, so none sums positions its own way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .instruments import Catalog, Instrument
from .model import Account, Order, Position, signed_zeros_differ
from .namespace import FLAT_FIELDS, Clock, PositionView

_WORKING = ("working", "pending")
# A flat family's view: expressions cannot write, so one flat view serves all.
FLAT_VIEWS = {flag: PositionView(**{**FLAT_FIELDS, "overnight": flag}) for flag in (False, True)}


@dataclass(slots=True)
class Family:
    """One account's exposure in one instrument family (`family_exposure`).

    Facts are slotted dataclasses, as views are (namespace.py): a tick stores into them (the
    positions they were derived from, a view on first use), and a slot takes a store at half
    the cost of a msgspec Struct (whose stores are checked)."""

    qty: int  # signed contracts, of whatever sizes
    equiv: float  # signed size in full-size contracts
    instrument: Instrument  # the main contract: the largest exposure (the first among equals)
    symbol: str  # the main contract as the broker names it
    avg_price: float  # the main contract's
    opened_at: datetime | None  # the main contract's
    # signed contracts per contract, as the broker names them (an order goes back in its words)
    symbols: dict[str, int] = field(default_factory=dict)
    minis: int = 0  # full-size contracts held, long or short
    micros: int = 0  # micro contracts held, long or short
    # derived on first use and kept while the family is reused (see `position_view`)
    trade: str | None = None  # the leader trade label: "<side>@<opened_at>"
    view: Any = None  # its PositionView (not declared overnight)
    night_view: Any = None  # the same, declared overnight

    @property
    def side(self) -> int:
        """1 long, -1 short (a family whose contracts net to nothing counts as short, as
        hedges and trade counts always took it)."""
        return 1 if self.equiv > 0 else -1

    def trade_label(self) -> str:
        """What identifies a leader's trade: its side and when it opened ("" if unknown)."""
        label = self.trade
        if label is None:
            opened = self.opened_at
            label = self.trade = (f"{(self.equiv > 0) - (self.equiv < 0)}@{opened.isoformat()}"
                                  if opened else "")
        return label


def position_view(family: Family | None, clock: Clock, overnight: bool) -> Any:
    """The `leader` / `follower` view of a family, built once per family and flag: its `age`
    follows the engine's clock (`PositionView`), so a later tick changes nothing in it."""
    if family is None:
        return FLAT_VIEWS[overnight]
    view = family.night_view if overnight else family.view
    if view is None:
        view = PositionView(  # positional, in FIELDS["position"] order
            family.qty, "long" if family.equiv > 0 else "short", False,
            round(family.equiv, 6), family.avg_price, family.opened_at, 0.0, family.symbol,
            overnight, clock)
        if overnight:
            family.night_view = view
        else:
            family.view = view
    return view


def _same_float(a: float, b: float) -> bool:
    return a == b and type(a) is type(b) and not signed_zeros_differ(a, b)


POSITION_FLOATS = ("avg_price",)  # a position's float fields (what `same_records` checks)
ORDER_FLOATS = ("limit_price", "stop_price")  # an order's


def same_records(a: tuple[Any, ...], b: tuple[Any, ...], floats: tuple[str, ...]) -> bool:
    """Do two tuples of records (positions, orders) say exactly the same? One comparison in C
    of each whole record, then, for its `floats` (POSITION_FLOATS, ORDER_FLOATS), what ==
    cannot tell (the type of a number, the sign of a zero). The engine calls it every tick for
    every account's positions and orders."""
    if a is b:
        return True
    if len(a) != len(b):
        return False
    for p, q in zip(a, b):  # noqa: B905 - the lengths are equal (above); strict costs a check
        if p is q:
            continue
        pd, qd = p.__dict__, q.__dict__
        if pd != qd:
            return False
        for name in floats:
            value = pd[name]
            # equal already: only a zero (its sign) or a type can still differ
            if value is not None and (value == 0 or type(value) is not type(qd[name])) and \
                    not _same_float(value, qd[name]):
                return False
    return True


@dataclass(slots=True)
class PositionFacts:
    """What an account's positions (and declared overnight positions) say, at any time."""

    firm: str | None  # the account's firm, with its positions (what hedges follow from)
    positions: tuple[Position, ...]  # what these facts were derived from
    overnight: tuple[str, ...]
    families: dict[str, Family]
    contracts: int
    minis: int
    micros: int
    undeclared: int
    first_seen: tuple[str, ...]  # keys of the engine's first-seen table these facts use
    family_names: Any  # families.keys() (a live view): what an account target's rules are about
    overnight_families: Any = None  # families declared overnight (pair views), on first use

    def overnight_set(self, catalog: Catalog) -> Any:
        found = self.overnight_families
        if found is None:
            found = self.overnight_families = frozenset(
                catalog.parse(s).family for s in self.overnight) if self.overnight else ()
        return found


FamilyExposure = Family  # the name the issue gives it: one account's exposure in one family


def family_exposure(positions: Iterable[Position], catalog: Catalog) -> dict[str, Family]:
    """An account's exposure per instrument family: the one place positions are summed.

    Contracts of one family (NQ and MNQ, two expiries) add up in full-size contracts
    (`equiv`) and in contracts (`qty`); the main contract is the one with the largest
    exposure. Positions of 0 contracts are left out; a family whose contracts net to nothing
    is kept (it still holds contracts)."""
    parse = catalog.parse
    families: dict[str, Family] = {}
    for position in positions:
        p = position.__dict__  # several times faster than attributes of a pydantic model
        qty = p["qty"]
        if qty == 0:
            continue
        symbol = p["instrument"]
        instrument = parse(symbol)
        equiv = qty * instrument.size
        family = families.get(instrument.family)
        if family is None:
            family = families[instrument.family] = Family(
                qty, equiv, instrument, symbol, p["avg_price"], p["opened_at"], {symbol: qty})
        else:
            main_is_new = abs(equiv) > abs(family.equiv)
            family.qty += qty
            family.equiv += equiv
            family.symbols[symbol] = family.symbols.get(symbol, 0) + qty
            if main_is_new:
                family.instrument, family.symbol = instrument, symbol
                family.avg_price, family.opened_at = p["avg_price"], p["opened_at"]
        if instrument.micro:
            family.micros += abs(qty)
        else:
            family.minis += abs(qty)
    return families


def contracts_for(equiv: float, size: float) -> int:
    """Whole contracts of `size` for an exposure of `equiv` full-size contracts: the nearest,
    a half away from zero (2.5 -> 3, -0.5 -> -1). The one rounding of a follower's share, used
    by the engine's catch-up, the enforcer and the copiers alike, so they never disagree on
    what a follower should hold."""
    units = abs(equiv) / size
    whole = math.floor(units + 0.5 + 1e-9)  # 1e-9: 0.15 / 0.1 is 1.4999999999999998
    return whole if equiv >= 0 else -whole


def account_exposure(account: Account, catalog: Catalog) -> dict[str, Family]:
    """`family_exposure` of an account's positions."""
    return family_exposure(account.__dict__["positions"], catalog)


def staleness(connected: bool, updated_at: datetime | None, now: datetime,
              stale_after: float) -> tuple[float, bool, bool]:
    """(data age in seconds, stale, reachable) of an account at `now`: the one rule for when
    an account may be sent orders — connected, and its data at most `stale_after` old."""
    age = (now - updated_at).total_seconds() if updated_at else 0.0  # Account.data_age
    stale = age > stale_after
    return age, stale, connected and not stale


def reachable(account: Account | None, now: datetime, stale_after: float) -> bool:
    """May `account` be sent orders at `now` (`staleness`)? An unknown account may not."""
    if account is None:
        return False
    a = account.__dict__
    return staleness(a["connected"], a["updated_at"], now, stale_after)[2]


def derive_positions(account_id: str, firm: str | None, positions: tuple[Position, ...],
                     overnight_symbols: tuple[str, ...], catalog: Catalog,
                     first_seen: dict[str, tuple[int, datetime]],
                     now: datetime) -> PositionFacts:
    """An account's position facts. A family whose opening time the broker did not give is
    dated by when the engine first saw it (side included), recorded in `first_seen`."""
    families = family_exposure(positions, catalog)
    minis = micros = 0
    seen: tuple[str, ...] = ()
    for name, family in families.items():
        minis += family.minis
        micros += family.micros
        if family.opened_at is not None:
            continue
        # the broker did not say when the position opened: use when we first saw it
        key = f"{account_id}|{name}"
        seen += (key,)
        side = (family.equiv > 0) - (family.equiv < 0)
        first = first_seen.get(key)
        if first is None or first[0] != side:
            first = first_seen[key] = (side, now)
        family.opened_at = first[1]
    if overnight_symbols:
        parse = catalog.parse
        overnight = {parse(s).symbol for s in overnight_symbols}
        undeclared = sum(1 for p in positions if p.__dict__["qty"] != 0 and
                         parse(p.__dict__["instrument"]).symbol not in overnight)
    else:  # every position held (a loop: cheaper than a comprehension for one or two)
        undeclared = 0
        for position in positions:
            if position.__dict__["qty"] != 0:
                undeclared += 1
    return PositionFacts(firm, positions, overnight_symbols, families, minis + micros, minis,
                         micros, undeclared, seen, families.keys())


def same_sides(a: PositionFacts, b: PositionFacts) -> bool:
    """Do two accounts' facts hold the same sides of the same families at the same firm? That
    is all an account's hedges follow from (`engine.targets._mark_hedges`): while every
    account's facts say the same sides, the last tick's hedge marks stand, whatever else moved
    (a quantity, a price, when a position opened)."""
    if a.firm != b.firm:
        return False
    ours, theirs = a.families, b.families
    if len(ours) != len(theirs):
        return False
    for name, family in ours.items():
        other = theirs.get(name)
        if other is None or (family.equiv > 0) != (other.equiv > 0):
            return False
    return True


@dataclass(slots=True)
class OrderFacts:
    """What an account's orders say: how many are working, and (for a leader) the protective
    stop per family, found on first use."""

    orders: tuple[Order, ...]
    working: int
    stops: dict[str, float | None] = field(default_factory=dict)

    def stop(self, family: str, catalog: Catalog) -> float | None:
        """The stop price of the first working stop order in `family` (a leader's protective
        stop, which a catch-up copies)."""
        stops = self.stops
        if family in stops:
            return stops[family]
        found = None
        for order in self.orders:
            if order.type in ("stop", "stop_limit") and order.stop_price is not None and \
                    order.status in _WORKING and \
                    catalog.parse(order.instrument).family == family:
                found = order.stop_price
                break
        stops[family] = found
        return found


NO_ORDERS = OrderFacts((), 0)


def derive_orders(orders: tuple[Order, ...]) -> OrderFacts:
    if not orders:
        return OrderFacts(orders, 0)
    return OrderFacts(orders, sum(1 for o in orders if o.__dict__["status"] in _WORKING))
