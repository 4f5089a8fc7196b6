"""The engine's saved state, described once (engine/state.py): a state saved by the code
before that description restores unchanged, and the models keep the live state's fields."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from copilink_rules.engine import STATE_VERSION, Engine, core
from copilink_rules.engine.state import (
    _Metrics,
    _RuleState,
    _SavedLock,
    _SavedMetrics,
    _SavedRuleState,
    fast_saved_json,
)
from copilink_rules.errors import StateError
from copilink_rules.locks import Lock
from copilink_rules.model import Snapshot
from copilink_rules.rules import load_policy
from copilink_rules.snapshots import iter_timeline

from .conftest import REPO

# Saved by `Engine.save_state` before the saved state was described once: 30 s of a seeded sim
# session (chaos_support's copier firm over desync, plus a rule reading trade counts; F3's
# positions undated, so first-seen times are kept) with locks, timers, cooldowns, entries,
# first-seen times, metrics and trade counts all non-empty.
V1_STATE = Path(__file__).parent / "fixtures" / "engine_state_v1.json"

# the rules the saved state names (their conditions do not matter to a restore)
V1_RULES = """
    ruleset: saved-v1
    timezone: America/New_York
    rules:
""" + "".join(f"""
      - id: {rule}
        when: account.flat
        then: [{{alert: {{message: "{rule}"}}}}]
