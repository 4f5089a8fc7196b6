"""The built-in copier's latency: from the leader's fill to the follower's order being sent.

    python benchmarks/bench_copy.py [--sim-changes 300] [--changes 60] [--ticks 250,250/50,50]

(a) The sim broker in this process, `own_copier: false` (the sim's own copier off, so the
    built-in one copies), ticks run as the scheduler runs them (`LiveRunner.tick_once`), the
    journal a real SQLite file. Measured in wall-clock from the moment the sim applies the
    leader's fill (in `before_tick`, just before the tick reads the snapshot) to the copier's
    `on_send` hook, called just before `place_order` / `close_position`. The fill lands right
    before a tick here, so (a) is the work of one tick; live, a fill lands anywhere in the tick
    interval and first waits for the next tick: 0 to one interval more, half of it on average.

(b) The Tradovate stand-in (REST + WebSocket on 127.0.0.1) and `copilink-rules run --config`
    in its own process: the real adapter, Session and scheduler, at each tick interval given,
    copying at the rule ticks only or also between them (`copy_every`, `TICK/COPY`).
    Measured from just before the stand-in applies the leader's fill and pushes it on the user
    socket to the stand-in receiving the follower's order (`order/placeorder`, or
    `order/liquidateposition` for an exit), both on the stand-in's monotonic clock. The
    adapter's REST budget (80 requests a minute by default, a copier vendor's figure) is raised
    for the run so that the benchmark's pace, far above a trader's, is not waited out.

Every number printed comes from the run; nothing is asserted (SPEC: no test asserts a time).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _workload import REPO, percentile

from copilink_rules.adapters.sim import SimBroker, SimFollower, SimScenario, SimTrade
from copilink_rules.alerts import Alerts
from copilink_rules.copier import BuiltinCopier, FollowerCopy
from copilink_rules.journal import Journal
from copilink_rules.scheduler import LiveRunner
from copilink_rules.session import Session

LEADER = "LEAD"
RULES = REPO / "rules" / "firms" / "apex.yaml"
# apex_flat_by 18:00: the flat-by window [18:00, 18:00) is empty, so the hour the benchmark runs
# at changes nothing (the gate refuses every entry after the real 16:59 ET)
OVERRIDES = {"apex_flat_by": "18:00"}
WORKLOAD = ("1 leader (Apex 50K) and 3 followers: F1 ratio 1 (Apex 50K), F2 ratio 1 in MNQ "
            "micros (Apex 100K), F3 ratio 0.5 (Apex 25K); the leader alternates an entry of "
            "2 NQ (long, then short) and its exit, so each change is 3 follower orders (2 NQ, "
            "20 MNQ, 1 NQ, or 3 closes); rules: rules/firms/apex.yaml (+ desync)")


def row(label: str, values: list[float]) -> str:
    if not values:
        return f"{label:<44} {0:>6}   {'-':>8} {'-':>8} {'-':>8} {'-':>8}"
    return (f"{label:<44} {len(values):>6}   {min(values) * 1e3:>8.2f} "
            f"{percentile(values, 0.5) * 1e3:>8.2f} {percentile(values, 0.99) * 1e3:>8.2f} "
            f"{max(values) * 1e3:>8.2f}")


HEADER = f"{'':<44} {'orders':>6}   {'min ms':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"


# --- (a) the sim, in process ------------------------------------------------------------------

def bench_sim(changes: int, tick: float, root: Path) -> tuple[dict[str, list[float]], str]:
    trades = [SimTrade(at=2.0 + i * 3.0, side="long" if i % 2 == 0 else "short", qty=2,
                       hold=1.5) for i in range(max(changes // 2, 1))]
    followers = [SimFollower(id="F1", firm="apex", size=50000),
                 SimFollower(id="F2", firm="apex", size=100000, instrument="MNQH6"),
                 SimFollower(id="F3", ratio=0.5, firm="apex", size=25000)]
    settings: dict[str, Any] = {"trades": trades, "followers": followers,
                                "leader": LEADER, "leader_firm": "apex", "leader_size": 50000}
    if "own_copier" in SimScenario.model_fields:
        settings["own_copier"] = False
        how = "own_copier: false"
    else:  # an older sim: its own copier is switched off on the instance instead
        how = "no own_copier setting in this sim: SimBroker._copy replaced by a no-op"
    broker = SimBroker(SimScenario(**settings))
    if "own_copier" not in settings:
        broker._copy = lambda *_, **__: None  # type: ignore[method-assign]

    fills: list[float] = []  # when the sim applied each leader fill

    def timed(original: Callable[..., None]) -> Callable[..., None]:
        def wrapper(*args: Any, **kwargs: Any) -> None:
            original(*args, **kwargs)
            fills.append(time.perf_counter())
        return wrapper

    for name in ("_on_leader_enter", "_on_leader_exit"):  # how advance() applies a trade
        setattr(broker, name, timed(getattr(broker, name)))
    journal = Journal(root / "sim.db")
    copier = BuiltinCopier(broker, journal, [
        FollowerCopy("F1", LEADER), FollowerCopy("F2", LEADER, instrument="MNQH6"),
        FollowerCopy("F3", LEADER, ratio=0.5)])
    sends: list[tuple[float, str]] = []
    copier.on_send = lambda _kind, account, _tag: sends.append((time.perf_counter(), account))
    session = Session(broker, journal, Alerts(), [str(RULES)], dict(OVERRIDES),
                      copier=copier, before_tick=lambda: broker.advance(tick))
    session.start()
    runner = LiveRunner(session, tick_seconds=tick)
    out: dict[str, list[float]] = {"every": [], "first": [], "last": [], "tick": []}
    late = 0
    try:
        while broker.elapsed < broker.end:
            seen, sent = len(fills), len(sends)
            started = time.perf_counter()
            runner.tick_once()
            ended = time.perf_counter()
            if len(fills) == seen:
                continue
            fill = fills[-1]
            mine = [at - fill for at, _ in sends[sent:]]
            late += 3 - len(mine)
            out["tick"].append(ended - started)
            if mine:
                out["every"] += mine
                out["first"].append(mine[0])
                out["last"].append(mine[-1])
    finally:
        runner.thaw()
        journal.close()
    note = (f"{len(fills)} leader changes, {copier.sent} orders sent by the copier (copied "
            f"stops included); {late} follower order(s) not sent in the fill's own tick; {how}")
    return out, note


# --- (b) the Tradovate stand-in, copilink-rules run in its own process ------------------------

def bench_standin(tick_ms: int, copy_ms: int, changes: int, root: Path, rng: random.Random
                  ) -> tuple[dict[str, list[float]], str]:
    sys.path.insert(0, str(REPO))  # the stand-ins live in tests/, a package of the checkout
    from tests.standins.tradovate import (  # noqa: PLC0415 - importable only after the line above
        PASSWORD,
        SEC,
        USER,
        TradovateStandIn,
    )

    ids = {LEADER: 101, "F1": 102, "F2": 103, "F3": 104}
    sizes = {LEADER: 50000, "F1": 50000, "F2": 100000, "F3": 25000}
    standin = TradovateStandIn(ids).start()
    names = {aid: name for name, aid in ids.items()}
    try:
        for account, size in sizes.items():
            standin.set_cash(account, float(size))
        for symbol in ("NQH6", "MNQH6"):
            standin.push_quote(symbol, 18000.0, 18000.25, 18000.0)
        config = root / f"copilink-{tick_ms}-{copy_ms}.yaml"
        journal = root / f"standin-{tick_ms}-{copy_ms}.db"
        config.write_text(textwrap.dedent(f"""\
            broker:
              name: tradovate
              settings: {{rest_url: '{standin.rest_url}', ws_url: '{standin.ws_url}',
                          md_url: '{standin.md_url}', username: '{USER}', app_id: bench,
                          cid: 1234, device_id: bench-device, request_budget: 1000}}
            copier: builtin
            accounts:
              - {{id: {LEADER}, role: leader, firm: apex, size: 50000}}
              - {{id: F1, role: follower, ratio: 1.0, firm: apex, size: 50000}}
              - {{id: F2, role: follower, ratio: 1.0, firm: apex, size: 100000,
                  instrument: MNQH6}}
              - {{id: F3, role: follower, ratio: 0.5, firm: apex, size: 25000}}
            rules: [{RULES}]
            params: {{apex_flat_by: "18:00"}}
            kill_file: null
            tick: {tick_ms}ms
            copy_every: {copy_ms}ms
            """))
        log = (root / f"run-{tick_ms}-{copy_ms}.log").open("w")
        process = subprocess.Popen(
            [sys.executable, "-m", "copilink_rules", "run", "--config", str(config),
             "--journal", str(journal), "--duration", "600", "--no-view"],
            stdout=log, stderr=subprocess.STDOUT, cwd=root,
            env={**os.environ, "TRADOVATE_PASSWORD": PASSWORD, "TRADOVATE_SEC": SEC})
        out: dict[str, list[float]] = {"every": [], "first": [], "last": []}
        missing = 0
        try:
            wait_ticking(journal, process)
            tick = tick_ms / 1000
            for change in range(changes):
                entry = change % 2 == 0
                qty = (2 if change % 4 == 0 else -2) if entry else 0
                t0 = time.monotonic()
                standin.set_position(LEADER, "NQH6", qty, 18000.0)
                orders = wait_orders(standin, names, t0, deadline=t0 + 10)
                missing += 3 - len(orders)
                mine = sorted(at - t0 for at in orders.values())
                if mine:
                    out["every"] += mine
                    out["first"].append(mine[0])
                    out["last"].append(mine[-1])
                # the copies shown done (the next tick) before the next change; then a random
                # moment within the tick interval, as a trader's fill would fall
                time.sleep(2 * tick + rng.uniform(0, tick))
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:  # scheduler.py sets an Event from its handler
                process.kill()
                process.wait(10)
            log.close()
        ticks, skipped = tick_counts(journal, root / f"run-{tick_ms}-{copy_ms}.log")
    finally:
        standin.stop()
    note = (f"{changes} leader changes; {missing} follower order(s) not received within 10 s; "
            f"run: {ticks} ticks, {skipped} skipped while the previous one ran")
    return out, note


def wait_ticking(journal: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"copilink-rules run exited with {process.returncode}")
        try:
            with sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=1) as db:
                if db.execute("SELECT COUNT(*) FROM ticks").fetchone()[0] >= 4:
                    return
        except sqlite3.Error:
            pass
        time.sleep(0.05)
    raise SystemExit("copilink-rules run never started ticking")


def wait_orders(standin: Any, names: dict[int, str], t0: float,
                deadline: float) -> dict[str, float]:
    """When each follower's first order after `t0` reached the stand-in."""
    found: dict[str, float] = {}
    while len(found) < 3 and time.monotonic() < deadline:
        for record in standin.requests():
            if record.at < t0 or record.path not in ("order/placeorder",
                                                     "order/liquidateposition"):
                continue
            account = names.get((record.body or {}).get("accountId"), "")
            if account != LEADER:
                found.setdefault(account, record.at)
        time.sleep(0.001)
    return found


