"""SPEC section 7 invariants, end to end with the sim broker over many seeded sessions.

Each session: a leader making random trades, followers copied with latency, and random faults
(missed entries and exits, reversals, disconnects, stale data, rejections, delayed fills). The
checks read the *broker's* own record of what it received, not the enforcer's bookkeeping.
"""

from __future__ import annotations

import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from copilink_rules.adapters.sim import SimBroker, SimFollower, SimScenario
from copilink_rules.alerts import Alerts
from copilink_rules.journal import Journal
from copilink_rules.session import Session

from .chaos_support import REPO, engine_entries, unreachable_orders
from .chaos_support import follower_states as _positions

MAX_CONTRACTS = 4


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("rules")
    path = folder / "limits.yaml"
    path.write_text(textwrap.dedent(f"""
        ruleset: limits
        extends: [desync]
        params: {{max_contracts: {MAX_CONTRACTS}}}
        rules: []
    """))
    return path


def run_session(seed: int, rules: Path, faults: int, trades: int = 4
                ) -> tuple[SimBroker, Session, list[dict[str, Any]]]:
    scenario = SimScenario(seed=seed, random_trades=trades, random_faults=faults,
                           followers=[SimFollower(id="F1"), SimFollower(id="F2"),
                                      SimFollower(id="F3", instrument="MNQH6")])
    broker = SimBroker(scenario)
    session = Session(broker, Journal(":memory:"), Alerts(), [rules],
                      rules_path=[REPO / "rules"], before_tick=lambda: broker.advance(0.25))
    session.start()
    states: list[dict[str, Any]] = []
    while broker.elapsed < broker.end:
        session.tick()
        states.append(_positions(broker))
    return broker, session, states


def check_invariants(broker: SimBroker) -> list[str]:
    problems = []
    engine_orders = engine_entries(broker.log)
    # 1. at most one outstanding corrective order per account and instrument family
    last_open: dict[str, dict[str, Any]] = {}
    for entry in sorted(engine_orders, key=lambda e: e["time"]):
        if entry["kind"] == "place_stop":
            continue  # the catch-up's protective stop travels with its entry order
        key = entry["account"]
        previous = last_open.get(key)
        if previous is not None and previous["status"] == "accepted" and \
                previous["tag"].split("~")[0] != entry["tag"].split("~")[0]:
            problems.append(f"{entry['tag']} sent while {previous['tag']} was still open")
        if previous is not None and previous["status"] == "filled" and \
                previous.get("filled_at", previous["time"]) > entry["time"]:
            problems.append(f"{entry['tag']} sent before {previous['tag']} filled")
        last_open[key] = entry
    # 2. never an order to a disconnected account or one whose data is stale
    problems += unreachable_orders(broker.log)
    for entry in engine_orders:
        if entry.get("kind") == "place_market" and entry.get("status") == "filled":
            # 3. never past max contracts, never an opposite position
            if entry.get("contracts_after", 0) > MAX_CONTRACTS:
                problems.append(f"{entry['tag']} left {entry['account']} with "
                                f"{entry['contracts_after']} contracts")
            if entry.get("after", 0) * entry.get("leader", 0) < 0:
                problems.append(f"{entry['tag']} created an opposite position on "
                                f"{entry['account']}")
    return problems


@pytest.mark.parametrize("seed", range(120))
def test_invariants_hold_with_random_faults(seed: int, rules: Path) -> None:
    broker, session, _ = run_session(seed, rules, faults=4)
    assert check_invariants(broker) == []
    # the journal saw every command the broker saw, and each tag once
    tags = [c.tag for c in session.journal.commands()]
    assert len(tags) == len(set(tags))
    broker_tags = {e["tag"] for e in broker.log if e["tag"].startswith("CLR-")}
    assert {t.removesuffix("-stop") for t in broker_tags} <= set(tags)


@pytest.mark.parametrize("seed", range(80))
def test_stuck_and_opposite_followers_are_resolved_in_bounded_time(seed: int,
                                                                   rules: Path) -> None:
    """With a healthy broker (desync faults only), every stuck or opposite follower is back
    in line within its grace plus a few ticks."""
    broker, session, states = _healthy_session(seed + 1000, rules, faults=3)
    assert check_invariants(broker) == []
    assert session.journal.count("decisions") > 0, "no desync happened: nothing was tested"
    bound = 2.0 + 1.0  # the longer grace (stuck, 2 s) + the copier's latency and ticks
    started: dict[str, float] = {}
    worst: dict[str, float] = defaultdict(float)
    for state in states:
        for follower in ("F1", "F2", "F3"):
            lead, held, _, _ = state[follower]
            bad = (lead == 0 and held != 0) or lead * held < 0
            if bad:
                started.setdefault(follower, state["time"])
                worst[follower] = max(worst[follower], state["time"] - started[follower])
            else:
                started.pop(follower, None)
    assert max(worst.values(), default=0.0) <= bound, dict(worst)


def _healthy_session(seed: int, rules: Path, faults: int
                     ) -> tuple[SimBroker, Session, list[dict[str, Any]]]:
    scenario = SimScenario(seed=seed, random_trades=5,
                           followers=[SimFollower(id="F1"), SimFollower(id="F2"),
                                      SimFollower(id="F3", instrument="MNQH6")])
    probe = SimBroker(scenario.model_copy(update={"random_faults": 12}))
    desync_only = [f for f in probe.faults
                   if f.kind in ("missed_entry", "missed_exit", "reversal")][:faults]
    assert desync_only, "the seed drew no desync fault: nothing would be tested"
    broker = SimBroker(scenario.model_copy(update={"faults": desync_only,
                                                   "trades": probe.trades}))
    session = Session(broker, Journal(":memory:"), Alerts(), [rules],
                      rules_path=[REPO / "rules"], before_tick=lambda: broker.advance(0.25))
    session.start()
    states = []
    while broker.elapsed < broker.end:
        session.tick()
        states.append(_positions(broker))
    return broker, session, states


def test_the_sim_saved_to_a_file_continues_exactly_as_the_original(tmp_path: Path) -> None:
    original = SimBroker(SimScenario(seed=3, random_trades=4, random_faults=6,
                                     followers=[SimFollower(id="F1"),
                                                SimFollower(id="F2", instrument="MNQH6")]))
    for _ in range(80):
        original.advance(0.25)
    original.close_position("F2", None, "CLR-000001")
    original.save(tmp_path / "sim.json")
    restored = SimBroker.load(tmp_path / "sim.json")
    assert restored.snapshot() == original.snapshot()
    for _ in range(200):
        original.advance(0.25)
        restored.advance(0.25)
    assert restored.snapshot() == original.snapshot()
    assert restored.log == original.log
    assert restored.find_tag("CLR-000001") == original.find_tag("CLR-000001")