""" for rule in ("chaos-over-limit", "chaos-resume", "chaos-trade-count",
                 "account-unreachable"))


def test_a_state_saved_by_the_previous_code_restores_and_saves_unchanged(
        engine_of: Callable[..., Engine]) -> None:
    saved = json.loads(V1_STATE.read_text(encoding="utf-8"))
    assert all(saved[part] for part in ("rules", "last_fired", "entries", "first_seen",
                                        "metrics", "locks"))
    engine = engine_of(V1_RULES)

    notes = engine.restore_state(saved)

    assert notes == [f"the rules changed since the state was saved (was "
                     f"{saved['policy_version']}, now {engine.policy.version}); timers of "
                     "rules that still exist are kept"]
    assert engine.save_state() == {**saved, "policy_version": engine.policy.version}
    assert json.loads(engine.save_state_json()) == engine.save_state()


def test_a_state_without_fields_added_later_takes_their_defaults(desync: Engine) -> None:
    desync.restore_state({
        "version": 1,
        "rules": {"stuck-follower": {"F1|LEAD|NQ": {"since": "2026-03-02T14:30:00-05:00",
                                                    "fired": True}}},
        "metrics": {"F1": {"day": "2026-03-02", "day_start": 1.0, "peak": 2.0, "peak_eod": 1.0,
                           "best_day": 0.0, "last_equity": 2.0, "size": 50000.0}},
    })

    saved = desync.save_state()

    assert saved["rules"] == {"stuck-follower": {"F1|LEAD|NQ": {
        "since": "2026-03-02T19:30:00+00:00", "fired": True, "held": False}}}
    assert saved["metrics"]["F1"] | {"trades": 0, "streak": 0, "opens": {}} \
        == saved["metrics"]["F1"]
    assert saved["version"] == STATE_VERSION


@pytest.mark.parametrize(("model", "live", "key"), [
    (_SavedRuleState, _RuleState, set()),
    (_SavedMetrics, _Metrics, set()),
    (_SavedLock, Lock, {"account"}),  # the key a lock is saved under
])
def test_the_saved_models_keep_the_live_state_s_fields(
        model: type, live: type, key: set[str]) -> None:
    fields = {f.name for f in dataclasses.fields(live)}
    assert set(model.model_fields) == fields - key


@pytest.mark.parametrize(("damage", "message"), [
    ({"rules": {"r": {"x": {"since": "2026-03-02T14:30:00+00:00"}}}},
     r"damaged: rules\.r\.x\.fired: Field required"),
    ({"metrics": {"F1": {"day": "d", "day_start": "NaN", "peak": 1.0, "peak_eod": 1.0,
                         "best_day": 0.0, "last_equity": 1.0, "size": 1.0}}},
     r"damaged: metrics\.F1\.day_start: Input should be a finite number"),
    ({"locks": {"F1": {"state": "frozen", "until": "2026-03-02T14:30:00+00:00", "rule": None,
                       "reason": "r"}}},
     r"damaged: locks\.F1\.state: Input should be 'halted' or 'reducing'"),
    ({"entries": {"F1|LEAD|NQ": ["1@t", "buy"]}}, r"damaged: entries\.F1\|LEAD\|NQ\.1: "),
])
def test_damaged_parts_are_refused_with_their_path(
        desync: Engine, damage: dict[str, object], message: str) -> None:
    with pytest.raises(StateError, match=message):
        desync.restore_state({"version": 1, **damage})


def test_restoring_a_running_engine_keeps_the_follower_s_trades_for_an_account_flatten(
        tmp_path: Path) -> None:
    """An account-wide flatten ends the follower's part in its leader's trades: still so right
    after restore_state on an engine that ran, in a stage without pair rules (a red-team find:
    the pair sets it reads them from were dropped by the restore)."""
    path = tmp_path / "r.yaml"
    path.write_text("ruleset: r\ntimezone: UTC\nrules:\n"
                    "  - {id: pair-watch, scope: pair, when: 'follower.flat and not leader.flat',"
                    " then: [alert]}\n"
                    "  - {id: pre-flat, stage: pre_session, when: 'not account.flat',"
                    " then: [flatten]}\n")
    held = [{"instrument": "NQH6", "qty": 1, "avg_price": 18000.0,
             "opened_at": "2026-03-02T14:00:00Z"}]

    def snap(second: int) -> Snapshot:
        return Snapshot.model_validate({"time": f"2026-03-02T14:30:0{second}Z", "accounts": [
            {"id": "L", "role": "leader", "positions": held},
            {"id": "F", "role": "follower", "leader": "L", "positions": held}]})

    outcomes = []
    for restore in (False, True):
        engine = Engine(load_policy([path]))
        engine.evaluate(snap(0))  # a session tick builds the pair targets
        if restore:
            engine.restore_state(engine.save_state())
        [flatten] = [d for d in engine.evaluate(snap(1), stage="pre_session")
                     if d.account == "F"]
        outcomes.append((flatten.args, engine.save_state()["entries"]))
    assert outcomes[0] == outcomes[1]
    assert outcomes[1][0]["episodes"] == [["F|L|NQ", "1@2026-03-02T14:00:00+00:00"]]
    assert outcomes[1][1]["F|L|NQ"][1] == "flatten"


def _timer_rule(tmp_path: Path) -> Path:
    """A rule that starts a 1-minute timer for every account holding a position."""
    path = tmp_path / "r.yaml"
    path.write_text("ruleset: r\ntimezone: UTC\nrules:\n"
                    "  - {id: open, when: 'not account.flat', for: 1m, then: [flatten]}\n")
    return path


def _holding(second: int, *ids: str) -> Snapshot:
    """A snapshot at 14:30:0<second> of leader accounts `ids`, each holding one NQ."""
    held = [{"instrument": "NQH6", "qty": 1, "avg_price": 18000.0,
             "opened_at": "2026-03-02T14:00:00Z"}]
    return Snapshot.model_validate({"time": f"2026-03-02T14:30:0{second}Z", "accounts": [
        {"id": i, "role": "leader", "positions": held} for i in ids]})


def test_a_restore_into_a_running_engine_drops_timers_of_targets_that_are_gone(
        tmp_path: Path) -> None:
    """A running engine skips looking for gone targets while its targets stay the same
    objects; timers restored for an account it does not see are still dropped in the next
    tick, as a fresh engine drops them."""
    path = _timer_rule(tmp_path)

    before = Engine(load_policy([path]))
    before.evaluate(_holding(0, "A", "GONE"))  # a timer for each
    saved = before.save_state()
    assert set(saved["rules"]["open"]) == {"A", "GONE"}
    states = []
    for running in (True, False):
        engine = Engine(load_policy([path]))
        if running:  # its tables were cleaned against these same targets already
            engine.evaluate(_holding(1, "A"))
            engine.evaluate(_holding(2, "A"))
        engine.restore_state(saved)
        engine.evaluate(_holding(3, "A"))
        states.append(engine.save_state()["rules"])
    assert states[0] == states[1]
    assert set(states[0]["open"]) == {"A"}


def test_a_tick_cut_short_leaves_the_next_one_searching_for_gone_targets(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A red-team find: an exception escaping a group after a new account's timer started
    (none is known: injected here) must not let the next tick, whose targets are again the
    ones last cleaned against, keep that account's timer once it is gone."""
    path = _timer_rule(tmp_path)

    on_true = Engine._on_true

    def failing(self: Engine, rule: Any, order: int, target: Any, *rest: Any) -> None:
        on_true(self, rule, order, target, *rest)
        if target.key == "NEW":
            raise RuntimeError("injected")

    states = []
    for reuse in (True, False):
        engine = Engine(load_policy([path]), reuse=reuse)
        engine.evaluate(_holding(0, "A"))
        with monkeypatch.context() as patch:
            patch.setattr(Engine, "_on_true", failing)
            with pytest.raises(RuntimeError):
                engine.evaluate(_holding(1, "A", "NEW"))
        engine.evaluate(_holding(2, "A"))
        states.append(engine.save_state()["rules"])
    assert states[0] == states[1]
    assert set(states[0]["open"]) == {"A"}


