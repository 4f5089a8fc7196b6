"""The engine's state: what it remembers across ticks (`_RuleState`, `_Metrics`; locks are in
locks.py) and the one description of its saved form, `_SavedState`.

The saved form is described once, by the `_Saved*` models: `Engine.save_state` reads the live
dataclasses into them by attribute name (`from_attributes`) and dumps them as JSON
(`model_dump(mode="json")`); `Engine.restore_state` checks data against the same models and
builds the live state back from their fields (`_Saved.live`). No field is listed anywhere else.
The models, not the dataclasses, are the description because the saved form is a format on disk
with rules of its own: journals already written must keep reading (`held`, `trades`, `streak`,
`opens` may be missing, `fired` may not), and damaged data is refused before the engine trusts
it (no NaN, aware times in range, known lock states); the live dataclasses stay plain and fast
for evaluation. tests/test_engine_state.py checks that models and dataclasses keep the same
fields, and that a state saved before this description existed restores and saves unchanged."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

from copilink_rules.facts import Family
from copilink_rules.model import UtcDatetime

STATE_VERSION = 1

_T = TypeVar("_T")


def _iso(moment: datetime) -> str:
    return moment.isoformat()  # `+00:00`, as saved states always had it (pydantic says `Z`)


_Moment = Annotated[UtcDatetime, PlainSerializer(_iso, when_used="json")]


class _Saved(BaseModel):
    # a NaN peak restored from damaged state would switch drawdown limits off
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, from_attributes=True)

    def live(self, kind: Callable[..., _T], **more: Any) -> _T:
        """The live object (a dataclass of the same fields) this saved part describes."""
        return kind(**self.__dict__, **more)  # its fields (`dict(self)` is slower)


class _SavedRuleState(_Saved):
    since: _Moment
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
    """A `locks.Lock` without its account (the key it is saved under)."""

    state: Literal["halted", "reducing"]
    until: _Moment
    rule: str | None  # None: a lock not from a rule (read back from the journal)
    reason: str


class _SavedState(_Saved):
    """What `Engine.save_state` writes, checked field by field before the engine trusts it."""

    version: int
    policy_version: str | None = None
    time: _Moment | None = None
    rules: dict[str, dict[str, _SavedRuleState]] = Field(default_factory=dict)
    last_fired: dict[str, dict[str, _Moment]] = Field(default_factory=dict)
    entries: dict[str, tuple[str, Literal["flatten", "skip_entry", "catch_up"]]] = Field(
        default_factory=dict)
    first_seen: dict[str, tuple[int, _Moment]] = Field(default_factory=dict)
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
