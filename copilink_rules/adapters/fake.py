"""The recording fake broker, shipped in the package: it holds a world you set by hand,
records every request it receives (`calls`), and answers as you script it. For tests of
anything that talks to a broker, and the reference implementation of the ports' contract.

    fake = FakeBroker([AccountSpec("LEAD", "leader"), AccountSpec("F1", "follower")])
    fake.set_position("F1", "NQH6", 2, 18000.0)
    fake.script("F1", BrokerAnswer("rejected", "max position reached"))   # next request
    fake.close_position("F1", "NQH6", "CLR-000001")
    fake.calls  # [Call("close_position", "F1", "NQH6", "CLR-000001", {...})]

Orders fill at once unless `fills` is "held" (accepted, then working until `release()`);
a close fills by closing what is held at that moment, as a broker's close-position does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from copilink_rules.errors import BrokerUnavailable
from copilink_rules.instruments import default_catalog
from copilink_rules.model import Snapshot

from .base import AccountSpec, BrokerAnswer, Health, OrderReport, Side, SnapshotBuilder


class Settings(BaseModel):
    """`broker.settings` of the fake (for `run --broker fake` in tests and trials)."""

    model_config = ConfigDict(extra="forbid")

    price: float = Field(default=18000.0, gt=0, allow_inf_nan=False)


@dataclass(frozen=True)
class Call:
    """One request the fake received."""

    method: str
    account: str
    instrument: str | None
    tag: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Order:
    id: str
    tag: str
    account: str
    instrument: str
    side: Side
    qty: int
    type: Literal["market", "stop"]
    stop_price: float | None
    state: Literal["working", "filled", "cancelled", "rejected"] = "working"
    reason: str = ""
    close: bool = False


class FakeBroker:
    """An in-memory broker that records what it was asked."""

    name = "fake"

    def __init__(self, accounts: list[AccountSpec], *, start: datetime | None = None,
                 price: float = 18000.0) -> None:
        self.specs = {a.id: a for a in accounts}
        self.now = start or datetime(2026, 3, 2, 14, 30, tzinfo=UTC)
        self.price = price
        self.catalog = default_catalog()
        self._build = SnapshotBuilder(self.catalog)  # snapshot(): the fast reader, or pydantic
        self.calls: list[Call] = []
        self.positions: dict[str, dict[str, tuple[int, float]]] = {a.id: {} for a in accounts}
        self.orders: dict[str, _Order] = {}
        self.connected: dict[str, bool] = {a.id: True for a in accounts}
        self.updated: dict[str, datetime] = {a.id: self.now for a in accounts}
        self.fills: Literal["now", "held"] = "now"
        self.live = False  # True (`run --broker fake`): its clock follows the wall clock
        self.reachable = True  # False: every request raises BrokerUnavailable
        self._scripted: dict[str, list[BrokerAnswer]] = {}
        self._unanswered: set[str] = set()  # tags of requests given a scripted refusal
        self._lock = threading.RLock()
        self._seq = 0

    # --- the world, set by hand --------------------------------------------------------------

    def set_position(self, account: str, instrument: str, qty: int,
                     avg_price: float | None = None) -> None:
        with self._lock:
            book = self.positions[account]
            if qty == 0:
                book.pop(instrument, None)
            else:
                book[instrument] = (qty, self.price if avg_price is None else avg_price)
            self.updated[account] = self.now

    def advance(self, seconds: float) -> None:
        """Move the clock; accounts that are connected are refreshed."""
        with self._lock:
            self.now += timedelta(seconds=seconds)
            for account, up in self.connected.items():
                if up:
                    self.updated[account] = self.now

    def script(self, account: str, answer: BrokerAnswer) -> None:
        """The next request for `account` gets `answer` (a refusal, a rate limit...)."""
        self._scripted.setdefault(account, []).append(answer)

    def release(self) -> None:
        """Fill every held (working) market order."""
        with self._lock:
            for order in list(self.orders.values()):
                if order.state == "working" and order.type == "market":
                    self._fill(order)

    # --- AccountFeed ---------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        with self._lock:
            if self.live:
                self.advance(max(0.0, (datetime.now(UTC) - self.now).total_seconds()))
            accounts = []
            for spec in self.specs.values():
                data: dict[str, Any] = {
                    **spec.snapshot_fields(),
                    "connected": self.connected[spec.id],
                    "updated_at": self.updated[spec.id].isoformat(),
                    "balance": spec.size or 50000.0,
                    "positions": [{"instrument": s, "qty": q, "avg_price": p}
                                  for s, (q, p) in self.positions[spec.id].items()],
                    "orders": [{"id": o.id, "instrument": o.instrument, "side": o.side,
                                "qty": o.qty, "type": o.type, "stop_price": o.stop_price}
                               for o in self.orders.values()
                               if o.account == spec.id and o.state == "working"],
                }
                accounts.append(data)
            symbols = {s for book in self.positions.values() for s in book}
            quotes = {s: {"bid": self.price - 0.25, "ask": self.price, "last": self.price}
                      for s in sorted(symbols)}
            return self._build({"time": self.now.isoformat(), "quotes": quotes,
                                            "accounts": accounts})

    def contracts(self) -> dict[str, str]:
        return {a.id: a.instrument for a in self.specs.values()
                if a.role == "follower" and a.instrument}

    # --- OrderPort -----------------------------------------------------------------------------

    def _request(self, method: str, account: str, instrument: str | None, tag: str,
                 **args: Any) -> BrokerAnswer | None:
        """Record the call; a scripted answer or an unreachable broker ends it early."""
        self.calls.append(Call(method, account, instrument, tag, args))
        if not self.reachable:
            raise BrokerUnavailable("fake broker: connection refused")
        if account not in self.specs:
            return BrokerAnswer("rejected", f"unknown account {account!r}")
        if not self.connected[account]:
            return BrokerAnswer("unavailable", f"account {account} is not connected")
        scripted = self._scripted.get(account)
        if scripted:
            answer = scripted.pop(0)
            if not answer.ok:  # refused or lost: the broker keeps nothing of it
                self._unanswered.add(tag)
            return answer
        return None

    def _next_id(self) -> str:
        self._seq += 1
        return f"F{self._seq}"

    def _fill(self, order: _Order) -> None:
        book = self.positions[order.account]
        held, avg = book.get(order.instrument, (0, self.price))
        delta = -held if order.close else (order.qty if order.side == "buy" else -order.qty)
        new = held + delta
        if new == 0:
            book.pop(order.instrument, None)
            for other in self.orders.values():  # brackets go with the position
                if other.account == order.account and other.state == "working" and \
                        other.type == "stop" and other.instrument == order.instrument:
                    other.state = "cancelled"
        else:
            book[order.instrument] = (new, avg if held * new > 0 else self.price)
        order.state = "filled"
        order.qty = abs(delta) or order.qty
        self.updated[order.account] = self.now

    def _cancel_working(self, account: str, instrument: str | None) -> str | None:
        """Cancel the account's working orders in `instrument`'s family (all when None)."""
        family = self.catalog.parse(instrument).family if instrument else None
        for order in self.orders.values():
            if order.account == account and order.state == "working" and (
                    family is None or self.catalog.parse(order.instrument).family == family):
                order.state = "cancelled"
        return family

    def close_position(self, account: str, instrument: str | None, tag: str) -> BrokerAnswer:
        with self._lock:
            early = self._request("close_position", account, instrument, tag)
            if early is not None:
                return early
            family = self._cancel_working(account, instrument)
            held = [s for s in self.positions[account]
                    if family is None or self.catalog.parse(s).family == family]
            if not held:
                return BrokerAnswer("filled", "already flat")
            answer = BrokerAnswer("filled")
            for symbol in held:
                qty = self.positions[account][symbol][0]
                order = _Order(self._next_id(), tag, account, symbol,
                               "sell" if qty > 0 else "buy", abs(qty), "market", None,
                               close=True)
                self.orders[order.id] = order
                if self.fills == "now":
                    self._fill(order)
                else:
                    answer = BrokerAnswer("accepted", "", order.id)
            return answer if answer.status == "accepted" else BrokerAnswer("filled", "", None)

    def cancel_order(self, account: str, order_id: str, tag: str) -> BrokerAnswer:
        with self._lock:
            early = self._request("cancel_order", account, None, tag, order_id=order_id)
            if early is not None:
                return early
            order = self.orders.get(order_id)
            if order is None or order.account != account or order.state != "working":
                return BrokerAnswer("rejected", f"no working order {order_id!r}")
            order.state = "cancelled"
            return BrokerAnswer("filled", "", order_id)

    def cancel_orders(self, account: str, instrument: str | None, tag: str) -> BrokerAnswer:
        with self._lock:
            early = self._request("cancel_orders", account, instrument, tag)
            if early is not None:
                return early
            self._cancel_working(account, instrument)
            return BrokerAnswer("filled")

    def place_order(self, account: str, instrument: str, side: Side, qty: int,
                    order_type: Literal["market", "stop"], tag: str,
                    stop_price: float | None = None) -> BrokerAnswer:
        with self._lock:
            early = self._request("place_order", account, instrument, tag, side=side, qty=qty,
                                  type=order_type, stop_price=stop_price)
            if early is not None:
                if early.status == "rejected":
                    order = _Order(self._next_id(), tag, account, instrument, side, qty,
                                   order_type, stop_price, "rejected", early.reason)
                    self.orders[order.id] = order
                return early
            if any(o.tag == tag for o in self.orders.values()):
                return BrokerAnswer("rejected", f"tag {tag!r} already in use")
            order = _Order(self._next_id(), tag, account, instrument, side, qty, order_type,
                           stop_price)
            self.orders[order.id] = order
            if order_type == "market" and self.fills == "now":
                self._fill(order)
                return BrokerAnswer("filled", "", order.id)
            return BrokerAnswer("accepted", "", order.id)

    def find_tag(self, tag: str) -> OrderReport | None:
        with self._lock:
            matches = [o for o in self.orders.values() if o.tag == tag]
            if not matches:
                if tag not in self._unanswered and any(c.tag == tag for c in self.calls):
                    # a close of nothing, a cancel
                    call = next(c for c in self.calls if c.tag == tag)
                    return OrderReport(tag, "filled", call.account, call.instrument)
                return None
            order = matches[-1]
            return OrderReport(tag, order.state, order.account, order.instrument, order.id,
                               order.qty if order.state == "filled" else 0, order.reason)

    # --- lifecycle ---------------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> None:
        if not self.reachable:
            raise BrokerUnavailable("fake broker: connection refused")

    def health(self) -> Health:
        return Health("connected" if self.reachable else "disconnected")

    def close(self) -> None:
        return None


def create(settings: Settings, accounts: list[AccountSpec]) -> FakeBroker:
    """The fake for `run --broker fake` (a trial run with no broker): its clock is the
    wall clock from now on, its accounts flat until a test or a script sets them."""
    broker = FakeBroker(accounts, start=datetime.now(UTC), price=settings.price)
    broker.live = True
    return broker
