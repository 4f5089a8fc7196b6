"""Whatever the accounts look like, evaluating every shipped rule never raises: a rule that
cannot be evaluated is an `error` decision for that rule and account, and the engine's state
still saves and restores. The pre-trade gate answers any order on them with a well-formed
verdict."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from copilink_rules.calendar import load_calendar
from copilink_rules.engine import Engine
from copilink_rules.gate import Gate, OrderRequest
from copilink_rules.model import ACTIONS, Snapshot
from copilink_rules.rules import load_policy

from .conftest import REPO

POLICY = load_policy([REPO / "rules" / "firms"])  # desync and all five firms, together
CALENDAR = load_calendar(REPO / "rules" / "tests" / "news-calendar.yaml")
SYMBOLS = ["NQH6", "MNQH6", "ESH6", "MESH6", "CLJ6", "NQ 03-26"]
# around the spring DST change, a trading-day rollover and a news release
STARTS = [datetime(2026, 3, 8, 6, 55, tzinfo=UTC), datetime(2026, 3, 2, 21, 59, tzinfo=UTC),
          datetime(2026, 3, 6, 13, 29, tzinfo=UTC), datetime(2026, 11, 1, 5, 59, tzinfo=UTC)]

money = st.floats(min_value=-1e7, max_value=1e7, allow_nan=False, allow_infinity=False)
price = st.one_of(st.none(), st.floats(min_value=0.25, max_value=1e5, allow_nan=False))
position = st.fixed_dictionaries(
    {"instrument": st.sampled_from(SYMBOLS), "qty": st.integers(-60, 60),
     "avg_price": st.floats(min_value=0, max_value=1e5, allow_nan=False)},
    optional={"opened_at": st.integers(-86400, 0)})
follower = st.fixed_dictionaries(
    {"role": st.just("follower"), "positions": st.lists(position, max_size=3)},
    optional={"firm": st.sampled_from(["apex", "topstep", "mffu", "takeprofit", "tradeify",
                                       "other"]),
              "size": st.sampled_from([25000, 50000, 100000, 150000, 300000]),
              "balance": money, "realized_pnl": money, "unrealized_pnl": money,
              "connected": st.booleans(), "copier": st.sampled_from(["active", "paused"]),
              "ratio": st.floats(min_value=0.01, max_value=20),
              "updated_at": st.integers(-600, 0),
              "overnight": st.lists(st.sampled_from(SYMBOLS), max_size=2)})
leader = follower.map(lambda a: {**{k: v for k, v in a.items() if k not in ("ratio",
                                                                             "copier")},
                                 "role": "leader"})
quote = st.fixed_dictionaries({}, optional={"bid": price, "ask": price, "last": price})


def _snapshot(moment: datetime, lead: dict[str, Any], followers: list[dict[str, Any]],
              quotes: dict[str, Any]) -> Snapshot:
    def concrete(account: dict[str, Any], id_: str) -> dict[str, Any]:
        out = {**account, "id": id_}
        if "updated_at" in out:
            out["updated_at"] = (moment + timedelta(seconds=out["updated_at"])).isoformat()
        out["positions"] = [
            {**p, "opened_at": (moment + timedelta(seconds=p["opened_at"])).isoformat()}
            if "opened_at" in p else p for p in account["positions"]]
        return out

    return Snapshot.model_validate({
        "time": moment.isoformat(), "quotes": quotes,
        "accounts": [concrete(lead, "LEAD")] + [{**concrete(f, f"F{i}"), "leader": "LEAD"}
                                                for i, f in enumerate(followers)]})


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(start=st.sampled_from(STARTS), lead=leader,
       ticks=st.lists(st.tuples(st.floats(min_value=0, max_value=7200),
                                st.lists(follower, min_size=1, max_size=4),
                                st.dictionaries(st.sampled_from(SYMBOLS[:5]), quote)),
                      min_size=1, max_size=5))
def test_any_accounts_give_decisions_never_an_exception(
        start: datetime, lead: dict[str, Any],
        ticks: list[tuple[float, list[dict[str, Any]], dict[str, Any]]]) -> None:
    engine = Engine(POLICY, calendar=CALENDAR)
    moment = start
    for step, followers, quotes in ticks:
        moment += timedelta(seconds=step)
        for decision in engine.evaluate(_snapshot(moment, lead, followers, quotes)):
            assert decision.action in (*ACTIONS, "error"), decision
            assert decision.time == moment
        restored = Engine(POLICY, calendar=CALENDAR)
        assert restored.restore_state(json.loads(engine.save_state_json())) == []
        assert restored.save_state() == engine.save_state()


GATE = Gate(POLICY, calendar=CALENDAR)
orders = st.builds(OrderRequest, account=st.sampled_from(["LEAD", "F0", "F1", "F3", "NOPE"]),
                   instrument=st.sampled_from(SYMBOLS), side=st.sampled_from(["buy", "sell"]),
                   qty=st.integers(1, 80), leader_price=price)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(moment=st.sampled_from(STARTS), lead=leader,
       followers=st.lists(follower, min_size=1, max_size=4),
       quotes=st.dictionaries(st.sampled_from(SYMBOLS[:5]), quote),
       batch=st.lists(orders, min_size=1, max_size=10))
def test_the_gate_answers_any_order_on_any_accounts(
        moment: datetime, lead: dict[str, Any], followers: list[dict[str, Any]],
        quotes: dict[str, Any], batch: list[OrderRequest]) -> None:
    snapshot = _snapshot(moment, lead, followers, quotes)
    engine = Engine(POLICY, calendar=CALENDAR)
    engine.evaluate(snapshot, as_if_held=True)
    GATE.update(snapshot, engine.locks)
    for request in batch:
        answer = GATE.check(request)
        if answer.verdict == "allow":
            assert answer.qty == request.qty
        elif answer.verdict == "reduce":
            assert 0 < answer.qty < request.qty
            assert answer.reasons
        else:
            assert answer.verdict == "block"
            assert answer.qty == 0
            assert answer.reasons
        if engine.locks.get(request.account, ("",))[0] == "halted":
            assert answer.verdict != "reduce"
