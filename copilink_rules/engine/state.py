"""The engine's state: what it remembers across ticks (`_RuleState`, `_Metrics`; locks are in
locks.py) and the models a saved state is checked against before the engine trusts it
(`Engine.save_state` writes them, `Engine.restore_state` reads them back)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from copilink_rules.facts import Family
from copilink_rules.model import UtcDatetime

STATE_VERSION = 1


class _Saved(BaseModel):
    # a NaN peak restored from damaged state would switch drawdown limits off
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class _SavedRuleState(_Saved):
    since: UtcDatetime
    fired: bool
    held: bool = False


class _SavedMetrics(_Saved):
    day: str
    day_start: float
    peak: float
    peak_eod: float
    best_day: float
    last_equity: float
    size: float
    trades: int = 0
    streak: int = 0
    opens: dict[str, tuple[int, float]] = Field(default_factory=dict)


class _SavedLock(_Saved):
    state: Literal["halted", "reducing"]
    until: UtcDatetime
    rule: str | None  # None: a lock not from a rule (read back from the journal)
    reason: str


class _SavedState(_Saved):
    """What `Engine.save_state` writes, checked field by field before the engine trusts it."""

    version: int
    policy_version: str | None = None
    time: UtcDatetime | None = None
    rules: dict[str, dict[str, _SavedRuleState]] = Field(default_factory=dict)
    last_fired: dict[str, dict[str, UtcDatetime]] = Field(default_factory=dict)
    entries: dict[str, tuple[str, Literal["flatten", "skip_entry", "catch_up"]]] = Field(
        default_factory=dict)
    first_seen: dict[str, tuple[int, UtcDatetime]] = Field(default_factory=dict)
    metrics: dict[str, _SavedMetrics] = Field(default_factory=dict)
    locks: dict[str, _SavedLock] = Field(default_factory=dict)


@dataclass(slots=True)
class _RuleState:
    since: datetime
    fired: bool = False
    held: bool = False


@dataclass(slots=True)
class _Metrics:
    """What the engine remembers about an account's money, across ticks and restarts."""

    day: str  # trading day label, YYYY-MM-DD
    day_start: float  # equity when the trading day began
    peak: float  # highest equity seen
    peak_eod: float  # highest end-of-day balance
    best_day: float  # best completed day's P&L
    last_equity: float
    size: float
    trades: int = 0  # trades closed this trading day
    streak: int = 0  # losing trades in a row this trading day
    # family -> (side, realized P&L when that position opened): how a closed trade did
    opens: dict[str, tuple[int, float]] = field(default_factory=dict)


def _count_trades(metrics: _Metrics, families: dict[str, Family], realized: float) -> None:
    """Count the trades an account closed since the last tick: a family's position gone flat
    or reversed is a trade, and its realized P&L says whether it lost."""
    opens = metrics.opens
    for name, family in families.items():
        side = family.side
        opened = opens.get(name)
        if opened is not None and opened[0] == side:
            continue
        if opened is not None:  # reversed: one trade closed, another opened
            _closed(metrics, realized - opened[1])
        opens[name] = (side, realized)
    for name in [f for f in opens if f not in families]:
        _closed(metrics, realized - opens.pop(name)[1])


def _closed(metrics: _Metrics, pnl: float) -> None:
    metrics.trades += 1
    metrics.streak = metrics.streak + 1 if pnl < 0 else 0
