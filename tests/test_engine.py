"""Engine semantics: debounce, episodes, cooldowns, conflicts, modes, reachability, errors,
state, and time taken only from snapshots."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time

from copilink_rules.engine import Engine
from copilink_rules.engine.core import _MONEY_GROUPS
from copilink_rules.errors import RuleFileError, StateError
from copilink_rules.model import Decision, Snapshot
from copilink_rules.rules import load_policy
from copilink_rules.snapshots import load_timeline

from .conftest import REPO, account, at, pos, snap

EngineOf = Callable[..., Engine]

BIG = """
    ruleset: demo
    params: {max_contracts: 3}
    rules:
      - id: too-big
        when: account.contracts > params.max_contracts
        for: 2s
        cooldown: {cooldown}
        then: [flatten]
"""


def big(n: int, t: float, **fields: Any) -> Snapshot:
    return snap(at(t), account("LEAD", "leader"), account("F1", positions=[pos("NQH6", n)],
                                                          **fields))


def fired(engine: Engine, snapshots: list[Snapshot]) -> list[tuple[float, str, str, str | bool]]:
    out = []
    for s in snapshots:
        for d in engine.evaluate(s):
            out.append(((d.time - at(0)).total_seconds(), d.rule, d.action, d.suppressed))
    return out


def test_rule_fires_once_when_condition_held_for_its_duration(engine_of: EngineOf) -> None:
    engine = engine_of(BIG.replace("{cooldown}", "0s"))
    timeline = [big(5, t) for t in (0, 1, 1.999, 2, 3, 10)]
    assert fired(engine, timeline) == [(2.0, "too-big", "flatten", False)]


def test_a_blip_shorter_than_for_never_fires(engine_of: EngineOf) -> None:
    engine = engine_of(BIG.replace("{cooldown}", "0s"))
    timeline = [big(5, 0), big(5, 1.5), big(1, 1.75), big(5, 2), big(5, 3.5)]
    assert fired(engine, timeline) == []  # the timer restarted at t=2


def test_rule_fires_again_only_after_condition_was_false(engine_of: EngineOf) -> None:
    engine = engine_of(BIG.replace("{cooldown}", "0s"))
    timeline = [big(5, 0), big(5, 2), big(1, 3), big(5, 4), big(5, 6)]
    assert [f[0] for f in fired(engine, timeline)] == [2.0, 6.0]


def test_cooldown_delays_the_next_episode(engine_of: EngineOf) -> None:
    engine = engine_of(BIG.replace("{cooldown}", "30s"))
    timeline = [big(5, 0), big(5, 2), big(1, 3), big(5, 4), big(5, 6), big(5, 31), big(5, 32),
                big(1, 33), big(5, 34), big(5, 36)]
    # fired at 2; the next episode is ready at 6 but cooling down until 32, so it fires at 32
    assert [f[0] for f in fired(engine, timeline)] == [2.0, 32.0]


def test_decisions_carry_rule_set_version_scope_and_severity(engine_of: EngineOf) -> None:
    engine = engine_of(BIG.replace("{cooldown}", "0s"))
    (decision,) = engine.evaluate(big(5, 0), as_if_held=True)
    assert decision.version == engine.policy.version
    assert (decision.ruleset, decision.scope, decision.severity) == ("demo", "account",
                                                                     "critical")
    assert decision.account == "F1"
    assert decision.instrument is None
    assert decision.as_if_held is True
    assert "as if held for 2s" in decision.reason
    line = decision.to_json_dict()
    assert {"time", "ruleset", "rule", "action", "account", "instrument", "severity", "reason",
            "suppressed"} <= set(line)
    assert line["time"] == "2026-03-02T14:30:00.000Z"


CONFLICT = """
    ruleset: demo
    rules:
      - id: enter-late
        scope: pair
        when: not leader.flat and follower.flat
        then: [catch_up]
        priority: 100
      - id: halt
        scope: account
        applies_to: {accounts: [F1]}
        when: account.pnl < -500
        then:
          - lock_account: {state: halted}
      - id: soft-lock
        scope: account
        when: account.pnl < -400
        then:
          - lock_account: {state: reducing}
      - id: alert-a
        scope: account
        when: account.pnl < -400
        then: [pause_copier]
        priority: 1
      - id: alert-b
        scope: account
        when: account.pnl < -400
        then: [pause_copier, resume_copier]
        priority: 5
