"""Instructions per engine tick, counted by valgrind's callgrind: a measure the shared host's
noise does not move (wall-clock times on it vary by 20-50% from run to run), for comparing two
versions of the engine. Needs `valgrind` on the PATH; each count runs Python under callgrind
twice (slow: about a minute per row at 100 accounts).

    python benchmarks/bench_instructions.py [--rules shipped-steady,shipped]
                                            [--accounts 100] [--ticks 16] [--at 0,4]

For each workload of bench_tick.py (`shipped`, `shipped-steady`, `shipped-live`,
`synthetic`), one process evaluates 2 ticks and another 2 + --ticks, on the same prepared
snapshots, with PYTHONHASHSEED=0 (string hashes, and so dict and set orders, fixed); the
difference of their instruction counts divided by --ticks is what one tick costs, start-up and
setting up excluded. These rows cycle through 4 snapshots in which the leaders never go flat:
ticks as most of a session's are, no position changing, few decisions. `shipped-cycle` is
shipped-live as bench_tick.py cycles it: 40 snapshots at 100 accounts (20,000 / accounts, 10
to 40), the leaders flat on the last, so that once a cycle every position changes (the leaders
enter again, their followers with them) and some ticks later the rules that waited their `for`
fire on hundreds of accounts at once: the ticks that make bench_tick.py's p99. With --ticks as
many as the cycle's snapshots (40 at 100 accounts), one whole cycle is counted. `--at 0,4`
counts instead ticks of that cycle alone, each in a process of its own that runs the cycle
once and then, in its second lap, collects only while that tick runs (callgrind's
--toggle-collect): tick 0, every position changing, and tick 4, when the rules that held
their `for` (1 s) fire. Two rows count the snapshot's making instead of the tick, the same way:
`read`, one line of bench_replay.py's timeline (its accounts, its lines: every follower's P&L
moves from line to line) read by the fast reader as `replay` reads it; `build`, one snapshot
of shipped-live's data built by an adapter's SnapshotBuilder, as `run` builds each tick's. One
row counts both: `replay`, one line of that timeline read and evaluated with desync.yaml, as
bench_replay.py replays it (`replay-apex`: with desync.yaml and firms/apex.yaml).
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

from bench_tick import cycle_length

HERE = Path(__file__).resolve().parent

# The child: set up as bench_tick.py does, then evaluate `ticks` snapshots of a fixed batch.
CHILD = """
import gc, random, sys
sys.path.insert(0, {here!r})
from datetime import timedelta
from bench_tick import MAKERS, START, cycle_length, sent_again
from copilink_rules.adapters.base import SnapshotBuilder
from _workload import refreshed, shipped_policy, load_bench_policy
from copilink_rules.engine import Engine
from copilink_rules.model import Snapshot
import tempfile, pathlib
kind, accounts, ticks, made, at = {kind!r}, {accounts}, {ticks}, {made}, {at!r}
if kind in ("read", "replay", "replay-apex"):  # bench_replay.py's lines, as `replay` reads
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
    # replay: each line read and evaluated with desync.yaml, as bench_replay.py replays it;
    # replay-apex: with desync.yaml and firms/apex.yaml
    files = [REPO / "rules" / "desync.yaml"] + (
        [REPO / "rules" / "firms" / "apex.yaml"] if kind == "replay-apex" else [])
    engine = Engine(load_policy(files)) if kind != "read" else None
    gc.disable()
    for line in lines[:ticks]:
        snapshot = reader.read(line)
        assert snapshot is not None
        if engine is not None:  # as `replay` evaluates it: with its accounts' origins
            engine.evaluate(snapshot, origins=reader.origins)
    sys.exit(0)
if kind.startswith("shipped") or kind == "build":
    policy = shipped_policy()
else:
    policy = load_bench_policy(pathlib.Path(tempfile.mkdtemp()))
