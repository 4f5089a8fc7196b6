"""A live tick as `copilink-rules run` runs it (`LiveRunner.tick_once` -> `Session.tick`), not the
engine alone: the broker adapter's snapshot, the engine's evaluation, the journal (a real SQLite
file in WAL mode), the enforcer and the engine state saved at the end of every tick. With the sim
broker, one leader and N-1 followers spread over the five firms, the shipped rules (desync.yaml
and every rules/firms/*.yaml) and random trades, so positions open and close as in a session.

    python benchmarks/bench_session.py [--accounts 20,100,1000] [--ticks 400] [--as-before]

Each row prints the whole tick and its parts, wall clock per tick (p50 and mean): `snapshot`
(the adapter: its own data, then the snapshot built from it), `evaluate` (Engine.evaluate, what
bench_tick.py times), `save state` (the engine's state as JSON, written to the journal) and
`rest` (the snapshot's digest, the tick's journal rows, the enforcer, and the garbage
collection the runner lets run after the tick).

`--as-before` runs the same ticks the way they ran before the snapshot, the saved state and the
digest got their fast paths, for comparison on the same host: the adapter's data validated by
`Snapshot.model_validate`, the state read into its pydantic models, dumped and written with
json.dumps (`Engine.save_state`), and the digest taken of pydantic's `model_dump_json`."""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _workload import FIRM_SIZES, REPO, percentile

from copilink_rules import session as session_module
from copilink_rules.adapters.sim import SimBroker, SimFollower, SimScenario
from copilink_rules.alerts import Alerts
from copilink_rules.journal import Journal
from copilink_rules.model import Snapshot
from copilink_rules.scheduler import LiveRunner
from copilink_rules.session import Session

RULES = [REPO / "rules" / "desync.yaml", *sorted((REPO / "rules" / "firms").glob("*.yaml"))]


def timed(parts: dict[str, float], name: str, call: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            parts[name] += time.perf_counter() - start
    return wrapper


def digest_as_before(snapshot: Snapshot) -> str:
    return hashlib.sha256(snapshot.model_dump_json().encode()).hexdigest()[:16]


def run(accounts: int, ticks: int, as_before: bool, folder: Path) -> dict[str, list[float]]:
    firms = list(FIRM_SIZES)
    followers = []
    for i in range(1, accounts):
        firm = firms[i % len(firms)]
        sizes = FIRM_SIZES[firm]
        followers.append(SimFollower(id=f"F{i:04d}", firm=firm,
                                     size=float(sizes[i // len(firms) % len(sizes)])))
    scenario = SimScenario(seed=3, random_trades=40, random_faults=0, followers=followers)
    broker = SimBroker(scenario)
    if as_before:
        broker._build = Snapshot.model_validate  # type: ignore[assignment]
    journal = Journal(folder / f"journal-{accounts}-{as_before}.db")

    def advance() -> None:
        broker.advance(0.25)

    session = Session(broker, journal, Alerts(), RULES, before_tick=advance)
    if as_before:
        engine = session.engine
        session.engine.save_state_text = lambda: json.dumps(  # type: ignore[method-assign]
            engine.save_state())
    runner = LiveRunner(session, reload_every=0)
    parts = {"snapshot": 0.0, "evaluate": 0.0, "save state": 0.0}
    broker.snapshot = timed(parts, "snapshot", broker.snapshot)  # type: ignore[method-assign]
    session.engine.evaluate = timed(  # type: ignore[method-assign]
        parts, "evaluate", session.engine.evaluate)
    session.engine.save_state_text = timed(  # type: ignore[method-assign]
        parts, "save state", session.engine.save_state_text)
    journal.save_engine_state = timed(  # type: ignore[method-assign]
        parts, "save state", journal.save_engine_state)
    for _ in range(20):  # start-up: the first ticks compile the rules' batches
        runner.tick_once()
    series: dict[str, list[float]] = {"tick": [], "snapshot": [], "evaluate": [],
                                      "save state": [], "rest": []}
    for _ in range(ticks):
        for name in parts:
            parts[name] = 0.0
        start = time.perf_counter()
        runner.tick_once()
        total = time.perf_counter() - start
        series["tick"].append(total)
        for name, value in parts.items():
            series[name].append(value)
        series["rest"].append(total - sum(parts.values()))
    journal.close()
    gc.unfreeze()
    return series


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--accounts", default="20,100,1000")
    parser.add_argument("--ticks", type=int, default=400)
    parser.add_argument("--as-before", action="store_true")
    args = parser.parse_args()
    how = "as before (model_validate, saved state through the models, pydantic's digest)" \
        if args.as_before else "fast snapshot, saved state and digest"
    if args.as_before:
        session_module.snapshot_digest = digest_as_before  # type: ignore[assignment]
    print(f"live tick (LiveRunner.tick_once), sim broker, shipped rules, {how}; "
          f"{args.ticks} ticks per row; ms per tick, p50 / mean")
    print("| accounts | tick | snapshot | evaluate | save state | rest |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for accounts in [int(n) for n in args.accounts.split(",") if n.strip()]:
            series = run(accounts, args.ticks, args.as_before, Path(tmp))
            cells = [f"{percentile(v, 0.5) * 1e3:.2f} / {statistics.fmean(v) * 1e3:.2f}"
                     for v in series.values()]
            print(f"| {accounts:,} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
