"""The broker-neutral ports: every interface of the adapter family, in one module.

    AccountFeed   keeps accounts, positions, working orders, quotes, cash/P&L, connection state
                  and per-account data age current (pushed where the broker pushes, polled
                  where it does not); `snapshot()` reads that state and never waits on the network
    OrderPort     close a position, cancel an order by the broker's id, cancel the working
                  orders in an instrument, place market and stop orders carrying a per-attempt
                  client tag, and reconcile: what became of a tag (`find_tag`)
    Broker        an AccountFeed and an OrderPort with a lifecycle (`connect`, `health`, `close`)
    CopierPort    pause / resume / skip-entry of the copier, which is not the broker: the sim's
                  copier, or an `external` one that only a person can steer (copier.py)
    ContractMap   catalog symbol <-> the broker's own name or id for a contract

Errors: an adapter raises the typed `BrokerError`s of errors.py (rejected, unavailable, rate
limited, authentication failed) or returns a `BrokerAnswer` saying the same; the enforcer turns
either into an answer with `call_broker`, so no broker error ever escapes a tick.

Every order carries a tag (`CLR-000007`, a retry `CLR-000007~2`, its stop `CLR-000007-stop`),
unique per attempt — ProjectX refuses a reused tag forever — so a restarted engine finds its
own orders by tag and never sends one twice.

Adapters are registered by name below; each lives in its own module beside this one, with a
pydantic `Settings` model (unknown keys refused) and a `create(settings, accounts)` factory.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel

from copilink_rules.errors import (
    AuthFailed,
    BrokerError,
    BrokerUnavailable,
    InstrumentError,
    OrderRejected,
    RateLimited,
)
from copilink_rules.fastread import FastReader
from copilink_rules.instruments import Catalog, default_catalog
from copilink_rules.model import Account, Snapshot, build_model

AnswerStatus = Literal["accepted", "filled", "rejected", "unavailable", "rate_limited",
                       "auth_failed", "manual"]
OrderState = Literal["working", "filled", "cancelled", "rejected"]
HealthState = Literal["connected", "connecting", "disconnected", "auth_failed"]
Side = Literal["buy", "sell"]


@dataclass(frozen=True)
class BrokerAnswer:
    """What the broker said about one request.

    accepted      it took the request (the order may still be working)
    filled        done already (a market order filled, a cancel confirmed, already flat)
    rejected      the broker said no; `reason` is its reason
    unavailable   it could not be reached (network, timeout, 5xx): not a refusal, try later
    rate_limited  over its request budget: wait `retry_after` seconds, never a burst of retries
    auth_failed   credentials refused or session ended: stop sending
    manual        no machine can do it (an external copier): `reason` tells the trader what to do
    """

    status: AnswerStatus
    reason: str = ""
    order_id: str | None = None
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("accepted", "filled")


@dataclass(frozen=True)
class OrderReport:
    """What became of a tagged order, as the broker records it (reconciliation)."""

    tag: str
    state: OrderState
    account: str
    instrument: str | None = None
    order_id: str | None = None
    filled_qty: int = 0
    reason: str = ""

    @property
    def final(self) -> bool:
        return self.state != "working"

    def answer(self) -> BrokerAnswer:
        """The report as an answer to the command that placed the order."""
        return BrokerAnswer(_REPORT_ANSWER[self.state], self.reason, self.order_id)


_REPORT_ANSWER: dict[str, AnswerStatus] = {"working": "accepted", "filled": "filled",
                                            "cancelled": "accepted", "rejected": "rejected"}


@dataclass(frozen=True)
class Health:
    """The adapter's connection to the broker as a whole (per-account state is in snapshots)."""

    state: HealthState
    detail: str = ""
    since: datetime | None = None

    @property
    def ok(self) -> bool:
        return self.state == "connected"


@dataclass(frozen=True)
class AccountSpec:
    """An account the adapter is told to watch (copilink.yaml `accounts:`)."""

    id: str  # the broker's account name
    role: Literal["leader", "follower"]
    leader: str | None = None
    ratio: float = 1.0
    firm: str | None = None
    size: float | None = None
    instrument: str | None = None

    def snapshot_fields(self) -> dict[str, Any]:
        """What the configuration says of the account, as a snapshot's account fields: the
        adapter adds what the broker says (connection, money, positions, orders)."""
        data: dict[str, Any] = {"id": self.id, "role": self.role, "firm": self.firm}
        if self.size is not None:
            data["size"] = self.size
        if self.role == "follower":
            data["ratio"] = self.ratio
            if self.leader:
                data["leader"] = self.leader
        return data


