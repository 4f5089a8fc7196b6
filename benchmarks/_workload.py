"""Shared workload for the benchmarks: the synthetic 40-rule policy, the peer workload's 20 account
rules, the shipped rules, and snapshots of N accounts for each."""

from __future__ import annotations

import random
import textwrap
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from copilink_rules.model import Snapshot
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


def peer_policy_text() -> str:
    """The peer workload's policy: exactly the 20 account conditions, as alerts that fire each
    time their condition becomes true (no `for`, no cooldown), so a tick's decisions are just
    the conditions that turned true."""
    rules = "".join(f"  - id: bench-account-{i}\n    when: \"{cond}\"\n    cooldown: 0s\n"
                    "    then: [alert]\n" for i, cond in enumerate(ACCOUNT_CONDITIONS))
    return textwrap.dedent("""\
        ruleset: peers
        timezone: America/New_York
        params: {max_contracts: 10, daily_loss: 1000, flat_by: "16:59"}
        rules:
        """) + rules


def load_peer_policy(tmp: Path) -> Policy:
    path = tmp / "peers.yaml"
    path.write_text(peer_policy_text())
    return load_policy([path])


def account_envs(policy: Policy, n_accounts: int = 100) -> list[Any]:
    """What the account-scope conditions of `policy` see for n accounts at 16:30 New York
    (near the flat-by deadline, so the time conditions are true for some): the environments
    the engine builds itself in one tick."""
    snapshot = Snapshot.model_validate(
        snapshot_dict(n_accounts, T0 + timedelta(hours=7), random.Random(3)))
    return [env for env in capture_envs(policy, snapshot)
            if getattr(env, "leader", None) is None and getattr(env, "accounts", None) is None]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- the shipped rules: desync.yaml + every firm file, on accounts at those firms -------------

FIRM_SIZES: dict[str, tuple[int, ...]] = {
    "apex": (25000, 50000, 100000, 150000), "topstep": (50000, 100000, 150000),
    "mffu": (50000, 100000, 150000), "takeprofit": (50000,), "tradeify": (50000, 100000),
}
GROUP = 20  # accounts per leader: one leader and 19 followers


def shipped_policy() -> Policy:
    """desync.yaml and all of rules/firms/*.yaml, as `copilink-rules run` would load them."""
    rules = REPO / "rules"
    return load_policy([rules / "desync.yaml", *sorted((rules / "firms").glob("*.yaml"))],
                       search_path=[rules])


