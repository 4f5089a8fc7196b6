"""A compiled batch (batching.py: constants folded, repeats computed once, environment names
read once) answers exactly as its conditions one by one: the same mask, and it fails whenever
one of them fails (the engine then evaluates them one by one). Checked on the shipped rules
and on conditions written to make repeats, failures and short cuts meet."""

from __future__ import annotations

import ast
import functools
from datetime import UTC, datetime, time, timedelta
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from copilink_rules.adapters.sim import SimBroker, SimFollower, SimScenario
from copilink_rules.alerts import Alerts
from copilink_rules.calendar import load_calendar
from copilink_rules.engine import Engine, episodes
from copilink_rules.errors import ExpressionError
from copilink_rules.journal import Journal
from copilink_rules.namespace import (
    FIELDS,
    AccountView,
    Env,
    MissingQuote,
    PairView,
    PositionView,
    QuoteView,
)
from copilink_rules.rules import batching, load_policy
from copilink_rules.rules.batching import fold
from copilink_rules.rules.expressions import CompiledExpression, compile_batch, compile_expression
from copilink_rules.session import Session
from copilink_rules.snapshots import iter_timeline

from .conftest import REPO
from .test_expressions import env

CALENDAR = load_calendar(REPO / "rules" / "tests" / "news-calendar.yaml")
SHIPPED = load_policy([REPO / "rules" / "desync.yaml",
                       *sorted((REPO / "rules" / "firms").glob("*.yaml"))])

# Conditions that repeat safe parts (shared), guarded parts (not shared), parts that fail
# (a missing quote, a None opened_at, a zero division) and folded constants.
EXTRA_ACCOUNT = [
    "account.minis + account.micros * 0.1 > 5 and account.size - account.peak < 100",
    "account.minis + account.micros * 0.1 == 3 or account.size - account.peak >= 100",
    "not account.flat and account.equity / account.day_pnl > 2",
    "not account.flat and account.equity / account.day_pnl < -2",
    "tier(account.size, 50000, 1, 100000, 2, 3) + tier(account.size, 50000, 1, 100000, 2, 3) "
    "== 4",
    "account.flat and tier(account.size, 50000, 7, 8) == 8",
    "'intraday' == 'intraday' and account.peak > account.equity",
    "('eod' == 'intraday' or account.peak_eod > 0) and min(account.peak, account.size) > 0",
    "0.0 > 0 and account.day_pnl < 0",
    "now_local >= time('16:00') and minutes_until('16:59') < 30",
]
EXTRA_PAIR = [
    "not leader.flat and follower.flat and abs(quote.last - leader.avg_price) > 2",
    "not leader.flat and follower.flat and abs(quote.last - leader.avg_price) <= 2",
    "leader.age > 10 and leader.age < 100",
    "not follower.flat and seconds_since(follower.opened_at) > 60",
    "not follower.flat and seconds_since(follower.opened_at) <= 60",
    "pair.expected_equiv * 2 > follower.equiv and pair.expected_equiv * 2 < 10",
    "leader.qty / follower.qty > 1",
]


@functools.cache
def conditions(scope: str) -> list[CompiledExpression]:
    shipped = [rule.when for rule in SHIPPED.rules if rule.scope == scope]
    extra = EXTRA_ACCOUNT if scope == "account" else EXTRA_PAIR
    return shipped + [compile_expression(s, scope, {}, condition=True) for s in extra]


@functools.cache
def batch_of(scope: str) -> Any:
    """One batch for all the examples, as an engine keeps one for a session: the parts it
    works out once for each time must follow the time from example to example."""
    return compile_batch(conditions(scope), f"{scope} rules")


def one_by_one(conds: list[CompiledExpression], e: Env,
               positions: list[int] | None = None) -> int | None:
    """The mask of the conditions evaluated separately; None when one of them fails."""
    mask = 0
    for i, cond in enumerate(conds):
        try:
            value = cond.evaluate(e)
        except Exception:  # noqa: BLE001 - any failure: the batch must fail too
            return None
        if value:
            mask |= 1 << (positions[i] if positions is not None else i)
    return mask


