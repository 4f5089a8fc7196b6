"""Detection-to-command latency with the sim broker: from reading the snapshot in which a rule
becomes due to the command reaching the broker adapter (engine + journal + enforcer).

    python benchmarks/bench_latency.py [--sessions 40]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _workload import REPO, percentile

from copilink_rules.adapters.sim import SimBroker, SimFollower, SimScenario
from copilink_rules.alerts import Alerts
from copilink_rules.journal import Journal
from copilink_rules.session import Session


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=40)
    args = parser.parse_args()
    latencies: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.sessions):
            scenario = SimScenario(seed=seed, random_trades=6, random_faults=6, followers=[
                SimFollower(id=f"F{i}") for i in range(1, 11)])
            broker = SimBroker(scenario)
            read_at = [0.0]
            original = broker.snapshot

            def timed_snapshot(original=original, read_at=read_at):  # type: ignore[no-untyped-def]
                snapshot = original()
                read_at[0] = time.perf_counter()
                return snapshot

            broker.snapshot = timed_snapshot  # type: ignore[method-assign]
            journal = Journal(Path(tmp) / f"j{seed}.db")  # a real file, WAL, as in `run`

            def reached(kind: str, account: str, tag: str, read_at=read_at) -> None:
                latencies.append(time.perf_counter() - read_at[0])

            session = Session(broker, journal, Alerts(), [REPO / "rules" / "desync.yaml"],
                              before_tick=lambda broker=broker: broker.advance(0.25),
                              on_command=reached)
            session.start()
            while broker.elapsed < broker.end:
                session.tick()
            journal.close()
    print(f"detection-to-command latency over {len(latencies)} corrective commands in "
          f"{args.sessions} sessions (11 accounts each, journal on disk):")
    print(f"  p50 {percentile(latencies, 0.5) * 1e3:.2f} ms   p90 "
          f"{percentile(latencies, 0.9) * 1e3:.2f} ms   p99 "
          f"{percentile(latencies, 0.99) * 1e3:.2f} ms   max {max(latencies) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
