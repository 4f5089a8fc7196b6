"""Instructions per engine tick, counted by valgrind's callgrind: a measure the shared host's
noise does not move (wall-clock times on it vary by 20-50% from run to run), for comparing two
versions of the engine. Needs `valgrind` on the PATH; each count runs Python under callgrind
twice (slow: about a minute per row at 100 accounts).

    python benchmarks/bench_instructions.py [--rules shipped-steady,shipped]
                                            [--accounts 100] [--ticks 16]

For each workload of bench_tick.py (`shipped`, `shipped-steady`, `shipped-live`,
`synthetic`), one process evaluates 2 ticks and another 2 + --ticks, on the same prepared
snapshots, with PYTHONHASHSEED=0 (string hashes, and so dict and set orders, fixed); the
difference of their instruction counts divided by --ticks is what one tick costs, start-up and
setting up excluded. Two rows count the snapshot's making instead of the tick, the same way:
`read`, one line of bench_replay.py's timeline (its accounts, its lines: every follower's P&L
moves from line to line) read by the fast reader as `replay` reads it; `build`, one snapshot
of shipped-live's data built by an adapter's SnapshotBuilder, as `run` builds each tick's. One
row counts both: `replay`, one line of that timeline read and evaluated with desync.yaml, as
bench_replay.py replays it.
Compare two versions by running the script in each checkout, best exported in turn to the
same directory: a count still moves by 1-4% from run to run (memory layout: the checkout's
path, the address space), so run each version more than once.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# The child: set up as bench_tick.py does, then evaluate `ticks` snapshots of a fixed batch.
CHILD = """
import gc, random, sys
sys.path.insert(0, {here!r})
from datetime import timedelta
from bench_tick import MAKERS, START, sent_again
from copilink_rules.adapters.base import SnapshotBuilder
from _workload import refreshed, shipped_policy, load_bench_policy
from copilink_rules.engine import Engine
from copilink_rules.model import Snapshot
import tempfile, pathlib
kind, accounts, ticks, made = {kind!r}, {accounts}, {ticks}, {made}
if kind in ("read", "replay"):  # bench_replay.py's lines, read as `replay` reads them
    import json
    from _workload import REPO, T0, snapshot_dict
    from copilink_rules.fastread import FastReader
    from copilink_rules.instruments import default_catalog
    from copilink_rules.rules import load_policy
    rng = random.Random(11)
    lines = []
    for i in range(made):  # as many in every run: only the reading differs
        moment = T0 + timedelta(milliseconds=250 * i)
        lines.append(json.dumps(snapshot_dict(accounts, moment, rng, True,
                                              T0 + timedelta(seconds=30)),
                                separators=(",", ":")))
    reader = FastReader(default_catalog())
    # replay: each line read and evaluated with desync.yaml, as bench_replay.py replays it
    engine = Engine(load_policy([REPO / "rules" / "desync.yaml"])) if kind == "replay" \
        else None
    gc.disable()
    for line in lines[:ticks]:
        snapshot = reader.read(line)
        assert snapshot is not None
        if engine is not None:
            engine.evaluate(snapshot)
    sys.exit(0)
if kind.startswith("shipped") or kind == "build":
    policy = shipped_policy()
else:
    policy = load_bench_policy(pathlib.Path(tempfile.mkdtemp()))
rng = random.Random(7)
distinct = 4
datas = [MAKERS["shipped-live" if kind == "build" else kind](
    accounts, START + timedelta(milliseconds=250 * i), rng, True) for i in range(distinct)]
snapshots = [Snapshot.model_validate(data) for data in datas]
builder = SnapshotBuilder()
engine = Engine(policy)
for snapshot in snapshots[:3]:
    engine.evaluate(snapshot)
cycle = timedelta(milliseconds=250 * distinct)
if kind == "build":  # each tick's snapshot built from the adapter's data, as `run` builds it
    gc.disable()
    for i in range(ticks):
        builder(sent_again(datas[i % distinct], START + cycle * (1 + i // distinct)
                           + timedelta(milliseconds=250 * (i % distinct))))
    sys.exit(0)
if kind == "shipped-live":
    batch = [builder(sent_again(datas[i % distinct], s.time + cycle * (1 + i // distinct)))
             for i, s in enumerate(snapshots * 13)]
else:
    batch = [refreshed(s, s.time + cycle * (1 + i // distinct)) if kind == "shipped-steady"
             else s.model_copy(update={{"time": s.time + cycle * (1 + i // distinct)}})
             for i, s in enumerate(snapshots * 13)]
gc.disable()
for snapshot in batch[:ticks]:
    engine.evaluate(snapshot)
"""


def count(kind: str, accounts: int, ticks: int, made: int) -> int:
    """Instructions callgrind counts for the whole child process (`made`: timeline lines
    generated, for read and replay: as many in both processes)."""
    code = CHILD.format(here=str(HERE), kind=kind, accounts=accounts, ticks=ticks, made=made)
    result = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         "-c", code],
        capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"},
        cwd=HERE.parent, check=False)  # this checkout's copilink_rules, first on the path
    found = re.search(r"Collected\s*:\s*(\d+)", result.stderr)
    if result.returncode != 0 or found is None:
        raise SystemExit(f"callgrind run failed ({kind}, {accounts} accounts, {ticks} ticks):\n"
                         f"{result.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rules", default="shipped-steady,shipped",
                        help="comma-separated: shipped, shipped-steady, shipped-live, "
                        "synthetic; read, build (the snapshot's making), replay (above)")
    parser.add_argument("--accounts", default="100", help="comma-separated account counts")
    parser.add_argument("--ticks", type=int, default=16,
                        help="timed ticks (at most 48; lines or snapshots for read, build and "
                        "replay: at most 1000)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("bench_instructions.py needs valgrind (apt install valgrind)")
    kinds = [k.strip() for k in args.rules.split(",") if k.strip()]
    most = 1000 if set(kinds) <= {"read", "build", "replay"} else 48
    if not 1 <= args.ticks <= most:
        raise SystemExit(f"--ticks must be between 1 and {most}"
                         + (" (48 for the tick rows)" if most == 48 else ""))
    unknown = sorted(set(kinds) - {"shipped", "shipped-steady", "shipped-live", "synthetic",
                                   "read", "build", "replay"})
    if unknown:
        raise SystemExit(f"unknown --rules {', '.join(unknown)}: use shipped, shipped-steady, "
                         "shipped-live, synthetic, read, build or replay")
    package = subprocess.run(
        [sys.executable, "-c", "import copilink_rules; print(copilink_rules.__file__)"],
        capture_output=True, text=True, cwd=HERE.parent, check=False).stdout.strip()
    print(f"instructions per Engine.evaluate tick (callgrind; {args.ticks} ticks counted; "
          f"{Path(package).parent}); for read, build and replay: per line read, per "
          "snapshot built, per line read and evaluated")
    print("| rules | accounts | instructions per tick | per account |")
    print("|---|---|---|---|")
    for kind in kinds:
        for accounts in [int(n) for n in args.accounts.split(",") if n.strip()]:
            made = max(50, 2 + args.ticks)
            per_tick = (count(kind, accounts, 2 + args.ticks, made)
                        - count(kind, accounts, 2, made)) / args.ticks
            print(f"| {kind} | {accounts:,} | {per_tick:,.0f} | {per_tick / accounts:,.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
