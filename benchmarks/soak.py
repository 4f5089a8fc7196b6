"""Soak test: thousands of seeded sim sessions with random faults, checking the SPEC section 7
invariants on each (CI runs a few hundred in tests/test_invariants.py).

    python benchmarks/soak.py [--sessions 2000] [--faults 6]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_invariants import check_invariants, run_session


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--faults", type=int, default=6)
    parser.add_argument("--first-seed", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rules = Path(tmp) / "limits.yaml"
        rules.write_text("ruleset: limits\nextends: [desync]\nparams: {max_contracts: 4}\n"
                         "rules: []\n")
        start = time.perf_counter()
        failures = 0
        commands = 0
        for seed in range(args.first_seed, args.first_seed + args.sessions):
            broker, session, _ = run_session(seed, rules, faults=args.faults, trades=6)
            commands += session.journal.count("commands")
            problems = check_invariants(broker)
            if problems:
                failures += 1
                print(f"seed {seed}: " + "; ".join(problems))
    print(f"{args.sessions} sessions, {commands} commands, {failures} with a broken invariant, "
          f"{time.perf_counter() - start:.0f} s")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
