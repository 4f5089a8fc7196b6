"""The pre-trade gate: "may the copier send this order?" answered in microseconds.

    gate = Gate(policy, calendar=calendar)
    gate.update(snapshot, locks=engine.lock_book)   # once per snapshot
    answer = gate.check(OrderRequest(account="F1", instrument="NQH6", side="buy", qty=3))
    answer.verdict, answer.qty, answer.reasons      # "allow" | "block" | "reduce", 3, (...)

Reasons to block or reduce, checked against the account's firm (the rule set with `firm:`):
a locked account (halted: only orders that reduce exposure; reducing: nothing that adds), an
order that would create a hedge with another account at the same firm or a position opposite
the follower's leader, exposure past the firm's contract limit (micros weighted as the firm
weighs them; reduced to what fits), a news blackout, the time after the flat-by deadline, and a
late entry priced beyond the slippage threshold from the leader's entry.

A firm's numbers come from its rule set's params, by name: `<firm>_max_contracts` (or
`<firm>_max_contracts_25k` / `_50k` / `_100k` / `_150k` by account size),
`<firm>_micro_weight`, `<firm>_flat_by`, `<firm>_news_before` / `<firm>_news_after`; the late
entry threshold is desync's `catch_up_max_ticks`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, time
from typing import Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field

from .calendar import Calendar
from .facts import account_exposure
from .instruments import Catalog, default_catalog
from .locks import Locks
from .model import MAX_QTY, Amount, Snapshot
from .rules.loader import Policy
from .snapshots import clip

Verdict = Literal["allow", "block", "reduce"]
_SIZES = ((25000, "25k"), (50000, "50k"), (100000, "100k"))


class OrderRequest(BaseModel):
    """An order the copier is about to send. Numbers are numbers: `qty` a whole number of
    contracts (`true` and `2.0` are refused), prices finite and bounded (NaN would pass every
    check). An order for more than MAX_QTY contracts is blocked by `Gate.check`, not refused
    here, so a caller building an order from a computed quantity never gets an exception."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    account: str
    instrument: str
    side: Literal["buy", "sell"]
    qty: int = Field(gt=0, strict=True)
    type: Literal["market", "limit", "stop", "stop_limit"] = "market"
    price: Amount | None = Field(default=None, description="expected fill price (limit/stop)")
    leader_price: Amount | None = Field(
        default=None, description="the leader's entry price: checks a late entry's slippage")


@dataclass(frozen=True)
class GateAnswer:
    verdict: Verdict
    qty: int
    reasons: tuple[str, ...] = ()

    def to_json_dict(self) -> dict[str, object]:
        return {"verdict": self.verdict, "qty": self.qty, "reasons": list(self.reasons)}


@dataclass
class _Firm:
    max_contracts: dict[str, float] = field(default_factory=dict)  # size tier -> limit
    micro_weight: float = 1.0
    flat_by: time | None = None
    day_start: time = time(18, 0)
    zone: ZoneInfo = field(default_factory=lambda: ZoneInfo("America/New_York"))
    news_before: float = 0.0
    news_after: float = 0.0


@dataclass
class _Account:
    id: str
    role: str
    firm: str | None
    leader: str | None
    size: float
    equiv: dict[str, float]  # family -> signed size in full contracts
    qty: dict[str, int]  # family -> signed contracts (of whatever sizes)
    weighted: float  # contracts as the firm counts them


