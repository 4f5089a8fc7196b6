"""An account the reader says moved only in its time and money since the line before (its
origin, `FastReader.origins`) is worked out from what the engine kept of that origin: the
decisions, and every field of every account view, are those of an engine that works each
account out again (no origins), and of the reference path (`reuse=False`)."""

from __future__ import annotations

import json
import math
import tempfile
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from copilink_rules.engine import Engine
from copilink_rules.errors import InstrumentError
from copilink_rules.model import Snapshot
from copilink_rules.namespace import FIELDS
from copilink_rules.rules import load_policy
from copilink_rules.snapshots import iter_timeline, iter_timeline_origins

from .conftest import REPO

WHOLE = """
ruleset: whole
extends: [desync]
rules:
  - id: shown-whole
    when: account.equity < 0 or account.trading_day == "" or account.ratio > 5
    cooldown: 0s
    then: [{alert: {message: "{account}"}}]
"""


def _policies() -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp())
    (folder / "desync.yaml").write_text((REPO / "rules" / "desync.yaml").read_text())
    (folder / "whole.yaml").write_text(WHOLE)
    return {"apex": load_policy([REPO / "rules" / "desync.yaml",
                                 REPO / "rules" / "firms" / "apex.yaml"]),
            "firms-whole": load_policy([REPO / "rules" / "firms", folder / "whole.yaml"])}


POLICIES = _policies()
DESYNC = load_policy([REPO / "rules" / "desync.yaml"])
START = datetime(2026, 3, 8, 6, 58, tzinfo=UTC)  # New York's change to summer time, at 07:00
LONG = [{"instrument": "NQH6", "qty": 2, "avg_price": 18000.0}]


def _first() -> list[dict[str, Any]]:
    accounts: list[dict[str, Any]] = [{"id": "L", "role": "leader", "firm": "apex",
                                       "size": 50000, "balance": 50000.0, "positions": LONG}]
    for i, firm in enumerate(["apex", "apex", "topstep", None, "tradeify"], 1):
        account: dict[str, Any] = {"id": f"F{i}", "role": "follower", "leader": "L",
                                   "balance": 50000.0 + i, "realized_pnl": 0.0,
                                   "unrealized_pnl": 0.0, "positions": LONG}
        if firm:
            account["firm"] = firm
        accounts.append(account)
    return accounts


money = st.sampled_from([0.0, -0.0, 47000.0, 48999.5, 50000.0, 50100.25, -150.0, 75.5])
positions = st.sampled_from([[], LONG, [{"instrument": "NQH6", "qty": -2, "avg_price": 18000.0}],
                             [{"instrument": "MNQH6", "qty": 40, "avg_price": 0.0}],
                             [{"instrument": "NQH6", "qty": 2, "avg_price": -0.0}]])
change = st.one_of(
    st.tuples(st.just("money"), st.integers(0, 5),
              st.sampled_from(["balance", "realized_pnl", "unrealized_pnl"]), money),
    st.tuples(st.just("drop money"), st.integers(1, 5),
              st.sampled_from(["realized_pnl", "unrealized_pnl"]), st.none()),
    st.tuples(st.just("updated_at"), st.integers(0, 5), st.sampled_from([None, 0, 3, 40, "-"]),
              st.none()),
    st.tuples(st.just("set"), st.integers(1, 5), st.sampled_from(
        [("connected", False), ("connected", True), ("copier", "paused"), ("copier", "active"),
         ("firm", "apex"), ("firm", "mffu"), ("ratio", 2.0), ("ratio", 1.0), ("size", 25000),
         ("overnight", ["NQH6"]), ("orders", [{"id": "s1", "instrument": "NQH6",
                                               "side": "sell", "qty": 2, "type": "stop",
                                               "stop_price": 17990.0}])]), st.none()),
    st.tuples(st.just("positions"), st.integers(0, 5), positions, st.none()),
    st.tuples(st.just("swap"), st.integers(0, 5), st.integers(0, 5), st.none()),
    st.tuples(st.just("drop"), st.integers(1, 5), st.none(), st.none()),
)
steps = st.lists(st.tuples(st.sampled_from([0.25, 1.0, 30.0, 3600.0]),
                           st.lists(change, max_size=4),
                           st.sampled_from([18001.0, 18001.0, 18010.0, 17990.0, None])),
                 min_size=2, max_size=14)


def _timeline(plan: list[tuple[float, list[tuple[Any, ...]], float | None]]) -> list[str]:
    accounts, moment, lines, dropped = _first(), START, [], []
    for advance, changes, last in plan:
        moment += timedelta(seconds=advance)
        for kind, at, what, value in changes:
            index = at % len(accounts)
            account = accounts[index]
            if kind == "money":
                account[what] = value
            elif kind == "drop money":
                account.pop(what, None)
            elif kind == "updated_at":
                if what == "-":
                    account.pop("updated_at", None)
                else:
                    account["updated_at"] = None if what is None else \
                        (moment - timedelta(seconds=what)).isoformat()
            elif kind == "set" and account["role"] == "follower":
                account[what[0]] = what[1]
            elif kind == "positions":
                account["positions"] = what
            elif kind == "swap":
                other = what % len(accounts)
                accounts[index], accounts[other] = accounts[other], accounts[index]
            elif kind == "drop" and account["role"] == "follower" and len(accounts) > 2:
                dropped.append(accounts.pop(index))
            elif kind == "drop" and dropped:  # a leader is not dropped: one comes back
                accounts.append(dropped.pop())
        lines.append(json.dumps({"time": moment.isoformat(), "accounts": accounts,
                                 "quotes": {} if last is None else {"NQH6": {"last": last}}}))
    return lines


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and a == b == 0:
        return math.copysign(1.0, a) == math.copysign(1.0, b)
    return type(a) is type(b) and a == b


