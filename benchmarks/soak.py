"""Soak test: thousands of the chaos sessions of tests/test_chaos.py — seeded sim sessions with
random faults of every kind (late fills, NaN and missing quotes included), the kill switch
engaged and released mid-session, and in-process crashes at random points inside a tick, each
followed by a restart on the same SQLite journal — checking the SPEC section 7 invariants on
each from the broker's own record (tests/chaos_support.py). CI runs a few hundred.

With `--copier builtin` the sim's own copier is off and copilink-rules' built-in copier copies
the leader onto the followers (1:1, micros, ratio 0.5) through the broker's faults (lost, stuck,
rejected and late orders, manual orders, reversals...), crashes come inside its send too, and
the copier's invariants are checked besides (tests/test_copier_chaos.py runs 200 of these).

    python benchmarks/soak.py [--copier sim|builtin] [--sessions 2000] [--first-seed 10000]
                              [--faults 5] [--trades 2] [--verbose]

Prints the counts: sessions, crashes and restarts, commands sent, faults injected, sessions
breaking each invariant (0 expected) and the wall time; exits 1 if any invariant broke.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from copilink_rules.copier import COPIER_ACTIONS
from tests.chaos_support import (
    COPIER_INVARIANTS,
    COPIERS,
    INVARIANTS,
    check_chaos,
    describe,
    run_chaos,
    write_rules,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copier", choices=COPIERS, default="sim",
                        help="who copies: the sim's own copier (default), or builtin: "
                        "copilink-rules' own, with the sim's off")
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--first-seed", type=int, default=10_000)
    parser.add_argument("--faults", type=int, default=5, help="random faults per session")
    parser.add_argument("--trades", type=int, default=2, help="leader trades per session")
    parser.add_argument("--verbose", action="store_true",
                        help="print every violation (seed, crashes, broker log entries)")
    args = parser.parse_args()
    broken: Counter[str] = Counter()  # invariant -> sessions that broke it
    crashes = commands = faults = sends = copies = failed = 0
    where: Counter[str] = Counter()  # crash point -> crashes
    examples: dict[str, str] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rules = write_rules(folder, args.copier)
        for seed in range(args.first_seed, args.first_seed + args.sessions):
            run = run_chaos(seed, folder, rules, trades=args.trades, faults=args.faults,
                            copier=args.copier)
            crashes += len(run.crashes)
            where.update(point for _, point in run.crashes)
            commands += run.commands
            faults += run.faults
            at_broker = [e for e in run.broker.log if str(e["tag"]).startswith("CLR-")]
            sends += len(at_broker)
            copies += sum(1 for e in at_broker
                          if run.actions.get(e["tag"], ("",))[0] in COPIER_ACTIONS)
            found = check_chaos(run)
            failed += bool(found)
            for name in found:
                broken[name] += 1
                examples.setdefault(name, describe(run, {name: found[name]}))
            if found and args.verbose:
                print(describe(run, found))
            for suffix in ("db", "db-wal", "db-shm", "sim.json"):
                (folder / f"chaos-{seed}.{suffix}").unlink(missing_ok=True)
    elapsed = time.perf_counter() - start
    print(f"copier:              {args.copier}")
    print(f"sessions:            {args.sessions} (seeds {args.first_seed}.."
          f"{args.first_seed + args.sessions - 1}, {args.trades} trades, {args.faults} faults "
          "each)")
    print(f"crashes / restarts:  {crashes} / {crashes} (" +
          ", ".join(f"{point} {count}" for point, count in sorted(where.items())) + ")")
    print(f"commands journaled:  {commands}")
    print(f"commands at broker:  {sends}" +
          (f" ({copies} of them the copier's copies)" if args.copier == "builtin" else ""))
    print(f"faults injected:     {faults}")
    print(f"sessions broken:     {failed}")
    for name in COPIER_INVARIANTS if args.copier == "builtin" else INVARIANTS:
        print(f"  {name:24} {broken[name]}")
    print(f"wall time:           {elapsed:.1f} s ({elapsed / max(args.sessions, 1) * 1000:.0f} "
          "ms a session)")
    if examples and not args.verbose:
        print("\nfirst session breaking each invariant:")
        for text in examples.values():
            print(text)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
