"""The chaos test: seeded sim sessions with random faults of every kind (late fills of the
engine's own orders, NaN and missing quotes included), the kill switch engaged and released
mid-session, and crashes at random points followed by a restart on the same journal — in
process (hundreds of sessions) and as real SIGKILLed `copilink-rules run` processes (a
handful). The SPEC section 7 invariants are read from the broker's own record: see
tests/chaos_support.py. benchmarks/soak.py runs thousands of the same sessions.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from copilink_rules.adapters.sim import SimBroker, SimFault, SimFollower, SimScenario, SimTrade
from copilink_rules.alerts import Alerts
from copilink_rules.journal import Journal
from copilink_rules.session import Session

from .chaos_support import (
    CATALOG,
    FIRM,
    REPO,
    ChaosRun,
    chaos_scenario,
    check_chaos,
    describe,
    run_chaos,
    write_rules,
)

CHUNKS, PER_CHUNK = 10, 20  # 200 in-process sessions


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_rules(tmp_path_factory.mktemp("rules"))


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_invariants_hold_through_faults_kill_switch_and_crashes(chunk: int, rules: Path,
                                                                 tmp_path: Path) -> None:
    failures = []
    crashes = 0
    for seed in range(chunk * PER_CHUNK, (chunk + 1) * PER_CHUNK):
        run = run_chaos(seed, tmp_path, rules)
        crashes += len(run.crashes)
        found = check_chaos(run)
        if found:
            failures.append(describe(run, found))
    assert not failures, "\n".join(failures)
    assert crashes >= PER_CHUNK, "the chunk crashed too rarely to test restarts"


# --- the sim's NaN and missing quotes -------------------------------------------------------


def test_a_nan_quote_is_missing_and_stale_data_never_a_number() -> None:
    broker = SimBroker(SimScenario(
        trades=[SimTrade(at=1, side="long", qty=1, hold=20)],
        followers=[SimFollower(id="F1"), SimFollower(id="F2", instrument="MNQH6")],
        faults=[SimFault(kind="nan_quote", account="F2", at=2, duration=6),
                SimFault(kind="no_quote", account="F1", at=10, duration=3)]))
    broker.advance(3)
    snapshot = broker.snapshot()
    quote = snapshot.quotes["MNQH6"]
    assert (quote.bid, quote.ask, quote.last) == (None, None, None)
    assert snapshot.quotes["NQH6"].last is not None
    f2 = next(a for a in snapshot.accounts if a.id == "F2")
    assert f2.data_age(snapshot.time) == pytest.approx(1.0)  # frozen since the NaN came
    broker.advance(8)  # 11 s: the NaN is over, NQ's quote is gone
    snapshot = broker.snapshot()
    assert "NQH6" not in snapshot.quotes
    assert snapshot.quotes["MNQH6"].last is not None
    assert all(a.data_age(snapshot.time) == 0 for a in snapshot.accounts)
    broker.advance(3)
    assert "NQH6" in broker.snapshot().quotes


def test_quote_faults_survive_save_and_load(tmp_path: Path) -> None:
    broker = SimBroker(SimScenario(
        trades=[SimTrade(at=1, side="short", qty=2, hold=20)],
        followers=[SimFollower(id="F1")],
        faults=[SimFault(kind="nan_quote", account="F1", at=2, duration=6)]))
    broker.advance(3)
    broker.save(tmp_path / "sim.json")
    restored = SimBroker.load(tmp_path / "sim.json")
    assert restored.snapshot() == broker.snapshot()
    restored.advance(6)
    broker.advance(6)
    assert restored.snapshot() == broker.snapshot()
    assert restored.snapshot().quotes["NQH6"].last is not None


def test_random_faults_draw_only_the_kinds_named() -> None:
    broker = SimBroker(SimScenario(seed=5, random_trades=3, random_faults=30,
                                   random_fault_kinds=["nan_quote", "no_quote"]))
    assert {f.kind for f in broker.faults} == {"nan_quote", "no_quote"}
    default = SimBroker(SimScenario(seed=5, random_trades=3, random_faults=60))
    assert not {f.kind for f in default.faults} & {"nan_quote", "no_quote"}


def test_a_session_through_nan_quotes_acts_on_no_number_it_does_not_have(rules: Path) -> None:
    """A follower whose quote turns to NaN while it misses the entry is not caught up on a
    price it cannot see; the session never stops."""
    broker = SimBroker(SimScenario(
        trades=[SimTrade(at=1, side="long", qty=1, hold=14)], leader_firm=None,
        followers=[SimFollower(id="F1")],
        faults=[SimFault(kind="missed_entry", account="F1", trade=0),
                SimFault(kind="no_quote", account="F1", at=0.5, duration=30)]))
    session = Session(broker, Journal(":memory:"), Alerts(), [rules],
                      rules_path=[REPO / "rules"], before_tick=lambda: broker.advance(0.25))
    session.start()
    while broker.elapsed < 14:
        session.tick()
    assert session.stopped is None
    assert not [e for e in broker.log if e.get("kind") == "place_market"]


# --- real crashes: SIGKILL and restart ---------------------------------------------------------

KILL_RUNS = 2


@pytest.mark.parametrize("seed", range(KILL_RUNS))
def test_sigkill_and_restart_on_the_same_journal(seed: int, rules: Path, tmp_path: Path) -> None:
    rng = random.Random(seed)
    scenario = chaos_scenario(1000 + seed, trades=2, faults=5)
    end = SimBroker(scenario).end
    config = tmp_path / "copilink.yaml"
    config.write_text(yaml.safe_dump({
        "broker": {"name": "sim", "settings": scenario.model_dump(mode="json")},
        "rules": [str(rules)], "kill_file": "copilink.kill"}), encoding="utf-8")
    journal, state, record = tmp_path / "j.db", tmp_path / "sim.json", tmp_path / "seen.jsonl"
    command = [sys.executable, "-m", "copilink_rules", "run", "--config", str(config),
               "--journal", str(journal), "--sim-state", str(state), "--speed", "50",
               "--duration", f"{end:g}", "--no-view", "--rules-path", str(REPO / "rules"),
               "--record", str(record)]
    kills, outputs = 0, []
    for _ in range(12):
        before = state.stat().st_mtime_ns if state.exists() else 0
        process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)
        if kills < 2:
            _kill_once_it_ticks(process, state, before, rng.uniform(0.05, 0.5))
        output, _ = process.communicate(timeout=120)
        outputs.append(output.decode(errors="replace"))
        if process.returncode == -signal.SIGKILL:
            kills += 1
            continue
        assert process.returncode == 0, f"seed {seed}: run failed:\n{outputs[-1]}"
        if SimBroker.load(state).elapsed >= end:
            break
    broker = SimBroker.load(state)
    assert broker.elapsed >= end, f"seed {seed}: the session never ended:\n{outputs[-1]}"
    assert kills >= 1, f"seed {seed}: never killed mid-run"
    reader = Journal(journal, read_only=True)
    rows = reader.commands()
    escalated = {r.account: _seconds(r.updated, scenario) for r in rows
                 if r.status == "escalated"}
    run = ChaosRun(1000 + seed, broker, _states(record, scenario), [], [(math.nan, "SIGKILL")]
                   * kills, escalated, {r.tag for r in rows}, len(rows))
    reader.close()
    found = check_chaos(run)
    assert not found, describe(run, found) + "\n" + "\n".join(o[-2000:] for o in outputs)


def _kill_once_it_ticks(process: subprocess.Popen[bytes], state: Path, before: int,
                        after: float) -> None:
    """SIGKILL `process` `after` seconds once it has saved the sim (it is ticking)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if state.exists() and state.stat().st_mtime_ns != before:
            time.sleep(after)
            break
        time.sleep(0.01)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)