def _decided(engine: Engine, snapshot: Any, origins: Any) -> list[Any]:
    return [(d.rule, d.action, d.account, d.reason, d.args)
            for d in engine.evaluate(snapshot, origins=origins)]


def _same_views(ours: Engine, theirs: Engine) -> None:
    assert ours._infos.keys() == theirs._infos.keys()
    for account_id, info in ours._infos.items():
        for name in FIELDS["account"]:
            mine, other = getattr(info.view, name), getattr(theirs._infos[account_id].view, name)
            assert _same(mine, other), (account_id, name, mine, other)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=steps, policy=st.sampled_from(sorted(POLICIES)))
def test_accounts_worked_out_from_their_origins_decide_and_show_the_same(
        plan: list[tuple[float, list[tuple[Any, ...]], float | None]], policy: str) -> None:
    lines = _timeline(plan)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.jsonl"
        path.write_text("\n".join(lines) + "\n")
        read = list(iter_timeline_origins(path))
        assert [s for s, _ in read] == list(iter_timeline(path, fast=False))
    engines = [Engine(POLICIES[policy]), Engine(POLICIES[policy]),
               Engine(POLICIES[policy], reuse=False)]
    # and two that miss every third line: the origins then name an account the engine did
    # not see last, and are not taken
    missing = [Engine(POLICIES[policy]), Engine(POLICIES[policy])]
    moved = 0
    for number, (snapshot, origins) in enumerate(read):
        seen = [_decided(engine, snapshot, origins if i == 0 else None)
                for i, engine in enumerate(engines)]
        assert seen[0] == seen[1] == seen[2]
        _same_views(engines[0], engines[1])
        if number % 3 != 1:
            assert _decided(missing[0], snapshot, origins) == \
                _decided(missing[1], snapshot, None)
            _same_views(missing[0], missing[1])
        moved += sum(o is not None for o in origins or ())
    if len(read) > 2:
        assert moved or any(o is None for _, origins in read[1:] for o in origins or ())


def test_most_accounts_of_a_replayed_session_have_an_origin() -> None:
    """On a session whose followers' P&L moves every line, every account after the first
    line has its origin: the previous line's account at its place."""
    path = REPO / "examples" / "desync-session.jsonl"
    read = list(iter_timeline_origins(path))
    assert read[0][1] == [None] * len(read[0][0].accounts)
    with_origin = sum(o is not None for _, origins in read[1:] for o in origins or ())
    total = sum(len(s.accounts) for s, _ in read[1:])
    assert with_origin > total // 2
    for (before, _), (snapshot, origins) in pairwise(read):
        for account, origin in zip(snapshot.accounts, origins or (), strict=True):
            if origin is not None:
                assert origin in before.accounts
                assert account.model_dump(exclude={"updated_at", "balance", "realized_pnl",
                                                   "unrealized_pnl"}) == origin.model_dump(
                    exclude={"updated_at", "balance", "realized_pnl", "unrealized_pnl"})


def test_pairs_of_a_tick_that_failed_before_them_are_not_taken_as_standing() -> None:
    """A tick fails while taking the leader's stop orders (a stop on a symbol the catalog does
    not know) after its accounts were taken in. The next tick's accounts are that tick's with
    only their money moved, origins and all: its pairs are made again, and it fails the same
    way, as the reference path does, instead of going on with the pairs of the tick before."""
    def stop(symbol: str, price: float, id_: str) -> dict[str, Any]:
        return {"id": id_, "instrument": symbol, "side": "sell", "qty": 1, "type": "stop",
                "stop_price": price, "status": "working"}

    held = [{"instrument": "NQH6", "qty": 1, "avg_price": 18000.0,
             "opened_at": START.isoformat()}]

    def line(t: int, orders: list[dict[str, Any]]) -> Snapshot:
        return Snapshot.model_validate({"time": (START + timedelta(seconds=t)).isoformat(),
                                        "accounts": [{"id": "L", "role": "leader",
                                                      "positions": held, "orders": orders},
                                                     {"id": "F1", "role": "follower",
                                                      "positions": held}]})

    first = line(1, [stop("NQH6", 17950.0, "a")])
    failing = line(2, [stop("XYZH6", 1.0, "x"), stop("NQH6", 17900.0, "b")])
    moved = Snapshot.model_validate({**failing.model_dump(), "time": START + timedelta(seconds=3),
                                     "accounts": [a.model_copy(update={"balance": 10.0})
                                                  for a in failing.accounts]})
    for engine, origins in ((Engine(DESYNC), list(failing.accounts)),
                            (Engine(DESYNC, reuse=False), None)):
        engine.evaluate(first)
        for snapshot, vouched in ((failing, None), (moved, origins)):
            with pytest.raises(InstrumentError):
                engine.evaluate(snapshot, origins=vouched)


def test_origins_of_another_length_are_not_taken() -> None:
    """Origins that do not match the snapshot's accounts one for one (a caller's slip) are
    ignored: the tick is worked out whole, never failed."""
    path = REPO / "examples" / "desync-session.jsonl"
    read = list(iter_timeline_origins(path))
    engines = (Engine(DESYNC), Engine(DESYNC))
    for snapshot, origins in read:
        short = None if origins is None else origins[:-1]
        assert _decided(engines[0], snapshot, short) == _decided(engines[1], snapshot, None)
    _same_views(engines[0], engines[1])
