"""The peer workload with pair rules: a full `Engine.evaluate` tick of leader/follower pairs under
desync.yaml, beside hand-written Python of the same shape doing the same work with the same
decisions (hand_replay.HandReplay: desync's five session rules, four of them pair rules, written
out by hand). bench_peers.py compares account rules, which the peer engines can express; this
compares the rules a copier's followers live by, where the engine's cost is the pair views.

    python benchmarks/bench_pairs.py [--accounts 100] [--laps 20]

The accounts are bench_tick.py's `shipped-live` accounts (groups of one leader and 19
followers; most followers copy their leader, some drift: a missed entry, an opposite side, an
extra ES position), as `run` gets them: each tick's snapshot built by an adapter's
SnapshotBuilder from the broker's data refreshed at that tick, an unchanged position the same
object as at the last tick. The leaders go flat and enter again once a cycle (10-40 ticks a
quarter second apart), so the rules' episodes end and fire again. The hand-written code gets
the same data as one line of JSON decoded into the fast reader's structs (hand_replay.py:
positions kept as text, their families derived again only when the text changes, as the
engine derives them again only when the positions change). Making the snapshot, and decoding
the line, happen before each tick and are not timed: each side's tick is snapshot in,
decisions out. What the hand-written code leaves out because no rule here needs it (the
account metrics firm rules read, views, conflict resolution between rules) is listed in
hand_replay.py's docstring; the decisions check below holds it to the same answers.

First every tick of two laps is run by both, and their decisions (time, rule, account,
action, alert message) must be the same, or the script stops before timing anything. Then
both are timed over --laps laps. Printed: p50 and p90 per tick, and the engine's p50 over the
hand-written p50.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from _workload import percentile, shipped_snapshot_dict
from bench_tick import START, cycle_length, sent_again
from hand_replay import Decided, HandReplay

from copilink_rules.adapters.base import SnapshotBuilder
from copilink_rules.engine import Engine
from copilink_rules.model import Decision, Snapshot
from copilink_rules.rules import load_policy

DESYNC = Path(__file__).resolve().parent.parent / "rules" / "desync.yaml"


def as_tuples(decided: list[Decision]) -> list[Decided]:
    return [(d.time, d.rule, d.account or "", d.action,
             str(d.args.get("message", "")) if d.action == "alert" else "") for d in decided]


def ticks(accounts: int, laps: int) -> list[tuple[Snapshot, Any]]:
    """Each tick's snapshot (as an adapter builds it) and line (decoded as the hand-written
    code reads it), `laps` cycles of them."""
    rng = random.Random(7)
    distinct = cycle_length(accounts)
    opened = START - timedelta(seconds=30)
    datas = [shipped_snapshot_dict(accounts, START + timedelta(milliseconds=250 * i), rng,
                                   i != distinct - 1, opened_at=opened)
             for i in range(distinct)]
    builder, decode = SnapshotBuilder(), HandReplay().decode
    cycle = timedelta(milliseconds=250 * distinct)
    out = []
    for lap in range(laps):
        for i, data in enumerate(datas):
            sent = sent_again(data, START + timedelta(milliseconds=250 * i) + cycle * lap)
            out.append((builder(sent), decode(json.dumps(sent))))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--laps", type=int, default=20, help="cycles of ticks timed")
    args = parser.parse_args()
    policy = load_policy([DESYNC])

    check = ticks(args.accounts, 2)
    engine, hand = Engine(policy), HandReplay()
    engine_said: list[Decided] = []
    hand_said: list[Decided] = []
    for snapshot, line in check:
        engine_said += as_tuples(engine.evaluate(snapshot))
        hand_said += hand(line)
    if sorted(engine_said) != sorted(hand_said):
        only_engine = sorted(set(engine_said) - set(hand_said))[:3]
        only_hand = sorted(set(hand_said) - set(engine_said))[:3]
        print(f"the hand-written tick decides otherwise than the engine ({len(hand_said)} "
              f"against {len(engine_said)} decisions; only the engine's: {only_engine}; only "
              f"the hand-written: {only_hand})", file=sys.stderr)
        return 1

    timed = ticks(args.accounts, args.laps)
    engine, hand = Engine(policy), HandReplay()
    engine_times: list[float] = []
    hand_times: list[float] = []
    decisions = 0
    for snapshot, line in timed:
        t0 = time.perf_counter()
        decisions += len(engine.evaluate(snapshot))
        t1 = time.perf_counter()
        hand(line)
        t2 = time.perf_counter()
        engine_times.append(t1 - t0)
        hand_times.append(t2 - t1)
    followers = sum(1 for a in timed[0][0].accounts if a.role == "follower")
    print(f"pairs: {args.accounts} accounts ({followers} leader/follower pairs), desync.yaml's "
          f"5 session rules (4 pair rules), {len(timed)} ticks, {decisions / len(timed):.1f} "
          f"decisions a tick; the same {len(engine_said)} decisions from both in the check")
    print("| full tick | p50 | p90 | vs hand-written (p50) |")
    print("|---|---|---|---|")
    hand_p50 = percentile(hand_times, 0.5)
    for name, times in (("hand-written Python (hand_replay.HandReplay)", hand_times),
                        ("copilink-rules Engine.evaluate", engine_times)):
        p50 = percentile(times, 0.5)
        print(f"| {name} | {p50 * 1e6:.0f} µs | {percentile(times, 0.9) * 1e6:.0f} µs | "
              f"{p50 / hand_p50:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
