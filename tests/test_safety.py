"""The money-losing defects of the Safety issue, each reproduced and shown fixed: limits as
facts, one corrective order at a time at the broker, episodes that survive a firm's flatten, a
crash and the kill switch, the broker's error kinds, one enforcer per journal, a journal that
cannot be written, dry-run wording, an external copier."""

from __future__ import annotations

import sqlite3
import textwrap
from pathlib import Path
from typing import Any

import pytest

from copilink_rules.adapters.base import AccountSpec, BrokerAnswer
from copilink_rules.adapters.fake import FakeBroker
from copilink_rules.adapters.sim import SimBroker, SimFault, SimFollower, SimScenario, SimTrade
from copilink_rules.alerts import Alerts
from copilink_rules.copier import ExternalCopier
from copilink_rules.errors import StateError
from copilink_rules.journal import Journal
from copilink_rules.session import Session

from .conftest import REPO

DESYNC = REPO / "rules" / "desync.yaml"
APEX = REPO / "rules" / "firms" / "apex.yaml"


def sim_session(scenario: SimScenario, rules: list[Path], journal: Journal | None = None,
                **options: Any) -> tuple[SimBroker, Session]:
    broker = SimBroker(scenario)
    session = Session(broker, journal or Journal(":memory:"), Alerts(), rules,
                      rules_path=[REPO / "rules"], before_tick=lambda: broker.advance(0.25),
                      **options)
    session.start()
    return broker, session


def run_until(session: Session, broker: SimBroker, seconds: float) -> None:
    while broker.elapsed < seconds:
        session.tick()


def engine_orders(broker: SimBroker, account: str) -> list[dict[str, Any]]:
    return [e for e in broker.log if e.get("account") == account and
            e.get("kind") in ("flatten", "place_market") and e["tag"].startswith("CLR-")]


# --- 1. limits are facts, not parameter names ------------------------------------------------

def test_a_catch_up_is_cut_to_the_firms_contract_limit() -> None:
    # the leader (another firm) enters 12 NQ; an Apex 50K follower misses it. Apex allows 10.
    scenario = SimScenario(
        seed=4, leader_firm=None,
        followers=[SimFollower(id="F1", firm="apex", size=50000)],
        trades=[SimTrade(at=2, side="long", qty=12, hold=40)],
        faults=[SimFault(kind="missed_entry", account="F1", trade=0)], random_faults=0)
    broker, session = sim_session(scenario, [APEX])
    run_until(session, broker, 8)
    entries = [e for e in engine_orders(broker, "F1") if e["kind"] == "place_market"]
    assert [e["delta"] for e in entries] == [10]
    (command,) = [c for c in session.journal.commands() if c.action == "catch_up"]
    assert command.args["reduced_from"] == 12
    assert "apex allows 10 contracts" in command.args["reduced_because"]


def test_a_catch_up_at_a_firm_with_no_room_is_refused_by_the_gate() -> None:
    scenario = SimScenario(
        seed=4, leader_firm=None,
        followers=[SimFollower(id="F1", firm="apex", size=25000, instrument="MNQH6")],
        trades=[SimTrade(at=2, side="long", qty=5, hold=40)],
        faults=[SimFault(kind="missed_entry", account="F1", trade=0)])
    broker, session = sim_session(scenario, [APEX])
    broker.accounts["F1"].positions.clear()
    # 5 NQ is 50 MNQ: Apex 25K counts a micro as 0.1 contract, allows 4 -> at most 40 MNQ
    run_until(session, broker, 8)
    entries = [e for e in engine_orders(broker, "F1") if e["kind"] == "place_market"]
    assert [e["delta"] for e in entries] == [40]


# --- 2. one corrective order at a time, at the broker too ------------------------------------

def test_a_flatten_that_fills_late_is_cancelled_before_a_second_one_is_sent() -> None:
    # F2 misses the leader's exit at 8 s; its fills are 8 s late between 9 s and 14 s
    scenario = SimScenario(
        followers=[SimFollower(id="F1"), SimFollower(id="F2")],
        trades=[SimTrade(at=2, side="long", qty=2, hold=6)],
        faults=[SimFault(kind="missed_exit", account="F2", trade=0),
                SimFault(kind="delay", account="F2", at=9, duration=5, delay=8)])
    broker, session = sim_session(scenario, [DESYNC])
    exposure = []
    while broker.elapsed < 30:
        session.tick()
        exposure.append(broker.exposure(broker.accounts["F2"], "NQ"))
    closes = engine_orders(broker, "F2")
    assert [e["status"] for e in closes] == ["cancelled", "filled"]
    first, second = closes
    assert second["time"] >= first["cancelled_at"]  # never two working at once
    assert min(exposure) == 0  # long 2 went flat, never short
    assert exposure[-1] == 0
    statuses = [(c.action, c.status) for c in session.journal.commands()]
    assert statuses == [("flatten", "retried"), ("flatten", "confirmed")]