money = st.one_of(st.sampled_from([0.0, -0.0, 100.0, 25000.0, 50000.0, 100000.0]),
                  st.floats(-200_000, 400_000, allow_nan=False))
sizes = st.sampled_from([25000.0, 24999.99, 50000.0, 50000.5, 100000.0, 150000.0, 300000.0])


@st.composite
def views(draw: st.DrawFn) -> Env:
    e = env()
    # a day and a half across New York's change to summer time (2:00 on 8 March 2026)
    e.now = datetime(2026, 3, 8, 0, tzinfo=UTC) + timedelta(minutes=draw(st.integers(0, 2160)))
    local = e.now.astimezone(ZoneInfo("America/New_York"))
    e.now_local, e.weekday = local.time(), local.weekday()
    e.params = SimpleNamespace()
    fields: dict[str, Any] = dict.fromkeys(FIELDS["account"], 0)
    fields.update(
        id="F1", role="follower", firm="apex", copier=draw(st.sampled_from(["active", "paused"])),
        connected=True, reachable=draw(st.booleans()), flat=draw(st.booleans()),
        hedged=draw(st.booleans()), size=draw(sizes), equity=draw(money), peak=draw(money),
        peak_eod=draw(money), day_pnl=draw(money), best_day=draw(money),
        total_profit=draw(money), minis=draw(st.integers(0, 20)),
        micros=draw(st.integers(0, 60)), working_orders=draw(st.integers(0, 3)),
        undeclared_positions=draw(st.integers(0, 2)), firm_accounts=draw(st.integers(0, 8)),
        data_age=draw(st.floats(0, 60)), hedged_with="", lock="", trading_day="2026-03-09")
    e.account = e.leader_account = AccountView(**fields)

    def position() -> Any:
        if draw(st.booleans()):
            return PositionView(0, "flat", True, 0.0, 0.0, None, 0.0, "", False)
        qty = draw(st.sampled_from([-3, -1, 1, 2, 5]))
        return PositionView(qty, "long" if qty > 0 else "short", False, float(qty),
                            draw(st.sampled_from([18000.0, 18000.25, 18010.0])),
                            e.now - timedelta(seconds=draw(st.integers(0, 300))),
                            float(draw(st.integers(0, 300))), "NQH26", draw(st.booleans()))

    e.leader, e.follower = position(), position()
    e.pair = PairView("NQ", 1.0, float(draw(st.integers(-5, 5))),
                      draw(st.sampled_from(["", "skip_entry", "catch_up"])))
    last = draw(st.sampled_from([18000.0, 18001.0, 18004.0, None]))
    e.quote = draw(st.sampled_from([QuoteView("NQH26", 18000.0, 18000.25, last),
                                    MissingQuote("NQH26")]))
    return e


@settings(max_examples=400, deadline=None)
@given(e=views(), scope=st.sampled_from(["account", "pair"]))
def test_a_batch_answers_as_its_conditions_one_by_one(e: Env, scope: str) -> None:
    conds = conditions(scope)
    expected = one_by_one(conds, e)
    batch = batch_of(scope)
    if expected is None:
        with pytest.raises(Exception):  # noqa: B017, PT011 - whatever the condition raised
            batch(e)
    else:
        assert batch(e) == expected


@settings(max_examples=200, deadline=None)
@given(e=views(), chosen=st.lists(st.integers(0, 60), min_size=1, max_size=12, unique=True))
def test_a_subset_batch_answers_in_the_groups_bits(e: Env, chosen: list[int]) -> None:
    conds = conditions("account")
    chosen = sorted(i for i in chosen if i < len(conds))
    if not chosen:
        return
    picked = [conds[i] for i in chosen]
    expected = one_by_one(picked, e, positions=chosen)
    batch = compile_batch(picked, "account rules", positions=chosen)
    if expected is None:
        with pytest.raises(Exception):  # noqa: B017, PT011
            batch(e)
    else:
        assert batch(e) == expected