rng = random.Random(7)
# shipped-cycle: bench_tick.py's cycle of shipped-live snapshots, the leaders flat on its last
cycling = kind == "shipped-cycle"
distinct = cycle_length(accounts) if cycling else 4
datas = [MAKERS["shipped-live" if kind in ("build", "shipped-cycle") else kind](
    accounts, START + timedelta(milliseconds=250 * i), rng, not cycling or i != distinct - 1)
    for i in range(distinct)]
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
if kind in ("shipped-live", "shipped-cycle"):
    # built as bench_tick builds them; as many in both processes of a row, whatever `ticks`
    # (slow at 1,000 accounts: two laps of the cycle, or the 50 ticks --ticks may take)
    needed = max(50, 2 * distinct) if cycling else 13 * distinct
    batch = [builder(sent_again(datas[i % distinct], s.time + cycle * (1 + i // distinct)))
             for i, s in enumerate((snapshots * (needed // distinct + 1))[:needed])]
else:
    batch = [refreshed(s, s.time + cycle * (1 + i // distinct)) if kind == "shipped-steady"
             else s.model_copy(update={{"time": s.time + cycle * (1 + i // distinct)}})
             for i, s in enumerate(snapshots * 13)]
gc.disable()
if at is not None:  # --at: the cycle's tick `at` of its second lap, counted alone
    import itertools
    for i, snapshot in enumerate(batch[:2 * distinct]):
        if i == distinct + at:  # callgrind collects only inside starmap's next (--toggle-collect)
            (made,) = itertools.starmap(engine.evaluate, [(snapshot,)])
            print("decisions", len(made))
        else:
            engine.evaluate(snapshot)
    sys.exit(0)
for snapshot in batch[:ticks]:
    engine.evaluate(snapshot)
"""


def count(kind: str, accounts: int, ticks: int, made: int,
          at: int | None = None) -> tuple[int, str]:
    """Instructions callgrind counts for the whole child process (`made`: timeline lines
    generated, for read and replay: as many in both processes), and what the child printed.
    With `at`, only those of the cycle's tick `at` (shipped-cycle), counted alone: collection
    is on only while itertools.starmap runs it (the engine never calls starmap)."""
    code = CHILD.format(here=str(HERE), kind=kind, accounts=accounts, ticks=ticks, made=made,
                        at=at)
    alone = ["--collect-atstart=no", "--toggle-collect=starmap_next"] if at is not None else []
    result = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *alone,
         sys.executable, "-c", code],
        capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"},
        cwd=HERE.parent, check=False)  # this checkout's copilink_rules, first on the path
    found = re.search(r"Collected\s*:\s*(\d+)", result.stderr)
    if result.returncode != 0 or found is None:
        raise SystemExit(f"callgrind run failed ({kind}, {accounts} accounts, {ticks} ticks):\n"
                         f"{result.stderr[-2000:]}")
    return int(found.group(1)), result.stdout


# the rows that count an engine tick, and those that count a line (read, built, replayed)
TICK_ROWS = frozenset({"shipped", "shipped-steady", "shipped-live", "shipped-cycle", "synthetic"})
LINE_ROWS = frozenset({"read", "build", "replay", "replay-apex"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rules", default="shipped-steady,shipped",
                        help="comma-separated: shipped, shipped-steady, shipped-live, "
                        "shipped-cycle, synthetic; read, build (the snapshot's making), "
                        "replay, replay-apex (above)")
    parser.add_argument("--accounts", default="100", help="comma-separated account counts")
    parser.add_argument("--ticks", type=int, default=16,
                        help="timed ticks (at most 48; lines or snapshots for read, build, "
                        "replay and replay-apex: at most 1000)")
    parser.add_argument("--at", default="",
                        help="shipped-cycle only: comma-separated ticks of the cycle (0 = its "
                        "first, when the leaders enter again) to count alone, each in its own "
                        "process, instead of --ticks")
    args = parser.parse_args()
    try:
        at = [int(n) for n in args.at.split(",") if n.strip()]
    except ValueError:
        raise SystemExit(f"--at must be tick numbers separated by commas, not {args.at!r}") \
            from None
    if shutil.which("valgrind") is None:
        raise SystemExit("bench_instructions.py needs valgrind (apt install valgrind)")
    kinds = [k.strip() for k in args.rules.split(",") if k.strip()]
    most = 1000 if set(kinds) <= LINE_ROWS else 48
    if not 1 <= args.ticks <= most:
        raise SystemExit(f"--ticks must be between 1 and {most}"
                         + (" (48 for the tick rows)" if most == 48 else ""))
    unknown = sorted(set(kinds) - TICK_ROWS - LINE_ROWS)
    if unknown:
        raise SystemExit(f"unknown --rules {', '.join(unknown)}: use shipped, shipped-steady, "
                         "shipped-live, shipped-cycle, synthetic, read, build, replay or "
                         "replay-apex")
    if at:
        distinct = [cycle_length(int(n)) for n in args.accounts.split(",") if n.strip()]
        if kinds != ["shipped-cycle"] or not all(0 <= i < min(distinct) for i in at):
            raise SystemExit("--at counts ticks of the shipped-cycle workload alone: use "
                             "--rules shipped-cycle and ticks from 0 to "
                             f"{min(distinct) - 1} (the cycle's length at these sizes)")
    package = subprocess.run(
        [sys.executable, "-c", "import copilink_rules; print(copilink_rules.__file__)"],
        capture_output=True, text=True, cwd=HERE.parent, check=False).stdout.strip()
    counted = f"ticks {args.at} of the cycle, each alone" if at else \
        f"{args.ticks} ticks counted"
    print(f"instructions per Engine.evaluate tick (callgrind; {counted}; "
          f"{Path(package).parent}); for read, build and replay: per line read, per "
          "snapshot built, per line read and evaluated")
    print("| rules | accounts | instructions per tick | per account |")
    print("|---|---|---|---|")
    for kind in kinds:
        for accounts in [int(n) for n in args.accounts.split(",") if n.strip()]:
            if at:  # each tick counted alone, in a process of its own
                for index in at:
                    alone, printed = count(kind, accounts, 0, 0, index)
                    made = printed.split()[-1] if printed.startswith("decisions") else "?"
                    print(f"| {kind}, tick {index} of the cycle ({made} decisions) | "
                          f"{accounts:,} | {alone:,} | {alone / accounts:,.0f} |", flush=True)
                continue
            made = max(50, 2 + args.ticks)
            per_tick = (count(kind, accounts, 2 + args.ticks, made)[0]
                        - count(kind, accounts, 2, made)[0]) / args.ticks
            print(f"| {kind} | {accounts:,} | {per_tick:,.0f} | {per_tick / accounts:,.0f} |",
                  flush=True)

if __name__ == "__main__":
    main()
