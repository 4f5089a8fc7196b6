"""The peer workload (SPEC section 8): copilink-rules, hand-written Python (the floor) and the peer
engines available as packages (rule-engine, json-logic, zen-engine, Cedar), the same answers from
every one, checked before anything is timed. A missing peer is reported and skipped.

    pip install -e ".[peers]"
    python benchmarks/bench_peers.py [--accounts 100] [--ticks 400] [--rounds 500]

The workload: the 20 account-scope conditions of benchmarks/_workload.py as 20 alert rules
(fire when the condition turns true, no `for`, no cooldown) over N accounts (one leader, N-1
followers). Two tables:

Full tick: a Snapshot in, the decisions out, over 40 snapshots a quarter second apart (the
  leader flat on every fourth, so conditions turn false and fire again), cycled. copilink-rules
  is `Engine.evaluate` (views, episodes, conflicts, decisions). Hand-written Python does the
  same work in the same shape (HandTick): the facts the conditions read derived from each
  account, one function per account evaluating all 20 conditions with the params and literal
  times folded as the engine folds them (bench_conditions.hand_account; the parts that depend on
  the time alone worked out once per tick, hand_clock, as the engine's batch does), and the
  episodes; its
  decisions are (rule, account, reason) tuples where the engine's are Decision models. Each
  peer is HandTick with the peer in place of hand_account: the facts become a plain record,
  the peer evaluates it. Reported: p50 and p90 per tick.
Conditions only: the same conditions on views (copilink-rules, hand-written) and records (the
  peers) built beforehand, not timed: copilink-rules is the compiled batch alone, one call per
  account. Reported: the best of the rounds.

Each peer gets each condition in its own language over the plain per-account record. Where a
peer's language has no such function, the translation is spelled out with what it has: a time
of day becomes seconds since local midnight (`now_s`), `abs(x) > k` becomes `x > k or x < -k`.
Cedar has no division or modulo and no floats: money is Cedar `decimal`, `minutes_until` is
given to it precomputed (`minutes_until_flat_by`), and condition 16 (`... / max(...) > 0.9 and
False`, false by construction) keeps only its first comparison. For Cedar the conversion of
each request to JSON happens inside cedarpy and is timed in both tables.
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from _workload import (
    ACCOUNT_CONDITIONS,
    T0,
    account_envs,
    load_peer_policy,
    percentile,
    snapshot_dict,
)
from bench_conditions import best_of, hand_account, hand_clock

from copilink_rules.engine import Engine
from copilink_rules.instruments import default_catalog
from copilink_rules.model import Account, Decision, Snapshot
from copilink_rules.rules.expressions import compile_batch

FLAT_BY_S, OPEN_S, FROM_S, TO_S = 16 * 3600 + 59 * 60, 9 * 3600 + 31 * 60, 16 * 3600, 18 * 3600
UNTIL_FLAT_BY = f"(({FLAT_BY_S} - now_s + 86400) % 86400) / 60"

# rule-engine (https://zerosteiner.github.io/rule-engine/): Python-like, `$` builtins
RULE_ENGINE = [
    "contracts > 10", "pnl < -1000", "pnl < -800", "unrealized_pnl < -500 and not flat",
    "working_orders > 10", "balance < 48000 and role == 'follower'", "positions > 2",
    "realized_pnl > 3000", f"now_s >= {FLAT_BY_S} and not flat",
    f"{UNTIL_FLAT_BY} <= 5 and not flat", "copier == 'paused' and not flat",
    "data_age > 2 and connected", "weekday == 6 and not flat",
    f"now_s >= {FROM_S} and now_s < {TO_S} and contracts > 0", "$abs(pnl) > 2000",
    "contracts >= 10 and working_orders > 0",
    "pnl > 0 and realized_pnl / $max([pnl, 1]) > 0.9 and false",
    f"undeclared_positions > 0 and now_s < {OPEN_S}", "firm == 'topstep' and contracts > 5",
    "firm == 'apex' and contracts > 10",
]
# zen-engine (GoRules ZEN expression language)
ZEN = [c.replace("$abs", "abs").replace("$max", "max") for c in RULE_ENGINE]


def _v(name: str) -> dict[str, str]:
    return {"var": name}


def _not(name: str) -> dict[str, Any]:
    return {"!": _v(name)}


# json-logic (https://jsonlogic.com/), the panzi-json-logic implementation
JSON_LOGIC: list[dict[str, Any]] = [
    {">": [_v("contracts"), 10]},
    {"<": [_v("pnl"), -1000]},
    {"<": [_v("pnl"), -800]},
    {"and": [{"<": [_v("unrealized_pnl"), -500]}, _not("flat")]},
    {">": [_v("working_orders"), 10]},
    {"and": [{"<": [_v("balance"), 48000]}, {"===": [_v("role"), "follower"]}]},
    {">": [_v("positions"), 2]},
    {">": [_v("realized_pnl"), 3000]},
    {"and": [{">=": [_v("now_s"), FLAT_BY_S]}, _not("flat")]},
    {"and": [{"<=": [{"/": [{"%": [{"+": [{"-": [FLAT_BY_S, _v("now_s")]}, 86400]}, 86400]},
                            60]}, 5]}, _not("flat")]},
    {"and": [{"===": [_v("copier"), "paused"]}, _not("flat")]},
    {"and": [{">": [_v("data_age"), 2]}, _v("connected")]},
    {"and": [{"===": [_v("weekday"), 6]}, _not("flat")]},
    {"and": [{">=": [_v("now_s"), FROM_S]}, {"<": [_v("now_s"), TO_S]},
             {">": [_v("contracts"), 0]}]},
    {"or": [{">": [_v("pnl"), 2000]}, {"<": [_v("pnl"), -2000]}]},
    {"and": [{">=": [_v("contracts"), 10]}, {">": [_v("working_orders"), 0]}]},
    {"and": [{">": [_v("pnl"), 0]},
             {">": [{"/": [_v("realized_pnl"), {"max": [_v("pnl"), 1]}]}, 0.9]}, False]},
    {"and": [{">": [_v("undeclared_positions"), 0]}, {"<": [_v("now_s"), OPEN_S]}]},
    {"and": [{"===": [_v("firm"), "topstep"]}, {">": [_v("contracts"), 5]}]},
    {"and": [{"===": [_v("firm"), "apex"]}, {">": [_v("contracts"), 10]}]},
]


def _d(name: str, op: str, value: float) -> str:
    return f'context.{name}.{op}(decimal("{value:.1f}"))'


# Cedar (https://www.cedarpolicy.com/): one `permit` per condition; the policies that allow a
# request are the conditions that hold.
CEDAR = [
    "context.contracts > 10", _d("pnl", "lessThan", -1000), _d("pnl", "lessThan", -800),
    _d("unrealized_pnl", "lessThan", -500) + " && !context.flat",
    "context.working_orders > 10",
    _d("balance", "lessThan", 48000) + ' && context.role == "follower"',
    "context.positions > 2", _d("realized_pnl", "greaterThan", 3000),
    f"context.now_s >= {FLAT_BY_S} && !context.flat",
    _d("minutes_until_flat_by", "lessThanOrEqual", 5) + " && !context.flat",
    'context.copier == "paused" && !context.flat',
    _d("data_age", "greaterThan", 2) + " && context.connected",
    "context.weekday == 6 && !context.flat",
    f"context.now_s >= {FROM_S} && context.now_s < {TO_S} && context.contracts > 0",
    _d("pnl", "greaterThan", 2000) + " || " + _d("pnl", "lessThan", -2000),
    "context.contracts >= 10 && context.working_orders > 0",
    _d("pnl", "greaterThan", 0) + " && false",
    f"context.undeclared_positions > 0 && context.now_s < {OPEN_S}",
    'context.firm == "topstep" && context.contracts > 5',
    'context.firm == "apex" && context.contracts > 10',
]


def record(a: Any, now_local: Any, weekday: int) -> dict[str, Any]:
    """The plain per-account record the peers evaluate, from account facts `a` (the engine
    reads its own views)."""
    return {
        "contracts": a.contracts, "pnl": a.pnl, "unrealized_pnl": a.unrealized_pnl,
        "realized_pnl": a.realized_pnl, "flat": a.flat, "working_orders": a.working_orders,
        "balance": a.balance, "role": a.role, "positions": a.positions, "copier": a.copier,
        "data_age": a.data_age, "connected": a.connected,
        "undeclared_positions": a.undeclared_positions, "firm": a.firm,
        "weekday": weekday,
        "now_s": now_local.hour * 3600 + now_local.minute * 60 + now_local.second,
    }


def cedar_request(rec: dict[str, Any], index: int) -> dict[str, Any]:
    context: dict[str, Any] = {}
    for key, value in rec.items():  # Cedar has no floats: decimal, 4 places at most
        context[key] = {"__extn": {"fn": "decimal", "arg": f"{value:.4f}"}} \
            if isinstance(value, float) else value
    until = ((FLAT_BY_S - rec["now_s"] + 86400) % 86400) / 60
    context["minutes_until_flat_by"] = {"__extn": {"fn": "decimal", "arg": f"{until:.4f}"}}
    return {"principal": f'Account::"{index}"', "action": 'Action::"check"',
            "resource": f'Account::"{index}"', "context": context}


def mask(values: list[bool]) -> int:
    return sum(1 << i for i, value in enumerate(values) if value)


Prepare = Callable[[list[dict[str, Any]]], list[Any]]  # records -> what the peer reads
Masks = Callable[[list[Any]], list[int]]  # -> one bitmask per account


def _optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _same(records: list[dict[str, Any]]) -> list[Any]:
    return records


def peers() -> dict[str, tuple[Prepare, Masks] | str]:
    """name -> (prepare, masks), or why it is missing."""
    out: dict[str, tuple[Prepare, Masks] | str] = {}
    if (rule_engine := _optional("rule_engine")) is None:
        out["rule-engine"] = "not installed"
    else:
        context = rule_engine.Context(default_value=None)
        rules = [rule_engine.Rule(text, context=context) for text in RULE_ENGINE]
        out["rule-engine"] = (
            _same, lambda rs: [mask([r.matches(rec) for r in rules]) for rec in rs])
    if (json_logic := _optional("json_logic")) is None:
        out["json-logic"] = "not installed"
    else:
        apply = json_logic.jsonLogic
        out["json-logic"] = (
            _same, lambda rs: [mask([bool(apply(c, rec)) for c in JSON_LOGIC]) for rec in rs])
    if (zen := _optional("zen")) is None:
        out["zen-engine"] = "not installed"
    else:
        compiled = [zen.compile_expression(text) for text in ZEN]
        out["zen-engine"] = (
            _same, lambda rs: [mask([bool(c.evaluate(rec)) for c in compiled]) for rec in rs])
    if (cedarpy := _optional("cedarpy")) is None:
        out["cedar (cedarpy)"] = "not installed"
    else:
        policy_set = cedarpy.PolicySet.from_str("\n".join(
            f"permit(principal, action, resource) when {{ {c} }};" for c in CEDAR))

        def run_cedar(reqs: list[Any]) -> list[int]:
            results = cedarpy.is_authorized_batch(reqs, policy_set, "[]")
            return [sum(1 << int(p.removeprefix("policy")) for p in r.diagnostics.reasons)
                    for r in results]

        out["cedar (cedarpy)"] = (
            lambda rs: [cedar_request(rec, i) for i, rec in enumerate(rs)], run_cedar)
    return out


# --- the full tick: snapshot in, decisions out ------------------------------------------------

NEW_YORK = ZoneInfo("America/New_York")
WORKING = ("working", "pending")
RULE_IDS = [f"bench-account-{i}" for i in range(len(ACCOUNT_CONDITIONS))]
REASONS = [f"when: {c}" for c in ACCOUNT_CONDITIONS]  # the engine's reason for a bare alert


class Facts:
    """What the conditions read about one account, derived from the snapshot by hand."""

    __slots__ = ("balance", "connected", "contracts", "copier", "data_age", "firm", "flat",
                 "id", "pnl", "positions", "realized_pnl", "role", "undeclared_positions",
                 "unrealized_pnl", "working_orders")

    def __init__(self, account: Account, now: datetime, parse: Callable[[str], Any]) -> None:
        families = set()
        contracts = undeclared = 0
        overnight = {parse(s).symbol for s in account.overnight} if account.overnight else ()
        for position in account.positions:
            qty = position.qty
            if qty:
                instrument = parse(position.instrument)
                contracts += abs(qty)
                families.add(instrument.family)
                if instrument.symbol not in overnight:
                    undeclared += 1
        self.id, self.role, self.firm = account.id, account.role, account.firm or ""
        self.connected, self.copier = account.connected, account.copier
        self.balance, self.realized_pnl = account.balance, account.realized_pnl
        self.unrealized_pnl = account.unrealized_pnl
        self.pnl = account.realized_pnl + account.unrealized_pnl
        self.data_age = account.data_age(now)
        self.flat, self.contracts, self.positions = not families, contracts, len(families)
        self.undeclared_positions = undeclared
        self.working_orders = sum(1 for o in account.orders if o.status in WORKING) \
            if account.orders else 0


class HandTick:
    """A tick written by hand, the same shape as the engine's: facts per account, all
    conditions in one call per account (`masks`), and episodes: a rule fires for an account
    when its condition turns true, and again only after it was false."""

    def __init__(self, masks: Callable[[list[Facts], Any, int], list[int]]) -> None:
        self.masks = masks
        self.live: dict[str, int] = {}  # account -> conditions true at the last tick
        self.parse = default_catalog().parse

    def __call__(self, snapshot: Snapshot) -> list[tuple[str, str, str]]:
        now = snapshot.time
        local = now.astimezone(NEW_YORK)
        parse = self.parse
        facts = [Facts(account, now, parse) for account in snapshot.accounts]
        masks = self.masks(facts, local.time(), local.weekday())
        live, last = {}, self.live
        decisions = []
        for f, m in zip(facts, masks, strict=True):
            live[f.id] = m
            fresh = m & ~last.get(f.id, 0)
            while fresh:
                low = fresh & -fresh
                fresh ^= low
                i = low.bit_length() - 1
                decisions.append((RULE_IDS[i], f.id, REASONS[i]))
        self.live = live
        return decisions


def hand_masks(facts: list[Facts], now_local: Any, weekday: int) -> list[int]:
    parts = hand_clock(now_local, weekday)  # once per tick
    return [hand_account(f, parts) for f in facts]


def peer_masks(prepare: Prepare, run: Masks) -> Callable[[list[Facts], Any, int], list[int]]:
    def masks(facts: list[Facts], now_local: Any, weekday: int) -> list[int]:
        return run(prepare([record(f, now_local, weekday) for f in facts]))
    return masks


def tick_snapshots(n_accounts: int, count: int) -> list[Snapshot]:
    """`count` snapshots a quarter second apart at 16:30 New York; the leader is flat on every
    fourth, so its followers' conditions turn false and fire again on the next one."""
    rng = random.Random(11)
    start = T0 + timedelta(hours=7)
    return [Snapshot.model_validate(snapshot_dict(
        n_accounts, start + timedelta(milliseconds=250 * i), rng, leader_long=i % 4 != 3,
        opened=start)) for i in range(count)]


