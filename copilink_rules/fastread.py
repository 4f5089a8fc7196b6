"""The fast path of reading a timeline line: msgspec Structs that mirror the snapshot models.

`FastReader.read(line)` decodes one JSON line with msgspec into Structs that carry the same
constraints as the pydantic models in `model.py` (unknown fields forbidden, strict numbers and
their bounds, literals), checks what msgspec cannot (times, the account-level rules and the
cross-field checks of `snapshots.check_snapshot`) with the same functions and conditions, and
builds the pydantic objects without validating them again: the result equals (==, and field by
field) what `Snapshot.model_validate_json` gives for the line, including `model_fields_set`.

It never reports a problem. On any doubt (a line msgspec refuses, a time the standard library
cannot read, a bound, an unknown instrument, a duplicate id ...) `read` returns None and the
caller reads the line again with the strict path, whose messages (file:line: field: what is
wrong) are the ones a user sees. So the fast path may refuse more than the strict one (which
costs only time) but must never accept a line the strict path refuses, nor read one differently:
tests/test_fast_reader.py checks both, on every example timeline and on generated lines.

What the previous line had unchanged at the same place is reused, not built again: an account
whose data did not change is the same `Account` object as on the previous line, a position held
for an hour one `Position` (equal field for field, the sign of a zero included). The models are
frozen, so sharing is invisible except to `is`; the engine may use that to keep what it derived
from an account.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType
from pydantic import BaseModel

from .errors import InstrumentError
from .instruments import Catalog
from .model import (
    MAX_AMOUNT,
    MAX_QTY,
    MAX_RATIO,
    Account,
    Order,
    Position,
    Quote,
    Snapshot,
    _utc_from_text,
    signed_zeros_differ,
)

# The constraints of model.py's Amount, Quantity and FiniteFloat. msgspec's float accepts a JSON
# integer (as pydantic's strict float does) and refuses a bool, a string and NaN/Infinity
# tokens; its int refuses a bool and 2.0 (as pydantic's strict int does). An infinity (1e400)
# fails the bounds.
_Amount = Annotated[float, Meta(ge=-MAX_AMOUNT, le=MAX_AMOUNT)]
_Quantity = Annotated[int, Meta(ge=-MAX_QTY, le=MAX_QTY)]
_OrderQuantity = Annotated[int, Meta(gt=0, le=MAX_QTY)]
_Ratio = Annotated[float, Meta(gt=0, le=MAX_RATIO)]
_Size = Annotated[float, Meta(gt=0, le=MAX_AMOUNT)]
_Id = Annotated[str, Meta(min_length=1)]

# Every field a model gives a default is UNSET here when the line leaves it out, so that the
# built model's `model_fields_set` is what pydantic's would be. Times stay text: they are read
# by model.py's own function, which is what the strict path uses.


class _Quote(Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    bid: _Amount | UnsetType | None = UNSET
    ask: _Amount | UnsetType | None = UNSET
    last: _Amount | UnsetType | None = UNSET


class _Position(Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    instrument: str
    qty: _Quantity
    avg_price: _Amount | UnsetType = UNSET
    opened_at: str | UnsetType | None = UNSET


class _Order(Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    id: str
    instrument: str
    side: Literal["buy", "sell"]
    qty: _OrderQuantity
    type: Literal["market", "limit", "stop", "stop_limit"] | UnsetType = UNSET
    limit_price: _Amount | UnsetType | None = UNSET
    stop_price: _Amount | UnsetType | None = UNSET
    status: Literal["working", "pending", "filled", "cancelled", "rejected"] | UnsetType = UNSET


class _Account(Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    id: _Id
    role: Literal["leader", "follower"]
    leader: str | UnsetType | None = UNSET
    ratio: _Ratio | UnsetType = UNSET
    firm: str | UnsetType | None = UNSET
    size: _Size | UnsetType | None = UNSET
    connected: bool | UnsetType = UNSET
    copier: Literal["active", "paused"] | UnsetType = UNSET
    updated_at: str | UnsetType | None = UNSET
    balance: _Amount | UnsetType = UNSET
    realized_pnl: _Amount | UnsetType = UNSET
    unrealized_pnl: _Amount | UnsetType = UNSET
    positions: tuple[_Position, ...] | UnsetType = UNSET
    orders: tuple[_Order, ...] | UnsetType = UNSET
    overnight: tuple[str, ...] | UnsetType = UNSET


class _Snapshot(Struct, forbid_unknown_fields=True, gc=False):
    time: str
    quotes: dict[str, _Quote] | UnsetType = UNSET
    accounts: tuple[_Account, ...] | UnsetType = UNSET


class _Fallback(Exception):  # noqa: N818 - a signal, not an error: read the line strictly
    pass


def _time(text: str) -> datetime:
    """`text` as the strict path reads it (the same cached function); _Fallback otherwise."""
    try:
        moment = _utc_from_text(text)
    except ValueError:  # outside 2000-2100: the strict path says so
        raise _Fallback from None
    if isinstance(moment, str):  # not an ISO time with an offset: pydantic decides
        raise _Fallback
    return moment


# Which of a struct's defaulted fields the line left out (UNSET), in field order. Written out
# (a generic loop costs more than the rest of building an object); tests/test_fast_reader.py
# checks each against the struct's fields.
def _quote_left_out(s: _Quote) -> tuple[bool, ...]:
    return (s.bid is UNSET, s.ask is UNSET, s.last is UNSET)


def _position_left_out(s: _Position) -> tuple[bool, ...]:
    return (s.avg_price is UNSET, s.opened_at is UNSET)


def _order_left_out(s: _Order) -> tuple[bool, ...]:
    return (s.type is UNSET, s.limit_price is UNSET, s.stop_price is UNSET, s.status is UNSET)


def _account_left_out(s: _Account) -> tuple[bool, ...]:
    return (s.leader is UNSET, s.ratio is UNSET, s.firm is UNSET, s.size is UNSET,
            s.connected is UNSET, s.copier is UNSET, s.updated_at is UNSET, s.balance is UNSET,
            s.realized_pnl is UNSET, s.unrealized_pnl is UNSET, s.positions is UNSET,
            s.orders is UNSET, s.overnight is UNSET)


def _snapshot_left_out(s: _Snapshot) -> tuple[bool, ...]:
    return (s.quotes is UNSET, s.accounts is UNSET)


S = TypeVar("S", bound=Struct)
_asdict = msgspec.structs.asdict
_new = object.__new__
_set = object.__setattr__


class _Maker(Generic[S]):
    """The model's __dict__ and fields set for one mirror struct, as model_validate leaves them:
    the line's values, the model's defaults for what it left out, the fields it gave.

    Models built with the same fields left out share one fields-set object: pydantic never
    changes it in place on a frozen model (model_copy copies it first)."""

    def __init__(self, model: type[BaseModel], mirror: type[S],
                 left_out: Callable[[S], tuple[bool, ...]]) -> None:
        self.model = model
        self.names = tuple(model.model_fields)
        self.optional = tuple(n for n, f in model.model_fields.items() if not f.is_required())
        assert mirror.__struct_fields__ == self.names, (model, mirror)
        self.defaults: dict[str, Any] = {
            name: model.model_fields[name].get_default(call_default_factory=True)
            for name in self.optional}
        self.left_out = left_out
        self._patterns: dict[tuple[bool, ...], tuple[set[str], dict[str, Any]]] = {}

    def values(self, struct: S) -> tuple[dict[str, Any], set[str]]:
        values = _asdict(struct)
        pattern = self.left_out(struct)
        entry = self._patterns.get(pattern)
        if entry is None:
            entry = self._pattern(pattern)
        given, fill = entry
        if fill:
            values.update(fill)
        return values, given

    def _pattern(self, pattern: tuple[bool, ...]) -> tuple[set[str], dict[str, Any]]:
        left_out = [n for n, out in zip(self.optional, pattern, strict=True) if out]
        entry = self._patterns[pattern] = (set(self.names).difference(left_out),
                                           {n: self.defaults[n] for n in left_out})
        return entry


# pydantic's own slots of a model instance, set as model_construct sets them
_SET_FIELDS_SET = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_SET_EXTRA = BaseModel.__dict__["__pydantic_extra__"].__set__
_SET_PRIVATE = BaseModel.__dict__["__pydantic_private__"].__set__


M = TypeVar("M", bound=BaseModel)


def _build(model: type[M], values: dict[str, Any], fields_set: set[str]) -> M:
    """An instance of `model` with these values, as model_construct would make it (no
    validation: the caller validated them)."""
    built: M = _new(model)
    _set(built, "__dict__", values)
    _SET_FIELDS_SET(built, fields_set)
    _SET_EXTRA(built, None)
    _SET_PRIVATE(built, None)
    return built


_QUOTE = _Maker(Quote, _Quote, _quote_left_out)
_POSITION = _Maker(Position, _Position, _position_left_out)
_ORDER = _Maker(Order, _Order, _order_left_out)
_ACCOUNT = _Maker(Account, _Account, _account_left_out)
_SNAPSHOT = _Maker(Snapshot, _Snapshot, _snapshot_left_out)


def _zeros_agree(new: Struct, old: Struct, names: tuple[str, ...]) -> bool:
    """Whether two equal structs also agree on the sign of each zero among these float fields:
    -0.0 == 0.0, and a reused object must keep the sign the strict path would read."""
    for name in names:
        value = getattr(new, name)
        if value is not None and signed_zeros_differ(value, getattr(old, name)):
            return False
    return True


def _items_agree(new: tuple[Struct, ...], old: tuple[Struct, ...], names: tuple[str, ...]) -> bool:
    return all(_zeros_agree(one, other, names) for one, other in zip(new, old, strict=True))


_QUOTE_FLOATS = ("bid", "ask", "last")
_POSITION_FLOATS = ("avg_price",)
_ORDER_FLOATS = ("limit_price", "stop_price")
_ACCOUNT_FLOATS = ("balance", "realized_pnl", "unrealized_pnl")  # ratio and size are > 0


def _account_zeros_agree(new: _Account, old: _Account) -> bool:
    """_zeros_agree for two equal account structs, their positions and orders included."""
    if (new.balance == 0.0 or new.realized_pnl == 0.0 or new.unrealized_pnl == 0.0) and \
            not _zeros_agree(new, old, _ACCOUNT_FLOATS):
        return False
    if new.positions is not UNSET and old.positions is not UNSET:
        for position in new.positions:
            if position.avg_price == 0.0:
                return _items_agree(new.positions, old.positions, _POSITION_FLOATS) and (
                    new.orders is UNSET or old.orders is UNSET
                    or _items_agree(new.orders, old.orders, _ORDER_FLOATS))
    return new.orders is UNSET or old.orders is UNSET or not new.orders \
        or _items_agree(new.orders, old.orders, _ORDER_FLOATS)


class FastReader:
    """Reads timeline lines fast, or says to read them strictly (`read` returns None).

    One reader per timeline: it remembers the instrument symbols the catalog parsed and the
    previous line it read, whose objects it reuses where a line repeats them unchanged (the
    same account, position, order or quote at the same place, equal field for field)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._decoder = msgspec.json.Decoder(_Snapshot)
        self._symbols: set[str] = set()
        self._last: tuple[_Snapshot, Snapshot] | None = None  # the structs and the snapshot

    def read(self, line: str) -> Snapshot | None:
        """The snapshot of one timeline line, equal to what the strict path reads; None when
        the line must be read by the strict path (which then accepts it or says why not)."""
        try:
            raw = self._decoder.decode(line)
        except (msgspec.MsgspecError, ValueError, RecursionError):
            return None
        try:
            snapshot = self._snapshot(raw, self._last)
        except _Fallback:
            return None
        self._last = (raw, snapshot)
        return snapshot

    def _snapshot(self, raw: _Snapshot, last: tuple[_Snapshot, Snapshot] | None) -> Snapshot:
        values, given = _SNAPSHOT.values(raw)
        moment = values["time"] = _time(raw.time)
        symbols = self._symbols
        if raw.quotes is UNSET:
            values["quotes"] = {}  # a dict of its own, not the shared default
        else:
            old_raw: dict[str, _Quote] = {}
            old: dict[str, Quote] = {}
            if last is not None and last[0].quotes is not UNSET:
                old_raw, old = last[0].quotes, last[1].quotes
            quotes: dict[str, Quote] = {}
            for name, quote in raw.quotes.items():
                previous = old_raw.get(name)
                if previous == quote and _zeros_agree(quote, previous, _QUOTE_FLOATS):
                    quotes[name] = old[name]
                    continue
                if name not in symbols:
                    self._symbol(name)
                quotes[name] = _build(Quote, *_QUOTE.values(quote))
            values["quotes"] = quotes
        if raw.accounts is not UNSET:
            old_raw_accounts: tuple[_Account, ...] = ()
            old_accounts: tuple[Account, ...] = ()
            if last is not None and last[0].accounts is not UNSET:
                old_raw_accounts, old_accounts = last[0].accounts, last[1].accounts
            reused = len(old_raw_accounts)
            accounts = []
            for i, struct in enumerate(raw.accounts):
                if i < reused:
                    if old_raw_accounts[i] == struct and \
                            _account_zeros_agree(struct, old_raw_accounts[i]):
                        accounts.append(old_accounts[i])
                        continue
                    accounts.append(self._account(struct, old_raw_accounts[i], old_accounts[i]))
                else:
                    accounts.append(self._account(struct, None, None))
            values["accounts"] = built = tuple(accounts)
            self._check(raw.accounts, built, moment)
        return _build(Snapshot, values, given)

    def _account(self, raw: _Account, old_raw: _Account | None, old: Account | None) -> Account:
        values, given = _ACCOUNT.values(raw)
        if raw.role == "leader" and values["leader"] is not None:
            raise _Fallback  # the model's own validator refuses it
        if raw.updated_at is not UNSET and raw.updated_at is not None:
            values["updated_at"] = _time(raw.updated_at)
        if raw.positions is not UNSET and raw.positions:
            if old_raw is not None and old is not None and old_raw.positions == raw.positions \
                    and _items_agree(raw.positions, old_raw.positions, _POSITION_FLOATS):
                values["positions"] = old.positions
            else:
                values["positions"] = tuple([self._position(p) for p in raw.positions])
        if raw.orders is not UNSET and raw.orders:
            if old_raw is not None and old is not None and old_raw.orders == raw.orders \
                    and _items_agree(raw.orders, old_raw.orders, _ORDER_FLOATS):
                values["orders"] = old.orders
            else:
                values["orders"] = tuple([self._order(o) for o in raw.orders])
        if raw.overnight is not UNSET:
            for text in raw.overnight:
                if text not in self._symbols:
                    self._symbol(text)
        return _build(Account, values, given)

    def _position(self, raw: _Position) -> Position:
        if raw.instrument not in self._symbols:
            self._symbol(raw.instrument)
        values, given = _POSITION.values(raw)
        if raw.opened_at is not UNSET and raw.opened_at is not None:
            values["opened_at"] = _time(raw.opened_at)
        return _build(Position, values, given)

    def _order(self, raw: _Order) -> Order:
        if raw.instrument not in self._symbols:
            self._symbol(raw.instrument)
        return _build(Order, *_ORDER.values(raw))

    # --- snapshots.check_snapshot's conditions, without the messages -----------------------

    def _symbol(self, text: str) -> None:
        try:
            self.catalog.parse(text)
        except InstrumentError:
            raise _Fallback from None
        self._symbols.add(text)

    @staticmethod
    def _check(raw: tuple[_Account, ...], accounts: tuple[Account, ...],
               moment: datetime) -> None:
        if len({a.id for a in raw}) != len(raw):
            raise _Fallback  # a duplicate id
        leaders = [a.id for a in raw if a.role == "leader"]
        for struct, account in zip(raw, accounts, strict=True):
            if struct.role == "follower":
                if struct.leader is UNSET or struct.leader is None:
                    if len(leaders) != 1:
                        raise _Fallback
                elif struct.leader not in leaders:
                    raise _Fallback
            if struct.updated_at is not UNSET and struct.updated_at is not None and \
                    account.updated_at is not None and account.updated_at > moment:
                raise _Fallback