def tick_counts(journal: Path, log: Path) -> tuple[int, str]:
    with sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=1) as db:
        ticks = int(db.execute("SELECT COUNT(*) FROM ticks").fetchone()[0])
    skipped = "?"
    for line in log.read_text().splitlines():
        if line.startswith("stopped after"):
            skipped = line.split(";")[1].split()[0]
    return ticks, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--sim-changes", type=int, default=300,
                        help="leader changes (entries and exits) in (a); default 300")
    parser.add_argument("--changes", type=int, default=60,
                        help="leader changes per tick interval in (b); default 60")
    parser.add_argument("--ticks", default="250,250/50,50",
                        help="(b)'s runs, comma-separated: TICK (copying at ticks only) or "
                        "TICK/COPY (the copier also every COPY ms between ticks, copy_every), in "
                        "ms; default 250,250/50,50")
    parser.add_argument("--skip-sim", action="store_true", help="leave out (a)")
    parser.add_argument("--skip-standin", action="store_true", help="leave out (b)")
    parser.add_argument("--seed", type=int, default=7, help="for (b)'s pauses between changes")
    args = parser.parse_args()
    ticks: list[tuple[int, int]] = []
    for run in (t.strip() for t in args.ticks.split(",") if t.strip()):
        tick_text, _, copy_text = run.partition("/")
        ticks.append((int(tick_text), int(copy_text or tick_text)))
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                            capture_output=True, text=True, check=False).stdout.strip()
    print("bench_copy: leader fill -> follower order sent, built-in copier (copier: builtin)")
    print(f"workload: {WORKLOAD}")
    print(f"host: {os.cpu_count()} CPU(s), Python {platform.python_version()}, "
          f"{platform.system()} {platform.machine()}; code {commit or '?'}")
    with tempfile.TemporaryDirectory(prefix="bench-copy-") as tmp:
        root = Path(tmp)
        if not args.skip_sim:
            started = time.monotonic()
            result, note = bench_sim(args.sim_changes, 0.25, root)
            print()
            print("(a) sim broker in process; from the sim applying the leader's fill "
                  "(before_tick) to the copier calling place_order/close_position, inside one "
                  "tick (LiveRunner.tick_once, journal on disk)")
            print(f"    {note}; {time.monotonic() - started:.1f} s")
            print(HEADER)
            print(row("sim: every follower order", result["every"]))
            print(row("sim: first follower order of a change", result["first"]))
            print(row("sim: last (3rd) follower order of a change", result["last"]))
            print(row("sim: whole tick with a leader change", result["tick"]))
            print("    live, add the wait for the next tick: 0 to one tick interval, half of it "
                  "on average (125 ms at the default 250 ms); (b) measures it end to end")
        if not args.skip_standin:
            rng = random.Random(args.seed)
            print()
            print("(b) Tradovate stand-in on 127.0.0.1, copilink-rules run --config in its own "
                  "process; from the stand-in applying and pushing the leader's fill to it "
                  "receiving the follower's order")
            print(HEADER)
            for tick_ms, copy_ms in ticks:
                started = time.monotonic()
                result, note = bench_standin(tick_ms, copy_ms, args.changes, root, rng)
                name = f"tick {tick_ms} ms" + (f", copy {copy_ms} ms" if copy_ms < tick_ms
                                               else "")
                print(row(f"{name}: every follower order", result["every"]))
                print(row(f"{name}: first of a change", result["first"]))
                print(row(f"{name}: last (3rd) of a change", result["last"]))
                print(f"    {note}; {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
