"""The `sim` broker: an in-process market, a leader that trades, a copier that mirrors it onto
followers with realistic latency, and fault injection (scripted, or random by seed).

With `own_copier: false` the sim's copier copies nothing: another copier (`copier: builtin`)
places the followers' orders through the broker, and the faults below hit those orders.
A working stop order (the leader's own, or one placed through `place_order`) fills as a market
order when the price reaches it, never taking the account through zero.

Time is virtual: `advance(seconds)` moves the simulation; the runner decides whether that
happens in real time or accelerated. Everything is deterministic for a given scenario and seed,
and the whole state saves to JSON (`save` / `load`) so a restarted engine can meet the same
broker again, as it would a real one.

Faults (`SimFault.kind`):
  missed_entry / missed_exit  the copier loses the leader's entry / exit of trade N for a follower
                              (with `own_copier: false`: the first market order placed to the
                              follower after that entry / exit is lost, as with lost_order)
  reversal                    the follower's position flips to the opposite side (stale reversal)
  disconnect                  the account drops for `duration` s: data frozen, commands refused,
                              copies lost
  stale                       connected, but the account's data stops refreshing for `duration` s
  reject                      the next `count` engine commands to the account are rejected
  delay                       engine orders to the account fill `delay` s late for `duration` s
  nan_quote                   the feed sends NaN for the quote of the account's contract (and so
                              for its P&L) for `duration` s; as a real adapter does
                              (`model.finite_or_none`), the NaN becomes a missing number, never
                              zero: the quote's bid/ask/last are missing and the account's data
                              stops refreshing (it goes stale), never a NaN in the snapshot
  no_quote                    no quote at all for the account's contract for `duration` s
  lost_order                  from `at` on, the next `count` market orders placed to the account
                              are lost: answered "unavailable", and the broker keeps no record
                              of them (`find_tag` finds nothing, nothing fills)
  stuck_order                 from `at` on, the next `count` market orders placed to the account
                              are accepted and stay working, never filling, until cancelled
  manual_order                at `at`, a person's market order of `count` contracts fills on the
                              account (`side`; default: against the leader's position, else buy)
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from copilink_rules.facts import contracts_for
from copilink_rules.instruments import Catalog, default_catalog
from copilink_rules.model import Snapshot, finite_or_none
from copilink_rules.snapshots import read_input

from .base import AccountSpec, BrokerAnswer, Health, OrderReport, SnapshotBuilder

FaultKind = Literal["missed_entry", "missed_exit", "reversal", "disconnect", "stale", "reject",
                    "delay", "nan_quote", "no_quote", "lost_order", "stuck_order",
                    "manual_order"]
# what `random_faults` draws from unless the scenario names its own `random_fault_kinds`
DEFAULT_RANDOM_KINDS: tuple[FaultKind, ...] = ("missed_entry", "missed_exit", "reversal",
                                               "disconnect", "stale", "reject", "delay")
# ... and with `own_copier: false`: faults of the broker, which hit the other copier's orders
BROKER_RANDOM_KINDS: tuple[FaultKind, ...] = ("lost_order", "stuck_order", "reject", "delay",
                                              "disconnect", "stale", "manual_order", "reversal")
_TIMED_KINDS = ("reversal", "disconnect", "stale", "reject", "delay", "nan_quote", "no_quote",
                "lost_order", "stuck_order", "manual_order")
LOST_REASON = "no answer from the broker (simulated lost order)"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SimFollower(_Strict):
    id: str
    ratio: float = Field(default=1.0, gt=0)
    firm: str | None = None
    instrument: str | None = Field(default=None, description="contract it trades (default: "
                                   "the leader's; e.g. MNQH6 to copy NQ as micros)")
    size: float = Field(default=50000.0, gt=0, allow_inf_nan=False,
                        description="starting balance (the account size every firm limit "
                        "depends on)")


class SimTrade(_Strict):
    at: float = Field(ge=0, description="seconds after the start")
    side: Literal["long", "short"]
    qty: int = Field(gt=0)
    hold: float = Field(gt=0, description="seconds the leader stays in")


class SimFault(_Strict):
    kind: FaultKind
    account: str
    at: float = Field(default=0.0, ge=0)
    trade: int | None = Field(default=None, ge=0, description="trade index (missed_*)")
    duration: float = Field(default=0.0, ge=0)
    count: int = Field(default=1, ge=1)
    delay: float = Field(default=0.0, ge=0)
    side: Literal["buy", "sell"] | None = Field(
        default=None, description="manual_order's side (default: against the leader's "
        "position, else buy)")


class SimScenario(_Strict):
    """What the simulated session looks like. Omitted trades / faults can be drawn by seed."""

    start: AwareDatetime = datetime(2026, 3, 2, 14, 30, tzinfo=UTC)
    seed: int = 1
    instrument: str = "NQH6"
    price: float = 18000.0
    leader: str = "LEAD"
    leader_firm: str | None = "apex"
    leader_size: float = Field(default=50000.0, gt=0, allow_inf_nan=False)
    followers: list[SimFollower] = Field(default_factory=lambda: [
        SimFollower(id="F1"), SimFollower(id="F2"), SimFollower(id="F3")])
    trades: list[SimTrade] | None = None
    random_trades: int = Field(default=0, ge=0, description="draw this many trades by seed")
    faults: list[SimFault] = Field(default_factory=list)
    random_faults: int = Field(default=0, ge=0, description="draw this many faults by seed")
    random_fault_kinds: list[FaultKind] | None = Field(
        default=None, min_length=1, description="the kinds `random_faults` draws from (default: "
        "the copier's faults and the broker's, without nan_quote, no_quote, lost_order, "
        "stuck_order and manual_order; with own_copier false: the broker's faults)")
    latency: tuple[float, float] = (0.25, 0.75)
    stop_ticks: int = Field(default=80, gt=0, description="leader's protective stop distance")
    own_copier: bool = Field(default=True, description="False: the sim's copier copies "
                             "nothing; another copier (copier: builtin) places the followers' "
                             "orders through the broker")


@dataclass
class _Position:
    qty: int
    avg: float
    opened: float


@dataclass
class _Order:
    id: str
    symbol: str
    side: str
    qty: int
    type: str
    stop_price: float | None
    tag: str


@dataclass
class _Account:
    id: str
    role: str
    leader: str | None
    ratio: float
    firm: str | None
    symbol: str
    size: float = 50000.0
    connected: bool = True
    copier: str = "active"
    realized: float = 0.0
    positions: dict[str, _Position] = field(default_factory=dict)
    orders: dict[str, _Order] = field(default_factory=dict)
    frozen: dict[str, Any] | None = None  # the data last seen, while disconnected or stale
    frozen_at: float | None = None


class SimBroker:
    """A simulated broker. Not thread-safe: one runner drives it."""

    name = "sim"

    def __init__(self, scenario: SimScenario, catalog: Catalog | None = None) -> None:
        self.scenario = scenario
        self.catalog = catalog or default_catalog()
        self._build = SnapshotBuilder(self.catalog)  # snapshot(): the fast reader, or pydantic
        self.rng = random.Random(scenario.seed)  # noqa: S311 - a market simulation, not crypto
        self.elapsed = 0.0
        self.price = scenario.price
        self.accounts: dict[str, _Account] = {}
        leader = _Account(scenario.leader, "leader", None, 1.0, scenario.leader_firm,
                          scenario.instrument, scenario.leader_size)
        self.accounts[leader.id] = leader
        for f in scenario.followers:
            self.accounts[f.id] = _Account(f.id, "follower", scenario.leader, f.ratio, f.firm,
                                           f.instrument or scenario.instrument, f.size)
        self.trades = list(scenario.trades or []) or self._random_trades()
        self.faults = list(scenario.faults) + self._random_faults()
        self.events: list[tuple[float, int, str, dict[str, Any]]] = []
        self._seq = 0
        self.log: list[dict[str, Any]] = []  # every command the broker received
        self.skipping: dict[str, int] = {}  # follower -> leader trade it sits out
        self.rejects: dict[str, int] = {}
        self.reject_reason = "order rejected by the broker (simulated fault)"
        self._delays: dict[str, dict[str, float]] = {}  # account -> {until, delay}
        self._lost: dict[str, int] = {}  # account -> market orders still to lose
        self._stuck: dict[str, int] = {}  # account -> market orders still to leave working
        # contract -> {until, nan (1.0: the feed sends NaN; 0.0: it sends nothing)}
        self._quote_faults: dict[str, dict[str, float]] = {}
        self.current_trade: int | None = None
        for index, trade in enumerate(self.trades):
            self._schedule(trade.at, "leader_enter", {"trade": index})
            self._schedule(trade.at + trade.hold, "leader_exit", {"trade": index})
        for index, fault in enumerate(self.faults):
            if fault.kind in _TIMED_KINDS:
                self._schedule(fault.at, "fault", {"fault": index})

    # --- scenario helpers ---------------------------------------------------------------------

    def _random_trades(self) -> list[SimTrade]:
        trades, at = [], 5.0
        for _ in range(self.scenario.random_trades):
            hold = self.rng.uniform(6.0, 20.0)
            trades.append(SimTrade(at=round(at, 2), side=self.rng.choice(["long", "short"]),
                                   qty=self.rng.randint(1, 3), hold=round(hold, 2)))
            at += hold + self.rng.uniform(4.0, 12.0)
        return trades

    def _random_faults(self) -> list[SimFault]:
        faults: list[SimFault] = []
        followers = [f.id for f in self.scenario.followers]
        if not followers or not self.trades:
            return faults
        end = self.trades[-1].at + self.trades[-1].hold
        for _ in range(self.scenario.random_faults):
            kind = self.rng.choice(list(self.scenario.random_fault_kinds or (
                DEFAULT_RANDOM_KINDS if self.scenario.own_copier else BROKER_RANDOM_KINDS)))
            account = self.rng.choice(followers)
            at = round(self.rng.uniform(0, end), 2)
            trade = self.rng.randrange(len(self.trades))
            faults.append(SimFault(kind=kind, account=account, at=at, trade=trade,
                                   duration=round(self.rng.uniform(2.0, 12.0), 2),
                                   count=self.rng.randint(1, 3),
                                   delay=round(self.rng.uniform(0.5, 3.0), 2)))
        return faults

    @property
    def now(self) -> datetime:
        return self.scenario.start + timedelta(seconds=self.elapsed)

    @property
    def end(self) -> float:
        """Seconds until the last scheduled event (trades and faults)."""
        last = max((t.at + t.hold for t in self.trades), default=0.0)
        faults = max((f.at + f.duration for f in self.faults), default=0.0)
        return max(last, faults) + 5.0

    def _schedule(self, at: float, kind: str, data: dict[str, Any]) -> None:
        self._seq += 1
        self.events.append((at, self._seq, kind, data))
        self.events.sort(key=lambda e: (e[0], e[1]))

    # --- the market moving ------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Move virtual time forward, applying every event that falls due."""
        target = self.elapsed + seconds
        while self.events and self.events[0][0] <= target + 1e-9:
            at, _, kind, data = self.events.pop(0)
            self._walk_to(max(self.elapsed, at))
            getattr(self, f"_on_{kind}")(**data)
        self._walk_to(target)

    def _walk_to(self, at: float) -> None:
        tick = self.catalog.parse(self.scenario.instrument).tick_size
        while self.elapsed + 0.25 <= at + 1e-9:
            self.elapsed += 0.25
            self.price += tick * self.rng.choice((-1, 0, 0, 1))
            self._trigger_stops()
        self.elapsed = max(self.elapsed, at)
        for account in self.accounts.values():
            if account.frozen is None:
                continue
            until = account.frozen.get("_until", 0.0)
            if self.elapsed >= until:
                account.frozen = None
                account.frozen_at = None
                account.connected = True

    def _fill(self, account: _Account, symbol: str, delta: int) -> None:
        """Apply a fill of `delta` contracts at the market price."""
        if delta == 0:
            return
        position = account.positions.get(symbol)
        tick_value = self.catalog.parse(symbol).tick_value
        tick_size = self.catalog.parse(symbol).tick_size
        if position is None:
            account.positions[symbol] = _Position(delta, self.price, self.elapsed)
            return
        new = position.qty + delta
        if position.qty * delta < 0:  # closing some or all
            closed = min(abs(delta), abs(position.qty))
            direction = 1 if position.qty > 0 else -1
            account.realized += direction * closed * (self.price - position.avg) / tick_size * \
                tick_value
        if new == 0:
            del account.positions[symbol]
            for order_id in [o.id for o in account.orders.values() if o.symbol == symbol]:
                del account.orders[order_id]  # brackets go with the position
        elif position.qty * new < 0:
            account.positions[symbol] = _Position(new, self.price, self.elapsed)
        else:
            if abs(new) > abs(position.qty):
                position.avg = (position.avg * position.qty + self.price * delta) / new
            position.qty = new

    def _trigger_stops(self) -> None:
        """Working stop orders the price has reached fill as market orders."""
        for account in self.accounts.values():
            for order in list(account.orders.values()):
                if order.type != "stop" or order.stop_price is None or \
                        order.id not in account.orders:  # gone with an earlier fill
                    continue
                if (order.side == "sell" and self.price <= order.stop_price) or \
                        (order.side == "buy" and self.price >= order.stop_price):
                    self._trigger(account, order)

    def _trigger(self, account: _Account, order: _Order) -> None:
        """Fill a triggered stop, never through zero: only what is held against its side; with
        nothing held against it, it is cancelled."""
        del account.orders[order.id]
        direction = -1 if order.side == "sell" else 1
        held = account.positions.get(order.symbol)
        against = abs(held.qty) if held is not None and held.qty * direction < 0 else 0
        delta = direction * min(order.qty, against)
        family = self.catalog.parse(order.symbol).family
        before = self.exposure(account, family)
        self._fill(account, order.symbol, delta)
        tag = order.tag or order.id
        status = "filled" if delta else "cancelled"
        if any(e["tag"] == tag and e["status"] != "lost" for e in self.log):
            # the command that placed it: `find_tag` reports what became of the order
            if delta:
                self._record(tag, status, filled_qty=abs(delta), filled_at=self.elapsed)
            else:
                self._record(tag, status, cancelled_at=self.elapsed)
        self.log.append({"tag": tag, "status": status, "time": self.elapsed,
                         "account": account.id, "kind": "stop_fill" if delta else "stop_cancel",
                         "instrument": order.symbol, "delta": delta, "order_id": order.id,
                         "stop_price": order.stop_price, "price": self.price, "before": before,
                         "after": self.exposure(account, family),
                         "held_after": {s: p.qty for s, p in account.positions.items()}})
        if account.role == "leader" and delta and self.current_trade is not None:
            trade = self.current_trade
            if order.symbol not in account.positions:
                self.current_trade = None
            self._copy(trade, delta * self.catalog.parse(order.symbol).size, "exit")

    def _copy(self, trade: int, delta_equiv: float, stage: str) -> None:
        """The copier mirrors a leader change onto each follower, after a latency."""
        if not self.scenario.own_copier:
            # another copier places the followers' orders: a missed copy is the broker losing
            # the first market order it is sent after the leader's change
            for spec in self.faults:
                if spec.kind == f"missed_{stage}" and spec.trade == trade and \
                        spec.account in self.accounts:
                    self._lost[spec.account] = self._lost.get(spec.account, 0) + 1
            return
        for account in self.accounts.values():
            if account.role != "follower":
                continue
            missed = any(f.kind == f"missed_{stage}" and f.account == account.id and
                         f.trade == trade for f in self.faults)
            if missed:
                continue
            lo, hi = self.scenario.latency
            delay = self.rng.uniform(lo, hi)
            self._schedule(self.elapsed + delay, "copy", {
                "account": account.id, "trade": trade, "delta_equiv": delta_equiv})

    def _on_leader_enter(self, trade: int) -> None:
        spec = self.trades[trade]
        leader = self.accounts[self.scenario.leader]
        qty = spec.qty if spec.side == "long" else -spec.qty
        self.current_trade = trade
        self._fill(leader, leader.symbol, qty)
        tick = self.catalog.parse(leader.symbol).tick_size
        stop = self.price - qty / abs(qty) * self.scenario.stop_ticks * tick
        leader.orders["L-stop"] = _Order("L-stop", leader.symbol, "sell" if qty > 0 else "buy",
                                         abs(qty), "stop", round(stop, 2), "")
        self._copy(trade, qty * self.catalog.parse(leader.symbol).size, "entry")

    def _on_leader_exit(self, trade: int) -> None:
        leader = self.accounts[self.scenario.leader]
        position = leader.positions.get(leader.symbol)
        if position is None:
            return
        delta = -position.qty
        self._fill(leader, leader.symbol, delta)
        self.current_trade = None
        self._copy(trade, delta * self.catalog.parse(leader.symbol).size, "exit")

    def _on_copy(self, account: str, trade: int, delta_equiv: float) -> None:
        follower = self.accounts[account]
        if not follower.connected or follower.copier != "active" or \
                self.skipping.get(account) == trade:
            return  # lost: the copier could not reach it, was paused, or sits this trade out
        size = self.catalog.parse(follower.symbol).size
        self._fill(follower, follower.symbol, contracts_for(delta_equiv * follower.ratio, size))

    def _on_fault(self, fault: int) -> None:
        spec = self.faults[fault]
        account = self.accounts.get(spec.account)
        if account is None:
            return
        if spec.kind == "reversal":
            position = account.positions.get(account.symbol)
            if position is not None:
                self._fill(account, account.symbol, -2 * position.qty)
            else:
                leader = self.accounts[self.scenario.leader].positions.get(
                    self.accounts[self.scenario.leader].symbol)
                side = -1 if leader is None or leader.qty > 0 else 1
                size = self.catalog.parse(account.symbol).size
                self._fill(account, account.symbol, side * max(1, round(1 / size)))
        elif spec.kind in ("disconnect", "stale", "nan_quote"):
            if account.frozen is None:
                account.frozen = self._account_data(account)
                account.frozen_at = self.elapsed
            account.frozen["_until"] = max(account.frozen.get("_until", 0.0),
                                           self.elapsed + spec.duration)
            if spec.kind == "disconnect":
                account.connected = False
        elif spec.kind == "reject":
            self.rejects[account.id] = self.rejects.get(account.id, 0) + spec.count
        elif spec.kind == "delay":
            self._delays[account.id] = {"until": self.elapsed + spec.duration,
                                        "delay": spec.delay}
        elif spec.kind == "lost_order":
            self._lost[account.id] = self._lost.get(account.id, 0) + spec.count
        elif spec.kind == "stuck_order":
            self._stuck[account.id] = self._stuck.get(account.id, 0) + spec.count
        elif spec.kind == "manual_order":
            self._manual(account, spec, f"manual-{fault}")
        if spec.kind in ("nan_quote", "no_quote"):
            current = self._quote_faults.get(account.symbol, {"until": 0.0, "nan": 0.0})
            self._quote_faults[account.symbol] = {
                "until": max(current["until"], self.elapsed + spec.duration),
                "nan": 1.0 if spec.kind == "nan_quote" or current["nan"] else 0.0}

    def _manual(self, account: _Account, spec: SimFault, tag: str) -> None:
        """A person's market order, clicked in the platform: it fills at once."""
        side = spec.side
        if side is None:
            leader = self.accounts[self.scenario.leader]
            held = leader.positions.get(leader.symbol)
            side = "sell" if held is not None and held.qty > 0 else "buy"
        delta = spec.count if side == "buy" else -spec.count
        family = self.catalog.parse(account.symbol).family
        before = self.exposure(account, family)
        self._fill(account, account.symbol, delta)
        self.log.append({"tag": tag, "status": "filled", "time": self.elapsed,
                         "account": account.id, "kind": "manual", "instrument": account.symbol,
                         "delta": delta, "before": before, "after": self.exposure(account, family),
                         "held_after": {s: p.qty for s, p in account.positions.items()}})

    def _on_engine_fill(self, account: str, symbol: str, delta: int, tag: str,
                        close: bool = False) -> None:
        target = self.accounts[account]
        family = self.catalog.parse(symbol).family
        if close:  # a close-position command closes what is held when it executes
            held = target.positions.get(symbol)
            delta = -held.qty if held is not None else 0
        before = self.exposure(target, family)
        self._fill(target, symbol, delta)
        leader = self.accounts[self.scenario.leader]
        self._record(tag, "filled", symbol, filled_at=self.elapsed, before=before,
                     after=self.exposure(target, family), leader=self.exposure(leader, family),
                     contracts_after=sum(abs(p.qty) for p in target.positions.values()),
                     held_after={s: p.qty for s, p in target.positions.items()})

    def exposure(self, account: _Account, family: str) -> float:
        return sum(p.qty * self.catalog.parse(s).size for s, p in account.positions.items()
                   if self.catalog.parse(s).family == family)

    # --- reading ----------------------------------------------------------------------------

    def _account_data(self, account: _Account) -> dict[str, Any]:
        unrealized = 0.0
        positions = []
        for symbol, p in account.positions.items():
            inst = self.catalog.parse(symbol)
            unrealized += p.qty * (self.price - p.avg) / inst.tick_size * inst.tick_value
            positions.append({"instrument": symbol, "qty": p.qty, "avg_price": round(p.avg, 4),
                              "opened_at": self._iso(p.opened)})
        data: dict[str, Any] = {
            "id": account.id, "role": account.role, "firm": account.firm,
            "size": account.size, "balance": round(account.size + account.realized, 2),
            "realized_pnl": round(account.realized, 2),
            "unrealized_pnl": round(unrealized, 2), "positions": positions,
            "orders": [{"id": o.id, "instrument": o.symbol, "side": o.side, "qty": o.qty,
                        "type": o.type, "stop_price": o.stop_price}
                       for o in account.orders.values()],
        }
        if account.role == "follower":
            data["leader"] = account.leader
            data["ratio"] = account.ratio
        return data

    def _iso(self, elapsed: float) -> str:
        return (self.scenario.start + timedelta(seconds=elapsed)).isoformat()

    def snapshot(self) -> Snapshot:
        accounts = []
        for account in self.accounts.values():
            if account.frozen is not None:
                data = {k: v for k, v in account.frozen.items() if not k.startswith("_")}
                data["updated_at"] = self._iso(account.frozen_at or 0.0)
            else:
                data = self._account_data(account)
                data["updated_at"] = self._iso(self.elapsed)
            data["connected"] = account.connected
            if account.role == "follower" and self.scenario.own_copier:
                data["copier"] = account.copier  # else the other copier's state, not ours
            accounts.append(data)
        quotes: dict[str, dict[str, float | None]] = {}
        for symbol in sorted({a.symbol for a in self.accounts.values()}):
            fault = self._quote_faults.get(symbol)
            if fault is not None and self.elapsed < fault["until"]:
                if not fault["nan"]:
                    continue  # no quote at all
                # the feed's NaN, read the way every adapter reads a broker's numbers
                quotes[symbol] = {k: finite_or_none(math.nan) for k in ("bid", "ask", "last")}
                continue
            quotes[symbol] = {"bid": round(self.price - self.catalog.parse(symbol).tick_size, 4),
                              "ask": round(self.price, 4), "last": round(self.price, 4)}
        return self._build({"time": self.now.isoformat(), "quotes": quotes,
                            "accounts": accounts})

    # --- commands -----------------------------------------------------------------------------

    def _record(self, tag: str, status: str, instrument: str | None = None,
                **data: Any) -> None:
        """Update the log entry of `tag` (for `instrument`, when one command had several)."""
        for entry in self.log:
            if tag and entry["tag"] == tag and entry["status"] != "lost" and \
                    instrument in (None, entry.get("instrument")):
                entry["status"] = status
                entry.update(data)
                return
        self.log.append({"tag": tag, "status": status, "time": self.elapsed, **data})

    def _conditions(self, account: str) -> dict[str, Any]:
        """How the account stood when a command arrived (for the invariant checks)."""
        target = self.accounts.get(account)
        if target is None:
            return {}
        return {"connected": target.connected,
                "data_age": 0.0 if target.frozen_at is None else self.elapsed - target.frozen_at,
                "trade": self.current_trade}

    def _refuse(self, account: str, tag: str, kind: str) -> BrokerAnswer | None:
        target = self.accounts.get(account)
        if target is None:
            answer = BrokerAnswer("rejected", f"unknown account {account!r}")
        elif not target.connected:
            answer = BrokerAnswer("unavailable", f"account {account} is not connected")
        elif self.rejects.get(account, 0) > 0:
            self.rejects[account] -= 1
            answer = BrokerAnswer("rejected", self.reject_reason)
        else:
            return None
        self.log.append({"tag": tag, "status": "rejected", "time": self.elapsed,
                         "account": account, "kind": kind, "reason": answer.reason,
                         **self._conditions(account)})
        return answer

    def _order_fill(self, account: str, symbol: str, delta: int, tag: str,
                    kind: str, close: bool = False, stuck: bool = False) -> BrokerAnswer:
        """Fill an order now, or later while a `delay` fault lasts; a stuck order's fill is
        never due (it works until cancelled)."""
        delay = self._delays.get(account)
        self.log.append({"tag": tag, "status": "accepted", "time": self.elapsed,
                         "account": account, "kind": kind, "instrument": symbol,
                         "delta": delta, **self._conditions(account)})
        if stuck or (delay is not None and self.elapsed < delay["until"]):
            due = math.inf if stuck or delay is None else self.elapsed + delay["delay"]
            self._schedule(due, "engine_fill",
                           {"account": account, "symbol": symbol, "delta": delta, "tag": tag,
                            "close": close})
            return BrokerAnswer("accepted", "", tag)
        self._on_engine_fill(account, symbol, delta, tag)
        return BrokerAnswer("filled", "", tag)

    def _cancel(self, target: _Account, instrument: str | None) -> str | None:
        """Cancel the working orders in `instrument`'s family (all when None); the family."""
        family = self.catalog.parse(instrument).family if instrument else None
        for order_id in [o.id for o in target.orders.values()
                         if family is None or self.catalog.parse(o.symbol).family == family]:
            del target.orders[order_id]
        # an engine order still working (its fill is late) is a working order too
        for event in [e for e in self.events if e[2] == "engine_fill" and
                      e[3]["account"] == target.id and (
                          family is None or
                          self.catalog.parse(e[3]["symbol"]).family == family)]:
            self.events.remove(event)
            self._record(event[3]["tag"], "cancelled", cancelled_at=self.elapsed)
        return family

    def close_position(self, account: str, instrument: str | None, tag: str) -> BrokerAnswer:
        """The broker's close-position command: cancels the working orders and closes what
        is held when it executes (a late fill closes what is there then, never more)."""
        refused = self._refuse(account, tag, "flatten")
        if refused:
            return refused
        target = self.accounts[account]
        family = self._cancel(target, instrument)
        symbols = [s for s in target.positions
                   if family is None or self.catalog.parse(s).family == family]
        if not symbols:
            self.log.append({"tag": tag, "status": "filled", "time": self.elapsed,
                             "account": account, "kind": "flatten", "delta": 0,
                             **self._conditions(account)})
            return BrokerAnswer("filled", "already flat", tag)
        answer = BrokerAnswer("filled", "", tag)
        for symbol in symbols:
            answer = self._order_fill(account, symbol, -target.positions[symbol].qty, tag,
                                      "flatten", close=True)
        return answer

    def cancel_order(self, account: str, order_id: str, tag: str) -> BrokerAnswer:
        refused = self._refuse(account, tag, "cancel_order")
        if refused:
            return refused
        target = self.accounts[account]
        if order_id in target.orders:
            del target.orders[order_id]
            found = True
        else:  # an engine order whose fill is still to come (a delayed fill)
            pending = [e for e in self.events if e[2] == "engine_fill" and
                       e[3]["tag"] == order_id and e[3]["account"] == account]
            for event in pending:
                self.events.remove(event)
            found = bool(pending)
            if found:
                self._record(order_id, "cancelled", cancelled_at=self.elapsed)
        self.log.append({"tag": tag, "status": "filled" if found else "rejected",
                         "time": self.elapsed, "account": account, "kind": "cancel_order",
                         "order_id": order_id, **({} if found else {
                             "reason": f"no working order {order_id!r}"})})
        if not found:
            return BrokerAnswer("rejected", f"no working order {order_id!r} on {account}")
        return BrokerAnswer("filled", "", order_id)

    def cancel_orders(self, account: str, instrument: str | None, tag: str) -> BrokerAnswer:
        refused = self._refuse(account, tag, "cancel_orders")
        if refused:
            return refused
        self._cancel(self.accounts[account], instrument)
        self.log.append({"tag": tag, "status": "filled", "time": self.elapsed,
                         "account": account, "kind": "cancel_orders",
                         **self._conditions(account)})
        return BrokerAnswer("filled", "", tag)

    def place_order(self, account: str, instrument: str, side: Literal["buy", "sell"],
                    qty: int, order_type: Literal["market", "stop"], tag: str,
                    stop_price: float | None = None) -> BrokerAnswer:
        refused = self._refuse(account, tag, f"place_{order_type}")
        if refused:
            return refused
        if order_type == "stop":
            self.accounts[account].orders[tag] = _Order(tag, instrument, side, qty, "stop",
                                                        stop_price, tag)
            self.log.append({"tag": tag, "status": "accepted", "time": self.elapsed,
                             "account": account, "kind": "place_stop", "instrument": instrument,
                             **self._conditions(account)})
            return BrokerAnswer("accepted", "", tag)
        delta = qty if side == "buy" else -qty
        if self._lost.get(account, 0) > 0:
            self._lost[account] -= 1
            # never reached the broker: no order, only a note for whoever reads the log
            self.log.append({"tag": tag, "status": "lost", "time": self.elapsed,
                             "account": account, "kind": "lost_order", "instrument": instrument,
                             "delta": delta, "reason": LOST_REASON,
                             **self._conditions(account)})
            return BrokerAnswer("unavailable", LOST_REASON)
        stuck = self._stuck.get(account, 0) > 0
        if stuck:
            self._stuck[account] -= 1
        return self._order_fill(account, instrument, delta, tag, "place_market", stuck=stuck)

    def contracts(self) -> dict[str, str]:
        leader = self.accounts[self.scenario.leader].symbol
        return {a.id: a.symbol for a in self.accounts.values()
                if a.role == "follower" and a.symbol != leader}

    def find_tag(self, tag: str) -> OrderReport | None:
        for entry in self.log:
            if entry["tag"] == tag and entry["status"] != "lost":  # a lost order left no trace
                state = {"accepted": "working", "filled": "filled", "rejected": "rejected",
                         "cancelled": "cancelled"}.get(entry["status"], "working")
                filled = entry.get("filled_qty", abs(entry.get("delta", 0)))
                return OrderReport(tag, state, entry.get("account", ""),  # type: ignore[arg-type]
                                   entry.get("instrument"), tag,
                                   filled if state == "filled" else 0, entry.get("reason", ""))
        return None

    # --- lifecycle: an in-process broker is always there ------------------------------------

    def connect(self, timeout: float = 10.0) -> None:
        return None

    def health(self) -> Health:
        return Health("connected")

    def close(self) -> None:
        return None

    # --- persistence ----------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the whole simulated broker to `path` (atomically)."""
        state = {
            "version": 1,
            "scenario": self.scenario.model_dump(mode="json"),
            "rng": _jsonable(self.rng.getstate()),
            "elapsed": self.elapsed, "price": self.price,
            "accounts": {k: asdict(v) for k, v in self.accounts.items()},
            "trades": [t.model_dump() for t in self.trades],
            "faults": [f.model_dump() for f in self.faults],
            "events": self.events, "seq": self._seq, "log": self.log,
            "skipping": self.skipping, "rejects": self.rejects,
            "delays": self._delays, "current_trade": self.current_trade,
            "quote_faults": self._quote_faults, "lost": self._lost, "stuck": self._stuck,
        }
        temporary = Path(f"{path}.tmp")
        temporary.write_text(json.dumps(state), encoding="utf-8")
        temporary.replace(path)

    @classmethod
    def load(cls, path: str | Path, catalog: Catalog | None = None) -> SimBroker:
        # bounded: a --sim-state of /dev/zero is refused, not read forever
        state = json.loads(read_input(path, str(path), " sim state"))
        broker = cls(SimScenario.model_validate(state["scenario"]), catalog)
        broker.rng.setstate(_tupled(state["rng"]))
        broker.elapsed, broker.price = state["elapsed"], state["price"]
        broker.accounts = {}
        for key, raw in state["accounts"].items():
            raw["positions"] = {s: _Position(**p) for s, p in raw["positions"].items()}
            raw["orders"] = {o: _Order(**v) for o, v in raw["orders"].items()}
            broker.accounts[key] = _Account(**raw)
        broker.trades = [SimTrade.model_validate(t) for t in state["trades"]]
        broker.faults = [SimFault.model_validate(f) for f in state["faults"]]
        broker.events = [(e[0], e[1], e[2], e[3]) for e in state["events"]]
        broker._seq = state["seq"]
        broker.log = state["log"]
        broker.skipping = state["skipping"]
        broker.rejects = state["rejects"]
        broker._delays = state["delays"]
        broker.current_trade = state["current_trade"]
        broker._quote_faults = state.get("quote_faults", {})
        broker._lost = state.get("lost", {})
        broker._stuck = state.get("stuck", {})
        return broker


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple | list) else value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


