"""Locks: one book (locks.py) with one rule, the same for the engine's decisions and the
enforcer's journaled locks, read by the gate and the view."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from copilink_rules.adapters.sim import SimBroker, SimFollower, SimScenario
from copilink_rules.alerts import Alerts
from copilink_rules.enforcer import Enforcer
from copilink_rules.engine import Engine
from copilink_rules.gate import Gate, OrderRequest
from copilink_rules.journal import Journal
from copilink_rules.locks import Locks
from copilink_rules.model import Decision, Snapshot
from copilink_rules.rules import Policy, load_policy
from copilink_rules.session import Session

from .conftest import REPO, account, pos, snap

# A firm in London: its trading day starts 22:00 local, 22:00 UTC in winter, 21:00 UTC once
# the clocks go forward (Sunday 29 March 2026).
ACME = """
    ruleset: acme
    firm: acme
    timezone: Europe/London
    trading_day_start: "22:00"
    rules:
      - id: halt
        scope: account
        when: account.pnl < -500
        then:
          - lock_account: {state: halted, until: 30m}
      - id: soft
        scope: account
        when: account.pnl < -400
        for: 60s
        then:
          - lock_account: {state: reducing, until: next_trading_day}
      - id: day-halt
        scope: account
        when: account.pnl < -2000
        priority: 10
        then:
          - lock_account: {state: halted, until: next_trading_day}
"""
T = datetime(2026, 3, 27, 14, 0, tzinfo=UTC)  # Friday afternoon in London


def _policy(write_rules: Callable[..., Path]) -> Policy:
    return load_policy([write_rules(ACME)])


def _f1(moment: datetime, pnl: float) -> Snapshot:
    return snap(moment, account("LEAD", "leader", firm="acme"),
                account("F1", firm="acme", realized_pnl=pnl, positions=[pos("NQH6", 1)]))


def _enforcer(policy: Policy) -> Enforcer:
    broker = SimBroker(SimScenario(followers=[SimFollower(id="F1")]))
    return Enforcer(broker, Journal(":memory:"), Alerts(), policy)


def _locks(decisions: list[Decision]) -> list[Decision]:
    return [d for d in decisions if d.action == "lock_account" and d.suppressed is False]


def test_a_halted_lock_is_never_replaced_by_a_reducing_one_in_the_book() -> None:
    book = Locks()
    book.place("F1", "halted", T + timedelta(minutes=30), "halt", "halt")
    kept = book.place("F1", "reducing", T + timedelta(days=1), "soft", "soft")
    assert (kept.state, kept.until, kept.rule) == ("halted", T + timedelta(minutes=30), "halt")
    stricter = book.place("F1", "halted", T + timedelta(hours=2), "again", "halt")
    assert book.get("F1") == stricter


def test_a_reducing_lock_gives_way_to_a_halted_one() -> None:
    book = Locks()
    book.place("F1", "reducing", T + timedelta(days=1), "soft", "soft")
    assert book.place("F1", "halted", T + timedelta(minutes=5), "halt", "halt").state == "halted"


def test_engine_and_enforcer_keep_the_halted_lock_over_a_later_reducing_one(
        write_rules: Callable[..., Path]) -> None:
    policy = _policy(write_rules)
    engine = Engine(policy)
    enforcer = _enforcer(policy)  # its own book, as when it is handed decisions made elsewhere
    decided = []
    for seconds in (0, 30, 61):
        snapshot = _f1(T + timedelta(seconds=seconds), -600.0)
        decisions = engine.evaluate(snapshot)
        enforcer.process(snapshot, decisions)
        decided += _locks(decisions)
    assert [(d.rule, d.args["state"]) for d in decided] == [("halt", "halted"),
                                                            ("soft", "reducing")]
    # the reducing lock would last longer, yet the halted one stands, and the decision says so
    halted_until = T + timedelta(minutes=30)
    assert decided[1].args["until_time"] == halted_until.isoformat()
    in_engine, in_enforcer = engine.lock_book.get("F1"), enforcer.locks.get("F1")
    assert in_engine is not None
    assert in_enforcer is not None
    assert (in_engine.state, in_engine.until, in_engine.rule) == \
        (in_enforcer.state, in_enforcer.until, in_enforcer.rule) == \
        ("halted", halted_until, "halt")
    assert [(row["state"], row["rule"]) for row in enforcer.journal.locks()] == \
        [("halted", "halt")]


def test_a_lock_ends_at_the_firms_trading_day_across_the_clock_change(
        write_rules: Callable[..., Path]) -> None:
    policy = _policy(write_rules)
    engine = Engine(policy)
    enforcer = _enforcer(policy)
    enforcer.locks = engine.lock_book  # as a session wires them
    gate = Gate(policy)
    saturday = datetime(2026, 3, 28, 22, 30, tzinfo=UTC)  # after 22:00 GMT: Sunday's day
    snapshot = _f1(saturday, -2500.0)
    decisions = engine.evaluate(snapshot)
    enforcer.process(snapshot, decisions)
    ends = datetime(2026, 3, 29, 21, 0, tzinfo=UTC)  # 22:00 BST
    (day_halt,) = [d for d in _locks(decisions) if d.rule == "day-halt"]
    assert day_halt.args["until_time"] == ends.isoformat()
    assert enforcer.journal.locks()[0]["until"].startswith("2026-03-29T21:00:00")

    before = _f1(ends - timedelta(seconds=1), -2500.0)
    assert not any(d.args.get("lock_expired") for d in engine.evaluate(before))
    gate.update(before, engine.lock_book)
    buy = OrderRequest(account="F1", instrument="NQH6", side="buy", qty=1)
    assert gate.check(buy).verdict == "block"

    after = _f1(ends, -2500.0)
    expired = [d for d in engine.evaluate(after) if d.args.get("lock_expired")]
    assert [(d.account, d.args["lock_expired"]) for d in expired] == [("F1", "halted")]
    enforcer.process(after, [])
    assert "F1" not in engine.lock_book
    assert "F1" not in enforcer.locks
    assert enforcer.journal.locks() == []
    gate.update(after, engine.lock_book)
    assert "is halted" not in " ".join(gate.check(buy).reasons)


def test_a_session_gives_the_enforcer_and_the_view_the_engines_book() -> None:
    broker = SimBroker(SimScenario(followers=[SimFollower(id="F1")]))
    session = Session(broker, Journal(":memory:"), Alerts(), [REPO / "rules" / "desync.yaml"])
    session.start()
    assert session.enforcer.locks is session.engine.lock_book
    session.engine.lock_book.place("F1", "halted", datetime(2030, 1, 1, tzinfo=UTC), "t", None)
    saved = session.engine.save_state()
    restored = Engine(session.policy)
    restored.restore_state(saved)
    lock = restored.lock_book.get("F1")
    assert lock is not None
    assert lock.state == "halted"
    assert lock.rule is None