def shipped_snapshot_dict(n_accounts: int, moment: datetime, rng: random.Random,
                          leader_long: bool = True,
                          opened_at: datetime | None = None) -> dict[str, Any]:
    """n accounts in groups of one leader (Apex 50K) and 19 followers spread over the five
    firms with their own account sizes; balances and P&L vary so that some accounts are near a
    drawdown, daily loss or contract limit. Most followers copy the leader (NQ, or MNQ at 10x),
    a few drift (missed the entry, too big, opposite side, an extra ES position). Positions
    opened at `opened_at` (default: 30 s before `moment`, so they differ at every moment)."""
    price = 18000.0 + rng.randint(-8, 8) * 0.25
    opened = (opened_at or moment - timedelta(seconds=30)).isoformat()
    firms = list(FIRM_SIZES)
    accounts: list[dict[str, Any]] = []
    stamp = moment.isoformat()
    for i in range(n_accounts):
        group, kind = divmod(i, GROUP)
        leader_id = f"L{group:03d}"
        if kind == 0:
            accounts.append({
                "id": leader_id, "role": "leader", "firm": "apex", "size": 50000.0,
                "balance": 50400.0, "realized_pnl": 400.0, "updated_at": stamp,
                "unrealized_pnl": round(rng.uniform(-150, 150), 2),
                "positions": [{"instrument": "NQH6", "qty": 2, "avg_price": 18000.0,
                               "opened_at": opened}] if leader_long else []})
            continue
        firm = firms[(i + group) % len(firms)]
        size = FIRM_SIZES[firm][(i // len(firms)) % len(FIRM_SIZES[firm])]
        # an account's money is its own and stable from one tick to the next (a hash of its
        # index); only the open P&L moves a little with the price
        u, v = (i * 2654435761 % 4294967296) / 4294967296, (i * 40503 % 65536) / 65536
        realized = round((u * 0.06 - 0.04) * size, 2)
        unrealized = round((v - 0.5) * 600 + rng.uniform(-20, 20), 2) if positions_of(
            leader_long, kind) else 0.0
        positions: list[dict[str, Any]] = []
        if leader_long and kind != 3:
            qty, symbol = {5: (20, "MNQH6"), 9: (6, "NQH6"), 11: (-2, "NQH6")}.get(
                kind, (2, "NQH6"))
            positions.append({"instrument": symbol, "qty": qty, "avg_price": 18000.25,
                              "opened_at": opened})
        if kind == 7:
            positions.append({"instrument": "ESH6", "qty": 1, "avg_price": 5000.0,
                              "opened_at": opened})
        accounts.append({
            "id": f"A{i:05d}", "role": "follower", "leader": leader_id, "firm": firm,
            "size": float(size), "balance": round(size * (1 + (v - u) * 0.05) + realized, 2),
            "realized_pnl": realized, "unrealized_pnl": unrealized,
            "updated_at": stamp, "positions": positions,
            "orders": [{"id": f"o{i}", "instrument": "NQH6", "side": "sell", "qty": 2,
                        "type": "stop", "stop_price": 17950.0}] if kind % 4 == 1 else [],
        })
    return {"time": stamp,
            "quotes": {"NQH6": {"bid": price - 0.25, "ask": price, "last": price},
                       "MNQH6": {"bid": price - 0.25, "ask": price, "last": price},
                       "ESH6": {"bid": 5000.0, "ask": 5000.25, "last": 5000.25}},
            "accounts": accounts}


def refreshed(snapshot: Snapshot, moment: datetime) -> Snapshot:
    """`snapshot` as a broker would send it again at `moment`: every account's data refreshed
    then (`updated_at`), its positions and orders new objects with the same values (as parsed
    from a new message), so the engine sees them unchanged by comparing, not by identity."""
    accounts = tuple(a.model_copy(update={
        "updated_at": moment,
        "positions": tuple(p.model_copy() for p in a.positions),
        "orders": tuple(o.model_copy() for o in a.orders)}) for a in snapshot.accounts)
    return snapshot.model_copy(update={"time": moment, "accounts": accounts})


def positions_of(leader_long: bool, kind: int) -> bool:
    return (leader_long and kind != 3) or kind == 7


def capture_envs(policy: Policy, snapshot: Any) -> list[Any]:
    """The evaluation environments the engine itself hands to its compiled condition batches
    for one tick of `snapshot` (in the order it evaluates them). Found by wrapping
    `compile_batch` while the Engine is built, so it does not depend on how the engine builds
    its views."""
    import sys  # noqa: PLC0415

    from copilink_rules.engine import Engine  # noqa: PLC0415
    from copilink_rules.rules import expressions  # noqa: PLC0415

    original = expressions.compile_batch
    seen: list[Any] = []

    def recording(conditions: Any, label: str, positions: Any = None) -> Any:
        batch: Callable[[Any], int] = original(conditions, label, positions)

        def wrapper(env: Any) -> int:
            seen.append(env)
            return batch(env)
        return wrapper

    modules = [m for name, m in list(sys.modules.items())
               if name.startswith("copilink_rules") and
               getattr(m, "compile_batch", None) is original]
    for module in modules:
        module.compile_batch = recording  # type: ignore[attr-defined]
    try:
        Engine(policy).evaluate(snapshot)
    finally:
        for module in modules:
            module.compile_batch = original  # type: ignore[attr-defined]
    if not seen:
        raise SystemExit("capture_envs: the engine evaluated no condition batch built by "
                         "compile_batch; benchmarks/_workload.py needs updating")
    return seen
