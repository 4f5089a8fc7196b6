"""The account-scope conditions of the peer workload, evaluated by the engine's compiled batch and
by hand-written Python of the same shape (the floor), side by side.

    python benchmarks/bench_conditions.py [--rounds 2000] [--accounts 100]

The work: the 20 account-scope conditions of benchmarks/_workload.py for each of N accounts
(2,000 evaluations at the default 100), on the views the engine itself builds in one tick (so
view building is not timed here: bench_peers.py times the full tick). Both sides have the same
shape: one function per account evaluates all 20 conditions and returns them as a bitmask, with
the params written in as constants and the literal times parsed once, at load, as the engine
folds them, and the parts that depend on the time alone worked out once per tick (hand_clock),
as the engine's batch works them out once for each time. The rows:
  hand-written  hand_account() below: one function per account, literals folded
  engine        the compiled batch the engine uses: one call per account evaluates all 20
  one-by-one    each compiled condition called separately (the engine's fallback path)
  simpleeval    simpleeval's own interpreter on pre-parsed trees (for reference)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import time as clock
from pathlib import Path
from typing import Any

import simpleeval
from _workload import ACCOUNT_CONDITIONS, account_envs, load_peer_policy

from copilink_rules.rules.expressions import LIBRARY, compile_batch

# params and literal times folded at load, as the engine folds them
MAX_CONTRACTS, DAILY_LOSS = 10, 1000
FLAT_BY, OPEN, EVENING_FROM, EVENING_TO = clock(16, 59), clock(9, 31), clock(16), clock(18)
FLAT_BY_S = 16 * 3600 + 59 * 60


def hand_clock(now_local: clock, weekday: int) -> tuple[bool, bool, bool, bool, bool]:
    """The parts of the conditions that depend on the time alone, worked out once per tick and
    passed to every account's hand_account (as the engine's batch works them out once for each
    time, not once per account): after the flat-by time, within 5 minutes of it, Sunday, in
    the evening window, before the open."""
    now_s = (now_local.hour * 3600 + now_local.minute * 60 + now_local.second
             + now_local.microsecond / 1e6)
    until_flat_by = FLAT_BY_S - now_s  # minutes_until("16:59"), on the local clock face
    if until_flat_by < 0:
        until_flat_by += 86400
    return (now_local >= FLAT_BY, until_flat_by / 60.0 <= 5, weekday == 6,
            EVENING_FROM <= now_local < EVENING_TO, now_local < OPEN)


def hand_account(a: Any, clock_parts: tuple[bool, bool, bool, bool, bool]) -> int:
    """Bit i: condition i of ACCOUNT_CONDITIONS holds for account facts `a` (any object with
    the fields the conditions read), with the time's parts from hand_clock."""
    flat, contracts, pnl, working = a.flat, a.contracts, a.pnl, a.working_orders
    after_flat_by, near_flat_by, sunday, evening, before_open = clock_parts
    mask = 0
    if contracts > MAX_CONTRACTS:
        mask |= 1
    if pnl < -DAILY_LOSS:
        mask |= 1 << 1
    if pnl < -DAILY_LOSS * 0.8:
        mask |= 1 << 2
    if a.unrealized_pnl < -DAILY_LOSS * 0.5 and not flat:
        mask |= 1 << 3
    if working > 10:
        mask |= 1 << 4
    if a.balance < 48000 and a.role == "follower":
        mask |= 1 << 5
    if a.positions > 2:
        mask |= 1 << 6
    if a.realized_pnl > DAILY_LOSS * 3:
        mask |= 1 << 7
    if after_flat_by and not flat:
        mask |= 1 << 8
    if near_flat_by and not flat:
        mask |= 1 << 9
    if a.copier == "paused" and not flat:
        mask |= 1 << 10
    if a.data_age > 2 and a.connected:
        mask |= 1 << 11
    if sunday and not flat:
        mask |= 1 << 12
    if evening and contracts > 0:
        mask |= 1 << 13
    if abs(pnl) > DAILY_LOSS * 2:
        mask |= 1 << 14
    if contracts >= MAX_CONTRACTS and working > 0:
        mask |= 1 << 15
    if pnl > 0 and a.realized_pnl / max(pnl, 1) > 0.9 and False:  # as written (never true)
        mask |= 1 << 16
    if a.undeclared_positions > 0 and before_open:
        mask |= 1 << 17
    firm = a.firm
    if firm == "topstep" and contracts > 5:
        mask |= 1 << 18
    if firm == "apex" and contracts > 10:
        mask |= 1 << 19
    return mask


def best_of(fn: Any, inputs: list[Any], rounds: int) -> float:
    """Best time per round (seconds) over `rounds` rounds of `fn(inputs)`."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn(inputs)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--accounts", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        policy = load_peer_policy(Path(tmp))
    envs = account_envs(policy, args.accounts)
    compiled = [r.when.evaluate for r in policy.rules]
    batch = compile_batch([r.when for r in policy.rules], "bench")

    # same answers, or the comparison means nothing
    for env in envs:
        want = hand_account(env.account, hand_clock(env.now_local, env.weekday))
        assert want == batch(env), "compiled batch and hand-written disagree"
        assert want == sum(1 << i for i, f in enumerate(compiled) if f(env))
    # one tick's accounts: one time, whose parts both sides work out once
    assert len({(env.now_local, env.weekday) for env in envs}) == 1

    def run_hand(es: list[Any]) -> None:
        parts = hand_clock(es[0].now_local, es[0].weekday)
        for env in es:
            hand_account(env.account, parts)

    def run_batch(es: list[Any]) -> None:
        for env in es:
            batch(env)

    def run_one_by_one(es: list[Any]) -> None:
        for env in es:
            for f in compiled:
                f(env)

    minutes_until = LIBRARY["minutes_until"].impl
    time_between = LIBRARY["time_between"].impl
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

    count = len(envs) * len(ACCOUNT_CONDITIONS)
    hand = best_of(run_hand, envs, args.rounds)
    results = [("hand-written", hand), ("engine (batch)", best_of(run_batch, envs, args.rounds)),
               ("one-by-one", best_of(run_one_by_one, envs, args.rounds)),
               ("simpleeval", best_of(run_simpleeval, envs, max(20, args.rounds // 20)))]
    print(f"{count} condition evaluations ({len(ACCOUNT_CONDITIONS)} conditions x {len(envs)} "
          f"accounts, one function per account on both sides), best of {args.rounds} rounds")
    for name, seconds in results:
        print(f"  {name:<15} {seconds * 1e6:8.1f} us   {seconds / hand:5.2f}x hand-written   "
              f"({seconds / count * 1e9:6.0f} ns per condition)")


if __name__ == "__main__":
    main()