def test_the_shipped_rules_never_fail_in_a_batch_for_a_plain_account() -> None:
    """Nothing computed early fails on the views the engine builds (a failure would cost the
    one-by-one path on every tick)."""
    conds = [rule.when for rule in SHIPPED.rules if rule.scope == "account"]
    batch = compile_batch(conds, "account rules")
    e = env()
    assert one_by_one(conds, e) is not None
    assert batch(e) == one_by_one(conds, e)


def local_names(conds: list[str], scope: str = "account") -> set[str]:
    compiled = [compile_expression(s, scope, {}, condition=True) for s in conds]
    batch = compile_batch(compiled, f"{scope} rules")
    return set(batch.__code__.co_varnames)


def test_repeats_that_run_anyway_are_computed_once() -> None:
    names = local_names(["min(account.peak - tier(account.size, 50000, 1, 2), account.size) "
                         "> account.equity",
                         "min(account.peak - tier(account.size, 50000, 1, 2), account.size) "
                         "+ 10 > account.equity"])
    assert "__cl_c0" in names  # the min(...) once
    assert "__cl_s_account" in names  # `account` read once


def test_repeats_behind_a_short_cut_are_left_where_they_are() -> None:
    """Computing first what `and` may never reach would add work: not shared."""
    names = local_names(["account.flat and account.minis + account.micros > 2",
                         "account.flat and account.minis + account.micros > 3"])
    assert not any(n.startswith("__cl_c") for n in names)


def test_a_repeat_that_may_fail_is_left_where_it_is() -> None:
    names = local_names(["quote.last - leader.avg_price > 2", "quote.last - leader.avg_price < 2",
                         "account.equity / account.day_pnl > 1",
                         "account.equity / account.day_pnl < 1"], scope="pair")
    assert not any(n.startswith("__cl_c") for n in names)


def test_a_condition_folded_false_sets_no_bit() -> None:
    compiled = [compile_expression(s, "account", {"x": "number"}, condition=True,
                                   values={"x": 0.0})
                for s in ["params.x > 0 and account.day_pnl < -params.x", "account.flat"]]
    batch = compile_batch(compiled, "account rules")
    e = env()
    assert batch(e) == 0  # the account is not flat, and the first can never be true
    e.account.flat = True
    assert batch(e) == 0b10
    assert compile_batch(compiled[:1], "account rules")(e) == 0


X = [0, 1, -1, 0.0, 2.5, "", "a", True, False, None]


@pytest.mark.parametrize("source", [
    "'a' == 'a' and x", "'a' != 'a' and x", "1 < 2 < 3 or x", "3 < 2 < 1 or x",
    "1 < 2 > 3 or x", "x if 'intraday' == 'intraday' else 7", "x if 1 > 2 else 7",
    "not 0 and x", "not 1 or x", "0 and x", "'' or x", "'b' or x", "0.0 > 0 and x",
    "1 and 2 and x", "0 or '' or x", "x and 1 == 1", "(1 == 1) + x if x is not None else 0",
])
def test_folding_gives_what_python_gives(source: str) -> None:
    tree = ast.parse(source, mode="eval").body
    folded = fold(tree)
    assert ast.unparse(tree) == ast.unparse(ast.parse(source, mode="eval").body)  # untouched
    for x in X:
        try:
            want: Any = eval(source, {"x": x})
        except TypeError:
            continue
        got = eval(compile(ast.Expression(folded), "<t>", "eval"), {"x": x})
        assert got == want
        assert type(got) is type(want)


def test_folding_leaves_what_python_would_refuse() -> None:
    tree = ast.parse("'a' < 1 or x", mode="eval").body
    assert ast.unparse(fold(tree)) == "'a' < 1 or x"


def test_a_time_is_compared_after_folding_as_before() -> None:
    e = env()
    e.now_local = time(16, 30)
    compiled = [compile_expression("now_local >= time('16:00') and not account.flat", "account",
                                   {}, condition=True)] * 2
    assert compile_batch(compiled, "account rules")(e) == 0b11