class Gate:
    def __init__(self, policy: Policy, catalog: Catalog | None = None,
                 calendar: Calendar | None = None) -> None:
        self.policy = policy
        self.catalog = catalog or default_catalog()
        self.calendar = calendar
        self.max_ticks = float(policy.param("catch_up_max_ticks", math.inf))
        self.firms = {name: self._firm(name) for name in policy.firms}
        self._accounts: dict[str, _Account] = {}
        self._sides: dict[tuple[str, str], dict[str, int]] = {}  # (firm, family) -> sides
        self._locks: dict[str, str] = {}
        self._quotes: dict[str, tuple[float | None, float | None, float | None]] = {}
        self._blackout: dict[str, dict[str, str]] = {}  # firm -> family -> event name
        self._after_flat_by: dict[str, bool] = {}
        self.now: datetime | None = None

    def _firm(self, name: str) -> _Firm:
        info = self.policy.firms[name]
        values = {p: self.policy.params[p].value for p in self.policy.params}
        firm = _Firm(zone=ZoneInfo(info.timezone),
                     day_start=time.fromisoformat(info.trading_day_start))
        prefix = f"{name}_"
        if f"{prefix}max_contracts" in values:
            firm.max_contracts["*"] = float(values[f"{prefix}max_contracts"])
        for tier in ("25k", "50k", "100k", "150k"):
            if f"{prefix}max_contracts_{tier}" in values:
                firm.max_contracts[tier] = float(values[f"{prefix}max_contracts_{tier}"])
        firm.micro_weight = float(values.get(f"{prefix}micro_weight", 1.0))
        if f"{prefix}flat_by" in values:
            firm.flat_by = time.fromisoformat(str(values[f"{prefix}flat_by"]))
        firm.news_before = float(values.get(f"{prefix}news_before", 0.0))
        firm.news_after = float(values.get(f"{prefix}news_after", 0.0))
        return firm

    # --- once per snapshot ----------------------------------------------------------------

    def update(self, snapshot: Snapshot,
               locks: Locks | Mapping[str, tuple[str, datetime, str]] | None = None) -> None:
        """Take in the world: positions, quotes, locks (the engine's `lock_book`, or
        `Engine.locks`), the clock."""
        self.now = snapshot.time
        self._locks = locks.states() if isinstance(locks, Locks) else \
            {a: lock[0] for a, lock in (locks or {}).items()}
        self._accounts = {}
        self._sides = {}
        for account in snapshot.accounts:
            firm = self.firms.get(account.firm or "")
            weight = firm.micro_weight if firm else 1.0
            exposure = account_exposure(account, self.catalog)
            equiv = {name: held.equiv for name, held in exposure.items()}
            qty = {name: held.qty for name, held in exposure.items()}
            weighted = float(sum(held.minis for held in exposure.values())) + \
                sum(held.micros for held in exposure.values()) * weight
            size = account.size or (account.balance - account.realized_pnl)
            self._accounts[account.id] = _Account(account.id, account.role, account.firm,
                                                  account.leader, size, equiv, qty, weighted)
            if account.firm:
                for family, held in exposure.items():
                    self._sides.setdefault((account.firm, family), {})[account.id] = held.side
        leaders = [a.id for a in snapshot.accounts if a.role == "leader"]
        for known in self._accounts.values():
            if known.role == "follower" and known.leader is None and len(leaders) == 1:
                known.leader = leaders[0]
        self._quotes = {self.catalog.parse(s).symbol: (q.bid, q.ask, q.last)
                        for s, q in snapshot.quotes.items()}
        self._blackout = {}
        self._after_flat_by = {}
        for name, firm in self.firms.items():
            local = snapshot.time.astimezone(firm.zone).time()
            if firm.flat_by is not None:
                start, end = firm.flat_by, firm.day_start
                self._after_flat_by[name] = (start <= local < end) if start <= end else (
                    local >= start or local < end)
            if self.calendar is not None and (firm.news_before or firm.news_after):
                families = {s.family for s in self.catalog.specs.values()}
                self._blackout[name] = {}
                for family in families:
                    event = self.calendar.active(snapshot.time, firm.news_before,
                                                 firm.news_after, (family,))
                    if event is not None:
                        self._blackout[name][family] = event.name

    def commit(self, account: str, instrument: str, signed_qty: int) -> None:
        """Count an order that went out (or is still working) as held by `account` until the
        next `update`: two orders in one tick, in two families, must not each fit the firm's
        contract limit on their own and break it together."""
        known = self._accounts.get(account)
        if known is None or not signed_qty:
            return
        inst = self.catalog.parse(instrument)
        family = inst.family
        firm = self.firms.get(known.firm or "")
        weight = (firm.micro_weight if firm else 1.0) if inst.micro else 1.0
        before = known.qty.get(family, 0)
        known.qty[family] = before + signed_qty
        known.equiv[family] = known.equiv.get(family, 0.0) + signed_qty * inst.size
        known.weighted += (abs(before + signed_qty) - abs(before)) * weight

    # --- per order: the hot path ------------------------------------------------------------

    def check(self, order: OrderRequest) -> GateAnswer:
        if order.qty > MAX_QTY:  # before any arithmetic: a huge int does not fit a float
            return GateAnswer("block", 0, (f"an order for more than {MAX_QTY:,} contracts is "
                                           "never sent",))
        account = self._accounts.get(order.account)
        if account is None:
            return GateAnswer("block", 0, (f"unknown account {clip(repr(order.account))}",))
        inst = self.catalog.parse(order.instrument)
        family = inst.family
        signed = order.qty if order.side == "buy" else -order.qty
        held = account.equiv.get(family, 0.0)
        after = held + signed * inst.size
        adds = abs(after) > abs(held) + 1e-9 or held * after < 0
        reasons: list[str] = []
        lock = self._locks.get(order.account)
        if lock == "halted" and (adds or after * held < 0):
            return GateAnswer("block", 0, (f"{order.account} is halted: only orders that "
                                           "reduce exposure pass",))
        if lock == "reducing" and adds:
            return GateAnswer("block", 0, (f"{order.account} is locked to reducing: this order "
                                           "adds exposure",))
        new_side = (after > 1e-9) - (after < -1e-9)
        if new_side and (not held or (held > 0) != (new_side > 0)):
            conflict = self._opposite(account, family, new_side)
            if conflict:
                return GateAnswer("block", 0, (conflict,))
        if not adds:
            return GateAnswer("allow", order.qty)
        firm = self.firms.get(account.firm or "")
        if firm is not None:
            if self._after_flat_by.get(account.firm or ""):
                return GateAnswer("block", 0, (f"after the {account.firm} flat-by time "
                                               f"{firm.flat_by}: no new exposure",))
            event = self._blackout.get(account.firm or "", {}).get(family)
            if event is not None:
                return GateAnswer("block", 0, (f"news blackout for {family}: {event}",))
        late = self._late(order, inst.symbol, inst.tick_size)
        if late:
            return GateAnswer("block", 0, (late,))
        if firm is not None:
            limit = self._limit(firm, account.size)
            if limit is not None:
                weight = firm.micro_weight if inst.micro else 1.0
                added = order.qty if held * signed >= 0 else order.qty - abs(
                    account.qty.get(family, 0))
                room = math.floor((limit - account.weighted) / weight + 1e-9)
                if added > room:
                    allowed = order.qty - (added - max(room, 0))
                    if allowed <= 0 or room <= 0:
                        return GateAnswer("block", 0, (
                            f"{account.weighted:g} of {limit:g} contracts already: no room "
                            f"at {account.firm}",))
                    reasons.append(f"reduced from {order.qty} to {allowed}: {account.firm} "
                                   f"allows {limit:g} contracts, {account.weighted:g} held")
                    return GateAnswer("reduce", allowed, tuple(reasons))
        return GateAnswer("allow", order.qty)

    def _opposite(self, account: _Account, family: str, side: int) -> str | None:
        if account.role == "follower" and account.leader:
            leader = self._accounts.get(account.leader)
            lead = leader.equiv.get(family, 0.0) if leader else 0.0
            if lead and (lead > 0) != (side > 0):
                return (f"would leave {account.id} {'long' if side > 0 else 'short'} {family} "
                        f"against its leader {account.leader}")
        if account.firm:
            for other, other_side in self._sides.get((account.firm, family), {}).items():
                if other != account.id and other_side != side:
                    return (f"would hedge {account.id} against {other} in {family} at "
                            f"{account.firm}")
        return None

    def _late(self, order: OrderRequest, symbol: str, tick: float) -> str | None:
        if order.leader_price is None or math.isinf(self.max_ticks):
            return None
        price = order.price
        if price is None:
            bid, ask, last = self._quotes.get(symbol, (None, None, None))
            price = (ask if order.side == "buy" else bid) or last
        if price is None:
            return f"no quote for {symbol}: cannot check the late entry's price"
        ticks = abs(price - order.leader_price) / tick
        if ticks > self.max_ticks:
            return (f"late entry: {price:.10g} is {ticks:.10g} ticks from the leader's "
                    f"{order.leader_price:.10g} (at most {self.max_ticks:.10g})")
        return None

    @staticmethod
    def _limit(firm: _Firm, size: float) -> float | None:
        if "*" in firm.max_contracts:
            return firm.max_contracts["*"]
        for upto, tier in _SIZES:
            if size <= upto and tier in firm.max_contracts:
                return firm.max_contracts[tier]
        return firm.max_contracts.get("150k")
