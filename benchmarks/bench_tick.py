"""One evaluation tick (`Engine.evaluate`, views, episodes and decisions) with the shipped rules and
with the synthetic 40-rule set, at several account counts (SPEC section 8; issue targets:
shipped rules, 100 accounts p50/p99 under 1/3 ms, 1,000 accounts under 10/25 ms).

    python benchmarks/bench_tick.py [--rules shipped,synthetic] [--accounts 20,100,1000,5000]
                                    [--seconds 5] [--max-ticks 2000] [--gc default|freeze]

shipped    rules/desync.yaml + every rules/firms/*.yaml (41 session rules), on groups of one
           leader and 19 followers spread over the five firms with their account sizes
           (_workload.shipped_snapshot_dict)
synthetic  desync.yaml + 35 synthetic rules (_workload.policy_text) on one leader and n-1
           followers (_workload.snapshot_dict)

Each (rules, accounts) cell runs ticks a quarter second apart until --seconds of ticking or
--max-ticks (at least 20 ticks), cycling through 10-40 distinct snapshots (fewer the more
accounts: building them is slow); the leader is flat on the last of them, so episodes end and
fire again once a cycle. `gen2` counts the full garbage collections that ran during the timed ticks;
`--gc freeze` calls gc.freeze() after setting up, as a long-running session could. The table
is printed in Markdown, ready to paste.
"""

from __future__ import annotations

import argparse
import gc
import random
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from _workload import (
    T0,
    load_bench_policy,
    percentile,
    shipped_policy,
    shipped_snapshot_dict,
    snapshot_dict,
)

from copilink_rules.engine import Engine
from copilink_rules.model import Snapshot
from copilink_rules.rules import Policy

MAKERS: dict[str, Callable[[int, Any, random.Random, bool], dict[str, Any]]] = {
    "shipped": shipped_snapshot_dict,
    "synthetic": lambda n, moment, rng, long: snapshot_dict(n, moment, rng, leader_long=long),
}


def run_cell(policy: Policy, kind: str, accounts: int, seconds: float, max_ticks: int,
             freeze: bool) -> tuple[list[float], int, int]:
    """Per-tick times, decisions made and full collections during the timed ticks."""
    rng = random.Random(7)
    start = T0 + timedelta(hours=5)  # 14:30 New York: mid-session
    distinct = max(10, min(40, 20_000 // accounts))  # snapshots to build (pydantic is slow)
    make = MAKERS[kind]
    snapshots = [Snapshot.model_validate(make(accounts, start + timedelta(milliseconds=250 * i),
                                              rng, i != distinct - 1))
                 for i in range(distinct)]
    engine = Engine(policy)
    for snapshot in snapshots[:3]:  # warm the caches (symbol parsing, first episodes)
        engine.evaluate(snapshot)
    cycle = timedelta(milliseconds=250 * distinct)
    if freeze:
        gc.collect()
        gc.freeze()
    gen2 = gc.get_stats()[2]["collections"]
    times: list[float] = []
    decisions = 0
    budget_end = time.perf_counter() + seconds
    lap = 1
    while len(times) < max_ticks and (len(times) < 20 or time.perf_counter() < budget_end):
        batch = [s.model_copy(update={"time": s.time + cycle * lap}) for s in snapshots]
        for snapshot in batch:
            if len(times) >= max_ticks:
                break
            t = time.perf_counter()
            decisions += len(engine.evaluate(snapshot))
            times.append(time.perf_counter() - t)
        lap += 1
    collections = gc.get_stats()[2]["collections"] - gen2
    if freeze:
        gc.unfreeze()
    return times, decisions, collections


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rules", default="shipped,synthetic",
                        help="comma-separated: shipped, synthetic")
    parser.add_argument("--accounts", default="20,100,1000,5000",
                        help="comma-separated account counts")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="ticking time per (rules, accounts) cell")
    parser.add_argument("--max-ticks", type=int, default=2000)
    parser.add_argument("--gc", choices=("default", "freeze"), default="default")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.rules.split(",") if k.strip()]
    sizes = [int(n) for n in args.accounts.split(",") if n.strip()]
    policies: dict[str, Policy] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            policies[kind] = shipped_policy() if kind == "shipped" else \
                load_bench_policy(Path(tmp))
    print(f"tick = Engine.evaluate on one snapshot; gc {args.gc}; up to {args.seconds:g} s "
          f"or {args.max_ticks} ticks per row")
    print("| rules | accounts | session rules | ticks | decisions per tick | p50 | p90 | p99 "
          "| max | gen2 GCs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind in kinds:
        policy = policies[kind]
        session = sum(1 for r in policy.rules if r.stage == "session")
        for accounts in sizes:
            times, decisions, collections = run_cell(
                policy, kind, accounts, args.seconds, args.max_ticks, args.gc == "freeze")
            ms = [percentile(times, q) * 1e3 for q in (0.5, 0.9, 0.99)]
            print(f"| {kind} | {accounts:,} | {session} | {len(times)} | "
                  f"{decisions / len(times):.1f} | "
                  f"{ms[0]:.2f} ms | {ms[1]:.2f} ms | {ms[2]:.2f} ms | "
                  f"{max(times) * 1e3:.2f} ms | {collections} |", flush=True)


if __name__ == "__main__":
    main()