def test_the_clocks_parts_follow_the_time() -> None:
    """minutes_until and time_between are worked out once for each time a batch sees (the
    same for every target of a tick): a new time, or a new weekday, works them out again."""
    compiled = [compile_expression(s, "account", {}, condition=True) for s in [
        "not account.flat and minutes_until('16:59') <= 5 and minutes_until('16:59') > 0",
        "time_between('16:00', '17:00') and not account.flat",
        "weekday == 0 and now_local >= time('16:55')"]]
    batch = compile_batch(compiled, "account rules")
    assert "__cl_t0" in batch.__code__.co_names  # worked out apart from the targets
    e = env()  # a Monday
    answers = []
    for moment, weekday in [(time(16, 50), 0), (time(16, 56), 0), (time(16, 56), 1),
                            (time(16, 50), 0), (time(17, 0), 0), (time(16, 56), 0)]:
        e.now_local, e.weekday = moment, weekday
        assert batch(e) == one_by_one(compiled, e)
        answers.append(batch(e))
    assert answers == [0b010, 0b111, 0b011, 0b010, 0b100, 0b111]
    same = e.now_local
    e.weekday = 1  # the same time object, another day
    assert e.now_local is same
    assert batch(e) == one_by_one(compiled, e) == 0b011


def test_a_huge_number_folded_in_still_compiles() -> None:
    """Parts are told apart without writing numbers out (an int of 5,000 digits cannot be)."""
    compiled = compile_expression("account.size < params.x and tier(account.size, params.x, 1, 2) "
                                  "== 1", "account", {"x": "number"}, condition=True,
                                  values={"x": 10**5000})
    e = env()
    assert compile_batch([compiled, compiled], "account rules")(e) == one_by_one(
        [compiled, compiled], e) == 0b11


def test_a_batch_too_large_to_search_is_still_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batching, "MAX_NODES", 50)
    conds = [rule.when for rule in SHIPPED.rules if rule.scope == "account"]
    batch = compile_batch(conds, "account rules")
    assert not any(n.startswith("__cl_c") for n in batch.__code__.co_varnames)
    e = env()
    assert batch(e) == one_by_one(conds, e)


@pytest.mark.parametrize("how", ["the batch fails", "no batch compiles"])
def test_an_engine_decides_as_with_every_condition_evaluated_alone(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, how: str) -> None:
    """End to end: an engine with its batches, and one whose every batch fails, or cannot be
    compiled (so the engine evaluates each condition alone, `_one_by_one`), decide the same at
    every tick of every example timeline, with the shipped rules and the tests' news
    calendar."""
    def failing(conditions: Any, label: str, positions: Any = None) -> Any:
        if how == "no batch compiles":
            raise ExpressionError("the expression is nested too deeply")

        def batch(env: Env) -> int:
            raise RuntimeError("evaluate them one by one")
        return batch

    timelines = sorted((REPO / "examples").glob("*.jsonl")) + \
        sorted((REPO / "examples" / "firms").glob("*.jsonl"))
    ticks = 0
    for timeline in timelines:
        batched = Engine(SHIPPED, calendar=CALENDAR)
        alone = Engine(SHIPPED, calendar=CALENDAR)
        for snapshot in iter_timeline(timeline):
            want = [d.to_json_dict() for d in batched.evaluate(snapshot)]
            with monkeypatch.context() as patch:
                patch.setattr(episodes, "compile_batch", failing)
                got = [d.to_json_dict() for d in alone.evaluate(snapshot)]
            assert got == want, f"{timeline.name} at {snapshot.time}"
            ticks += 1
        assert batched.save_state() == alone.save_state()
    assert ticks > 500
    said = "could not compile the batch" in caplog.text  # a warning, not a crash
    assert said is (how == "no batch compiles")


