"""The enforcer: action lifecycle, idempotency, reachability, kill switch, dry run, locks."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

import pytest

from copilink_rules.adapters.base import BrokerAnswer
from copilink_rules.adapters.sim import SimBroker, SimFault, SimFollower, SimScenario, SimTrade
from copilink_rules.alerts import Alerts
from copilink_rules.enforcer import KillSwitch, Lock
from copilink_rules.engine import lock_until
from copilink_rules.journal import Journal
from copilink_rules.model import Decision
from copilink_rules.rules.loader import TradingDay
from copilink_rules.session import Session

from .conftest import REPO

DESYNC = REPO / "rules" / "desync.yaml"


def make(faults: list[SimFault] | None = None, *, dry_run: bool = False,
         kill: KillSwitch | None = None, rules: list[Path] | None = None,
         trades: list[SimTrade] | None = None) -> tuple[SimBroker, Session]:
    scenario = SimScenario(
        followers=[SimFollower(id="F1"), SimFollower(id="F2")],
        trades=trades or [SimTrade(at=2, side="long", qty=2, hold=6)],
        faults=faults or [])
    broker = SimBroker(scenario)
    session = Session(broker, Journal(":memory:"), Alerts(), rules or [DESYNC],
                      rules_path=[REPO / "rules"], dry_run=dry_run,
                      kill_switch=kill or KillSwitch(),
                      before_tick=lambda: broker.advance(0.25))
    session.start()
    return broker, session


def run_until(session: Session, broker: SimBroker, seconds: float) -> None:
    while broker.elapsed < seconds:
        session.tick()


def commands(session: Session) -> list[tuple[str, str, str, int]]:
    return [(c.action, c.account, c.status, c.attempt) for c in session.journal.commands()]


def test_a_stuck_follower_is_flattened_and_verified_flat() -> None:
    broker, session = make([SimFault(kind="missed_exit", account="F2", trade=0)])
    run_until(session, broker, 14)
    assert commands(session) == [("flatten", "F2", "confirmed", 1)]
    assert broker.accounts["F2"].positions == {}
    (row,) = session.journal.commands()
    assert row.reason == "verified in snapshot"
    assert row.tag.startswith("CLR-")


def test_a_rejected_flatten_is_retried_with_backoff_until_it_works() -> None:
    broker, session = make([SimFault(kind="missed_exit", account="F2", trade=0),
                            SimFault(kind="reject", account="F2", at=9, count=2)])
    run_until(session, broker, 20)
    assert commands(session) == [("flatten", "F2", "retried", 1),
                                 ("flatten", "F2", "retried", 2),
                                 ("flatten", "F2", "confirmed", 3)]
    times = [c.time for c in session.journal.commands()]
    # backoff: 1 s after the first rejection, 2 s after the second
    assert times == ["2026-03-02T14:30:10.000Z", "2026-03-02T14:30:11.000Z",
                     "2026-03-02T14:30:13.000Z"]
    # the trader reads the rule's alert first, then what the broker answered to its order
    told = [a.message for a in session.alerts.sent if a.account == "F2"]
    assert "F2 still holds long 2" in told[0]
    assert told[1].startswith("F2: broker rejected flatten")


def test_a_broker_that_never_complies_escalates_and_pauses_every_follower() -> None:
    broker, session = make([SimFault(kind="missed_exit", account="F2", trade=0),
                            SimFault(kind="reject", account="F2", at=9, count=10)])
    run_until(session, broker, 30)
    flattens = [c for c in commands(session) if c[0] == "flatten"]
    assert flattens[-1][2] == "escalated"
    assert len(flattens) == 4  # the first try and three retries
    assert {a.id: a.copier for a in broker.accounts.values() if a.role == "follower"} == {
        "F1": "paused", "F2": "paused"}
    incidents = session.journal.incidents()
    assert incidents[-1]["severity"] == "critical"
    assert "act by hand now" in incidents[-1]["summary"]
    assert any("act by hand" in a.message for a in session.alerts.sent)


def test_no_order_reaches_a_disconnected_follower_and_it_is_flattened_once_back() -> None:
    broker, session = make([SimFault(kind="disconnect", account="F2", at=5, duration=8)])
    run_until(session, broker, 20)
    flattens = [e for e in broker.log if e.get("kind") == "flatten"]
    # the leader exited at 8 s while F2 was down (5-13 s): flattened the moment it is back
    assert [(e["account"], e["time"]) for e in flattens] == [("F2", 13.0)]
    assert all(e.get("connected", True) for e in broker.log)


def test_kill_switch_file_stops_every_automatic_order(tmp_path: Path) -> None:
    kill_file = tmp_path / "copilink.kill"
    kill_file.write_text("stop")
    broker, session = make([SimFault(kind="missed_exit", account="F2", trade=0)],
                           kill=KillSwitch(kill_file))
    decisions = []
    while broker.elapsed < 14:
        decisions += session.tick()
    assert [e for e in broker.log if e.get("kind") == "flatten"] == []
    assert commands(session) == []
    # the decision is reported once, held with its reason, and its alert says it is on hold
    held = [d for d in decisions if d.action == "flatten"]
    assert len(held) == 1
    assert isinstance(held[0].suppressed, str)
    assert "kill switch" in held[0].suppressed
    assert any("ON HOLD: kill switch" in a.message for a in session.alerts.sent)
    KillSwitch(kill_file).release()
    assert not kill_file.exists()


def test_a_flatten_held_by_the_kill_switch_goes_out_once_it_is_released(
        tmp_path: Path) -> None:
    kill_file = tmp_path / "copilink.kill"
    kill_file.write_text("stop")
    broker, session = make([SimFault(kind="missed_exit", account="F2", trade=0)],
                           kill=KillSwitch(kill_file))
    run_until(session, broker, 14)
    assert broker.accounts["F2"].positions  # still stuck while the switch is engaged
    kill_file.unlink()  # `copilink-rules kill --release`
    run_until(session, broker, 16)
    flattens = [e for e in broker.log if e.get("kind") == "flatten"]
    assert [(e["account"], e["time"]) for e in flattens] == [("F2", 14.25)]
    assert broker.accounts["F2"].positions == {}
    assert commands(session) == [("flatten", "F2", "confirmed", 1)]


def test_dry_run_journals_what_it_would_send_and_sends_nothing() -> None:
    broker, session = make([SimFault(kind="missed_exit", account="F2", trade=0)],
                           dry_run=True)
    run_until(session, broker, 14)
    assert [e for e in broker.log if e["tag"].startswith("CLR-")] == []
    assert commands(session) == [("flatten", "F2", "dry_run", 1)]


def test_one_outstanding_corrective_action_per_account_and_instrument() -> None:
    # fills are delayed 3 s: while the first flatten is outstanding, nothing else is sent
    # for F2 in NQ, although the follower still shows the position for 3 more seconds
    broker, session = make([SimFault(kind="missed_exit", account="F2", trade=0),
                            SimFault(kind="delay", account="F2", at=9, duration=10, delay=3)])
    run_until(session, broker, 20)
    engine_orders = [e for e in broker.log if e.get("kind") == "flatten"]
    assert len(engine_orders) == 1
    assert commands(session)[0][:3] == ("flatten", "F2", "confirmed")


def write_limits(tmp_path: Path, max_contracts: int) -> Path:
    path = tmp_path / "limits.yaml"
    path.write_text(f"ruleset: limits\nextends: [desync]\nparams: {{max_contracts: "
                    f"{max_contracts}}}\nrules: []\n")
    return path


def test_catch_up_is_reduced_to_stay_within_max_contracts(tmp_path: Path) -> None:
    broker, session = make([SimFault(kind="missed_entry", account="F2", trade=0)],
                           rules=[write_limits(tmp_path, 1)],
                           trades=[SimTrade(at=2, side="long", qty=2, hold=10)])
    run_until(session, broker, 8)
    (row,) = session.journal.commands()
    assert (row.action, row.args["qty"], row.args["reduced_from"]) == ("catch_up", 1, 2)
    assert broker.accounts["F2"].positions["NQH6"].qty == 1


def test_catch_up_is_refused_on_a_locked_account(tmp_path: Path) -> None:
    broker, session = make([SimFault(kind="missed_entry", account="F2", trade=0)],
                           trades=[SimTrade(at=2, side="long", qty=2, hold=10)])
    session.enforcer.locks["F2"] = Lock("F2", "reducing", datetime(2030, 1, 1, tzinfo=UTC),
                                        "test", None)
    decided = []
    while broker.elapsed < 8:
        decided += session.tick()
    # one book of locks (locks.py): the engine sees the lock and never asks for the catch-up
    catch_ups = [d for d in decided if d.action == "catch_up"]
    assert catch_ups
    assert all("locked (reducing)" in str(d.suppressed) for d in catch_ups)
    # a catch-up decided elsewhere (journaled before a restart) meets the enforcer's refusal
    session.enforcer.process(broker.snapshot(), [catch_ups[0].model_copy(
        update={"suppressed": False})])
    (row,) = session.journal.commands()
    assert (row.action, row.status) == ("catch_up", "blocked")
    assert "locked (reducing)" in (row.reason or "")
    assert "F2" not in {a for a, acc in broker.accounts.items() if acc.positions}


@pytest.mark.parametrize(
    ("now", "until", "expected"),
    [
        # EST (winter): 18:00 New York is 23:00 UTC
        ("2026-03-06T15:00:00+00:00", "next_trading_day", "2026-03-06T23:00:00+00:00"),
        # after 18:00 it is the next evening's 18:00
        ("2026-03-06T23:30:00+00:00", "next_session", "2026-03-07T23:00:00+00:00"),
        # across the spring change (March 8): EDT, 18:00 New York is 22:00 UTC
        ("2026-03-07T23:30:00+00:00", "next_trading_day", "2026-03-08T22:00:00+00:00"),
        # across the autumn change (November 1): EST again, 23:00 UTC
        ("2026-10-31T23:30:00+00:00", "next_trading_day", "2026-11-01T23:00:00+00:00"),
        ("2026-03-06T15:00:00+00:00", "16:59", "2026-03-06T21:59:00+00:00"),
        ("2026-03-06T15:00:00+00:00", "90m", "2026-03-06T16:30:00+00:00"),
    ],
)
def test_lock_expiry_follows_the_trading_day_across_dst(now: str, until: str,
                                                         expected: str) -> None:
    zone = ZoneInfo("America/New_York")
    result = lock_until(until, datetime.fromisoformat(now), zone, TradingDay(zone, "18:00"))
    assert result == datetime.fromisoformat(expected)


def test_lock_decisions_persist_in_the_journal_and_expire() -> None:
    broker, session = make()
    now = broker.snapshot().time
    decision = Decision(time=now, ruleset="t", rule="stuck-follower", action="lock_account",
                        account="F1", instrument=None, severity="critical", reason="test",
                        args={"state": "halted", "until": "30s",
                              "until_time": (now + timedelta(seconds=30)).isoformat()})
    session.enforcer.process(broker.snapshot(), [decision])
    assert session.journal.locks()[0]["state"] == "halted"
    broker.advance(31)
    session.enforcer.process(broker.snapshot(), [])
    assert session.journal.locks() == []
    assert "F1" not in session.enforcer.locks


def test_broker_errors_are_answers_not_crashes() -> None:
    broker, session = make([SimFault(kind="missed_exit", account="F2", trade=0)])

    def explode(*args: object, **kwargs: object) -> None:
        raise ConnectionError("socket closed")

    broker.close_position = explode  # type: ignore[method-assign,assignment]
    run_until(session, broker, 12)
    first, *later = session.journal.commands()
    assert first.status == "retried"  # and tried again, under a new tag
    assert later[0].tag == first.tag + "~2"
    # an error is "unavailable", never counted as the broker refusing
    assert "unavailable: broker error: ConnectionError: socket closed" in (first.reason or "")
    assert not any("broker rejected" in a.message for a in session.alerts.sent)


def test_a_copier_error_never_escapes_the_tick_and_the_state_is_saved() -> None:
    broker, session = make([SimFault(kind="missed_entry", account="F2", trade=0)],
                           trades=[SimTrade(at=2, side="long", qty=2, hold=60)])
    assert session.copier is not None

    def explode(*args: object, **kwargs: object) -> None:
        raise ConnectionError("copier socket closed")

    session.copier.skip_entry = explode  # type: ignore[method-assign,assignment]
    run_until(session, broker, 3)
    broker.price += 100  # price ran away: the missed entry is skipped, not caught up
    run_until(session, broker, 8)
    skips = [c for c in session.journal.commands() if c.action == "skip_entry"]
    assert [c.status for c in skips] == ["rejected"]
    assert "ConnectionError: copier socket closed" in (skips[0].reason or "")
    saved = session.journal.engine_state()
    assert saved is not None
    assert saved["time"] == "2026-03-02T14:30:08+00:00"


def test_a_failing_snapshot_read_skips_the_tick_with_an_alert() -> None:
    broker, session = make()
    original: Callable[[], object] = broker.snapshot

    def broken() -> object:
        raise TimeoutError("no answer from the broker")

    broker.snapshot = broken  # type: ignore[method-assign,assignment]
    assert session.tick() == []
    assert "broker error TimeoutError" in session.alerts.sent[-1].message
    broker.snapshot = original  # type: ignore[method-assign,assignment]
    session.tick()
    assert session.ticks == 1


def test_a_restart_picks_up_open_actions_from_the_journal() -> None:
    broker, session = make([SimFault(kind="missed_exit", account="F2", trade=0),
                            SimFault(kind="reject", account="F2", at=9, count=1)])
    run_until(session, broker, 10.25)  # the first flatten was rejected: retrying
    assert commands(session)[-1][2] == "retrying"
    journal = session.journal
    restarted = Session(broker, journal, Alerts(), [DESYNC],
                        before_tick=lambda: broker.advance(0.25))
    restarted.start()
    restarted.engine.restore_state(session.engine.save_state())
    run_until(restarted, broker, 16)
    flattens = [c for c in commands(restarted) if c[0] == "flatten"]
    assert flattens[-1][2] == "confirmed"
    assert len([e for e in broker.log if e.get("kind") == "flatten"]) == 2  # 1 refused, 1 ok


@pytest.mark.parametrize("told", [{}, {"F2": "MNQH6"}])  # by the broker, or by copilink.yaml
def test_a_catch_up_is_placed_in_the_contract_the_follower_trades(told: dict[str, str]) -> None:
    # F2 copies the leader's NQ as micros (ratio 0.5): 2 NQ long is 10 MNQ for it
    scenario = SimScenario(
        followers=[SimFollower(id="F1"), SimFollower(id="F2", ratio=0.5, instrument="MNQH6")],
        trades=[SimTrade(at=2, side="long", qty=2, hold=10)],
        faults=[SimFault(kind="missed_entry", account="F2", trade=0)])
    broker = SimBroker(scenario)
    session = Session(broker, Journal(":memory:"), Alerts(), [DESYNC],
                      before_tick=lambda: broker.advance(0.25), contracts=told)
    session.start()
    run_until(session, broker, 8)
    (row,) = session.journal.commands()
    assert (row.action, row.status, row.instrument, row.args["qty"]) == (
        "catch_up", "confirmed", "MNQH6", 10)
    assert row.args["contract_of_leader"] == "1 NQH6"
    assert {s: p.qty for s, p in broker.accounts["F2"].positions.items()} == {"MNQH6": 10}


def test_a_broker_that_cannot_list_contracts_leaves_copilink_yaml_s(
        caplog: pytest.LogCaptureFixture) -> None:
    class Silent(SimBroker):
        def contracts(self) -> dict[str, str]:
            raise ConnectionError("copier settings unavailable")

    broker = Silent(SimScenario(followers=[SimFollower(id="F1", instrument="MNQH6")]))
    session = Session(broker, Journal(":memory:"), Alerts(), [DESYNC],
                      contracts={"F1": "MNQH6"})
    assert session.enforcer.contracts == {"F1": "MNQH6"}
    assert "could not say which contract each follower trades" in caplog.text


class _Crash(BaseException):
    """The process dying at a chosen instant (not an Exception: nothing may catch it)."""


def _restart(broker: SimBroker, journal: Journal) -> tuple[Session, list[str]]:
    session = Session(broker, journal, Alerts(), [DESYNC],
                      before_tick=lambda: broker.advance(0.25))
    return session, session.start()


def test_a_command_journaled_but_never_sent_before_a_crash_is_sent_once() -> None:
    def die(kind: str, account: str, tag: str) -> None:
        raise _Crash

    broker = SimBroker(SimScenario(
        followers=[SimFollower(id="F1"), SimFollower(id="F2")],
        trades=[SimTrade(at=2, side="long", qty=2, hold=6)],
        faults=[SimFault(kind="missed_exit", account="F2", trade=0)]))
    journal = Journal(":memory:")
    session = Session(broker, journal, Alerts(), [DESYNC], on_command=die,
                      before_tick=lambda: broker.advance(0.25))
    session.start()
    with pytest.raises(_Crash):
        run_until(session, broker, 14)
    assert [(r.action, r.status) for r in journal.commands()] == [("flatten", "sending")]
    assert not [e for e in broker.log if e.get("kind") == "flatten"]  # it never left
    restarted, notes = _restart(broker, journal)
    assert any("never reached the broker; will send it again" in n for n in notes)
    run_until(restarted, broker, 16)
    assert len([e for e in broker.log if e.get("kind") == "flatten"]) == 1
    rows = journal.commands()
    assert [(r.tag, r.status) for r in rows[:2]] == [("CLR-000001", "retried"),
                                                     ("CLR-000001~2", "confirmed")]
    # the engine, restored from before the crash, decides the flatten again: refused
    assert (rows[2].status, rows[2].reason) == (
        "blocked", "flatten CLR-000001~2 is still outstanding for this account and instrument")
    assert broker.accounts["F2"].positions == {}
    # and a second restart finds nothing open to send again
    _, notes = _restart(broker, journal)
    assert not any("will send it again" in n for n in notes)


def test_a_command_sent_just_before_a_crash_is_not_sent_again() -> None:
    broker, session = make([SimFault(kind="missed_exit", account="F2", trade=0)])
    run_until(session, broker, 10.5)
    (row,) = session.journal.commands()
    assert [e["kind"] for e in broker.log if e.get("kind") == "flatten"] == ["flatten"]
    # the crash came after the broker took the order, before its answer was journaled
    session.journal.command_status(row.tag, "sending", datetime(2026, 3, 2, 14, 30, 10,
                                                                tzinfo=UTC))
    restarted, notes = _restart(broker, session.journal)
    assert any(f"{row.tag}: the broker has it" in n for n in notes)
    run_until(restarted, broker, 16)
    assert len([e for e in broker.log if e.get("kind") == "flatten"]) == 1
    assert [(r.action, r.status) for r in restarted.journal.commands()] == [
        ("flatten", "confirmed")]


def test_a_restart_after_a_retried_flatten_worked_sends_nothing_more() -> None:
    broker, session = make([SimFault(kind="missed_exit", account="F2", trade=0),
                            SimFault(kind="reject", account="F2", at=9, count=2)])
    run_until(session, broker, 20)
    assert [c[2] for c in commands(session)] == ["retried", "retried", "confirmed"]
    sent = len([e for e in broker.log if e.get("kind") == "flatten"])
    restarted, _ = _restart(broker, session.journal)
    run_until(restarted, broker, 30)
    assert len([e for e in broker.log if e.get("kind") == "flatten"]) == sent
    # a journal written before attempts were closed as `retried` left them `retrying`
    for row in session.journal.commands()[:2]:
        session.journal.command_status(row.tag, "retrying", datetime(2026, 3, 2, 14, 30, 20,
                                                                    tzinfo=UTC))
    again, _ = _restart(broker, session.journal)
    assert again.enforcer.outstanding == {}
    run_until(again, broker, 40)
    assert len([e for e in broker.log if e.get("kind") == "flatten"]) == sent
    assert [c[2] for c in commands(again)][:3] == ["retried", "retried", "confirmed"]


def test_a_refused_protective_stop_is_a_critical_alert_and_journaled() -> None:
    class NoStops(SimBroker):
        def place_order(self, account: str, instrument: str, side: Literal["buy", "sell"],
                        qty: int, order_type: Literal["market", "stop"], tag: str,
                        stop_price: float | None = None) -> BrokerAnswer:
            if order_type == "stop":
                return BrokerAnswer("rejected", "stop too close to the market", None)
            return super().place_order(account, instrument, side, qty, order_type, tag,
                                       stop_price)

    broker = NoStops(SimScenario(
        followers=[SimFollower(id="F1"), SimFollower(id="F2")],
        trades=[SimTrade(at=2, side="long", qty=2, hold=10)],
        faults=[SimFault(kind="missed_entry", account="F2", trade=0)]))
    session = Session(broker, Journal(":memory:"), Alerts(), [DESYNC],
                      before_tick=lambda: broker.advance(0.25))
    session.start()
    run_until(session, broker, 8)
    (row,) = session.journal.commands()
    assert (row.action, row.status) == ("catch_up", "confirmed")  # the entry itself worked
    warning = [a for a in session.alerts.sent if "protective stop" in a.message]
    assert len(warning) == 1
    assert warning[0].severity == "critical"
    assert warning[0].message.startswith(
        f"F2: the protective stop at {row.args['stop_price']} for catch-up {row.tag} was "
        "refused (stop too close to the market): the position has no stop")
    answers = [(tag, status, reason) for tag, _, status, reason in session.journal.answers()]
    assert (f"{row.tag}-stop", "rejected", "stop too close to the market") in answers


def test_a_crash_at_any_point_of_a_tick_never_leaves_the_sim_behind_the_journal(
        tmp_path: Path) -> None:
    state = tmp_path / "sim.json"
    scenario = SimScenario(followers=[SimFollower(id="F1"), SimFollower(id="F2")],
                           trades=[SimTrade(at=2, side="long", qty=2, hold=6)],
                           faults=[SimFault(kind="missed_exit", account="F2", trade=0)])
    for crash_in in ("after_commands", "save_engine_state"):
        broker = SimBroker(scenario)
        journal = Journal(tmp_path / f"{crash_in}.db")
        session = Session(broker, journal, Alerts(), [DESYNC],
                          before_tick=lambda b=broker: b.advance(0.25))  # type: ignore[misc]

        def save(b: SimBroker = broker) -> None:
            b.save(state)

        session.after_commands = save
        session.start()
        run_until(session, broker, 9)

        def die(*args: object, **kwargs: object) -> None:
            raise _Crash

        if crash_in == "after_commands":
            session.after_commands = die
        else:
            journal.save_engine_state = die  # type: ignore[method-assign]
        with pytest.raises(_Crash):
            session.tick()
        journal.close()
        restored = SimBroker.load(state)
        restarted = Session(restored, Journal(tmp_path / f"{crash_in}.db"), Alerts(), [DESYNC],
                            before_tick=lambda b=restored: b.advance(0.25))  # type: ignore[misc]
        restarted.start()  # the journal is never ahead of the sim's clock
        run_until(restarted, restored, 14)
        assert restored.accounts["F2"].positions == {}


def test_a_refused_cancel_of_a_working_attempt_is_asked_again_until_it_is_final() -> None:
    # a catch-up sticks at the broker; the first cancel is refused (a broker fault): the
    # enforcer asks again, so the attempt ends and the follower is not blocked for good
    scenario = SimScenario(
        own_copier=False, followers=[SimFollower(id="F1")],
        trades=[SimTrade(at=1, side="long", qty=1, hold=25)],
        faults=[SimFault(kind="stuck_order", account="F1", at=2),
                SimFault(kind="reject", account="F1", at=10, count=1)])
    broker = SimBroker(scenario)
    session = Session(broker, Journal(":memory:"), Alerts(), [DESYNC],
                      before_tick=lambda: broker.advance(0.25))
    session.start()
    run_until(session, broker, 20)
    cancels = [e for e in broker.log if e.get("kind") == "cancel_order"]
    assert [e["status"] for e in cancels] == ["rejected", "filled"]
    catch_up = [c for c in session.journal.commands() if c.action == "catch_up"]
    assert catch_up[0].status != "cancelling"
    assert broker.find_tag(catch_up[0].tag).state == "cancelled"  # type: ignore[union-attr]


def test_a_flatten_of_every_instrument_waits_for_a_flatten_of_one_on_the_same_account(
        tmp_path: Path) -> None:
    from copilink_rules.adapters.base import AccountSpec
    from copilink_rules.adapters.fake import FakeBroker
    from copilink_rules.enforcer import Enforcer
    from copilink_rules.rules.loader import load_policy

    fake = FakeBroker([AccountSpec("LEAD", "leader"), AccountSpec("F1", "follower", "LEAD")])
    fake.set_position("F1", "NQH6", 2)
    fake.fills = "held"  # the first close works at the broker and is not done yet
    journal = Journal(tmp_path / "j.db")
    enforcer = Enforcer(fake, journal, Alerts(), load_policy([DESYNC]))
    snapshot = fake.snapshot()

    def flatten(instrument: str | None) -> Decision:
        return Decision(time=snapshot.time, ruleset="desync", rule="r", action="flatten",
                        account="F1", instrument=instrument, severity="critical", reason="x")

    enforcer.process(snapshot, [flatten("NQH6"), flatten(None)])
    closes = [c for c in fake.calls if c.method == "close_position"]
    assert [c.instrument for c in closes] == ["NQH6"]  # never both: NQ would close twice
    assert any("still outstanding" in (c.reason or "") for c in journal.commands())
