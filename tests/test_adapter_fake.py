"""The contract suite over the shipped recording fake."""

from __future__ import annotations

from typing import Any

import pytest

from copilink_rules.adapters.base import AccountSpec, BrokerAnswer
from copilink_rules.adapters.fake import FakeBroker

from .adapter_contract import BrokerContract


class FakeHarness:
    leader, follower, symbol = "LEAD", "F1", "NQH6"

    def __init__(self) -> None:
        self.broker = FakeBroker([AccountSpec("LEAD", "leader"),
                                  AccountSpec("F1", "follower", leader="LEAD")])

    def set_position(self, account: str, qty: int, avg_price: float) -> None:
        self.broker.set_position(account, self.symbol, qty, avg_price)

    def received(self) -> list[dict[str, Any]]:
        kinds = {"close_position": "close", "place_order": "place", "cancel_order": "cancel",
                 "cancel_orders": "cancel"}
        out = []
        for call in self.broker.calls:
            entry = {"kind": kinds[call.method], "account": call.account, "tag": call.tag,
                     **call.args}
            out.append(entry)
        return out

    def reject_next(self, reason: str) -> None:
        self.broker.script(self.follower, BrokerAnswer("rejected", reason))

    def hold_fills(self) -> None:
        self.broker.fills = "held"

    def go_offline(self) -> None:
        self.broker.reachable = False
        self.broker.connected = dict.fromkeys(self.broker.connected, False)


class TestFakeContract(BrokerContract):
    @pytest.fixture
    def harness(self) -> FakeHarness:
        return FakeHarness()


def test_the_fake_records_every_request_in_order() -> None:
    harness = FakeHarness()
    harness.broker.close_position("F1", None, "CLR-1")
    harness.broker.place_order("F1", "NQH6", "buy", 1, "market", "CLR-2")
    assert [(c.method, c.tag) for c in harness.broker.calls] == [
        ("close_position", "CLR-1"), ("place_order", "CLR-2")]


def test_the_fake_refuses_a_reused_tag() -> None:
    harness = FakeHarness()
    assert harness.broker.place_order("F1", "NQH6", "buy", 1, "market", "CLR-1").ok
    again = harness.broker.place_order("F1", "NQH6", "buy", 1, "market", "CLR-1")
    assert again.status == "rejected"
    assert "already in use" in again.reason


def test_open_pnl_is_worked_out_from_quotes_where_the_broker_gives_none() -> None:
    from copilink_rules.adapters.base import mark_to_market
    from copilink_rules.model import Snapshot

    snapshot = Snapshot.model_validate({
        "time": "2026-03-02T14:30:00Z",
        "quotes": {"NQ 03-26": {"bid": 18010.0, "ask": 18010.25, "last": 18010.0},
                   "MESH6": {"last": 5000.0}},
        "accounts": [
            {"id": "L", "role": "leader",
             "positions": [{"instrument": "NQH6", "qty": 2, "avg_price": 18000.0}]},
            {"id": "F1", "role": "follower",
             "positions": [{"instrument": "NQH6", "qty": -1, "avg_price": 18000.0},
                           {"instrument": "ESH6", "qty": 1, "avg_price": 5000.0}]},
            {"id": "F2", "role": "follower", "unrealized_pnl": -12.5,
             "positions": [{"instrument": "NQH6", "qty": 1, "avg_price": 18000.0}]}]})
    marked = {a.id: a.unrealized_pnl for a in mark_to_market(snapshot).accounts}
    # long 2 NQ valued at the bid: 40 ticks x $5 x 2; short 1 at the ask: -41 ticks x $5; the
    # ES position has no quote (MES is another contract): unknown, counted 0; F2's own figure
    # from the broker is kept
    assert marked == {"L": 400.0, "F1": -205.0, "F2": -12.5}