def test_an_engine_compiles_a_batch_only_when_a_tick_needs_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Making an engine compiles nothing (an engine is made at each restart, reload and policy
    test); ticks compile the batches of the kinds of accounts they meet, each once."""
    compiled: list[tuple[tuple[int, ...], tuple[int, ...] | None]] = []

    def counting(conditions: Any, label: str, positions: Any = None) -> Any:
        compiled.append((tuple(id(c) for c in conditions),
                         tuple(positions) if positions is not None else None))
        return compile_batch(conditions, label, positions=positions)

    monkeypatch.setattr(episodes, "compile_batch", counting)
    engine = Engine(SHIPPED, calendar=CALENDAR)
    assert compiled == []
    for snapshot in iter_timeline(REPO / "examples" / "firms" / "apex-breaches.jsonl"):
        engine.evaluate(snapshot)
    assert compiled  # the session's groups ran
    assert len(compiled) == len(set(compiled))  # each batch once
    groups = engine._groups["pre_session"]
    assert groups
    assert all(g._batch is None and not g._by_mask for g in groups)  # never run: never built


def test_a_prepared_engine_compiles_nothing_in_its_ticks_and_decides_the_same(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`Engine.prepare` (what a live session calls at start, with the broker's first snapshot)
    compiles the batches the accounts of that snapshot need, so ticks over those accounts
    compile none; and the ticks decide exactly as an engine that was not prepared."""
    compiled: list[str] = []

    def counting(conditions: Any, label: str, positions: Any = None) -> Any:
        compiled.append(label)
        return compile_batch(conditions, label, positions=positions)

    monkeypatch.setattr(episodes, "compile_batch", counting)
    timelines = sorted((REPO / "examples").glob("*.jsonl")) + \
        sorted((REPO / "examples" / "firms").glob("*.jsonl"))
    for timeline in timelines:
        snapshots = list(iter_timeline(timeline))
        plain, prepared = Engine(SHIPPED, calendar=CALENDAR), Engine(SHIPPED, calendar=CALENDAR)
        ids = {a.id for s in snapshots for a in s.accounts}
        assert all({a.id for a in s.accounts} == ids for s in snapshots), timeline.name
        compiled.clear()
        prepared.prepare(snapshots[0])
        assert compiled, timeline.name
        compiled.clear()
        for snapshot in snapshots:
            want = [d.to_json_dict() for d in plain.evaluate(snapshot)]
            compiled.clear()  # the unprepared engine's, just now
            assert [d.to_json_dict() for d in prepared.evaluate(snapshot)] == want
            assert compiled == [], f"{timeline.name} at {snapshot.time}"
        assert prepared.save_state() == plain.save_state()


def test_a_live_session_compiles_its_rules_at_start_not_in_its_first_tick(
        monkeypatch: pytest.MonkeyPatch) -> None:
    compiled: list[str] = []

    def counting(conditions: Any, label: str, positions: Any = None) -> Any:
        compiled.append(label)
        return compile_batch(conditions, label, positions=positions)

    monkeypatch.setattr(episodes, "compile_batch", counting)
    firms = ["apex", "topstep", "mffu", "takeprofit", "tradeify"]
    broker = SimBroker(SimScenario(seed=5, random_trades=3, followers=[
        SimFollower(id=f"F{i}", firm=firms[i % 5]) for i in range(1, 8)]))
    session = Session(broker, Journal(":memory:"), Alerts(),
                      [REPO / "rules" / "desync.yaml",
                       *sorted((REPO / "rules" / "firms").glob("*.yaml"))])
    session.start()
    assert compiled  # at start
    compiled.clear()
    for _ in range(8):
        broker.advance(0.25)
        session.tick()
    assert session.ticks == 8
    assert compiled == []


def test_prepare_compiles_the_alert_messages_too() -> None:
    """A message is written by a function compiled on its first render, inside the tick in
    which its rule first fires; `Engine.prepare` (what `run` calls at start) compiles them
    ahead, so that tick does not."""
    policy = load_policy([REPO / "rules" / "desync.yaml",
                          *sorted((REPO / "rules" / "firms").glob("*.yaml"))],
                         search_path=[REPO / "rules"])  # its own: templates cache their function
    templates = [t for r in policy.rules if r.stage == "session" for t in r.templates
                 if t is not None]
    assert templates
    assert not any(callable(t._whole) for t in templates)
    snapshot = next(iter(iter_timeline(REPO / "examples" / "desync-session.jsonl")))
    Engine(policy).prepare(snapshot)
    assert all(callable(t._whole) for t in templates)