class SimCopier:
    """The sim's own copier (with its faults): pause, resume and skip-entry really happen."""

    name = "sim"
    steerable = True

    def __init__(self, broker: SimBroker) -> None:
        self.broker = broker

    def _state(self, follower: str, tag: str, state: str) -> BrokerAnswer:
        target = self.broker.accounts.get(follower)
        if target is None or target.role != "follower":
            return BrokerAnswer("rejected", f"no follower named {follower!r}")
        target.copier = state
        self.broker.log.append({"tag": tag, "status": "filled", "time": self.broker.elapsed,
                                "account": follower, "kind": f"copier_{state}"})
        return BrokerAnswer("filled", "", tag)

    def pause(self, follower: str, tag: str) -> BrokerAnswer:
        return self._state(follower, tag, "paused")

    def resume(self, follower: str, tag: str) -> BrokerAnswer:
        return self._state(follower, tag, "active")

    def skip_entry(self, follower: str, instrument: str, tag: str) -> BrokerAnswer:
        broker = self.broker
        if broker.current_trade is not None:
            broker.skipping[follower] = broker.current_trade
        broker.log.append({"tag": tag, "status": "filled", "time": broker.elapsed,
                           "account": follower, "kind": "skip_entry",
                           "trade": broker.current_trade})
        return BrokerAnswer("filled", "", tag)


Settings = SimScenario


def create(settings: SimScenario, accounts: list[AccountSpec]) -> SimBroker:
    """The sim from its scenario; `accounts` (copilink.yaml) name its leader and followers."""
    data = settings.model_dump()
    leaders = [a for a in accounts if a.role == "leader"]
    if leaders:
        data["leader"], data["leader_firm"] = leaders[0].id, leaders[0].firm
        if leaders[0].size is not None:
            data["leader_size"] = leaders[0].size
    followers = [a for a in accounts if a.role == "follower"]
    if followers:
        data["followers"] = [{"id": a.id, "ratio": a.ratio, "firm": a.firm,
                              "instrument": a.instrument,
                              **({"size": a.size} if a.size is not None else {})}
                             for a in followers]
    return SimBroker(SimScenario.model_validate(data))
