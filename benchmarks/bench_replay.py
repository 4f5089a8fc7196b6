"""Replay throughput: a 7-hour session at 4 snapshots/s with 20 accounts (100,800 snapshots)
through `copilink-rules replay`'s code path: read JSON Lines, validate, evaluate (SPEC section 8
target: under 10 s). Replayed twice: with desync.yaml alone, and with desync.yaml and a firm
file (firms/apex.yaml, which extends desync); each run prints its reading (decoding and
validating the line) and evaluating parts. Then two floors. Under the reading: the same lines
decoded alone by the fast reader's msgspec decoder, into its structs (msgspec's checks of types
and bounds, none of the reader's own; an account's positions and orders left as text, which
the reader decodes only when it changed) and no snapshot built: what reading would cost if
the snapshot were those structs. Under the whole replay (with desync.yaml, when it is replayed):
hand-written Python doing desync's work on those structs (hand_replay.py), its decisions
checked against the engine's, alert messages included, before it is timed.

    python benchmarks/bench_replay.py [--snapshots 100800] [--accounts 20]
                                      [--reader fast|strict|both] [--rules desync|apex|both]

`--reader strict` reads every line with the strict pydantic path (what `replay` did before the
msgspec reader); `both` runs each rule set with each reader, strict first.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import msgspec
from _workload import REPO, T0, snapshot_dict
from hand_replay import Decided, HandReplay

from copilink_rules import fastread
from copilink_rules.engine import Engine
from copilink_rules.rules import load_policy
from copilink_rules.snapshots import iter_timeline_origins

RULES = {
    "desync": [REPO / "rules" / "desync.yaml"],
    "apex": [REPO / "rules" / "desync.yaml", REPO / "rules" / "firms" / "apex.yaml"],
}


def replay(path: Path, rules: str, reader: str) -> list[Decided]:
    """Replays the timeline; returns its decisions in HandReplay's form."""
    engine = Engine(load_policy(RULES[rules]))
    decisions = 0
    decided: list[Decided] = []
    parse = 0.0
    count = 0
    # as `replay` reads and evaluates: each snapshot with its accounts' origins
    iterator = iter_timeline_origins(path, fast=reader == "fast")
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        line = next(iterator, None)
        parse += time.perf_counter() - t0
        if line is None:
            break
        snapshot, origins = line
        count += 1
        made = engine.evaluate(snapshot, origins=origins)
        decisions += len(made)
        decided.extend((d.time, d.rule, d.account or "", d.action,
                        str(d.args.get("message", "")) if d.action == "alert" else "")
                       for d in made)
    total = time.perf_counter() - start
    label = "desync" if rules == "desync" else "desync + firms/apex"
    print(f"replay ({label}, {reader} reader): {count} snapshots in {total:.2f} s "
          f"({count / total:,.0f} snapshots/s; reading+validating {parse:.2f} s = "
          f"{parse / count * 1e6:.0f} µs a line, evaluating {total - parse:.2f} s = "
          f"{(total - parse) / count * 1e6:.0f} µs a line), {decisions} decisions   "
          "(target: 100k snapshots under 10 s)", flush=True)
    return decided


def hand_replay(path: Path, engine_decided: list[Decided]) -> None:
    """The floor: hand_replay.py's hand-written desync over the same lines; its decisions are
    checked against the engine's before it is timed."""
    check = HandReplay()
    with path.open() as handle:  # text, as the timeline is read
        decided = [d for line in handle for d in check(check.decode(line))]
    if sorted(decided) != sorted(engine_decided):
        missing = sorted(set(engine_decided) - set(decided))[:3]
        extra = sorted(set(decided) - set(engine_decided))[:3]
        raise SystemExit(f"the hand-written replay decides otherwise than the engine "
                         f"({len(decided)} against {len(engine_decided)} decisions; only the "
                         f"engine's: {missing}; only the hand-written: {extra})")
    hand = HandReplay()
    decode, parse, evaluate = hand.decode, 0.0, 0.0
    count = 0
    with path.open() as handle:
        start = time.perf_counter()
        for line in handle:
            t0 = time.perf_counter()
            raw = decode(line)
            t1 = time.perf_counter()
            hand(raw)
            evaluate += time.perf_counter() - t1
            parse += t1 - t0
            count += 1
        total = time.perf_counter() - start
    print(f"replay (desync, hand-written, the same {len(decided)} decisions): {count} lines in "
          f"{total:.2f} s (decoding into the reader's structs {parse:.2f} s = "
          f"{parse / count * 1e6:.0f} µs a line, evaluating by hand {evaluate:.2f} s = "
          f"{evaluate / count * 1e6:.0f} µs a line)", flush=True)


def decode_floor(path: Path) -> None:
    """msgspec's decoding alone, of every line, into the fast reader's structs."""
    decode = msgspec.json.Decoder(fastread._LineSnapshot).decode
    count = 0
    taken = 0.0
    with path.open() as handle:  # text, as the timeline is read
        for line in handle:
            t0 = time.perf_counter()
            decode(line)
            taken += time.perf_counter() - t0
            count += 1
    print(f"decoding alone (msgspec into the reader's structs: its type and bound checks, none "
          f"of the reader's, positions and orders left as text, no snapshot built): "
          f"{count} lines in {taken:.2f} s = {taken / count * 1e6:.0f} µs a line", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--snapshots", type=int, default=7 * 3600 * 4)
    parser.add_argument("--accounts", type=int, default=20)
    parser.add_argument("--reader", choices=["fast", "strict", "both"], default="fast")
    parser.add_argument("--rules", choices=["desync", "apex", "both"], default="both")
    args = parser.parse_args()
    rng = random.Random(11)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "session.jsonl"
        start = time.perf_counter()
        with path.open("w") as handle:
            # the leader alternates 2-minute trades and 1-minute flat spells
            for i in range(args.snapshots):
                moment = T0 + timedelta(milliseconds=250 * i)
                in_trade = (i // 240) % 3 != 2
                opened = T0 + timedelta(milliseconds=250 * (i // 720 * 720))
                handle.write(json.dumps(snapshot_dict(args.accounts, moment, rng, in_trade,
                                                      opened), separators=(",", ":")) + "\n")
        size = path.stat().st_size
        print(f"generated {args.snapshots} snapshots x {args.accounts} accounts "
              f"({size / 1e6:.0f} MB) in {time.perf_counter() - start:.1f} s", flush=True)
        readers = ["strict", "fast"] if args.reader == "both" else [args.reader]
        engine_decided: list[Decided] | None = None
        for rules in (["desync", "apex"] if args.rules == "both" else [args.rules]):
            for reader in readers:
                decided = replay(path, rules, reader)
                if rules == "desync":
                    engine_decided = decided
        decode_floor(path)
        if engine_decided is not None:
            hand_replay(path, engine_decided)


if __name__ == "__main__":
    main()
