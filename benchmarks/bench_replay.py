"""Replay throughput: a 7-hour session at 4 snapshots/s with 20 accounts (100,800 snapshots)
through `copilink-rules replay`'s code path: read JSON Lines, validate, evaluate desync.yaml
(SPEC section 8 target: under 10 s).

    python benchmarks/bench_replay.py [--snapshots 100800] [--accounts 20]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from _workload import REPO, T0, snapshot_dict

from copilink_rules.engine import Engine
from copilink_rules.rules import load_policy
from copilink_rules.snapshots import iter_timeline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--snapshots", type=int, default=7 * 3600 * 4)
    parser.add_argument("--accounts", type=int, default=20)
    args = parser.parse_args()
    rng = random.Random(11)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "session.jsonl"
        start = time.perf_counter()
        with path.open("w") as handle:
            # the leader alternates 2-minute trades and 1-minute flat spells
            for i in range(args.snapshots):
                moment = T0 + timedelta(milliseconds=250 * i)
                in_trade = (i // 240) % 3 != 2
                opened = T0 + timedelta(milliseconds=250 * (i // 720 * 720))
                handle.write(json.dumps(snapshot_dict(args.accounts, moment, rng, in_trade,
                                                      opened), separators=(",", ":")) + "\n")
        size = path.stat().st_size
        print(f"generated {args.snapshots} snapshots x {args.accounts} accounts "
              f"({size / 1e6:.0f} MB) in {time.perf_counter() - start:.1f} s")

        policy = load_policy([REPO / "rules" / "desync.yaml"])
        engine = Engine(policy)
        decisions = 0
        start = time.perf_counter()
        parse = 0.0
        count = 0
        iterator = iter_timeline(path)
        while True:
            t0 = time.perf_counter()
            snapshot = next(iterator, None)
            parse += time.perf_counter() - t0
            if snapshot is None:
                break
            count += 1
            decisions += len(engine.evaluate(snapshot))
        total = time.perf_counter() - start
    print(f"replay: {count} snapshots in {total:.2f} s ({count / total:,.0f} snapshots/s; "
          f"reading+validating {parse:.2f} s, evaluating {total - parse:.2f} s), "
          f"{decisions} decisions   (target: 100k snapshots under 10 s)")


if __name__ == "__main__":
    main()