@runtime_checkable
class AccountFeed(Protocol):
    """The world as the broker last told it, kept current in the background."""

    name: str

    def snapshot(self) -> Snapshot:
        """Accounts, positions, working orders, quotes, connection state and data age, as
        last received; never waits on the network. An account the broker stopped updating
        keeps its old `updated_at` (so it goes stale); one it never reported is disconnected."""

    def contracts(self) -> dict[str, str]:
        """Follower -> the contract it trades when not the leader's (MNQH6 for a follower
        that copies NQ as micros), as far as the broker knows."""


@runtime_checkable
class OrderPort(Protocol):
    """Commands to the broker. Each returns the broker's answer or raises a BrokerError."""

    def close_position(self, account: str, instrument: str | None, tag: str) -> BrokerAnswer:
        """Close the position in `instrument` (every instrument when None) with the broker's
        own close-position command where it has one (it closes what is held when it runs,
        so it can never cross through zero), and cancel the working orders there."""

    def cancel_order(self, account: str, order_id: str, tag: str) -> BrokerAnswer:
        """Cancel one order by the broker's id."""

    def cancel_orders(self, account: str, instrument: str | None, tag: str) -> BrokerAnswer:
        """Cancel the working orders in `instrument` (all instruments when None), one by one:
        never a broker-wide cancel-all, which hits other accounts too."""

    def place_order(self, account: str, instrument: str, side: Side, qty: int,
                    order_type: Literal["market", "stop"], tag: str,
                    stop_price: float | None = None) -> BrokerAnswer:
        """Place a market or stop order carrying `tag`."""

    def find_tag(self, tag: str) -> OrderReport | None:
        """What became of the command tagged `tag`; None when the broker never received it."""


@runtime_checkable
class Broker(AccountFeed, OrderPort, Protocol):
    """A broker connection: an account feed and an order port with a lifecycle."""

    def connect(self, timeout: float = 10.0) -> None:
        """Log in, subscribe and fill the first snapshot; raises AuthFailed or
        BrokerUnavailable saying exactly what failed. Reconnects on its own afterwards."""

    def health(self) -> Health:
        """The connection now (connected, reconnecting, logged out...)."""

    def close(self) -> None:
        """Stop background work and close connections; safe to call twice."""


@runtime_checkable
class CopierPort(Protocol):
    """The trade copier, which is not the broker: no broker has a `pause_copier`."""

    name: str
    steerable: bool  # False: pause/resume/skip become instructions to the trader

    def pause(self, follower: str, tag: str) -> BrokerAnswer:
        """Stop copying the leader onto `follower`."""

    def resume(self, follower: str, tag: str) -> BrokerAnswer:
        """Copy onto `follower` again."""

    def skip_entry(self, follower: str, instrument: str, tag: str) -> BrokerAnswer:
        """Leave `follower` out of the leader's current trade in `instrument`."""


@runtime_checkable
class ContractMap(Protocol):
    """Catalog symbols <-> the broker's names for contracts."""

    def to_broker(self, symbol: str) -> str:
        """The broker's name (or id) for a catalog symbol."""

    def from_broker(self, name: str) -> str:
        """The catalog symbol for the broker's name (or id); InstrumentError if unknown."""


# --- what a broker does not say ----------------------------------------------------------------


class SnapshotBuilder:
    """An adapter's data (a dict as `Snapshot.model_validate` takes it) made into its
    snapshot, once a tick: by the fast reader (`FastReader.convert`: msgspec checks the same
    constraints at a fraction of pydantic's cost, and an account, position, order or quote
    unchanged since the last tick is the same object again, which the engine tells at once),
    else by `Snapshot.model_validate`, whose errors are the ones an adapter reports. The two
    give equal snapshots (tests/test_adapter_snapshots.py). One per adapter: it remembers the last
    snapshot it built. Two threads may call it at once (an adapter's feed lock need not be
    held): each call reads the last snapshot once and replaces it in one assignment, and
    reuses an old object only where the data equals what built it."""

    def __init__(self, catalog: Catalog | None = None) -> None:
        self._reader = FastReader(catalog or default_catalog())

    def __call__(self, data: dict[str, Any]) -> Snapshot:
        snapshot = self._reader.convert(data)
        return snapshot if snapshot is not None else Snapshot.model_validate(data)


