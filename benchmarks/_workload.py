"""Shared workload for the benchmarks: a 40-rule policy and snapshots of N accounts."""

from __future__ import annotations

import random
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from copilink_rules.rules import Policy, load_policy

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 3, 2, 14, 30, tzinfo=UTC)

# 35 extra rules on top of desync.yaml's 5 session rules = 40 session rules.
ACCOUNT_CONDITIONS = [
    "account.contracts > params.max_contracts",
    "account.pnl < -params.daily_loss",
    "account.pnl < -params.daily_loss * 0.8",
    "account.unrealized_pnl < -params.daily_loss * 0.5 and not account.flat",
    "account.working_orders > 10",
    "account.balance < 48000 and account.role == 'follower'",
    "account.positions > 2",
    "account.realized_pnl > params.daily_loss * 3",
    "now_local >= time(params.flat_by) and not account.flat",
    "minutes_until(params.flat_by) <= 5 and not account.flat",
    "account.copier == 'paused' and not account.flat",
    "account.data_age > 2 and account.connected",
    "weekday == 6 and not account.flat",
    "time_between('16:00', '18:00') and account.contracts > 0",
    "abs(account.pnl) > params.daily_loss * 2",
    "account.contracts >= params.max_contracts and account.working_orders > 0",
    "account.pnl > 0 and account.realized_pnl / max(account.pnl, 1) > 0.9 and False",
    "account.undeclared_positions > 0 and now_local < time('09:31')",
    "account.firm == 'topstep' and account.contracts > 5",
    "account.firm == 'apex' and account.contracts > 10",
]
PAIR_CONDITIONS = [
    "not leader.flat and follower.flat and leader.age > 60",
    "not follower.flat and abs(follower.equiv) > abs(pair.expected_equiv) * 2",
    "not follower.flat and follower.age > 3600",
    "not leader.flat and not follower.flat and ticks(follower.avg_price, leader.avg_price) > 40",
    "not leader.flat and follower.flat and pair.entry_action == 'skip_entry' and False",
    "leader.side == follower.side and abs(follower.qty) > abs(leader.qty) * 3",
    "not leader.flat and account.copier == 'paused'",
    "follower.overnight and not leader.flat",
    "not follower.flat and instrument.micro and follower.qty > 50",
    "not leader.flat and quote.last > leader.avg_price + 1000",
    "not follower.flat and seconds_since(follower.opened_at) > 7200",
    "not leader.flat and follower.flat and leader_account.connected == False",
    "not follower.flat and leader.flat and follower.age < 0",
    "sign(leader.qty) * sign(follower.qty) < 0 and False",
    "not leader.flat and abs(leader.equiv - follower.equiv) > 10",
]


def policy_text() -> str:
    rules = []
    for i, cond in enumerate(ACCOUNT_CONDITIONS):
        rules.append(f"  - id: bench-account-{i}\n    when: \"{cond}\"\n    for: 1s\n"
                     "    then: [alert]\n")
    for i, cond in enumerate(PAIR_CONDITIONS):
        rules.append(f"  - id: bench-pair-{i}\n    scope: pair\n    when: \"{cond}\"\n"
                     "    for: 1s\n    then: [alert]\n")
    return textwrap.dedent("""\
        ruleset: bench
        extends: [desync]
        params: {max_contracts: 10, daily_loss: 1000, flat_by: "16:59"}
        rules:
        """) + "".join(rules)


def load_bench_policy(tmp: Path) -> Policy:
    path = tmp / "bench.yaml"
    path.write_text(policy_text())
    return load_policy([path], search_path=[REPO / "rules"])


def snapshot_dict(n_accounts: int, moment: datetime, rng: random.Random,
                  leader_long: bool = True, opened: datetime | None = None) -> dict[str, Any]:
    """One leader and n-1 followers; most followers copy the leader, a few drift. The leader
    entered at `opened` (default: 30 s before `moment`), the followers a second later. Money
    is in cents, as brokers report it."""
    price = 18000.0 + rng.randint(-8, 8) * 0.25
    opened = opened or moment - timedelta(seconds=30)
    lead_positions = ([{"instrument": "NQH6", "qty": 2, "avg_price": 18000.0,
                        "opened_at": opened.isoformat()}]
                      if leader_long else [])
    accounts: list[dict[str, Any]] = [{"id": "LEAD", "role": "leader", "firm": "apex",
                                       "balance": 50000.0, "positions": lead_positions}]
    for i in range(1, n_accounts):
        positions = []
        kind = i % 10
        if leader_long and kind != 3:
            positions.append({"instrument": "NQH6" if kind != 5 else "MNQH6",
                              "qty": 2 if kind != 5 else 20, "avg_price": 18000.25,
                              "opened_at": (opened + timedelta(seconds=1)).isoformat()})
        if kind == 7:
            positions.append({"instrument": "ESH6", "qty": 1, "avg_price": 5000.0})
        accounts.append({
            "id": f"F{i:03d}", "role": "follower", "leader": "LEAD",
            "firm": ("apex", "topstep", "tradeify")[i % 3], "balance": 50000.0 + i,
            "realized_pnl": round(rng.uniform(-300, 300), 2),
            "unrealized_pnl": round(rng.uniform(-200, 200), 2),
            "positions": positions,
        })
    return {"time": moment.isoformat(),
            "quotes": {"NQH6": {"bid": price - 0.25, "ask": price, "last": price},
                       "MNQH6": {"bid": price - 0.25, "ask": price, "last": price},
                       "ESH6": {"bid": 5000.0, "ask": 5000.25, "last": 5000.25}},
            "accounts": accounts}


def account_envs(policy: Policy, n_accounts: int = 40) -> list[Any]:
    """What the account-scope conditions of `policy` see for n accounts at 16:30 New York
    (near the flat-by deadline, so the time conditions are true for some)."""
    from copilink_rules.engine import Engine  # noqa: PLC0415 - only the condition benchmarks
    from copilink_rules.model import Snapshot  # noqa: PLC0415

    engine = Engine(policy)
    snapshot = Snapshot.model_validate(
        snapshot_dict(n_accounts, T0 + timedelta(hours=7), random.Random(3)))
    infos = engine._accounts(snapshot, snapshot.time)
    targets = engine._account_targets(snapshot, infos, snapshot.time)
    local = snapshot.time.astimezone(policy.rules[0].timezone)
    for target in targets:
        target.env.local, target.env.now_local, target.env.weekday = (
            local, local.time(), local.weekday())
    return [t.env for t in targets]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