# --- the state saved every tick: written straight from the live state -------------------------

def _same_text(engine: Engine) -> None:
    """save_state_text reads back as save_state() exactly: the same values of the same JSON
    types (5 and 5.0 differ in the canonical text, where == would not tell them apart)."""
    fast = engine.save_state_text()
    canonical = json.dumps(json.loads(fast), sort_keys=True)
    assert canonical == json.dumps(engine.save_state(), sort_keys=True)


def test_the_state_saved_each_tick_reads_back_as_the_models_write_it(
        engine_of: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch) -> None:
    """The v1 state (every part non-empty), and every tick of every example timeline with the
    shipped rules: the text written without the models is the models' data, and it is written
    without them (no fallback)."""

    fell_back: list[bool] = []
    original = core.fast_saved_json

    def watched(*args: Any) -> Any:
        text = original(*args)
        fell_back.append(text is None)
        return text

    monkeypatch.setattr(core, "fast_saved_json", watched)
    engine = engine_of(V1_RULES)
    engine.restore_state(json.loads(V1_STATE.read_text(encoding="utf-8")))
    _same_text(engine)

    shipped = load_policy([REPO / "rules" / "desync.yaml",
                           *sorted((REPO / "rules" / "firms").glob("*.yaml"))])
    timelines = sorted((REPO / "examples").glob("*.jsonl")) + \
        sorted((REPO / "examples" / "firms").glob("*.jsonl"))
    parts: set[str] = set()
    for timeline in timelines:
        engine = Engine(shipped)
        for snapshot in iter_timeline(timeline):
            engine.evaluate(snapshot)
            _same_text(engine)
            parts |= {part for part, value in engine.save_state().items() if value}
    assert parts >= {"rules", "last_fired", "entries", "metrics", "locks"}
    assert len(fell_back) > 500
    assert not any(fell_back)


class _NoOffset(tzinfo):
    """A zone that cannot say its offset: its times count as naive."""

    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return None

    def dst(self, dt: datetime | None) -> timedelta | None:
        return None


class _Moment(datetime):
    def isoformat(self, sep: str = "T", timespec: str = "auto") -> str:
        return "whenever"


