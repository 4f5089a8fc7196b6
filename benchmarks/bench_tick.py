"""One evaluation tick of 100 accounts x 40 rules (SPEC section 8: p50 under 2 ms).

    python benchmarks/bench_tick.py [--ticks 2000] [--accounts 100]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from _workload import T0, load_bench_policy, percentile, snapshot_dict

from copilink_rules.engine import Engine
from copilink_rules.model import Snapshot


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ticks", type=int, default=2000)
    parser.add_argument("--accounts", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        policy = load_bench_policy(Path(tmp))
    session_rules = [r for r in policy.rules if r.stage == "session"]
    rng = random.Random(7)
    snapshots = [Snapshot.model_validate(snapshot_dict(
        args.accounts, T0 + timedelta(milliseconds=250 * i), rng)) for i in range(50)]
    engine = Engine(policy)
    for snapshot in snapshots[:10]:  # warm caches (symbol parsing, first episodes)
        engine.evaluate(snapshot.model_copy(update={"time": T0}))
    times = []
    decisions = 0
    for i in range(args.ticks):
        snapshot = snapshots[i % len(snapshots)].model_copy(
            update={"time": T0 + timedelta(milliseconds=250 * (i + 1))})
        start = time.perf_counter()
        decisions += len(engine.evaluate(snapshot))
        times.append(time.perf_counter() - start)
    pairs = sum(1 for a in snapshots[0].accounts if a.role == "follower")
    print(f"tick: {args.accounts} accounts ({pairs} follower pairs) x {len(session_rules)} "
          f"session rules, {args.ticks} ticks, {decisions} decisions")
    print(f"tick p50 {percentile(times, 0.5) * 1e3:.2f} ms   p90 {percentile(times, 0.9) * 1e3:.2f}"
          f" ms   p99 {percentile(times, 0.99) * 1e3:.2f} ms   (target p50 < 2 ms)")


if __name__ == "__main__":
    main()
