"""The same 800 condition evaluations by copilink-rules, by hand-written Python (the floor) and by
the peer engines available as packages: rule-engine, json-logic, zen-engine, Cedar (SPEC
section 8). Every engine must give the same answers, or the run stops before timing anything.

    pip install -e ".[peers]"
    python benchmarks/bench_peers.py [--rounds 500]

800 = the 20 account-scope conditions of benchmarks/_workload.py x 40 accounts; each engine's
answers per account are gathered into one bitmask (copilink-rules computes it directly, as the
engine does; the others evaluate each condition and collect the results). Each peer gets
each condition in its own language over a plain per-account record. Where a peer's language
has no such function, the translation is spelled out with what it has: a time of day becomes
seconds since local midnight (`now_s`), `abs(x) > k` becomes `x > k or x < -k`. Cedar has no
division or modulo and no floats: money is Cedar `decimal`, `minutes_until` is given to it
precomputed (`minutes_until_flat_by`), and condition 16 (`... / max(...) > 0.9 and False`,
false by construction) keeps only its first comparison. Building the records is not timed;
for Cedar the conversion of each request to JSON happens inside cedarpy and is timed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _workload import ACCOUNT_CONDITIONS, account_envs, load_bench_policy
from bench_conditions import HAND_WRITTEN, best_of

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


def record(env: Any) -> dict[str, Any]:
    """The plain per-account record the peers evaluate (the engine reads `env` itself)."""
    a = env.account
    local = env.now_local
    return {
        "contracts": a.contracts, "pnl": a.pnl, "unrealized_pnl": a.unrealized_pnl,
        "realized_pnl": a.realized_pnl, "flat": a.flat, "working_orders": a.working_orders,
        "balance": a.balance, "role": a.role, "positions": a.positions, "copier": a.copier,
        "data_age": a.data_age, "connected": a.connected,
        "undeclared_positions": a.undeclared_positions, "firm": a.firm,
        "weekday": env.weekday,
        "now_s": local.hour * 3600 + local.minute * 60 + local.second,
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


Runner = Callable[[list[Any]], list[int]]


def _optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def peers(records: list[dict[str, Any]]) -> dict[str, tuple[Runner, list[Any]] | str]:
    """name -> (run over inputs giving one mask per account, inputs), or why it is missing."""
    out: dict[str, tuple[Runner, list[Any]] | str] = {}
    if (rule_engine := _optional("rule_engine")) is None:
        out["rule-engine"] = "not installed"
    else:
        context = rule_engine.Context(default_value=None)
        rules = [rule_engine.Rule(text, context=context) for text in RULE_ENGINE]
        out["rule-engine"] = (
            lambda rs: [mask([r.matches(rec) for r in rules]) for rec in rs], records)
    if (json_logic := _optional("json_logic")) is None:
        out["json-logic"] = "not installed"
    else:
        apply = json_logic.jsonLogic
        out["json-logic"] = (
            lambda rs: [mask([bool(apply(c, rec)) for c in JSON_LOGIC]) for rec in rs], records)
    if (zen := _optional("zen")) is None:
        out["zen-engine"] = "not installed"
    else:
        compiled = [zen.compile_expression(text) for text in ZEN]
        out["zen-engine"] = (
            lambda rs: [mask([bool(c.evaluate(rec)) for c in compiled]) for rec in rs], records)
    if (cedarpy := _optional("cedarpy")) is None:
        out["cedar (cedarpy)"] = "not installed"
    else:
        policy_set = cedarpy.PolicySet.from_str("\n".join(
            f"permit(principal, action, resource) when {{ {c} }};" for c in CEDAR))
        requests = [cedar_request(rec, i) for i, rec in enumerate(records)]

        def run_cedar(reqs: list[Any]) -> list[int]:
            results = cedarpy.is_authorized_batch(reqs, policy_set, "[]")
            return [sum(1 << int(p.removeprefix("policy")) for p in r.diagnostics.reasons)
                    for r in results]

        out["cedar (cedarpy)"] = (run_cedar, requests)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=500)
    args = parser.parse_args()
    for table in (RULE_ENGINE, ZEN, JSON_LOGIC, CEDAR):
        assert len(table) == len(ACCOUNT_CONDITIONS)
    with tempfile.TemporaryDirectory() as tmp:
        policy = load_bench_policy(Path(tmp))
    envs = account_envs(policy)
    batch = compile_batch([r.when for r in policy.rules if r.id.startswith("bench-account-")],
                          "bench")
    expected = [mask([bool(f(env)) for f in HAND_WRITTEN]) for env in envs]
    records = [record(env) for env in envs]

    runs: dict[str, tuple[Runner, list[Any]] | str] = {
        "hand-written": (lambda es: [mask([bool(f(e)) for f in HAND_WRITTEN]) for e in es], envs),
        "copilink-rules": (lambda es: [batch(e) for e in es], envs),
        **peers(records),
    }
    # the same decisions, or the comparison means nothing
    for name, run in runs.items():
        if isinstance(run, str):
            continue
        got = run[0](run[1])
        for index, (want, have) in enumerate(zip(expected, got, strict=True)):
            if want != have:
                differ = [i for i in range(len(ACCOUNT_CONDITIONS)) if (want ^ have) >> i & 1]
                raise SystemExit(f"{name} disagrees with hand-written Python on account "
                                 f"{index}, conditions {differ}: {json.dumps(records[index])}")
    true_count = sum(bin(m).count("1") for m in expected)
    count = len(envs) * len(ACCOUNT_CONDITIONS)
    print(f"{count} condition evaluations ({len(ACCOUNT_CONDITIONS)} conditions x {len(envs)} "
          f"accounts, {true_count} true), the same answers from every engine below")
    floor = None
    for name, run in runs.items():
        if isinstance(run, str):
            print(f"  {name:<16} {run} (pip install -e \".[peers]\")")
            continue
        fn, inputs = run
        rounds = args.rounds if name in ("hand-written", "copilink-rules") else \
            max(20, args.rounds // 20)
        seconds = best_of(fn, inputs, rounds)
        floor = floor or seconds
        print(f"  {name:<16} {seconds * 1e6:9.1f} us   {seconds / floor:7.1f}x hand-written   "
              f"({seconds / count * 1e9:7.0f} ns per condition, best of {rounds})")


if __name__ == "__main__":
    main()
