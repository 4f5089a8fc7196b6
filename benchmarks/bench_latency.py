"""Detection-to-command latency with the sim broker: from reading the snapshot in which a rule
becomes due to the command reaching the broker adapter (engine + journal + enforcer), with the
journal a real SQLite file on disk, ticks run as the live scheduler runs them
(`LiveRunner.tick_once`: the garbage collector held off during a tick, start-up frozen out of
it). Also: how long a tick takes, the garbage collections and WAL checkpoints and where they
fell, and the WAL's largest size.

    python benchmarks/bench_latency.py [--sessions 40] [--as-before] [--checkpoint-pages 1000]

`--as-before` runs it the way it was before issue 10, for comparison on the same host: SQLite's
automatic WAL checkpoint (which may land on a command's insert) and plain `Session.tick()`
(the garbage collector free to run inside a tick).

Wall-clock numbers on a shared host include time the process waited for a CPU; the "on-CPU"
line (thread CPU time over the same window) leaves that out (and time blocked in fsync too).
On Linux the thread's context switches over each window tell the two apart: a voluntary one
means it waited (an fsync, I/O, a lock), an involuntary one that the OS gave its CPU to another
process; "not preempted" is the wall-clock latency of the windows without the latter.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _workload import REPO, percentile

from copilink_rules.adapters.sim import SimBroker, SimFollower, SimScenario
from copilink_rules.alerts import Alerts
from copilink_rules.journal import Journal
from copilink_rules.scheduler import LiveRunner
from copilink_rules.session import Session


def ms(values: list[float], label: str) -> str:
    if not values:
        return f"{label}: none"
    return (f"{label}: p50 {percentile(values, 0.5) * 1e3:.2f} ms   p90 "
            f"{percentile(values, 0.9) * 1e3:.2f} ms   p99 "
            f"{percentile(values, 0.99) * 1e3:.2f} ms   max {max(values) * 1e3:.2f} ms")


def switches() -> tuple[int, int]:
    """This thread's context switches so far: (voluntary: it waited, e.g. on an fsync;
    involuntary: the OS gave its CPU to another process)."""
    if not sys.platform.startswith("linux"):
        return (0, 0)
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return (usage.ru_nvcsw, usage.ru_nivcsw)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=40)
    parser.add_argument("--as-before", action="store_true",
                        help="SQLite's automatic checkpoint, and the collector free in a tick")
    parser.add_argument("--checkpoint-pages", type=int, default=1000,
                        help="the WAL's size at a checkpoint (either way); smaller: more often")
    args = parser.parse_args()
    before = args.as_before
    latencies: list[float] = []
    cpu_latencies: list[float] = []
    calm: list[float] = []  # the windows in which the OS did not take the CPU away
    blocked = preempted = 0  # windows with a voluntary / involuntary context switch
    tick_times: list[float] = []  # Session.tick
    runner_times: list[float] = []  # the scheduler's tick: with the collection after it
    # where we are: 0 between ticks, 1 in a tick, 2 between a snapshot and its command, 3 in
    # start-up (building the session, its first tick and the freeze after it) or shutdown
    phase = [3]
    gc_in = {0: 0, 1: 0, 2: 0, 3: 0}
    gc_pause: dict[int, list[float]] = {0: [], 1: [], 2: [], 3: []}
    gc_at = [0.0]
    gc_phase = [0]

    def on_gc(stage: str, info: dict[str, Any]) -> None:
        if stage == "start":
            gc_at[0], gc_phase[0] = time.perf_counter(), phase[0]
        else:
            gc_in[gc_phase[0]] += 1
            gc_pause[gc_phase[0]].append(time.perf_counter() - gc_at[0])

    gc.callbacks.append(on_gc)
    checkpoints = on_path = 0
    wal_max = 0
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.sessions):
            phase[0] = 3
            scenario = SimScenario(seed=seed, random_trades=6, random_faults=6, followers=[
                SimFollower(id=f"F{i}") for i in range(1, 11)])
            broker = SimBroker(scenario)
            read_at: list[Any] = [0.0, 0.0, 0, (0, 0)]
            original = broker.snapshot
            # a real file, WAL, as in `run`
            journal = Journal(Path(tmp) / f"j{seed}.db",
                              checkpoint_pages=0 if before else args.checkpoint_pages)
            if before:  # SQLite's own, at the same size
                journal._db.execute(f"PRAGMA wal_autocheckpoint={args.checkpoint_pages}")

            def timed_snapshot(original: Any = original, read_at: list[Any] = read_at,
                               journal: Journal = journal) -> Any:
                snapshot = original()
                read_at[0], read_at[1] = time.perf_counter(), time.thread_time()
                read_at[2] = journal.checkpoints
                read_at[3] = switches()
                if phase[0] == 1:  # in a tick (session.start() reads one too)
                    phase[0] = 2
                return snapshot

            broker.snapshot = timed_snapshot  # type: ignore[method-assign]

            def reached(kind: str, account: str, tag: str, read_at: list[Any] = read_at,
                        journal: Journal = journal) -> None:
                nonlocal on_path, blocked, preempted
                latency = time.perf_counter() - read_at[0]
                latencies.append(latency)
                cpu_latencies.append(time.thread_time() - read_at[1])
                on_path += journal.checkpoints - read_at[2]
                voluntary, involuntary = (a - b for a, b in zip(switches(), read_at[3],
                                                                strict=True))
                blocked += voluntary > 0
                preempted += involuntary > 0
                if not involuntary:
                    calm.append(latency)
                phase[0] = 1

            def advance(broker: SimBroker = broker) -> None:
                broker.advance(0.25)

            session = Session(broker, journal, Alerts(), [REPO / "rules" / "desync.yaml"],
                              before_tick=advance, on_command=reached)
            session_tick = session.tick

            def timed_tick(session_tick: Any = session_tick) -> Any:
                outer, phase[0] = phase[0], 1
                start = time.perf_counter()
                try:
                    return session_tick()
                finally:
                    tick_times.append(time.perf_counter() - start)
                    phase[0] = outer

            session.tick = timed_tick  # type: ignore[method-assign]
            runner = LiveRunner(session, reload_every=0)
            tick = session.tick if before else runner.tick_once
            session.start()
            first = True
            wal = Path(f"{journal.path}-wal")
            while broker.elapsed < broker.end:
                start = time.perf_counter()
                tick()
                elapsed = time.perf_counter() - start
                if first:  # the first tick of a run also freezes start-up's objects
                    tick_times.pop()
                else:
                    runner_times.append(elapsed)
                first = False
                phase[0] = 0
                wal_max = max(wal_max, wal.stat().st_size if wal.exists() else 0)
            phase[0] = 3
            checkpoints += journal.checkpoints
            journal.close()
            runner.thaw()
    gc.callbacks.remove(on_gc)
    mode = "AS BEFORE (SQLite's automatic checkpoint, collector free in a tick)" if before \
        else "journal checkpoints after a tick's commands, collector held off in a tick"
    print(f"[{mode}]")
    print(f"detection-to-command latency over {len(latencies)} corrective commands in "
          f"{args.sessions} sessions (11 accounts each, journal on disk, pid {os.getpid()}):")
    print("  " + ms(latencies, "wall  "))
    print("  " + ms(cpu_latencies, "on-CPU"))
    print("  " + ms(calm, f"wall, the {len(calm)} windows not preempted"))
    print(f"  windows in which the thread waited (fsync, I/O, a lock): {blocked}; in which the "
          f"OS gave the CPU to another process: {preempted}")
    print("  " + ms(tick_times, f"tick time ({len(tick_times)} ticks, wall)"))
    if not before:
        print("  " + ms(runner_times, "tick + the collection after it"))
    print(f"  garbage collections: {gc_in[2]} between a snapshot and its command, {gc_in[1]} "
          f"elsewhere in a tick, {gc_in[0]} between ticks; longest "
          f"{max([*gc_pause[1], *gc_pause[2]], default=0) * 1e3:.2f} ms in a tick, "
          f"{max(gc_pause[0], default=0) * 1e3:.2f} ms between ticks (start-up and shutdown: "
          f"{gc_in[3]}, longest {max(gc_pause[3], default=0) * 1e3:.2f} ms)")
    if before:
        print(f"  WAL checkpoints: SQLite's own, inside whichever commit reached "
              f"{args.checkpoint_pages} pages; WAL at most {wal_max / 2**20:.1f} MB")
    else:
        print(f"  WAL checkpoints: {checkpoints}, {on_path} of them between a snapshot and its "
              f"command; WAL at most {wal_max / 2**20:.1f} MB")


if __name__ == "__main__":
    main()
