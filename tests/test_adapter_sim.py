"""The contract suite over the sim broker."""

from __future__ import annotations

from typing import Any

import pytest

from copilink_rules.adapters.sim import SimBroker, SimFollower, SimScenario, _Position

from .adapter_contract import BrokerContract


class SimHarness:
    leader, follower, symbol = "LEAD", "F1", "NQH6"

    def __init__(self) -> None:
        self.broker = SimBroker(SimScenario(followers=[SimFollower(id="F1")], trades=[]))

    def set_position(self, account: str, qty: int, avg_price: float) -> None:
        positions = self.broker.accounts[account].positions
        positions.pop(self.symbol, None)
        if qty:
            positions[self.symbol] = _Position(qty, avg_price, self.broker.elapsed)

    def received(self) -> list[dict[str, Any]]:
        kinds = {"flatten": "close", "place_market": "place", "place_stop": "place",
                 "cancel_order": "cancel", "cancel_orders": "cancel"}
        out = []
        for entry in self.broker.log:
            if entry.get("kind") not in kinds:
                continue
            kind = kinds[entry["kind"]]
            record = {"kind": kind, "account": entry["account"], "tag": entry["tag"],
                      "order_id": entry.get("order_id")}
            if kind == "place":
                delta = entry.get("delta")
                record["type"] = "stop" if entry["kind"] == "place_stop" else "market"
                if delta is not None:
                    record["side"], record["qty"] = ("buy" if delta > 0 else "sell"), abs(delta)
            out.append(record)
        return out

    def reject_next(self, reason: str) -> None:
        self.broker.reject_reason = reason
        self.broker.rejects[self.follower] = 1

    def hold_fills(self) -> None:
        self.broker._delays[self.follower] = {"until": 1e12, "delay": 1e9}

    def go_offline(self) -> None:
        target = self.broker.accounts[self.follower]
        target.frozen = self.broker._account_data(target)
        target.frozen["_until"] = 1e12
        target.frozen_at = self.broker.elapsed
        target.connected = False


class TestSimContract(BrokerContract):
    @pytest.fixture
    def harness(self) -> SimHarness:
        return SimHarness()
