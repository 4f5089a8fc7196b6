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

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import msgspec
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

from copilink_rules.facts import Family
from copilink_rules.model import UtcDatetime, _in_range

if TYPE_CHECKING:
    from copilink_rules.locks import Lock

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


# --- the saved form, written every tick ---------------------------------------------------------


class _Doubt(Exception):  # noqa: N818 - a signal: write the state through the models instead
    pass


_ENCODER = msgspec.json.Encoder()


def fast_saved_json(version: int, policy_version: str | None, time: datetime | None,
                    states: dict[str, dict[str, _RuleState]],
                    last_fired: dict[str, dict[str, datetime]],
                    entries: dict[str, tuple[str, str]],
                    first_seen: dict[str, tuple[int, datetime]],
                    metrics: dict[str, _Metrics], locks: Iterable[Lock]) -> bytes | None:
    """The state `_SavedState` describes, as JSON text that reads back (json.loads) exactly as
    its `model_dump(mode="json")` data, built without the models: a live session saves its
    state every tick, and reading every account's metrics into models and dumping them again
    cost as much as the tick's evaluation. None when any value is not what the models would
    pass unchanged (a float that is not finite, a time that is naive or out of range, a value
    of another type): the caller then writes through the models, which say what is wrong.
    tests/test_engine_state.py holds the two to the same text on every example timeline."""
    try:
        return _ENCODER.encode(_saved_data(version, policy_version, time, states, last_fired,
                                           entries, first_seen, metrics, locks))
    # _Doubt, or anything odd (a tzinfo's own code): the models decide, and say what is wrong
    except Exception:  # noqa: BLE001
        return None


def _saved_data(version: int, policy_version: str | None, time: datetime | None,
                states: dict[str, dict[str, _RuleState]],
                last_fired: dict[str, dict[str, datetime]],
                entries: dict[str, tuple[str, str]],
                first_seen: dict[str, tuple[int, datetime]],
                metrics: dict[str, _Metrics], locks: Iterable[Lock]) -> dict[str, Any]:
    texts: dict[datetime, str] = {}  # a UTC time's text, worked out once per save

    def moment(value: datetime) -> str:
        """The time as _Moment saves it: in UTC, ISO text (what _in_range refuses, refused)."""
        if type(value) is datetime and value.tzinfo is UTC:  # what the engine's times are
            text = texts.get(value)
            if text is None:
                text = texts[value] = _in_range(value).isoformat()
            return text
        # any other zone: not remembered (two times of one zone that differ only in `fold`
        # are equal as keys, an hour apart as instants)
        if type(value) is not datetime or value.utcoffset() is None:
            raise _Doubt  # naive (or a tzinfo that gives no offset): the models refuse it
        return _in_range(value).isoformat()

    check = 0.0  # the sum of every float: finite only if each one is (all are bounded)
    for account, m in metrics.items():
        # msgspec writes the dataclass itself, field by field, as the model dumps it; a value
        # of another type (an int where the model has a float) would read back differently
        day_start, peak, peak_eod, best_day, last_equity, size = \
            m.day_start, m.peak, m.peak_eod, m.best_day, m.last_equity, m.size
        if not (type(account) is str and type(m) is _Metrics and type(m.day) is str and
                type(m.trades) is int and type(m.streak) is int and
                type(day_start) is float and type(peak) is float and
                type(peak_eod) is float and type(best_day) is float and
                type(last_equity) is float and type(size) is float):
            raise _Doubt
        check += day_start + peak + peak_eod + best_day + last_equity + size
        for family, (side, realized) in m.opens.items():
            if type(family) is not str or type(side) is not int or type(realized) is not float:
                raise _Doubt
            check += realized
    if not math.isfinite(check):
        raise _Doubt  # a NaN peak would switch a drawdown limit off once restored
    saved_rules: dict[str, dict[str, dict[str, Any]]] = {}
    for rule, by_target in states.items():
        if not by_target:
            continue
        if type(rule) is not str:
            raise _Doubt
        saved = saved_rules[rule] = {}
        for key, state in by_target.items():
            fired, held = state.fired, state.held
            if type(key) is not str or type(fired) is not bool or type(held) is not bool:
                raise _Doubt
            saved[key] = {"since": moment(state.since), "fired": fired, "held": held}
    saved_locks = {}
    for lock in locks:
        if type(lock.account) is not str or lock.state not in ("halted", "reducing") or \
                type(lock.reason) is not str or (lock.rule is not None and
                                                 type(lock.rule) is not str):
            raise _Doubt
        saved_locks[lock.account] = {"state": lock.state, "until": moment(lock.until),
                                     "rule": lock.rule, "reason": lock.reason}
    for key, (trade, action) in entries.items():
        if type(key) is not str or type(trade) is not str or \
                action not in ("flatten", "skip_entry", "catch_up"):
            raise _Doubt
    saved_fired = {}
    for rule, fired_at in last_fired.items():
        if fired_at:
            if type(rule) is not str:
                raise _Doubt
            saved_fired[rule] = {key: moment(at) for key, at in fired_at.items()
                                 if type(key) is str or _doubt()}
    saved_first = {key: (side, moment(at)) for key, (side, at) in first_seen.items()
                   if (type(key) is str and type(side) is int) or _doubt()}
    if type(version) is not int or (policy_version is not None and
                                    type(policy_version) is not str):
        raise _Doubt
    return {
        "version": version,
        "policy_version": policy_version,
        "time": None if time is None else moment(time),
        "rules": saved_rules,
        "last_fired": saved_fired,
        "entries": entries,
        "first_seen": saved_first,
        "metrics": metrics,
        "locks": saved_locks,
    }


def _doubt() -> bool:
    raise _Doubt


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
