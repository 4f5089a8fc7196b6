"""The built-in copier (copier.py `BuiltinCopier`) under chaos: seeded sim sessions with the
sim's own copier off, the built-in copier copying the leader onto three followers (1:1, NQ as
micros, ratio 0.5) of a firm with a 2-contract limit, random faults of the broker (lost, stuck,
rejected and late orders, manual orders, reversals, disconnects, stale data, NaN and missing
quotes), followers locked, paused and resumed by the rules, the kill switch engaged and
released, and crashes at random points — inside the copier's send too, before and after the
broker has the order — each followed by a new Session and a new BuiltinCopier on the same
journal. The SPEC section 7 invariants, the copier's own among them, are read from the broker's
record: see tests/chaos_support.py. `benchmarks/soak.py --copier builtin` runs more.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from copilink_rules.adapters.sim import SimBroker, SimFault, SimFollower, SimScenario, SimTrade
from copilink_rules.alerts import Alerts
from copilink_rules.copier import BuiltinCopier, FollowerCopy
from copilink_rules.journal import Journal
from copilink_rules.session import Session

from .chaos_support import (
    COPIER_INVARIANTS,
    FIRM,
    REPO,
    ChaosRun,
    check_chaos,
    describe,
    run_chaos,
    write_rules,
)

CHUNKS, PER_CHUNK = 10, 20  # 200 sessions


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_rules(tmp_path_factory.mktemp("rules"), "builtin")


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_copier_invariants_hold_through_broker_faults_kill_switch_and_crashes(
        chunk: int, rules: Path, tmp_path: Path) -> None:
    failures = []
    crashes: list[str] = []
    for seed in range(chunk * PER_CHUNK, (chunk + 1) * PER_CHUNK):
        run = run_chaos(seed, tmp_path, rules, copier="builtin")
        crashes += [where for _, where in run.crashes]
        found = check_chaos(run)
        if found:
            failures.append(describe(run, found))
    assert not failures, "\n".join(failures)
    assert len(crashes) >= PER_CHUNK, "the chunk crashed too rarely to test restarts"
    assert {"on_command", "after_send", "after_copy"} <= set(crashes), crashes


# --- the checks are not vacuous -----------------------------------------------------------------


def test_the_copier_checks_see_every_kind_of_violation() -> None:
    """A broker log with one of each copier violation breaks each copier invariant."""
    broker = SimBroker(SimScenario(
        trades=[SimTrade(at=1, side="long", qty=1, hold=30)], leader_firm=FIRM,
        own_copier=False, followers=[SimFollower(id="F1", firm=FIRM),
                                     SimFollower(id="F2", firm=FIRM)]))
    broker.advance(2)  # the leader long 1; the followers flat (nothing copies)
    broker.place_order("F1", "NQH6", "buy", 1, "market", "CLR-000001")  # copying is paused
    broker.place_order("F2", "NQH6", "buy", 1, "market", "CLR-000002")  # F2 is halted
    broker.place_order("F2", "NQH6", "sell", 1, "market", "CLR-000003")  # one leader change...
    broker.place_order("F2", "NQH6", "buy", 1, "market", "CLR-000004")  # ...copied twice
    copy = {"qty": 1, "expected": 1.0}
    actions = {"CLR-000001": ("copy", "NQH6", copy), "CLR-000002": ("copy", "NQH6", copy),
               "CLR-000003": ("copy", "NQH6", {"qty": -1, "expected": 0.0}),
               "CLR-000004": ("copy", "NQH6", copy)}
    controls = [{"time": 2.0, "lead": 1.0, "paused": {"F1"}, "locks": {"F2": "halted"},
                 "killed": False}]
    # at the end the leader is flat and F1 still long
    states = [{"time": 40.0, "killed": False, "F1": (0.0, 1.0, True, True),
               "F2": (0.0, 0.0, True, True)}]
    run = ChaosRun(-1, broker, states, [], [], {}, set(actions), 4, [], "builtin", controls,
                   actions)
    found = check_chaos(run)
    assert {"paused_copy", "locked_copy", "copied_twice", "end_in_line"} <= set(found), found
    assert set(found) <= set(COPIER_INVARIANTS)
    assert "CLR-000001" in found["paused_copy"][0]
    assert "CLR-000002" in found["locked_copy"][0]
    assert any("CLR-000004" in problem for problem in found["copied_twice"])


# --- bugs the chaos found, one focused test each --------------------------------------------------


def _session(tmp_path: Path, broker: SimBroker,
             followers: tuple[FollowerCopy, ...]) -> tuple[Journal, Session]:
    """A session (a new process) with the built-in copier, on the journal in `tmp_path`."""
    journal = Journal(tmp_path / "journal.db")
    session = Session(broker, journal, Alerts(), [REPO / "rules" / "desync.yaml"],
                      rules_path=[REPO / "rules"],
                      copier=BuiltinCopier(broker, journal, followers),
                      before_tick=lambda: broker.advance(0.25))
    session.start()
    return journal, session


@pytest.mark.parametrize("restart", [False, True], ids=["same-process", "after-a-restart"])
def test_a_refused_cancel_of_a_stuck_copy_is_asked_again(tmp_path: Path, restart: bool) -> None:
    """Chaos seeds 1033 and 1129 (3 trades, 12 faults): a copy stuck at the broker is
    cancelled 5 s on, the broker refuses the cancel, and the copier never asked again. The
    order stayed working (it could still fill at any time) and the follower's family stayed
    closed to every copy and to the rules' own flatten for the rest of the session."""
    scenario = SimScenario(
        trades=[SimTrade(at=1, side="long", qty=1, hold=20)], leader_firm=None,
        own_copier=False, followers=[SimFollower(id="F1")],
        faults=[SimFault(kind="stuck_order", account="F1", at=0.5),
                SimFault(kind="reject", account="F1", at=2.0)])
    followers = (FollowerCopy("F1", "LEAD"),)
    broker = SimBroker(scenario)
    journal, session = _session(tmp_path, broker, followers)
    while broker.elapsed < 6.5:  # the copy at 1 s sticks; its cancel at 6 s is refused
        session.tick()
    copy = next(e for e in broker.log if e.get("kind") == "place_market")
    cancels = [e for e in broker.log if e.get("kind") == "cancel_order"]
    assert copy["status"] == "accepted"
    assert [c["status"] for c in cancels] == ["rejected"]
    if restart:  # the process dies; a new one starts on the same journal and broker
        journal.close()
        journal, session = _session(tmp_path, broker, followers)
    while broker.elapsed < 9:
        session.tick()
    report = broker.find_tag(copy["tag"])
    assert report is not None
    assert report.state == "cancelled"  # asked again: no stuck order is left working
    assert session.builtin is not None
    assert not session.builtin.in_flight
    while broker.elapsed < 30:  # the leader exits at 21 s
        session.tick()
    assert not broker.accounts["F1"].positions
    assert not [e for e in broker.log if e["tag"] != copy["tag"] and
                e.get("kind") == "place_market" and e["status"] == "accepted"]
    journal.close()


