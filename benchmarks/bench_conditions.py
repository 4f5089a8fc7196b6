"""The same 800 condition evaluations, made by the engine's compiled expressions and by
hand-written Python (the floor), side by side (target: within 5x of hand-written).

    python benchmarks/bench_conditions.py [--rounds 2000]

800 = 20 account-scope conditions x 40 accounts. Three ways to evaluate them:
  hand-written  a Python function per condition, written by hand against the same views
  engine        the compiled batch the engine uses: one call per account evaluates all 20
  one-by-one    each compiled condition called separately (the engine's fallback path)
  simpleeval    simpleeval's own interpreter on pre-parsed trees (for reference)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import simpleeval
from _workload import ACCOUNT_CONDITIONS, account_envs, load_bench_policy

from copilink_rules.rules.expressions import LIBRARY, compile_batch

HAND_WRITTEN = [
    lambda e: e.account.contracts > 10,
    lambda e: e.account.pnl < -1000,
    lambda e: e.account.pnl < -800.0,
    lambda e: e.account.unrealized_pnl < -500.0 and not e.account.flat,
    lambda e: e.account.working_orders > 10,
    lambda e: e.account.balance < 48000 and e.account.role == "follower",
    lambda e: e.account.positions > 2,
    lambda e: e.account.realized_pnl > 3000,
    lambda e: e.now_local >= FLAT_BY and not e.account.flat,
    lambda e: minutes_until(e, FLAT_BY) <= 5 and not e.account.flat,
    lambda e: e.account.copier == "paused" and not e.account.flat,
    lambda e: e.account.data_age > 2 and e.account.connected,
    lambda e: e.weekday == 6 and not e.account.flat,
    lambda e: time_between(e, "16:00", "18:00") and e.account.contracts > 0,
    lambda e: abs(e.account.pnl) > 2000,
    lambda e: e.account.contracts >= 10 and e.account.working_orders > 0,
    lambda e: e.account.pnl > 0 and e.account.realized_pnl / max(e.account.pnl, 1) > 0.9
    and False,
    lambda e: e.account.undeclared_positions > 0 and e.now_local < OPEN,
    lambda e: e.account.firm == "topstep" and e.account.contracts > 5,
    lambda e: e.account.firm == "apex" and e.account.contracts > 10,
]
FLAT_BY = LIBRARY["time"].impl("16:59")
OPEN = LIBRARY["time"].impl("09:31")
minutes_until = LIBRARY["minutes_until"].impl
time_between = LIBRARY["time_between"].impl


def best_of(fn: Any, envs: list[Any], rounds: int) -> float:
    """Best time per round (seconds) over `rounds` rounds of evaluating `fn` on every env."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn(envs)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    assert len(HAND_WRITTEN) == len(ACCOUNT_CONDITIONS)
    with tempfile.TemporaryDirectory() as tmp:
        policy = load_bench_policy(Path(tmp))
    envs = account_envs(policy)
    rules = [r for r in policy.rules if r.id.startswith("bench-account-")]
    compiled = [r.when.evaluate for r in rules]
    batch = compile_batch([r.when for r in rules], "bench")

    # same answers, or the comparison means nothing
    for env in envs:
        hand = [bool(f(env)) for f in HAND_WRITTEN]
        assert hand == [bool(f(env)) for f in compiled], "compiled and hand-written disagree"
        assert sum(1 << i for i, v in enumerate(hand) if v) == batch(env)

    def run_hand(es: list[Any]) -> None:
        for env in es:
            for f in HAND_WRITTEN:
                f(env)

    def run_batch(es: list[Any]) -> None:
        for env in es:
            batch(env)

    def run_one_by_one(es: list[Any]) -> None:
        for env in es:
            for f in compiled:
                f(env)

    evaluator = simpleeval.SimpleEval(
        names=lambda node: getattr(current[0], node.id),
        functions={"abs": abs, "max": max, "min": min,
                   "time": LIBRARY["time"].impl,
                   "minutes_until": lambda t: minutes_until(current[0], t),
                   "time_between": lambda a, b: time_between(current[0], a, b)})
    sources = [c.replace("params.max_contracts", "10").replace("params.daily_loss", "1000")
               .replace("params.flat_by", "'16:59'") for c in ACCOUNT_CONDITIONS]
    trees = [evaluator.parse(s) for s in sources]
    current: list[Any] = [None]

    def run_simpleeval(es: list[Any]) -> None:
        for env in es:
            current[0] = env
            for source, tree in zip(sources, trees, strict=True):
                evaluator.eval(source, previously_parsed=tree)

    count = len(envs) * len(HAND_WRITTEN)
    hand = best_of(run_hand, envs, args.rounds)
    results = [("hand-written", hand), ("engine (batch)", best_of(run_batch, envs, args.rounds)),
               ("one-by-one", best_of(run_one_by_one, envs, args.rounds)),
               ("simpleeval", best_of(run_simpleeval, envs, max(50, args.rounds // 20)))]
    print(f"{count} condition evaluations ({len(HAND_WRITTEN)} conditions x {len(envs)} "
          f"accounts), best of {args.rounds} rounds")
    for name, seconds in results:
        print(f"  {name:<15} {seconds * 1e6:8.1f} us   {seconds / hand:5.2f}x hand-written   "
              f"({seconds / count * 1e9:6.0f} ns per condition)")


if __name__ == "__main__":
    main()
