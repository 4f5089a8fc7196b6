"""Account facts are derived once and reused while an account's positions (orders, firm) do not
change (facts.py): what depends on the time (data age, stale, reachable, a position's age) is
fresh every tick, a changed account is derived again, saved state still restores, and an
engine that reuses decides exactly as one that derives everything every tick."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from copilink_rules import engine as engine_module
from copilink_rules.engine import Engine
from copilink_rules.model import Snapshot
from copilink_rules.rules import Policy, load_policy

from .conftest import REPO, account, at, pos, snap
from .test_engine_fuzz import CALENDAR, POLICY, STARTS, SYMBOLS, follower, leader, quote

DESYNC = load_policy([REPO / "rules" / "desync.yaml"])


def decisions(engine: Engine, snapshot: Snapshot) -> list[dict[str, object]]:
    return [d.to_json_dict() for d in engine.evaluate(snapshot)]


def both(policy: Policy, snapshots: list[Snapshot]) -> tuple[Engine, Engine]:
    """An engine that reuses facts and one that does not, fed the same snapshots; they must
    decide the same at every tick."""
    reusing, fresh = Engine(policy, calendar=CALENDAR), Engine(policy, calendar=CALENDAR,
                                                                 reuse=False)
    for snapshot in snapshots:
        assert decisions(reusing, snapshot) == decisions(fresh, snapshot)
        assert reusing.save_state() == fresh.save_state()
        assert seen(reusing, snapshot) == seen(fresh, snapshot)
    return reusing, fresh


def seen(engine: Engine, snapshot: Snapshot) -> list[Any]:
    """Every value the rules could read at this snapshot: each account's view, and each pair's
    leader, follower and pair views (deriving them again at the same time changes nothing)."""
    now = snapshot.time
    infos = engine._accounts(snapshot, now)
    out: list[Any] = [(i, repr(info.view)) for i, info in infos.items()]
    for target in engine._pair_targets(snapshot, infos, now):
        env = target.env
        out.append((target.key, repr(env.account), repr(env.leader_account), repr(env.leader),
                    repr(env.follower), repr(env.pair), target.trade, target.catch_up_qty,
                    target.stop_price, target.instrument))
    return out


def test_an_unchanged_account_gets_a_fresh_data_age_and_position_age() -> None:
    engine = Engine(DESYNC)
    lead = account("LEAD", "leader", positions=[pos("NQH6", 1)], updated_at=at(0).isoformat())
    follow = account("F1", positions=[pos("NQH6", 1)], updated_at=at(0).isoformat())
    first = snap(at(1), lead, follow)
    infos = engine._accounts(first, at(1))
    assert (infos["F1"].view.data_age, infos["F1"].view.reachable) == (1.0, True)
    pair = engine._pair_targets(first, infos, at(1))[0]
    assert pair.env.leader.age == 0.0  # first seen now: the broker did not say when it opened
    # the same data, later: the facts are reused, what depends on the time is not
    later = snap(at(30), lead, follow)
    infos = engine._accounts(later, at(30))
    assert engine._infos["F1"].facts.positions is later.accounts[1].positions
    view = infos["F1"].view
    assert (view.data_age, view.stale, view.reachable) == (30.0, True, False)
    pair = engine._pair_targets(later, infos, at(30))[0]
    assert (pair.env.leader.age, pair.env.follower.age) == (29.0, 29.0)
    assert pair.env.leader.opened_at == at(1)


def test_equal_positions_in_new_objects_are_reused_and_a_change_is_derived_again() -> None:
    engine = Engine(DESYNC)
    engine._accounts(snap(at(0), account("F1", positions=[pos("NQH6", 2)])), at(0))
    facts = engine._infos["F1"].facts
    engine._accounts(snap(at(1), account("F1", positions=[pos("NQH6", 2)])), at(1))
    assert engine._infos["F1"].facts is facts  # equal, though parsed again
    infos = engine._accounts(snap(at(2), account("F1", positions=[pos("NQH6", 3)])), at(2))
    assert engine._infos["F1"].facts is not facts
    assert infos["F1"].view.contracts == 3
    infos = engine._accounts(snap(at(3), account("F1", positions=[pos("NQH6", 3)],
                                                 overnight=["NQH6"])), at(3))
    assert infos["F1"].view.undeclared_positions == 0
    infos = engine._accounts(snap(at(4), account("F1", positions=[
        pos("NQH6", 3), pos("ESH6", 1)], overnight=["NQH6"])), at(4))
    assert (infos["F1"].view.positions, infos["F1"].view.undeclared_positions) == (2, 1)


def test_orders_are_derived_again_when_they_change() -> None:
    engine = Engine(DESYNC)

    def working(*statuses: str) -> Snapshot:
        return snap(at(0), account("F1", orders=[
            {"id": f"o{i}", "instrument": "NQH6", "side": "buy", "qty": 1, "status": status}
            for i, status in enumerate(statuses)]))

    assert engine._accounts(working("working", "filled"), at(0))["F1"].view.working_orders == 1
    assert engine._accounts(working("working", "filled"), at(0))["F1"].view.working_orders == 1
    assert engine._accounts(working("working", "pending"), at(0))["F1"].view.working_orders == 2
    assert engine._accounts(working(), at(0))["F1"].view.working_orders == 0


def test_a_zero_of_the_other_sign_is_not_the_same_price() -> None:
    rules = load_policy([REPO / "rules" / "desync.yaml"])
    engine = Engine(rules)
    engine._accounts(snap(at(0), account("F1", positions=[pos("NQH6", 1, 0.0)])), at(0))
    infos = engine._accounts(snap(at(1), account("F1", positions=[pos("NQH6", 1, -0.0)])), at(1))
    assert str(infos["F1"].families["NQ"].avg_price) == "-0.0"


def test_an_account_gone_for_a_tick_is_first_seen_again() -> None:
    lead = account("LEAD", "leader", positions=[pos("NQH6", 1)])
    follow = account("F1", positions=[pos("NQH6", 1)])
    timeline = [snap(at(0), lead, follow), snap(at(5), lead), snap(at(10), lead, follow),
                snap(at(15), lead, follow)]
    reusing, _ = both(DESYNC, timeline)
    assert reusing._first_seen["F1|NQ"] == (1, at(10))


def test_hedges_are_marked_again_when_a_firm_or_a_position_changes() -> None:
    def tick(t: float, side_b: int, firm_b: str = "topstep") -> Snapshot:
        return snap(at(t), account("LEAD", "leader"),
                    account("A", firm="topstep", positions=[pos("NQH6", 1)]),
                    account("B", firm=firm_b, positions=[pos("MNQH6", side_b)]))

    engine = Engine(POLICY)
    for t, side, firm, hedged in [(0, -1, "topstep", True), (1, -1, "topstep", True),
                                  (2, 1, "topstep", False), (3, -1, "topstep", True),
                                  (4, -1, "apex", False), (5, -1, "topstep", True)]:
        infos = engine._accounts(tick(t, side, firm), at(t))
        assert (infos["A"].view.hedged, infos["B"].view.hedged) == (hedged, hedged), t
        assert infos["A"].view.hedged_with == ("B" if hedged else "")
    both(POLICY, [tick(t, s) for t, s in [(0, -1), (1, -1), (2, 1), (3, 1), (4, -1)]])


def test_state_saved_and_restored_mid_timeline_continues_the_same() -> None:
    lead = account("LEAD", "leader", positions=[pos("NQH6", 1)])
    timeline = [snap(at(t), lead, account("F1", positions=[pos("NQH6", -1)] if t < 20 else [],
                                          unrealized_pnl=float(t)))
                for t in range(0, 40, 2)]
    whole = Engine(DESYNC)
    out = [decisions(whole, s) for s in timeline[:10]]
    first = Engine(DESYNC)
    for s in timeline[:10]:
        decisions(first, s)
    resumed = Engine(DESYNC)
    assert resumed.restore_state(json.loads(first.save_state_json())) == []
    assert [decisions(resumed, s) for s in timeline[10:]] == \
        [decisions(whole, s) for s in timeline[10:]]
    assert any(out)  # the opposite position was flattened in the first part
    # restoring over an engine that has seen other accounts drops what it had derived
    other = Engine(DESYNC)
    decisions(other, snap(at(0), lead, account("F1", positions=[pos("NQH6", 5)])))
    other.restore_state(json.loads(first.save_state_json()))
    assert other._infos == {}


def test_rules_of_another_firm_are_not_evaluated_and_errors_stay_the_same(
        monkeypatch: pytest.MonkeyPatch, policy_of: Callable[..., Policy]) -> None:
    policy = policy_of("""
        ruleset: demo
        rules:
          - id: apex-only
            applies_to: {firms: [apex]}
            when: account.balance / account.realized_pnl > 1
            then: [alert]
          - id: everyone
            when: account.contracts > 1
            then: [alert]
    """)
    # apex's rule divides by zero on the topstep account: no error for an account it does not
    # apply to, an error for the apex account, and the other rule still fires for both
    timeline = [snap(at(t), account("LEAD", "leader"),
                     account("A", firm="apex", positions=[pos("NQH6", 2)]),
                     account("T", firm="topstep", positions=[pos("NQH6", 2)]))
                for t in (0, 1)]
    both(policy, timeline)
    got = [(d["rule"], d["account"], d["action"])
           for d in decisions(Engine(policy), timeline[0])]
    assert got == [("apex-only", "A", "error"), ("everyone", "A", "alert"),
                   ("everyone", "T", "alert")]
    # past the limit of compiled subsets, the group's batch is masked: the same decisions
    monkeypatch.setattr(engine_module, "MAX_SUBSETS", 0)
    assert [(d["rule"], d["account"], d["action"])
            for d in decisions(Engine(policy), timeline[0])] == got


# --- any timeline: reusing facts decides exactly as deriving them every tick ------------------

change = st.sampled_from(["same", "same-object", "time", "money", "positions", "gone", "firm",
                          "orders"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(start=st.sampled_from(STARTS), lead=leader,
       followers=st.lists(follower, min_size=1, max_size=4),
       quotes=st.dictionaries(st.sampled_from(SYMBOLS[:5]), quote),
       ticks=st.lists(st.tuples(st.floats(min_value=0, max_value=900),
                                st.lists(change, min_size=5, max_size=5),
                                st.lists(follower, min_size=5, max_size=5),
                                st.integers(0, 3)),
                      min_size=2, max_size=8))
def test_reusing_facts_decides_exactly_as_deriving_them_every_tick(
        start: datetime, lead: dict[str, Any], followers: list[dict[str, Any]],
        quotes: dict[str, Any],
        ticks: list[tuple[float, list[str], list[dict[str, Any]], int]]) -> None:
    accounts = {"LEAD": {**lead, "id": "LEAD"}}
    accounts.update({f"F{i}": {**f, "id": f"F{i}", "leader": "LEAD"}
                     for i, f in enumerate(followers)})
    moment = start
    timeline = []
    last: Snapshot | None = None
    for step, changes, others, restore_at in ticks:
        moment += timedelta(seconds=step)
        ids = list(accounts)
        gone = set()
        for i, (what, other) in enumerate(zip(changes, others, strict=True)):
            id_ = ids[i % len(ids)]
            data = accounts[id_]
            if what == "time":
                data["updated_at"] = other.get("updated_at", 0)
            elif what == "money":
                data["unrealized_pnl"] = other.get("unrealized_pnl", 0.0)
            elif what == "positions":
                data["positions"] = other["positions"]
            elif what == "gone" and id_ != "LEAD":
                gone.add(id_)
            elif what == "firm":
                data["firm"] = other.get("firm", "apex")
            elif what == "orders":
                data["orders"] = [{"id": "o1", "instrument": SYMBOLS[restore_at],
                                   "side": "sell", "qty": 1, "type": "stop",
                                   "stop_price": 17990.0, "status": "working"}][:restore_at % 2]
        if last is not None and all(c == "same-object" for c in changes):
            timeline.append(last.model_copy(update={"time": moment}))  # the very same accounts
        else:
            timeline.append(_snapshot(moment, start, [a for i, a in accounts.items()
                                                      if i not in gone], quotes))
        last = timeline[-1]
    both(POLICY, timeline)
    # and a restart in the middle continues as the uninterrupted engine does
    cut = ticks[0][3] % len(timeline)
    restored = Engine(POLICY, calendar=CALENDAR)
    replay = Engine(POLICY, calendar=CALENDAR)
    for snapshot in timeline[:cut]:
        replay.evaluate(snapshot)
    restored.restore_state(json.loads(replay.save_state_json()))
    again = Engine(POLICY, calendar=CALENDAR, reuse=False)
    again.restore_state(json.loads(replay.save_state_json()))
    for snapshot in timeline[cut:]:
        assert decisions(restored, snapshot) == decisions(again, snapshot)


def _snapshot(moment: datetime, start: datetime, accounts: list[dict[str, Any]],
              quotes: dict[str, Any]) -> Snapshot:
    """`updated_at` is seconds before `moment`; a position's `opened_at` seconds before `start`,
    so positions stay the same from tick to tick unless changed."""
    def concrete(data: dict[str, Any]) -> dict[str, Any]:
        out = dict(data)
        if "updated_at" in out:
            out["updated_at"] = (moment + timedelta(seconds=out["updated_at"])).isoformat()
        out["positions"] = [
            {**p, "opened_at": (start + timedelta(seconds=p["opened_at"])).isoformat()}
            if "opened_at" in p else p for p in data.get("positions", [])]
        return out

    return Snapshot.model_validate({"time": moment.isoformat(), "quotes": quotes,
                                    "accounts": [concrete(a) for a in accounts]})



@pytest.mark.parametrize(("equiv", "size", "expected"), [
    (0.5, 1.0, 1), (1.5, 1.0, 2), (2.5, 1.0, 3), (3.5, 1.0, 4),  # a half goes up, always
    (-0.5, 1.0, -1), (-2.5, 1.0, -3), (0.3, 1.0, 0), (-0.3, 1.0, 0), (0.0, 1.0, 0),
    (2.0, 0.1, 20), (0.15, 0.1, 2), (0.05, 0.1, 1), (1.04, 0.1, 10)])
def test_a_followers_share_rounds_to_the_nearest_contract_a_half_away_from_zero(
        equiv: float, size: float, expected: int) -> None:
    from copilink_rules.facts import contracts_for

    assert contracts_for(equiv, size) == expected