def time_ticks(make: Callable[[], Callable[[Snapshot], Any]], snapshots: list[Snapshot],
               ticks: int) -> tuple[list[float], int]:
    """Per-tick times of a fresh `make()` run over `ticks` ticks cycling through `snapshots`
    (each later pass a cycle later in time), and how many decisions it made."""
    tick = make()
    cycle = timedelta(milliseconds=250 * len(snapshots))
    times, decisions = [], 0
    for lap in range(-(-ticks // len(snapshots))):
        batch = [s.model_copy(update={"time": s.time + cycle * lap}) for s in snapshots]
        for snapshot in batch[:ticks - lap * len(snapshots)]:
            start = time.perf_counter()
            decisions += len(tick(snapshot))
            times.append(time.perf_counter() - start)
    return times, decisions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=500,
                        help="conditions only: best of this many rounds (peers: a 20th)")
    parser.add_argument("--ticks", type=int, default=400,
                        help="full tick: this many ticks (peers: a 10th, at least 40)")
    parser.add_argument("--accounts", type=int, default=100)
    args = parser.parse_args()
    for table in (RULE_ENGINE, ZEN, JSON_LOGIC, CEDAR):
        assert len(table) == len(ACCOUNT_CONDITIONS)
    with tempfile.TemporaryDirectory() as tmp:
        policy = load_peer_policy(Path(tmp))
    batch = compile_batch([r.when for r in policy.rules], "bench")
    the_peers = peers()
    missing = {name: why for name, why in the_peers.items() if isinstance(why, str)}
    present = {name: run for name, run in the_peers.items() if not isinstance(run, str)}

    # --- the full tick: snapshot in, decisions out, the same decisions from every engine ------
    snapshots = tick_snapshots(args.accounts, 40)
    ticks: dict[str, Callable[[], Callable[[Snapshot], Any]]] = {
        "hand-written": lambda: HandTick(hand_masks),
        "copilink-rules Engine.evaluate": lambda: Engine(policy).evaluate,
        **{name: (lambda p=p, r=r: HandTick(peer_masks(p, r)))  # type: ignore[misc]
           for name, (p, r) in present.items()},
    }
    want = [sorted(d) for d in map(HandTick(hand_masks), snapshots)]
    for name, make in ticks.items():
        tick = make()
        for index, snapshot in enumerate(snapshots):
            got = sorted((d.rule, d.account, d.reason) if isinstance(d, Decision) else d
                         for d in tick(snapshot))
            if got != want[index]:
                raise SystemExit(f"{name} decides differently from hand-written Python on "
                                 f"tick {index}: {sorted(set(got) ^ set(want[index]))[:5]}")
    fired = sum(map(len, want))
    print(f"Full tick: snapshot of {args.accounts} accounts in, decisions out ({len(policy.rules)}"
          f" account rules; {fired} decisions over {len(snapshots)} ticks, the same from every "
          "engine)")
    print("| engine | ticks | p50 | p90 | x hand-written (p50) |")
    print("|---|---|---|---|---|")
    floor = 0.0
    for name, make in ticks.items():
        n = args.ticks if name in ("hand-written", "copilink-rules Engine.evaluate") else \
            max(40, args.ticks // 10)
        times, _ = time_ticks(make, snapshots, n)
        p50 = percentile(times, 0.5)
        floor = floor or p50
        print(f"| {name} | {n} | {p50 * 1e6:,.0f} us | {percentile(times, 0.9) * 1e6:,.0f} us | "
              f"{p50 / floor:.1f}x |")
    for name, why in missing.items():
        print(f"| {name} | {why} (pip install -e \".[peers]\") | | | |")

    # --- the conditions alone, on views and records built beforehand -----------------------
    envs = account_envs(policy, args.accounts)
    expected = [hand_account(e.account, hand_clock(e.now_local, e.weekday)) for e in envs]
    assert len({(e.now_local, e.weekday) for e in envs}) == 1  # one tick: one time
    records = [record(e.account, e.now_local, e.weekday) for e in envs]
    runs: dict[str, tuple[Masks, list[Any]]] = {
        "hand-written": (lambda es: [hand_account(e.account, parts)
                                     for parts in [hand_clock(es[0].now_local, es[0].weekday)]
                                     for e in es], envs),
        "copilink-rules compiled batch": (lambda es: [batch(e) for e in es], envs),
        **{name: (run, prepare(records)) for name, (prepare, run) in present.items()},
    }
    for name, (run, inputs) in runs.items():  # the same answers, or it means nothing
        for index, (w, have) in enumerate(zip(expected, run(inputs), strict=True)):
            if w != have:
                differ = [i for i in range(len(ACCOUNT_CONDITIONS)) if (w ^ have) >> i & 1]
                raise SystemExit(f"{name} disagrees with hand-written Python on account "
                                 f"{index}, conditions {differ}: {json.dumps(records[index])}")
    true_count = sum(bin(m).count("1") for m in expected)
    count = len(envs) * len(ACCOUNT_CONDITIONS)
    print()
    print(f"Conditions only: {count} evaluations ({len(ACCOUNT_CONDITIONS)} conditions x "
          f"{len(envs)} accounts, {true_count} true, the same answers from every engine) on "
          "views/records built beforehand")
    print("| engine | best of | time | x hand-written | per condition |")
    print("|---|---|---|---|---|")
    floor = 0.0
    for name, (run, inputs) in runs.items():
        rounds = args.rounds if name in ("hand-written", "copilink-rules compiled batch") else \
            max(20, args.rounds // 20)
        seconds = best_of(run, inputs, rounds)
        floor = floor or seconds
        print(f"| {name} | {rounds} | {seconds * 1e6:,.1f} us | {seconds / floor:.1f}x | "
              f"{seconds / count * 1e9:,.0f} ns |")
    for name, why in missing.items():
        print(f"| {name} | {why} (pip install -e \".[peers]\") | | | |")


if __name__ == "__main__":
    main()