def mark_to_market(snapshot: Snapshot, catalog: Catalog | None = None) -> Snapshot:
    """`snapshot` with each account's unrealized P&L worked out from its positions and the
    snapshot's quotes, for brokers that do not report it (NinjaTrader, Tradovate without the
    cash-balance poll, ProjectX): without it, equity would ignore an open loss and an
    intraday trailing drawdown could not fire before the position closed. A long position is
    valued at the bid, a short at the ask (what closing it would get), else the last trade; a
    position with no quote at all counts 0 (unknown, never a guess)."""
    catalog = catalog or default_catalog()
    prices: dict[str, tuple[float | None, float | None, float | None]] = {}
    for symbol, quote in snapshot.quotes.items():
        try:
            canonical = catalog.parse(symbol).symbol
        except InstrumentError:
            continue
        prices[canonical] = (quote.bid, quote.ask, quote.last)
    accounts = []
    changed = False
    for account in snapshot.accounts:
        open_pnl = 0.0
        for position in account.positions:
            if not position.qty:
                continue
            try:
                instrument = catalog.parse(position.instrument)
            except InstrumentError:
                continue
            bid, ask, last = prices.get(instrument.symbol, (None, None, None))
            price = (bid if position.qty > 0 else ask) or last
            if price is None:
                continue
            open_pnl += position.qty * (price - position.avg_price) / instrument.tick_size * \
                instrument.tick_value
        if open_pnl and not account.unrealized_pnl:
            # model_copy(update=...), as pydantic makes it, without its cost every tick
            accounts.append(build_model(
                Account, {**account.__dict__, "unrealized_pnl": round(open_pnl, 2)},
                account.model_fields_set | {"unrealized_pnl"}))
            changed = True
        else:
            accounts.append(account)
    if not changed:
        return snapshot
    return build_model(Snapshot, {**snapshot.__dict__, "accounts": tuple(accounts)},
                       snapshot.model_fields_set | {"accounts"})


# --- errors as answers -----------------------------------------------------------------------


def answer_from_error(exc: BaseException) -> BrokerAnswer:
    """The answer a broker error stands for; anything unexpected counts as unavailable
    (we do not know that the broker refused, so it is never counted as a refusal)."""
    if isinstance(exc, OrderRejected):
        return BrokerAnswer("rejected", str(exc))
    if isinstance(exc, RateLimited):
        return BrokerAnswer("rate_limited", str(exc), retry_after=exc.retry_after)
    if isinstance(exc, AuthFailed):
        return BrokerAnswer("auth_failed", str(exc))
    if isinstance(exc, BrokerUnavailable | BrokerError):
        return BrokerAnswer("unavailable", str(exc))
    return BrokerAnswer("unavailable", f"broker error: {type(exc).__name__}: {exc}")


# seconds between two requests to cancel an order the broker still works (a cancel refused or
# unanswered is asked again, never in a burst)
CANCEL_AGAIN = 1.0


def find_tag(broker: OrderPort, tag: str) -> OrderReport | None:
    """What the broker says became of `tag`; when it cannot say (an error), the order counts
    as still working: asked again later, never taken for gone."""
    try:
        return broker.find_tag(tag)
    except Exception:  # noqa: BLE001 - unknown counts as "ask again next tick"
        logging.getLogger("copilink_rules.adapters").warning("could not ask the broker about "
                                                             "%s", tag)
        return OrderReport(tag, "working", "")


def call_broker(request: Callable[[], BrokerAnswer]) -> BrokerAnswer:
    """Run one broker request; whatever it raises comes back as an answer."""
    try:
        return request()
    except Exception as exc:  # noqa: BLE001 - a broker error is an answer, never a crash
        return answer_from_error(exc)


# --- the registry ----------------------------------------------------------------------------

# name -> the module implementing it (imported only when used: a trader on NinjaTrader never
# loads the WebSocket stack)
_MODULES: dict[str, str] = {
    "sim": "copilink_rules.adapters.sim",
    "fake": "copilink_rules.adapters.fake",
    "ninjatrader": "copilink_rules.adapters.ninjatrader",
    "tradovate": "copilink_rules.adapters.tradovate",
    "projectx": "copilink_rules.adapters.projectx",
}


def adapter_names() -> list[str]:
    return list(_MODULES)


def _module(name: str) -> Any:
    if name not in _MODULES:
        near = difflib.get_close_matches(name, list(_MODULES), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise LookupError(f"No broker adapter named {name!r}{hint}; known: "
                          f"{', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name])


def settings_model(name: str) -> type[BaseModel]:
    """The pydantic model of `broker.settings` for the adapter `name`."""
    model: type[BaseModel] = _module(name).Settings
    return model


def create_adapter(name: str, settings: dict[str, Any],
                   accounts: list[AccountSpec] | None = None) -> Broker:
    """The adapter registered as `name`, built from its settings and the accounts to watch;
    LookupError if unknown, pydantic's ValidationError for bad settings."""
    module = _module(name)
    parsed = module.Settings.model_validate(settings)
    broker: Broker = module.create(parsed, list(accounts or []))
    return broker
