"""The sim as a broker only (`own_copier: false`): another copier places the followers' orders
and the sim's faults hit those orders; stop orders trigger as the price walks."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest

from copilink_rules.adapters.base import BrokerAnswer
from copilink_rules.adapters.sim import (
    BROKER_RANDOM_KINDS,
    DEFAULT_RANDOM_KINDS,
    LOST_REASON,
    SimBroker,
    SimFault,
    SimFollower,
    SimScenario,
    SimTrade,
)
from copilink_rules.live import DEMO_SCENARIO

LONG_TRADE = [SimTrade(at=2, side="long", qty=2, hold=20)]


def broker_only(faults: list[SimFault] | None = None, trades: list[SimTrade] | None = None,
                **settings: object) -> SimBroker:
    return SimBroker(SimScenario.model_validate({
        "own_copier": False, "trades": trades if trades is not None else LONG_TRADE,
        "followers": [{"id": "F1"}, {"id": "F2"}],
        "faults": [f.model_dump() for f in faults or []], **settings}))


def held(broker: SimBroker, account: str) -> dict[str, int]:
    snapshot = broker.snapshot()
    found = next(a for a in snapshot.accounts if a.id == account)
    return {p.instrument: p.qty for p in found.positions}


def buy(broker: SimBroker, account: str, tag: str, qty: int = 1,
        side: Literal["buy", "sell"] = "buy") -> BrokerAnswer:
    return broker.place_order(account, "NQH6", side, qty, "market", tag)


# --- own_copier ---------------------------------------------------------------------------


def test_without_its_own_copier_the_sim_copies_nothing_while_the_leader_trades() -> None:
    broker = broker_only(trades=[SimTrade(at=2, side="long", qty=2, hold=10),
                                 SimTrade(at=20, side="short", qty=1, hold=10)])

    broker.advance(5)
    assert held(broker, "LEAD") == {"NQH6": 2}
    assert held(broker, "F1") == held(broker, "F2") == {}
    broker.advance(20)
    assert held(broker, "LEAD") == {"NQH6": -1}
    assert held(broker, "F1") == held(broker, "F2") == {}
    assert not [e for e in broker.events if e[2] == "copy"]


def test_without_its_own_copier_the_snapshot_leaves_the_copier_state_out() -> None:
    broker = broker_only()

    followers = [a for a in broker.snapshot().accounts if a.role == "follower"]

    assert followers
    assert all("copier" not in a.model_fields_set for a in followers)
    copying = SimBroker(SimScenario(followers=[SimFollower(id="F1")]))
    follower = next(a for a in copying.snapshot().accounts if a.id == "F1")
    assert "copier" in follower.model_fields_set


def test_a_seeded_scenario_with_its_own_copier_is_unchanged() -> None:
    """Positions and prices recorded from the sim before the broker faults existed."""
    broker = SimBroker(SimScenario(seed=3, random_trades=4, random_faults=6))
    assert [(f.kind, f.account, f.at, f.trade) for f in broker.faults] == [
        ("disconnect", "F2", 54.92, 1), ("stale", "F2", 63.7, 0), ("delay", "F1", 70.78, 2),
        ("disconnect", "F3", 67.73, 3), ("missed_exit", "F2", 8.38, 1),
        ("disconnect", "F3", 73.5, 3)]
    expected = [
        (17997.75, {"LEAD": 2, "F1": 2, "F2": 2, "F3": 2}),
        (17998.0, {"LEAD": 3, "F1": 3, "F2": 3, "F3": 3}),
        (17995.75, {"LEAD": -3, "F1": -3, "F2": 0, "F3": -3}),
        (17995.0, {"LEAD": -3, "F1": -3, "F2": 0, "F3": -3})]
    for step, (price, positions) in zip((10, 20, 20, 20), expected, strict=True):
        broker.advance(step)
        assert broker.price == price
        assert {a: held(broker, a).get("NQH6", 0) for a in positions} == positions
        assert all(a.copier == "active" for a in broker.snapshot().accounts)


def test_the_demo_scenario_is_unchanged() -> None:
    broker = SimBroker(DEMO_SCENARIO)
    expected = [
        (17997.75, {"LEAD": 2, "F1": 2, "F2": 0, "F3": 20, "F4": 2}),
        (17998.5, {"LEAD": 0, "F1": 0, "F2": -2, "F3": 20, "F4": 0}),
        (17998.75, {"LEAD": 0, "F1": 0, "F2": -2, "F3": 20, "F4": 2}),
        (17998.5, {"LEAD": 0, "F1": 1, "F2": -2, "F3": 20, "F4": 2})]
    for step, (price, positions) in zip((10, 10, 20, 20), expected, strict=True):
        broker.advance(step)
        assert broker.price == price
        assert {a: sum(held(broker, a).values()) for a in positions} == positions


def test_random_faults_without_its_own_copier_are_the_brokers() -> None:
    broker = SimBroker(SimScenario(seed=5, random_trades=3, random_faults=60, own_copier=False))
    named = SimBroker(SimScenario(seed=5, random_trades=3, random_faults=20, own_copier=False,
                                  random_fault_kinds=["missed_entry"]))
    copying = SimBroker(SimScenario(seed=5, random_trades=3, random_faults=60))

    assert {f.kind for f in broker.faults} == set(BROKER_RANDOM_KINDS)
    assert {f.kind for f in named.faults} == {"missed_entry"}
    assert {f.kind for f in copying.faults} == set(DEFAULT_RANDOM_KINDS)


# --- lost orders ------------------------------------------------------------------------------


def test_a_lost_order_is_answered_unavailable_and_leaves_no_trace() -> None:
    broker = broker_only([SimFault(kind="lost_order", account="F1", at=1, count=2)])
    assert buy(broker, "F1", "before").status == "filled"

    broker.advance(1)
    first, second = buy(broker, "F1", "lost-1"), buy(broker, "F1", "lost-2", 2)
    other = buy(broker, "F2", "other")
    third = buy(broker, "F1", "after")

    assert first == second == BrokerAnswer("unavailable", LOST_REASON)
    assert broker.find_tag("lost-1") is None
    assert broker.find_tag("lost-2") is None
    assert other.status == third.status == "filled"
    broker.advance(30)
    assert held(broker, "F1") == {"NQH6": 2}  # "before" and "after" only
    assert [e["status"] for e in broker.log if e["tag"].startswith("lost-")] == ["lost", "lost"]


def test_a_lost_order_sent_again_under_its_tag_is_the_one_reported() -> None:
    broker = broker_only([SimFault(kind="lost_order", account="F1", at=0)])
    broker.advance(0.5)

    assert buy(broker, "F1", "T1").status == "unavailable"
    assert buy(broker, "F1", "T1").status == "filled"

    report = broker.find_tag("T1")
    assert report is not None
    assert (report.state, report.filled_qty, report.account) == ("filled", 1, "F1")


def test_an_order_refused_while_disconnected_does_not_use_up_a_lost_order() -> None:
    broker = broker_only([SimFault(kind="disconnect", account="F1", at=1, duration=3),
                          SimFault(kind="lost_order", account="F1", at=1)])
    broker.advance(2)
    assert buy(broker, "F1", "T1").status == "unavailable"
    assert broker.find_tag("T1") is not None  # refused: the broker says so

    broker.advance(3)

    assert buy(broker, "F1", "T2").status == "unavailable"
    assert broker.find_tag("T2") is None
    assert buy(broker, "F1", "T3").status == "filled"


@pytest.mark.parametrize(("kind", "lost_after"), [("missed_entry", 2.0), ("missed_exit", 22.0)])
def test_a_missed_copy_without_its_own_copier_loses_one_order_after_the_leaders_change(
        kind: Literal["missed_entry", "missed_exit"], lost_after: float) -> None:
    broker = broker_only([SimFault(kind=kind, account="F1", trade=0)])
    broker.advance(lost_after - 0.5)
    assert buy(broker, "F1", "early").status == "filled"

    broker.advance(1)
    lost = buy(broker, "F1", "lost")
    kept = buy(broker, "F1", "kept")
    elsewhere = buy(broker, "F2", "elsewhere")

    assert lost.status == "unavailable"
    assert broker.find_tag("lost") is None
    assert kept.status == elsewhere.status == "filled"
    assert held(broker, "F1") == {"NQH6": 2}


def test_a_missed_entry_with_its_own_copier_still_means_the_copier_misses_it() -> None:
    broker = SimBroker(SimScenario(trades=LONG_TRADE, followers=[SimFollower(id="F1")],
                                   faults=[SimFault(kind="missed_entry", account="F1", trade=0)]))
    broker.advance(5)

    assert held(broker, "F1") == {}
    assert buy(broker, "F1", "T1").status == "filled"


# --- stuck orders -----------------------------------------------------------------------------


def cancel_by_id(broker: SimBroker) -> BrokerAnswer:
    return broker.cancel_order("F1", "stuck", "cancel")


def cancel_all(broker: SimBroker) -> BrokerAnswer:
    return broker.cancel_orders("F1", "NQH6", "cancel")


def close(broker: SimBroker) -> BrokerAnswer:
    return broker.close_position("F1", None, "cancel")


@pytest.mark.parametrize("cancel", [cancel_by_id, cancel_all, close])
def test_a_stuck_order_works_until_it_is_cancelled(
        cancel: Callable[[SimBroker], BrokerAnswer]) -> None:
    broker = broker_only([SimFault(kind="stuck_order", account="F1", at=1)])
    broker.advance(1)

    answer = buy(broker, "F1", "stuck", 2)
    broker.advance(600)

    assert answer == BrokerAnswer("accepted", "", "stuck")
    report = broker.find_tag("stuck")
    assert report is not None
    assert report.state == "working"
    assert held(broker, "F1") == {}
    assert cancel(broker).ok
    report = broker.find_tag("stuck")
    assert report is not None
    assert (report.state, report.filled_qty) == ("cancelled", 0)
    broker.advance(10)
    assert held(broker, "F1") == {}
    assert buy(broker, "F1", "next").status == "filled"  # one order stuck, not every one


# --- manual orders ----------------------------------------------------------------------------


@pytest.mark.parametrize(("at", "side", "expected"), [
    (5, None, -3),  # against the leader's long
    (1, None, 3),  # the leader is flat: a buy
    (5, "buy", 3),
])
def test_a_manual_order_fills_on_the_account(at: float, side: Literal["buy", "sell"] | None,
                                             expected: int) -> None:
    broker = broker_only([SimFault(kind="manual_order", account="F2", at=at, count=3,
                                   side=side)])

    broker.advance(at + 0.5)

    assert held(broker, "F2") == {"NQH6": expected}
    assert held(broker, "F1") == {}
    manual = [e for e in broker.log if e.get("kind") == "manual"]
    assert [(e["account"], e["delta"], e["tag"]) for e in manual] == [
        ("F2", expected, "manual-0")]


# --- stop orders ------------------------------------------------------------------------------


def advance_until_stopped(broker: SimBroker, account: str, tag: str) -> None:
    for _ in range(2400):
        if tag not in broker.accounts[account].orders:
            return
        broker.advance(0.25)
    pytest.fail(f"the stop {tag} never triggered")


@pytest.mark.parametrize(("position", "side", "qty", "after", "filled"), [
    (3, "sell", 2, 1, 2),  # part of a long
    (1, "sell", 3, 0, 1),  # more than is held: only what is held, never short
    (-2, "buy", 5, 0, 2),  # a buy stop closes a short, never goes long
])
def test_a_stop_fills_when_the_price_reaches_it_and_never_crosses_zero(
        position: int, side: Literal["buy", "sell"], qty: int, after: int,
        filled: int) -> None:
    broker = broker_only(trades=[])
    buy(broker, "F1", "entry", abs(position), "buy" if position > 0 else "sell")
    stop_price = broker.price

    assert broker.place_order("F1", "NQH6", side, qty, "stop", "S1", stop_price).status == \
        "accepted"
    advance_until_stopped(broker, "F1", "S1")

    assert held(broker, "F1") == ({"NQH6": after} if after else {})
    report = broker.find_tag("S1")
    assert report is not None
    assert (report.state, report.filled_qty) == ("filled", filled)
    fill = next(e for e in broker.log if e.get("kind") == "stop_fill")
    assert fill["tag"] == "S1"
    assert fill["delta"] == (-filled if side == "sell" else filled)
    assert (fill["price"] <= stop_price) if side == "sell" else (fill["price"] >= stop_price)


def test_a_stop_with_nothing_held_against_it_is_cancelled_when_reached() -> None:
    broker = broker_only(trades=[])
    buy(broker, "F1", "entry", 2, "sell")  # short: a sell stop has nothing to close

    broker.place_order("F1", "NQH6", "sell", 1, "stop", "S1", broker.price)
    advance_until_stopped(broker, "F1", "S1")

    assert held(broker, "F1") == {"NQH6": -2}
    report = broker.find_tag("S1")
    assert report is not None
    assert report.state == "cancelled"
    assert not [e for e in broker.log if e.get("kind") == "stop_fill"]


def test_a_stop_the_price_has_not_reached_keeps_working() -> None:
    broker = broker_only(trades=[])
    buy(broker, "F1", "entry", 1)

    broker.place_order("F1", "NQH6", "sell", 1, "stop", "S1", broker.price - 50)
    broker.advance(30)

    assert held(broker, "F1") == {"NQH6": 1}
    report = broker.find_tag("S1")
    assert report is not None
    assert report.state == "working"


@pytest.mark.parametrize("own_copier", [True, False])
def test_the_leaders_stop_closes_its_trade_early(own_copier: bool) -> None:
    broker = SimBroker(SimScenario(trades=[SimTrade(at=1, side="long", qty=2, hold=500)],
                                   followers=[SimFollower(id="F1")], stop_ticks=1,
                                   own_copier=own_copier))
    broker.advance(2)
    assert held(broker, "LEAD") == {"NQH6": 2}

    advance_until_stopped(broker, "LEAD", "L-stop")
    broker.advance(1)  # the copier's latency

    assert held(broker, "LEAD") == {}
    assert broker.current_trade is None
    assert held(broker, "F1") == {}
    stops = [e for e in broker.log if e.get("kind") == "stop_fill"]
    assert [(e["account"], e["tag"], e["delta"]) for e in stops] == [("LEAD", "L-stop", -2)]


# --- save and load --------------------------------------------------------------------------


def test_a_restarted_process_meets_the_same_broker_faults(tmp_path: Path) -> None:
    broker = broker_only([SimFault(kind="stuck_order", account="F1", at=1),
                          SimFault(kind="lost_order", account="F2", at=1, count=2),
                          SimFault(kind="manual_order", account="F2", at=8, count=1,
                                   side="sell")])
    broker.advance(2)
    assert buy(broker, "F1", "stuck").status == "accepted"
    assert buy(broker, "F2", "lost-1").status == "unavailable"
    broker.save(tmp_path / "sim.json")

    restored = SimBroker.load(tmp_path / "sim.json")

    assert restored.snapshot() == broker.snapshot()
    report = restored.find_tag("stuck")
    assert report is not None
    assert report.state == "working"
    assert buy(restored, "F2", "lost-2").status == "unavailable"
    assert buy(restored, "F2", "kept").status == "filled"
    assert restored.cancel_order("F1", "stuck", "cancel").ok
    report = restored.find_tag("stuck")
    assert report is not None
    assert report.state == "cancelled"
    restored.advance(10)
    assert held(restored, "F1") == {}
    assert held(restored, "F2") == {}  # the kept buy, then the person's sell
    assert [e["tag"] for e in restored.log if e.get("kind") == "manual"] == ["manual-2"]


def test_a_state_saved_before_the_broker_faults_still_loads(tmp_path: Path) -> None:
    broker = SimBroker(SimScenario(seed=3, random_trades=2, random_faults=2))
    broker.advance(10)
    broker.save(tmp_path / "sim.json")
    state = json.loads((tmp_path / "sim.json").read_text(encoding="utf-8"))
    for key in ("lost", "stuck"):
        del state[key]
    del state["scenario"]["own_copier"]
    for fault in state["faults"] + state["scenario"]["faults"]:
        fault.pop("side", None)
    (tmp_path / "old.json").write_text(json.dumps(state), encoding="utf-8")

    restored = SimBroker.load(tmp_path / "old.json")
    restored.advance(10)
    broker.advance(10)

    assert restored.snapshot() == broker.snapshot()
    assert buy(restored, "F1", "T1").status == "filled"
