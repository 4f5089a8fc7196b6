"""One evaluation tick (`Engine.evaluate`, views, episodes and decisions) with the shipped rules and
with the synthetic 40-rule set, at several account counts (SPEC section 8; issue targets:
shipped rules, 100 accounts p50/p99 under 1/3 ms, 1,000 accounts under 10/25 ms).

    python benchmarks/bench_tick.py [--rules shipped,shipped-steady,shipped-live,synthetic]
                                    [--accounts 20,100,1000,5000]
                                    [--seconds 5] [--max-ticks 2000]
                                    [--gc default|freeze|run]

shipped    rules/desync.yaml + every rules/firms/*.yaml (41 session rules), on groups of one
           leader and 19 followers spread over the five firms with their account sizes
           (_workload.shipped_snapshot_dict). Every position's `opened_at` moves with each
           snapshot, so no account is ever unchanged from one tick to the next; and the timed
           ticks (the second cycle on) keep the `updated_at` of the first, so the accounts'
           data ages a cycle (5-10 s) a lap and soon counts as stale (rules' orders held, not
           sent). The engine's heaviest case, kept as it was to compare with earlier numbers.
shipped-live
           shipped-steady's accounts as a live session's engine gets them now: each
           snapshot built from the data by a broker adapter's SnapshotBuilder (the fast
           reader), which hands over an unchanged position or order as the same object as at
           the last tick, so the engine tells it unchanged by identity instead of comparing
shipped-steady
           the same rules and accounts as a live session sees them (a tick every 250 ms):
           positions opened once (`opened_at` fixed) and unchanged from tick to tick except
           once a cycle, when the leaders go flat and enter again; every account refreshed
           with each tick (`updated_at` = the tick's time, as new position and order objects
           of the same values: _workload.refreshed), so accounts are reachable; P&L moves
synthetic  desync.yaml + 35 synthetic rules (_workload.policy_text) on one leader and n-1
           followers (_workload.snapshot_dict)

Each (rules, accounts) cell runs ticks a quarter second apart until --seconds of ticking or
--max-ticks (at least 20 ticks), cycling through 10-40 distinct snapshots (fewer the more
accounts: building them is slow); the leader is flat on the last of them, so episodes end and
fire again once a cycle. `gen2` counts the full garbage collections that ran during the timed ticks;
`--gc run` keeps the collector out of the ticks as `copilink-rules run` does
(scheduler.LiveRunner.tick_once: collection held off while a tick runs, so it runs between ticks,
and start-up's objects frozen out of it after the first tick); `--gc freeze` only calls
gc.freeze() after setting up; `--gc default` leaves the collector as Python has it, so a full
collection may land inside a timed tick. The table is printed in Markdown, ready to paste.
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
    refreshed,
    shipped_policy,
    shipped_snapshot_dict,
    snapshot_dict,
)

from copilink_rules.adapters.base import SnapshotBuilder
from copilink_rules.engine import Engine
from copilink_rules.model import Snapshot
from copilink_rules.rules import Policy
from copilink_rules.scheduler import gc_held

START = T0 + timedelta(hours=5)  # 14:30 New York: mid-session
MAKERS: dict[str, Callable[[int, Any, random.Random, bool], dict[str, Any]]] = {
    "shipped": shipped_snapshot_dict,
    "shipped-steady": lambda n, moment, rng, long: shipped_snapshot_dict(
        n, moment, rng, long, opened_at=START - timedelta(seconds=30)),
    "synthetic": lambda n, moment, rng, long: snapshot_dict(n, moment, rng, leader_long=long),
}
MAKERS["shipped-live"] = MAKERS["shipped-steady"]


def cycle_length(accounts: int) -> int:
    """Distinct snapshots a cell cycles through: fewer the more accounts (building them is
    slow), the leaders flat on the last."""
    return max(10, min(40, 20_000 // accounts))


def sent_again(data: dict[str, Any], moment: Any) -> dict[str, Any]:
    """A snapshot's data as an adapter hands it over again at `moment`: every account
    refreshed then, its positions and orders the same values."""
    stamp = moment.isoformat()
    return {**data, "time": stamp,
            "accounts": [{**a, "updated_at": stamp} for a in data["accounts"]]}


def run_cell(policy: Policy, kind: str, accounts: int, seconds: float, max_ticks: int,
             gc_mode: str) -> tuple[list[float], int, int]:
    """Per-tick times, decisions made and full collections while ticking (with `--gc run`
    they run between the ticks, never inside one)."""
    rng = random.Random(7)
    start = START
    distinct = cycle_length(accounts)
    make = MAKERS[kind]
    datas = [make(accounts, start + timedelta(milliseconds=250 * i), rng, i != distinct - 1)
             for i in range(distinct)]
    snapshots = [Snapshot.model_validate(data) for data in datas]
    builder = SnapshotBuilder()
    engine = Engine(policy)
    for snapshot in snapshots[:3]:  # warm the caches (symbol parsing, first episodes)
        engine.evaluate(snapshot)
    cycle = timedelta(milliseconds=250 * distinct)
    freeze, held = gc_mode in ("freeze", "run"), gc_mode == "run"
    if freeze:  # start-up is over (the warm-up ticks ran): what it built is frozen
        gc.collect()
        gc.freeze()
    gen2 = gc.get_stats()[2]["collections"]
    times: list[float] = []
    decisions = 0
    budget_end = time.perf_counter() + seconds
    lap = 1
    while len(times) < max_ticks and (len(times) < 20 or time.perf_counter() < budget_end):
        if kind == "shipped-live":
            batch = [builder(sent_again(data, s.time + cycle * lap))
                     for data, s in zip(datas, snapshots, strict=True)]
        else:
            batch = [refreshed(s, s.time + cycle * lap) if kind == "shipped-steady" else
                     s.model_copy(update={"time": s.time + cycle * lap}) for s in snapshots]
        for snapshot in batch:
            if len(times) >= max_ticks:
                break
            if held:
                with gc_held():
                    t = time.perf_counter()
                    decided = engine.evaluate(snapshot)
                    elapsed = time.perf_counter() - t
            else:
                t = time.perf_counter()
                decided = engine.evaluate(snapshot)
                elapsed = time.perf_counter() - t
            times.append(elapsed)
            decisions += len(decided)
        lap += 1
    collections = gc.get_stats()[2]["collections"] - gen2
    if freeze:
        gc.unfreeze()
    return times, decisions, collections


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rules", default="shipped,shipped-steady,shipped-live,synthetic",
                        help="comma-separated: shipped, shipped-steady, shipped-live, "
                        "synthetic")
    parser.add_argument("--accounts", default="20,100,1000,5000",
                        help="comma-separated account counts")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="ticking time per (rules, accounts) cell")
    parser.add_argument("--max-ticks", type=int, default=2000)
    parser.add_argument("--gc", choices=("default", "freeze", "run"), default="default")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.rules.split(",") if k.strip()]
    sizes = [int(n) for n in args.accounts.split(",") if n.strip()]
    policies: dict[str, Policy] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            policies[kind] = shipped_policy() if kind.startswith("shipped") else \
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
                policy, kind, accounts, args.seconds, args.max_ticks, args.gc)
            ms = [percentile(times, q) * 1e3 for q in (0.5, 0.9, 0.99)]
            print(f"| {kind} | {accounts:,} | {session} | {len(times)} | "
                  f"{decisions / len(times):.1f} | "
                  f"{ms[0]:.2f} ms | {ms[1]:.2f} ms | {ms[2]:.2f} ms | "
                  f"{max(times) * 1e3:.2f} ms | {collections} |", flush=True)


if __name__ == "__main__":
    main()