"""


def test_most_restrictive_action_wins_and_losers_say_why(engine_of: EngineOf) -> None:
    engine = engine_of(CONFLICT)
    snapshot = snap(at(0), account("LEAD", "leader", positions=[pos("NQH6", 1)]),
                    account("F1", realized_pnl=-600.0))
    decisions = {(d.rule, d.action): d.suppressed for d in engine.evaluate(snapshot)}
    assert decisions[("halt", "lock_account")] is False
    assert decisions[("soft-lock", "lock_account")] == \
        "halted lock from rule halt is more restrictive"
    assert decisions[("alert-b", "pause_copier")] is False  # higher priority among equals
    assert decisions[("alert-a", "pause_copier")] == \
        "pause_copier already decided by rule alert-b (priority 5)"
    assert decisions[("alert-b", "resume_copier")] == \
        "pause_copier from rule alert-b is more restrictive"
    assert decisions[("enter-late", "catch_up")] == \
        "account is locked (halted) by rule halt: no new exposure"


def test_catch_up_never_follows_a_flatten_in_the_same_leader_trade(desync: Engine) -> None:
    lead = account("LEAD", "leader", positions=[pos("NQH6", 2, opened_at=at(0).isoformat())])
    short = account("F1", positions=[pos("MNQH6", -20, opened_at=at(0).isoformat())])
    flat = account("F1")
    timeline = [snap(at(t), lead, short) for t in (0, 0.5, 1.0)] + \
        [snap(at(t), lead, flat) for t in (1.5, 3, 4.5, 6)]
    actions = [(t, rule, action) for t, rule, action, _ in fired(desync, timeline)]
    assert (1.0, "opposite-position", "flatten") in actions
    assert (1.0, "opposite-position", "pause_copier") in actions
    assert not [a for a in actions if a[2] in ("catch_up", "skip_entry")]
    # a new leader trade is a new episode: catch-up is possible again
    lead2 = account("LEAD", "leader", positions=[pos("NQH6", 2, opened_at=at(10).isoformat())])
    later = [snap(at(t), lead2, flat) for t in (10, 13)]
    assert [(t, a) for t, _, a, _ in fired(desync, later) if a == "catch_up"] == [(13.0,
                                                                                    "catch_up")]


def test_modes_warn_and_dryrun_report_without_acting(engine_of: EngineOf) -> None:
    engine = engine_of("""
        ruleset: demo
        rules:
          - id: warned
            when: account.contracts > 0
            then: [flatten]
            mode: warn
          - id: dry
            when: account.contracts > 0
            then:
              - flatten
              - alert: {message: "{account.id} big"}
            mode: dryrun
    """)
    decisions = [(d.rule, d.action, d.suppressed) for d in engine.evaluate(big(1, 0))]
    assert decisions == [
        ("warned", "flatten", "rule mode is warn: alert only"),
        ("dry", "flatten", "rule mode is dryrun: report only"),
        ("dry", "alert", "rule mode is dryrun: report only"),
        ("warned", "alert", False),
    ]


def test_orders_are_held_for_a_stale_account_and_sent_once_it_is_fresh(desync: Engine) -> None:
    def state(t: float, updated: float) -> Snapshot:
        return snap(at(t), account("LEAD", "leader"),
                    account("F1", updated_at=at(updated).isoformat(),
                            positions=[pos("NQH6", 1)]))

    timeline = [state(0, -10), state(1, -10), state(2, -10), state(3, -10), state(4, 4),
                state(5, 5)]
    decisions = [d for s in timeline for d in desync.evaluate(s)]
    result = [((d.time - at(0)).total_seconds(), d.rule, d.action, d.suppressed)
              for d in decisions]
    flattens = [(t, s) for t, rule, a, s in result if a == "flatten"]
    assert flattens == [(2.0, "account F1 data is stale (12.0s old): no orders until it is "
                              "reachable again"), (4.0, False)]
    assert (1.0, "account-unreachable", "pause_copier", False) in result
    # the held flatten's alert is reported once, not on every tick while stale, and says the
    # flatten it announces is on hold; once sent, the alert no longer says so
    alerts = [(d.time, str(d.args["message"])) for d in decisions
              if d.rule == "stuck-follower" and d.action == "alert"]
    assert [(t - at(0)).total_seconds() for t, _ in alerts] == [2.0, 4.0]
    assert alerts[0][1].endswith("flattening [ON HOLD: account F1 data is stale (12.0s old); "
                                 "the rule acts once it is reachable again]")
    assert alerts[1][1].endswith("flattening")


def test_evaluation_errors_are_reported_once_and_never_count_as_false(
        engine_of: EngineOf) -> None:
    engine = engine_of("""
        ruleset: demo
        rules:
          - id: needs-quote
            scope: pair
            when: ticks(quote.last, leader.avg_price) > 4
            for: 1s
            then: [skip_entry]
    """)
    lead = account("LEAD", "leader", positions=[pos("ESH6", 1, 5000.0)])
    no_quote = [snap(at(t), lead, account("F1"), quotes={}) for t in (0, 0.5, 1)]
    quoted = [snap(at(t), lead, account("F1"),
                   quotes={"ESH6": {"bid": 5002, "ask": 5002.25, "last": 5002.25}})
              for t in (2, 3)]
    result = fired(engine, no_quote + quoted)
    assert result[0][:3] == (0.0, "needs-quote", "error")
    assert len([r for r in result if r[2] == "error"]) == 1
    assert [r[:3] for r in result[1:]] == [(3.0, "needs-quote", "skip_entry")]
    (error,) = Engine(engine.policy).evaluate(no_quote[0])
    assert error.reason.startswith("evaluation error: no quote for ESH26 in this snapshot")
    assert error.severity == "error"


@pytest.mark.parametrize(
    ("when", "gives"),
    [("account.contracts", "a number"), ("account.id", "text"),
     ("account.flat or account.contracts", "a value that is not always true or false"),
     ("now_local", "a time")],
)
def test_a_condition_that_is_not_true_or_false_is_rejected_at_load(
        policy_of: Callable[..., Any], when: str, gives: str) -> None:
    with pytest.raises(RuleFileError, match=f"sloppy: when: a condition must be true or false, "
                                            f"but this gives {gives}"):
        policy_of(f"""
            ruleset: demo
            rules:
              - id: sloppy
                when: "{when}"
                then: [flatten]
        """)


def test_time_comes_only_from_snapshots(engine_of: EngineOf) -> None:
    text = BIG.replace("{cooldown}", "0s")
    timeline = [big(5, t) for t in (0, 1, 2, 3)]
    expected = fired(engine_of(text), timeline)
    with freeze_time("2031-07-04 03:00:00"):
        assert fired(engine_of(text), timeline) == expected
    engine = engine_of(text)
    engine.evaluate(big(5, 10))
    with pytest.raises(StateError, match="cannot go back"):
        engine.evaluate(big(5, 9))


def test_local_time_follows_daylight_saving_changes(engine_of: EngineOf) -> None:
    engine = engine_of("""
        ruleset: demo
        timezone: America/New_York
        params: {flat_by: "16:59"}
        rules:
          - id: flat-by
            when: now_local >= time(params.flat_by) and not account.flat
            then: [flatten]
    """)

    def at_utc(text: str) -> list[str]:
        moment = datetime.fromisoformat(text).replace(tzinfo=UTC)
        fresh = Engine(engine.policy)
        s = snap(moment, account("LEAD", "leader"), account("F1", positions=[pos("NQH6", 1)]))
        return [d.action for d in fresh.evaluate(s)]

    # Friday 2026-03-06, EST (UTC-5): 16:59 local is 21:59 UTC
    assert at_utc("2026-03-06T21:58:59") == []
    assert at_utc("2026-03-06T21:59:00") == ["flatten"]
    # Monday 2026-03-09, after the spring change, EDT (UTC-4): 16:59 local is 20:59 UTC
    assert at_utc("2026-03-09T20:58:59") == []
    assert at_utc("2026-03-09T20:59:00") == ["flatten"]
    # Friday 2026-10-30 EDT, then Monday 2026-11-02 after the autumn change, EST again
    assert at_utc("2026-10-30T20:59:00") == ["flatten"]
    assert at_utc("2026-11-02T20:59:00") == []
    assert at_utc("2026-11-02T21:59:00") == ["flatten"]


def test_one_engine_moves_its_local_times_every_tick_in_each_zone(tmp_path: Path) -> None:
    """A tick works out a zone's local time once for all the groups in that zone: the next
    tick must see its own, in every zone, across a daylight-saving change (the test above
    starts a fresh engine for each moment)."""
    (tmp_path / "ny.yaml").write_text(textwrap.dedent("""\
        ruleset: ny
        timezone: America/New_York
        rules:
          - id: ny-account
            when: now_local >= time("16:59") and not account.flat
            then: [alert]
          - id: ny-pair
            scope: pair
            when: now_local >= time("16:59") and not follower.flat
            then: [alert]
        """))
    (tmp_path / "chicago.yaml").write_text(textwrap.dedent("""\
        ruleset: chicago
        timezone: America/Chicago
        rules:
          - id: chicago-account
            when: now_local >= time("15:59") and not account.flat
            then: [alert]
        """))
    engine = Engine(load_policy([tmp_path / "ny.yaml", tmp_path / "chicago.yaml"]))

    def tick(text: str) -> list[str]:
        moment = datetime.fromisoformat(text).replace(tzinfo=UTC)
        s = snap(moment, account("LEAD", "leader"), account("F1", positions=[pos("NQH6", 1)]))
        return sorted(f"{d.rule} {d.account}" for d in engine.evaluate(s))

    fired_all = ["chicago-account F1", "ny-account F1", "ny-pair F1"]
    # Friday 2026-03-06, EST (UTC-5) and CST (UTC-6): 16:59 New York, 15:59 Chicago is 21:59 UTC
    assert tick("2026-03-06T21:58:59") == []
    assert tick("2026-03-06T21:59:00") == fired_all
    # Monday morning: false again, each episode ends
    assert tick("2026-03-09T14:00:00") == []
    # after the spring change, EDT (UTC-4) and CDT (UTC-5): 20:59 UTC
    assert tick("2026-03-09T20:58:59") == []
    assert tick("2026-03-09T20:59:00") == fired_all


def test_micro_against_mini_is_an_opposite_position_but_another_index_is_not(
        desync: Engine) -> None:
    lead = account("LEAD", "leader", positions=[pos("NQH6", 1)])
    follower = account("F1", positions=[pos("MNQ 03-26", -10), pos("ESH6", 1, 5000.0)])
    decisions = desync.evaluate(snap(at(0), lead, follower), as_if_held=True)
    by_rule = {(d.rule, d.action, d.instrument) for d in decisions}
    assert ("opposite-position", "flatten", "MNQ 03-26") in by_rule
    # the ES position has no leader position: a stuck follower in the ES family
    assert ("stuck-follower", "flatten", "ESH6") in by_rule


def test_followers_pair_with_their_own_leader(desync: Engine) -> None:
    snapshot = snap(
        at(0),
        account("L1", "leader", positions=[pos("NQH6", 1)]),
        account("L2", "leader"),
        account("F1", leader="L1", positions=[pos("NQH6", 1)]),
        account("F2", leader="L2", positions=[pos("NQH6", 1)]),
    )
    decisions = desync.evaluate(snapshot, as_if_held=True)
    assert {(d.account, d.rule) for d in decisions if d.action == "flatten"} == {
        ("F2", "stuck-follower")}


def test_global_scope_sees_counts_over_all_accounts(engine_of: EngineOf) -> None:
    engine = engine_of("""
        ruleset: demo
        rules:
          - id: many-down
            scope: global
            when: accounts.disconnected >= 2
            then:
              - pause_copier: {all_followers: true}
              - alert: {severity: critical, message: "{accounts.disconnected} accounts down"}
    """)
    snapshot = snap(at(0), account("LEAD", "leader"), account("F1", connected=False),
                    account("F2", connected=False))
    decisions = engine.evaluate(snapshot)
    assert [(d.action, d.account, d.reason) for d in decisions] == [
        ("pause_copier", None, "when: accounts.disconnected >= 2"),
        ("alert", None, "2 accounts down"),
    ]


def test_saved_state_resumes_exactly_where_it_stopped(desync: Engine) -> None:
    timeline = load_timeline(REPO / "examples" / "disconnected-follower.jsonl")
    whole = [d.model_dump() for s in timeline for d in desync.evaluate(s)]

    first = Engine(desync.policy)
    part: list[Decision] = []
    for s in timeline[:50]:  # stop mid-episode: F2 unreachable, flatten held
        part.extend(first.evaluate(s))
    saved = json.loads(json.dumps(first.save_state()))
    assert saved["version"] == 1
    second = Engine(desync.policy)
    assert second.restore_state(saved) == []
    for s in timeline[50:]:
        part.extend(second.evaluate(s))
    assert [d.model_dump() for d in part] == whole


def test_state_from_a_newer_version_or_damaged_is_refused(desync: Engine) -> None:
    with pytest.raises(StateError, match="version 2; this copilink-rules reads version 1"):
        desync.restore_state({"version": 2})
    with pytest.raises(StateError, match=r"damaged: rules\.stuck-follower\.x\.since: Field "
                       "required"):
        desync.restore_state({"version": 1, "rules": {"stuck-follower": {"x": {}}}})
    with pytest.raises(StateError, match=r"damaged: locks\.F1\.until: Input should have "
                       "timezone info"):
        desync.restore_state({"version": 1, "locks": {"F1": {
            "state": "halted", "until": "2026-03-02T18:00:00", "rule": "r", "reason": "x"}}})
    notes = Engine(desync.policy).restore_state(
        {"version": 1, "policy_version": "old", "rules": {"gone": {}}})
    assert any("the rules changed" in n for n in notes)
    assert any("gone" in n for n in notes)


MONEY_RULE = """
    ruleset: money
    extends: [desync]
    rules:
      - id: equity-low
        when: account.equity < 100 or account.balance < 0 or account.best_day > 10**9
        then: [alert]
    """


WHOLE_VIEW_RULE = """
      - id: shown-whole
        when: account.id == ""
        then: [{alert: {message: "{account}"}}]
    """


def test_account_view_fields_hold_what_their_names_say(
        write_rules: Callable[..., Path]) -> None:
    write_rules((REPO / "rules" / "desync.yaml").read_text(), "desync.yaml")
    engine = Engine(load_policy([write_rules(MONEY_RULE + WHOLE_VIEW_RULE)]))
    snapshot = snap(at(10), account("LEAD", "leader"), account(
        "F1", firm="apex", ratio=2.0, connected=True, copier="paused", balance=50100.0,
        realized_pnl=-50.0, unrealized_pnl=20.0, updated_at=at(7).isoformat(),
        overnight=["ESH6"],
        positions=[pos("NQH6", -2), pos("ESH6", 1, 5000.0), pos("CLJ6", 0, 70.0)],
        orders=[{"id": "o1", "instrument": "NQH6", "side": "buy", "qty": 2, "type": "stop",
                 "stop_price": 18050.0}]))
    infos = engine._accounts(snapshot, at(10))
    view = infos["F1"].view
    assert {name: getattr(view, name) for name in (
        "id", "role", "firm", "leader_id", "ratio", "connected", "stale", "reachable",
        "data_age", "copier", "balance", "realized_pnl", "unrealized_pnl", "pnl", "flat",
        "contracts", "positions", "working_orders", "undeclared_positions")} == {
        "id": "F1", "role": "follower", "firm": "apex", "leader_id": "LEAD", "ratio": 2.0,
        "connected": True, "stale": False, "reachable": True, "data_age": 3.0,
        "copier": "paused", "balance": 50100.0, "realized_pnl": -50.0, "unrealized_pnl": 20.0,
        "pnl": -30.0, "flat": False, "contracts": 3, "positions": 2, "working_orders": 1,
        "undeclared_positions": 1}
    assert infos["LEAD"].view.ratio == 1.0
    assert infos["LEAD"].view.flat is True
    # first seen mid-day: the day started at balance - realized (its size, not given) and
    # its P&L is realized + unrealized
    assert (view.size, view.equity, view.day_pnl, view.peak) == (50150.0, 50120.0, -30.0,
                                                                 50150.0)


_MONEY_FIELDS = frozenset().union(*_MONEY_GROUPS)


def test_money_fields_no_rule_reads_are_not_stored_but_the_metrics_are_kept(
        desync: Engine, write_rules: Callable[..., Path]) -> None:
    """desync.yaml reads no money field of an account: its views hold None in them (never a
    stale value), and the metrics behind them are kept the same."""
    write_rules((REPO / "rules" / "desync.yaml").read_text(), "desync.yaml")
    money = Engine(load_policy([write_rules(MONEY_RULE)]))
    for moment, equity in ((10, 50000.0), (11, 50300.0), (12, 49900.0)):
        snapshot = snap(at(moment), account("LEAD", "leader"),
                        account("F1", balance=equity, unrealized_pnl=0.0))
        infos = desync._accounts(snapshot, at(moment))
        money._accounts(snapshot, at(moment))
    view = infos["F1"].view
    assert (view.reachable, view.flat, view.copier) == (True, True, "active")
    assert {name: getattr(view, name) for name in _MONEY_FIELDS} == dict.fromkeys(
        _MONEY_FIELDS)
    assert desync._metrics["F1"] == money._metrics["F1"]
    assert desync._metrics["F1"].peak == 50300.0
    assert money._infos["F1"].view.peak == 50300.0
    assert money._infos["F1"].view.day_pnl == -100.0


def test_each_group_of_money_fields_is_worked_out_when_a_rule_reads_one_of_it(
        write_rules: Callable[..., Path]) -> None:
    """Apex's rules read equity and its peaks: the broker's money and the profit fields are
    left None; a rule reading one profit field gets that whole group."""
    apex = Engine(load_policy([REPO / "rules" / "desync.yaml",
                               REPO / "rules" / "firms" / "apex.yaml"]))
    assert apex._money == (True, False, False)
    snapshot = snap(at(0), account("LEAD", "leader"),
                    account("F1", firm="apex", balance=50100.0, unrealized_pnl=20.0))
    view = apex._accounts(snapshot, at(0))["F1"].view
    assert (view.equity, view.peak, view.size) == (50120.0, 50120.0, 50100.0)
    assert (view.balance, view.pnl, view.day_share) == (None, None, None)
    write_rules((REPO / "rules" / "desync.yaml").read_text(), "desync.yaml")
    consistency = Engine(load_policy([write_rules(MONEY_RULE.replace(
        "account.equity < 100 or account.balance < 0 or ", ""))]))
    assert consistency._money == (False, False, True)
    view = consistency._accounts(snapshot, at(0))["F1"].view
    assert (view.total_profit, view.best_day, view.day_share) == (20.0, 20.0, 1.0)
    assert (view.equity, view.balance) == (None, None)


def test_the_leader_link_and_trading_day_are_worked_out_when_a_rule_reads_one(
        desync: Engine, policy_of: Callable[..., Any]) -> None:
    """No shipped rule reads an account's leader_id, ratio or trading_day: desync's views hold
    None in them; a rule that reads one of them gets all three, each tick's own."""
    late = Engine(policy_of("""
        ruleset: day-seen
        timezone: America/New_York
        trading_day_start: "18:00"
        rules:
          - id: new-day
            when: account.trading_day == "2026-03-03"
            then: [alert]
        """))
    assert not desync._links
    assert late._links
    for moment in (datetime(2026, 3, 2, 22, 59, tzinfo=UTC),  # 17:59 New York (EST)
                   datetime(2026, 3, 2, 23, 0, tzinfo=UTC)):  # 18:00: the next trading day
        snapshot = snap(moment, account("LEAD", "leader"), account("F1", ratio=0.5))
        plain = desync._accounts(snapshot, moment)["F1"].view
        seen = late._accounts(snapshot, moment)
        assert (plain.leader_id, plain.ratio, plain.trading_day) == (None, None, None)
    assert (seen["F1"].view.leader_id, seen["F1"].view.ratio) == ("LEAD", 0.5)
    assert (seen["LEAD"].view.leader_id, seen["LEAD"].view.ratio) == ("", 1.0)
    assert seen["F1"].view.trading_day == "2026-03-03"
    assert [d.rule for d in late.evaluate(snap(datetime(2026, 3, 2, 23, 1, tzinfo=UTC),
                                               account("LEAD", "leader")))] == ["new-day"]


