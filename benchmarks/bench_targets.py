"""Every row of issue 10's targets, measured side by side in one run: the scripts that measure
them, one after another in this process's Python, on the same host within minutes, each with
the arguments the README's Performance table gives. Their own output is printed as it comes,
under a heading naming the command; then how long each took.

    python benchmarks/bench_targets.py [--quick]

| target (issue 10)                                   | script                              |
|-----------------------------------------------------|-------------------------------------|
| peer workload, full tick, within 5x hand-written    | bench_peers.py (account rules, the  |
|                                                     | peers), bench_pairs.py (pair rules) |
| tick, shipped rules, 100 and 1,000 accounts         | bench_tick.py (shipped, -live, -steady) |
| replay, 100,800 snapshots x 20 accounts, < 10 s     | bench_replay.py                     |
| detection -> command, max < 5 ms                    | bench_latency.py                    |

`--quick` runs each with less (fewer ticks, snapshots and sessions): to try the script, not
for numbers. Nothing else should run on the machine meanwhile; on a shared host the numbers
still move from run to run (the README says by how much).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent

FULL: list[list[str]] = [
    ["bench_peers.py"],
    ["bench_pairs.py"],
    ["bench_tick.py", "--rules", "shipped,shipped-steady,shipped-live", "--accounts",
     "20,100,1000", "--seconds", "4", "--gc", "run"],
    ["bench_replay.py", "--rules", "both", "--reader", "fast"],
    ["bench_latency.py"],
]
QUICK: list[list[str]] = [
    ["bench_peers.py", "--rounds", "20", "--ticks", "20"],
    ["bench_pairs.py", "--laps", "2"],
    ["bench_tick.py", "--rules", "shipped,shipped-live", "--accounts", "20,100", "--seconds",
     "0.5", "--gc", "run"],
    ["bench_replay.py", "--rules", "desync", "--reader", "fast", "--snapshots", "2000"],
    ["bench_latency.py", "--sessions", "3"],
]


def commit() -> str:
    """The commit measured, and whether the work tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=HERE, check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes" if dirty.strip() else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="less of everything: to try the script, not for numbers")
    args = parser.parse_args()
    runs = QUICK if args.quick else FULL
    print(f"# issue 10 targets, one run: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit "
          f"{commit()}, Python {sys.version.split()[0]}", flush=True)
    took: list[tuple[str, float, int]] = []
    for argv in runs:
        command = " ".join(["python", f"benchmarks/{argv[0]}", *argv[1:]])
        print(f"\n## {command}\n", flush=True)
        start = time.perf_counter()
        code = subprocess.run([sys.executable, str(HERE / argv[0]), *argv[1:]],
                              cwd=HERE.parent, check=False).returncode
        took.append((command, time.perf_counter() - start, code))
    print("\n## how long each took\n")
    for command, seconds, code in took:
        print(f"- {command}: {seconds:.1f} s" + (f" (FAILED: exit {code})" if code else ""))
    return 1 if any(code for _, _, code in took) else 0


if __name__ == "__main__":
    sys.exit(main())