@pytest.mark.parametrize("damage", ["nan peak", "inf in an open trade", "int equity",
                                    "naive time", "time out of range", "unknown lock state",
                                    "non-str key", "non-str rule", "non-str rule fired",
                                    "a zone with no offset", "a datetime subclass"])
def test_a_state_the_models_would_refuse_or_change_is_written_through_them(
        engine_of: Callable[..., Engine], damage: str) -> None:
    """Any doubt, and the state goes through the models: they refuse what must never be saved
    (a NaN peak would switch a drawdown limit off once restored) and convert the rest, as
    before."""

    engine = engine_of(V1_RULES)
    engine.restore_state(json.loads(V1_STATE.read_text(encoding="utf-8")))
    metrics = next(iter(engine._metrics.values()))
    rule_states = next(states for states in engine._states.values() if states)
    state = next(iter(rule_states.values()))
    if damage == "nan peak":
        metrics.peak = float("nan")
    elif damage == "inf in an open trade":
        metrics.opens["NQ"] = (1, float("inf"))
    elif damage == "int equity":
        metrics.last_equity = 50_000  # type: ignore[assignment]
    elif damage == "naive time":
        state.since = datetime(2026, 3, 2, 14, 30)
    elif damage == "time out of range":
        state.since = datetime(2150, 1, 1, tzinfo=state.since.tzinfo)
    elif damage == "unknown lock state":
        next(iter(engine.lock_book.values())).state = "frozen"
    elif damage == "non-str key":
        rule_states[7] = state  # type: ignore[index]  # keys are the targets' (text)
    elif damage == "non-str rule":
        engine._states[5] = {"F1": state}  # type: ignore[index]
    elif damage == "non-str rule fired":
        engine._last_fired[1.5] = {"F1": state.since}  # type: ignore[index]
    elif damage == "a zone with no offset":
        state.since = datetime(2026, 3, 2, 14, 30, tzinfo=_NoOffset())
    else:
        state.since = _Moment(2026, 3, 2, 14, 30, tzinfo=state.since.tzinfo)

    assert fast_saved_json(STATE_VERSION, engine.policy.version, engine.last_time,
                           engine._states, engine._last_fired, engine._entries,
                           engine._first_seen, engine._metrics,
                           engine.lock_book.values()) is None
    if damage == "int equity":  # converted, as the models always did
        assert json.loads(engine.save_state_text())["metrics"] == \
            engine.save_state()["metrics"]
        assert isinstance(json.loads(engine.save_state_text())["metrics"][
            next(iter(engine._metrics))]["last_equity"], float)
    elif damage == "a datetime subclass":  # the models write it their way
        assert json.loads(engine.save_state_text()) == engine.save_state()
    else:
        with pytest.raises((ValidationError, TypeError)):
            engine.save_state_text()


def test_times_in_a_zone_are_saved_each_as_its_own_instant(
        engine_of: Callable[..., Engine]) -> None:
    """Two lock ends at 01:30 New York on the night clocks go back (fold 0 and 1) are equal as
    dict keys yet an hour apart: each is saved as its own instant in UTC, as the models save
    it (a lock must not end an hour early)."""
    engine = engine_of(V1_RULES)
    engine.restore_state(json.loads(V1_STATE.read_text(encoding="utf-8")))
    zone = ZoneInfo("America/New_York")
    first, second = (datetime(2026, 11, 1, 1, 30, tzinfo=zone, fold=fold) for fold in (0, 1))
    assert first == second
    engine.lock_book.restore([
        Lock("F1", "halted", first, "until the first 01:30", "chaos-over-limit"),
        Lock("F2", "halted", second, "until the second 01:30", "chaos-over-limit")])
    saved = json.loads(engine.save_state_text())
    assert saved["locks"]["F1"]["until"] == "2026-11-01T05:30:00+00:00"
    assert saved["locks"]["F2"]["until"] == "2026-11-01T06:30:00+00:00"
    _same_text(engine)