def test_no_copy_adds_exposure_on_data_older_than_entry_max_data_age(tmp_path: Path) -> None:
    """Chaos seeds 2025 and 2095 (4 trades, 15 faults): a follower's data froze (a NaN quote),
    a person's order then filled there unseen, and the copier sized the leader's entry, and
    asked the gate about it, from data 4.4 s old: the follower ended past its firm's limit.
    A copy that adds exposure needs data as fresh as the rules' catch-up does
    (`entry_max_data_age`); the rules catch the follower up once its data is fresh."""
    rules = write_rules(tmp_path, "builtin")
    broker = SimBroker(SimScenario(
        trades=[SimTrade(at=3, side="long", qty=2, hold=20)], leader_firm=FIRM,
        own_copier=False, followers=[SimFollower(id="F1", firm=FIRM)],
        faults=[SimFault(kind="stale", account="F1", at=0.5, duration=4),
                SimFault(kind="manual_order", account="F1", at=1.0, count=2, side="buy")]))
    journal = Journal(tmp_path / "journal.db")
    session = Session(broker, journal, Alerts(), [rules], rules_path=[REPO / "rules"],
                      copier=BuiltinCopier(broker, journal, (FollowerCopy("F1", "LEAD"),)),
                      before_tick=lambda: broker.advance(0.25))
    session.start()
    while broker.elapsed < 12:
        session.tick()
    copies = [e for e in broker.log if e.get("kind") == "place_market" and e["time"] <= 4.5]
    assert copies == []  # F1's data was 2.5 s old at the leader's entry: no copy
    row = next(r for r in journal.commands() if r.action == "copy")
    assert row.status == "not_copied"
    assert "needs data under 1s old" in (row.reason or "")
    held = [e["held_after"] for e in broker.log if e.get("kind") in ("place_market", "flatten")
            and e["status"] == "filled" and abs(e["after"]) > abs(e["before"])]
    assert all(sum(abs(q) for q in h.values()) <= 2 for h in held), held
    journal.close()