@pytest.mark.parametrize(("text", "fields"), [
    ("account.equity < 100 and account.flat", {"equity", "flat"}),
    ("leader_account.day_pnl < 0", set()),  # another view's name
    ("account == leader_account", None),  # the whole view: every field
    ("min(account, 1) > 0", None),
])
def test_an_expression_tells_which_view_fields_it_reads(text: str,
                                                        fields: set[str] | None) -> None:
    from copilink_rules.rules.expressions import compile_expression
    read = compile_expression(text, "pair", {}, condition=True).view_fields("account")
    assert read == (None if fields is None else frozenset(fields))


def test_a_policy_tells_which_account_fields_its_conditions_and_messages_read(
        write_rules: Callable[..., Path]) -> None:
    assert load_policy([REPO / "rules" / "desync.yaml"]).view_fields(
        ("account", "leader_account")) == {"reachable", "copier", "working_orders",
                                           "undeclared_positions", "id", "connected",
                                           "data_age"}
    whole = write_rules("""
        ruleset: whole
        rules:
          - id: show
            when: account.flat
            then: [{alert: {message: "{account}"}}]
        """)
    assert load_policy([whole]).view_fields(("account",)) is None


CATCH_UP_AGAINST = """
    ruleset: demo
    rules:
      - id: catch               # no pair.entry_action guard: the engine must still hold the line
        scope: pair
        when: not leader.flat and follower.flat
        then: [catch_up]
      - id: runaway
        scope: pair
        when: >
          not leader.flat and follower.flat and account.id == "F1"
          and ticks(quote.last, leader.avg_price) > 4
        then: [skip_entry]
      - id: lock-f2
        when: account.id == "F2"
        then: [{lock_account: {state: reducing}}]
      - id: pause-f3
        when: account.id == "F3"
        then: [pause_copier]
"""