def _seconds(text: str, scenario: SimScenario) -> float:
    return (datetime.fromisoformat(text.replace("Z", "+00:00")) - scenario.start).total_seconds()


def _states(record: Path, scenario: SimScenario) -> list[dict[str, Any]]:
    """What the engine saw at each tick (its `--record` timeline), as chaos states: a killed
    process may leave half a line."""
    states = []
    for line in record.read_text(encoding="utf-8").splitlines():
        try:
            snapshot = json.loads(line)
        except json.JSONDecodeError:
            continue
        now = snapshot["time"]
        state: dict[str, Any] = {"time": _seconds(now, scenario), "killed": False}
        exposure: dict[str, float] = {}
        for account in snapshot.get("accounts", []):
            exposure[account["id"]] = sum(
                p["qty"] * CATALOG.parse(p["instrument"]).size
                for p in account.get("positions", ())
                if CATALOG.parse(p["instrument"]).family == "NQ")
        lead = exposure.get(scenario.leader, 0.0)
        for account in snapshot.get("accounts", []):
            if account["role"] == "follower":
                fresh = account.get("updated_at") in (None, now) or \
                    _seconds(account["updated_at"], scenario) == state["time"]
                state[account["id"]] = (lead, exposure[account["id"]],
                                        account.get("connected", True), fresh)
        states.append(state)
    return states


def test_the_checks_see_every_kind_of_violation() -> None:
    """The checker is not vacuous: a broker log with one of each violation breaks each one."""
    broker = SimBroker(SimScenario(
        trades=[SimTrade(at=1, side="long", qty=1, hold=30)], leader_firm=FIRM,
        followers=[SimFollower(id="F1", firm=FIRM), SimFollower(id="F2", firm=FIRM)]))
    broker.advance(2)  # the leader and both followers long 1
    broker.close_position("F1", "NQH6", "CLR-000001")  # a flatten in leader trade 0...
    broker.place_order("F1", "NQH6", "buy", 1, "market", "CLR-000002")  # ...then a catch-up
    broker.place_order("F1", "NQH6", "sell", 4, "market", "CLR-000003")  # long 1 to short 3
    broker._delays["F2"] = {"until": 100.0, "delay": 2.0}
    broker.place_order("F2", "NQH6", "buy", 1, "market", "CLR-000004")  # works until 4 s
    broker.close_position("F2", "NQH6", "CLR-000005")  # while CLR-000004 works
    broker.close_position("F2", "NQH6", "CLR-000005")  # the same tag again
    broker.accounts["F2"].connected = False
    broker.place_order("F2", "NQH6", "buy", 1, "market", "CLR-000006")
    states = [{"time": t / 4, "killed": False, "F1": (0.0, 1.0, True, True),
               "F2": (0.0, 0.0, True, True)} for t in range(60)]
    run = ChaosRun(-1, broker, states, [(1.5, 2.5)], [], {}, {"CLR-000001"}, 0)
    found = check_chaos(run)
    assert set(found) == {"unreachable", "kill_switch", "one_working", "contract_limit",
                          "opposite", "catch_up_after_flatten", "stuck_bound", "sent_twice",
                          "unjournaled"}, found
