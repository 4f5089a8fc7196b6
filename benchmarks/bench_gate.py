"""Pre-trade gate latency per order (target: p99 under 50 us), on a 20-account Apex snapshot
with a news calendar, cycling through orders that are allowed, reduced and blocked.

    python benchmarks/bench_gate.py [--orders 200000]
"""

from __future__ import annotations

import argparse
import random
import time
from datetime import timedelta

from _workload import REPO, T0, percentile, snapshot_dict

from copilink_rules.calendar import Calendar, NewsEvent
from copilink_rules.gate import Gate, OrderRequest
from copilink_rules.model import Snapshot
from copilink_rules.rules import load_policy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--orders", type=int, default=200_000)
    args = parser.parse_args()
    policy = load_policy([REPO / "rules" / "firms" / "apex.yaml"])
    rng = random.Random(5)
    data = snapshot_dict(20, T0, rng)
    for account in data["accounts"]:
        account["firm"] = "apex"
        account["size"] = 50000
    snapshot = Snapshot.model_validate(data)
    calendar = Calendar([NewsEvent(time=T0 + timedelta(hours=i), name=f"event {i}",
                                   instruments=("CL",)) for i in range(200)])
    gate = Gate(policy, calendar=calendar)
    gate.update(snapshot, {"F005": ("halted", T0 + timedelta(hours=8), "apex-drawdown")})
    orders = [OrderRequest(account=f"F{rng.randint(1, 19):03d}",
                           instrument=rng.choice(["NQH6", "MNQH6", "ESH6", "CLJ6"]),
                           side=rng.choice(["buy", "sell"]), qty=rng.randint(1, 12),
                           leader_price=rng.choice([None, 18000.0]))
              for _ in range(1000)]
    verdicts: dict[str, int] = {}
    for o in orders:
        verdict = gate.check(o).verdict
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
    times = []
    check = gate.check
    for i in range(args.orders):
        o = orders[i % len(orders)]
        start = time.perf_counter()
        check(o)
        times.append(time.perf_counter() - start)
    print(f"gate: {args.orders} checks on 20 accounts ({verdicts} of 1000 distinct orders)")
    print(f"  p50 {percentile(times, 0.5) * 1e6:.1f} us   p99 {percentile(times, 0.99) * 1e6:.1f}"
          f" us   (target p99 < 50 us)")


if __name__ == "__main__":
    main()