def _entry_snapshot(t: float, price: float, f1_qty: int = 0) -> Snapshot:
    lead = account("LEAD", "leader", positions=[pos("NQH6", 2, 18000.0,
                                                    opened_at=at(0).isoformat())])
    f1 = account("F1", positions=[pos("NQH6", f1_qty)] if f1_qty else [])
    return snap(at(t), lead, f1, account("F2"), account("F3"),
                quotes={"NQH6": {"bid": price, "ask": price, "last": price}})


def test_a_catch_up_loses_to_a_skip_a_lock_or_a_pause_and_never_follows_a_skip(
        engine_of: EngineOf) -> None:
    engine = engine_of(CATCH_UP_AGAINST)
    catch_ups = {d.account: d.suppressed for d in engine.evaluate(_entry_snapshot(1, 18010.0))
                 if d.action == "catch_up"}
    assert catch_ups == {
        "F1": "skip_entry from rule runaway is more restrictive",
        "F2": "account is locked (reducing) by rule lock-f2: no new exposure",
        "F3": "copier paused by rule pause-f3"}
    # F1 gets in by hand, then out again while the leader's trade goes on, price back near
    # its entry: a new episode of `catch`, but this trade was skipped: still no catch-up
    engine.evaluate(_entry_snapshot(2, 18000.25, f1_qty=2))
    again = [d for d in engine.evaluate(_entry_snapshot(3, 18000.25)) if d.account == "F1"]
    assert [(d.rule, d.action, d.suppressed) for d in again] == [
        ("catch", "catch_up", "no catch-up after skip_entry in the same leader trade "
                              "(follower F1)")]



def test_a_message_hole_that_fails_never_breaks_its_decision(engine_of: EngineOf) -> None:
    engine = engine_of("""
        ruleset: demo
        rules:
          - id: big
            scope: pair
            when: abs(follower.qty) > 1
            then:
              - alert: {message: "{account.id} holds {follower.qty} at {quote.last} {{ok}}"}
    """)
    snapshot = snap(at(0), account("LEAD", "leader"),
                    account("F1", positions=[pos("ESH6", 2, 5000.0)]), quotes={})
    (decision,) = engine.evaluate(snapshot)
    assert decision.args["message"] == "F1 holds 2 at <quote.last: no quote for ESH26 in this " \
        "snapshot> {ok}"