# --- 3. episodes survive a firm's flatten, a crash and the kill switch -----------------------

def test_an_account_wide_flatten_ends_the_followers_part_in_the_leader_trade(
        tmp_path: Path) -> None:
    rules = tmp_path / "firm.yaml"
    rules.write_text(textwrap.dedent("""
        ruleset: strict
        extends: [desync]
        rules:
          - id: no-f1-exposure
            scope: account
            when: account.id == "F1" and account.contracts > 0
            then: [{flatten: {}}]
            priority: 990
    """))
    scenario = SimScenario(followers=[SimFollower(id="F1"), SimFollower(id="F2")],
                           trades=[SimTrade(at=2, side="long", qty=2, hold=20)])
    broker, session = sim_session(scenario, [rules])
    run_until(session, broker, 20)
    f1 = engine_orders(broker, "F1")
    assert [e["kind"] for e in f1] == ["flatten"]  # never bought back into the same trade
    assert broker.accounts["F1"].positions == {}


class _Crash(BaseException):
    """The process dies here (as a SIGKILL would): nothing after it runs."""


def test_a_skip_decided_just_before_a_crash_holds_after_the_restart(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    scenario = SimScenario(followers=[SimFollower(id="F1"), SimFollower(id="F2")],
                           trades=[SimTrade(at=2, side="long", qty=2, hold=40)],
                           faults=[SimFault(kind="missed_entry", account="F2", trade=0)])
    broker, session = sim_session(scenario, [DESYNC], Journal(path))
    run_until(session, broker, 3)
    broker.price += 50  # ran away: F2's missed entry is skipped
    crashed = []

    def crash_after_skip() -> None:
        if any(c.action == "skip_entry" for c in session.journal.commands()) and not crashed:
            crashed.append(broker.elapsed)
            raise _Crash  # after the commands, before the engine's state is saved

    session.after_commands = crash_after_skip
    with pytest.raises(_Crash):
        run_until(session, broker, 10)
    assert crashed
    session.journal.close()
    broker.price -= 50  # price is back at the leader's entry: a catch-up would tempt
    journal = Journal(path)
    restarted = Session(broker, journal, Alerts(), [DESYNC], rules_path=[REPO / "rules"],
                        before_tick=lambda: broker.advance(0.25))
    notes = restarted.start()
    assert any("rebuilt 1 decision" in n for n in notes)
    run_until(restarted, broker, 20)
    assert [e for e in engine_orders(broker, "F2") if e["kind"] == "place_market"] == []
    journal.close()


# --- the broker's error kinds ----------------------------------------------------------------

def fake_session(**options: Any) -> tuple[FakeBroker, Session]:
    fake = FakeBroker([AccountSpec("LEAD", "leader"), AccountSpec("F1", "follower",
                                                                 leader="LEAD")])
    session = Session(fake, Journal(":memory:"), Alerts(), [DESYNC],
                      rules_path=[REPO / "rules"], before_tick=lambda: fake.advance(0.25),
                      **options)
    session.start()
    return fake, session


def stuck(fake: FakeBroker) -> None:
    fake.set_position("F1", "NQH6", 2, 18000.0)  # the leader is flat: F1 is stuck


def ticks(session: Session, count: int) -> None:
    for _ in range(count):
        session.tick()


def test_a_rate_limit_stops_every_order_until_the_broker_said_and_then_retries_once() -> None:
    fake, session = fake_session()
    stuck(fake)
    fake.script("F1", BrokerAnswer("rate_limited", "HTTP 429", retry_after=60))
    ticks(session, 4 * 30)  # 30 s: grace, the refused close, then silence
    assert [c.method for c in fake.calls] == ["close_position"]
    assert any("rate-limited" in a.message and a.severity == "critical"
               for a in session.alerts.sent)
    ticks(session, 4 * 40)  # past the 60 s the broker asked for
    assert [c.method for c in fake.calls] == ["close_position", "close_position"]
    assert fake.positions["F1"] == {}


def test_a_refused_log_in_stops_sending_with_a_critical_alert() -> None:
    fake, session = fake_session()
    stuck(fake)
    fake.script("F1", BrokerAnswer("auth_failed", "access token expired"))
    ticks(session, 4 * 30)
    assert [c.method for c in fake.calls] == ["close_position"]
    assert any("refused our log-in" in a.message and a.severity == "critical"
               for a in session.alerts.sent)
    # the adapter is connected again: a minute after the refusal, orders resume (once)
    ticks(session, 4 * 40)
    assert [c.method for c in fake.calls] == ["close_position", "close_position"]
    assert any("accepted our log-in again" in a.message for a in session.alerts.sent)


def test_a_change_of_the_brokers_connection_is_told() -> None:
    fake, session = fake_session()
    ticks(session, 2)
    fake.reachable = False  # e.g. a ProjectX GatewayLogout, a lost socket
    ticks(session, 2)
    fake.reachable = True
    ticks(session, 2)
    told = [(a.severity, a.message) for a in session.alerts.sent if "broker fake" in a.message]
    assert told == [("critical", "broker fake disconnected"), ("info", "broker fake connected")]


def test_an_unreachable_broker_is_retried_after_asking_about_the_first_attempt() -> None:
    fake, session = fake_session()
    stuck(fake)
    fake.reachable = False
    ticks(session, 4 * 3)
    fake.reachable = True
    ticks(session, 4 * 4)
    assert [c.method for c in fake.calls] == ["close_position", "close_position"]
    assert not any("rejected" in a.message for a in session.alerts.sent)
    assert fake.positions["F1"] == {}


# --- an external copier: a person must act ----------------------------------------------------

def test_an_external_copier_turns_pause_into_an_instruction_and_still_flattens() -> None:
    fake, session = fake_session(copier=ExternalCopier())
    fake.set_position("LEAD", "NQH6", 2, 18000.0)
    fake.set_position("F1", "NQH6", -2, 18000.0)  # opposite the leader
    ticks(session, 8)
    assert [c.method for c in fake.calls] == ["close_position"]
    commands = {c.action: c for c in session.journal.commands()}
    assert commands["pause_copier"].status == "manual"
    assert "pause copying onto F1 in your copier now" in (commands["pause_copier"].reason or "")
    assert any(a.message.startswith("ACT NOW: pause copying onto F1") and
               a.severity == "critical" for a in session.alerts.sent)


# --- dry run says "would" -------------------------------------------------------------------

def test_dry_run_alerts_say_would_never_flattened() -> None:
    scenario = SimScenario(followers=[SimFollower(id="F1"), SimFollower(id="F2")],
                           trades=[SimTrade(at=2, side="long", qty=2, hold=6)],
                           faults=[SimFault(kind="missed_exit", account="F2", trade=0)])
    broker, session = sim_session(scenario, [DESYNC], dry_run=True)
    run_until(session, broker, 14)
    told = [a.message for a in session.alerts.sent if a.account == "F2"]
    assert told
    assert all(m.startswith("DRY RUN, nothing sent: ") for m in told)
    assert any("is flat: would flatten (held 2.0s)" in m for m in told)
    assert not any(word in m for m in told for word in (": flattening", ": flattened"))


# --- one enforcer per journal; a journal that cannot be written ------------------------------

def test_a_second_run_on_the_same_journal_is_refused(tmp_path: Path) -> None:
    first = Journal(tmp_path / "j.db")
    first.claim()
    second = Journal(tmp_path / "j.db")
    with pytest.raises(StateError, match=r"is in use by copilink-rules process \d+: one run "
                                         "per journal"):
        second.claim()
    first.close()
    second.claim()  # the first one ended: the journal is free
    second.close()


def test_an_unwritable_journal_stops_enforcement_with_an_alert_and_sends_nothing_unjournaled(
        tmp_path: Path) -> None:
    scenario = SimScenario(followers=[SimFollower(id="F1"), SimFollower(id="F2")],
                           trades=[SimTrade(at=2, side="long", qty=2, hold=6)],
                           faults=[SimFault(kind="missed_exit", account="F2", trade=0)])
    broker, session = sim_session(scenario, [DESYNC], Journal(tmp_path / "j.db"))
    run_until(session, broker, 5)
    db: sqlite3.Connection = session.journal._db
    db.execute("PRAGMA query_only = ON")  # every write fails from now on, as on a full disk
    session.tick()
    assert session.stopped is not None
    assert "cannot be written" in session.stopped
    assert session.alerts.sent[-1].severity == "critical"
    sent_before = len(engine_orders(broker, "F2"))
    while broker.elapsed < 20:  # F2 is stuck from 8 s on: nothing is sent any more
        broker.advance(0.25)
        assert session.tick() == []
    assert len(engine_orders(broker, "F2")) == sent_before == 0


# --- files and processes ------------------------------------------------------------------------

def test_a_rule_file_that_loads_but_cannot_be_compiled_on_reload_alerts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import copilink_rules.session as session_module

    rules = tmp_path / "rules.yaml"
    rules.write_text("ruleset: mine\nextends: [desync]\nrules: []\n")
    scenario = SimScenario(followers=[SimFollower(id="F1")], trades=[])
    _broker, session = sim_session(scenario, [rules])
    session.tick()
    old = session.policy
    rules.write_text("ruleset: mine\nextends: [desync]\nparams: {stuck_grace: 5s}\nrules: []\n")
    os.utime(rules, (1e9, 1e9))

    def cannot_compile(*args: object, **kwargs: object) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(session_module, "Engine", cannot_compile)
    message = session.reload_if_changed()
    assert message is not None
    assert "cannot be used (maximum recursion depth exceeded); the old rules stay in force" \
        in message
    assert session.policy is old
    assert session.alerts.sent[-1].severity == "critical"
    assert session.alerts.sent[-1].message == message


@pytest.mark.parametrize("content", ["{bad", "", "[1, 2]", '{"version": 1}'])
def test_a_damaged_sim_state_is_one_line_never_a_traceback(tmp_path: Path,
                                                           content: str) -> None:
    import io

    from copilink_rules.cli import run

    state = tmp_path / "sim.json"
    state.write_text(content)
    out, err = io.StringIO(), io.StringIO()
    code = run(["run", "--rules", str(DESYNC), "--sim-state", str(state), "--journal",
                str(tmp_path / "j.db"), "--duration", "1", "--no-view"], out, err)
    assert code == 1
    assert err.getvalue().startswith(f"{state}: not a saved sim broker (")
    assert len(err.getvalue().strip().splitlines()) == 1
    assert state.read_text() == content  # nothing written over it


def test_an_unwritable_output_path_is_one_line_and_nothing_half_written(tmp_path: Path) -> None:
    import io

    from copilink_rules.cli import run

    out, err = io.StringIO(), io.StringIO()
    target = tmp_path / "missing" / "state.json"
    code = run(["replay", "--rules", str(DESYNC), "--save-state", str(target),
                str(REPO / "examples" / "desync-session.jsonl")], out, err)
    assert code == 1
    assert err.getvalue().strip() == f"{target}: cannot write: No such file or directory"
    assert not target.parent.exists()


# --- a typo never turns a rule off --------------------------------------------------------------

def _cli(*argv: str) -> tuple[int, str, str]:
    import io

    from copilink_rules.cli import run

    out, err = io.StringIO(), io.StringIO()
    code = run(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(("firm", "near"), [("Apex", "apex"), ("apex-trader-funding", "apex"),
                                            ("topstepx", "topstep")])
def test_an_account_at_an_unknown_firm_is_an_error_naming_the_nearest(
        tmp_path: Path, firm: str, near: str) -> None:
    state = tmp_path / "s.json"
    state.write_text('{"time": "2026-03-02T14:30:00Z", "accounts": ['
                     '{"id": "L", "role": "leader"}, '
                     f'{{"id": "F1", "role": "follower", "firm": "{firm}"}}]}}')
    for command in ("dry-run", "check"):
        code, _, err = _cli(command, "--rules", str(REPO / "rules" / "firms"), "--state",
                            str(state))
        assert code == 1
        assert err.strip() == (f"account F1: unknown firm {firm!r} (did you mean {near!r}?); "
                               "known firms: apex, mffu, takeprofit, topstep, tradeify")
    config = tmp_path / "copilink.yaml"
    config.write_text(f"accounts:\n  - {{id: L, role: leader}}\n"
                      f"  - {{id: F1, role: follower, firm: {firm}}}\n"
                      f"rules: [{REPO / 'rules' / 'firms'}]\n")
    for argv in (("validate", "--config", str(config)),
                 ("run", "--config", str(config), "--journal", str(tmp_path / "j.db"))):
        code, _, err = _cli(*argv)
        assert code == 1
        assert f"unknown firm {firm!r} (did you mean {near!r}?)" in err


def test_a_known_firm_whose_rules_are_not_loaded_is_a_warning(tmp_path: Path) -> None:
    state = tmp_path / "s.json"
    state.write_text('{"time": "2026-03-02T14:30:00Z", "accounts": ['
                     '{"id": "L", "role": "leader"}, '
                     '{"id": "F1", "role": "follower", "firm": "apex"}]}')
    code, _, err = _cli("dry-run", "--rules", str(DESYNC), "--state", str(state))
    assert code == 0
    assert err.strip() == ("warning: account F1: the rules of firm 'apex' are not loaded, so "
                           "none of its limits apply; add rules/firms/apex.yaml to the rules")
