"""One contract test suite, run over every broker adapter (fake, sim, ninjatrader, tradovate,
projectx — each real one against its protocol stand-in).

An adapter's test module subclasses `BrokerContract` and provides a `harness` fixture: a
`Harness` that owns the broker under test and the world behind it (the stand-in). The checks
read the stand-in's own record of what it received (`harness.received()`), never only what the
adapter says it did.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import pytest

from copilink_rules.adapters import base
from copilink_rules.adapters.base import Broker, BrokerAnswer, OrderReport
from copilink_rules.instruments import default_catalog
from copilink_rules.model import Account, Snapshot

CATALOG = default_catalog()


class Harness(Protocol):
    """What the contract suite needs of an adapter's test setup."""

    broker: Broker  # connected, watching `leader` and `follower`
    leader: str
    follower: str
    symbol: str  # a catalog symbol the world trades, e.g. "NQH6"

    def set_position(self, account: str, qty: int, avg_price: float) -> None:
        """Change the position in the world (the stand-in), as if a fill happened."""

    def received(self) -> list[dict[str, Any]]:
        """Every order command the stand-in received, oldest first: dicts with at least
        `kind` (place | close | cancel), `account`, and where they apply `tag`, `qty`,
        `side` (buy | sell), `type` (market | stop), `order_id`."""

    def reject_next(self, reason: str) -> None:
        """The stand-in refuses the next order command with `reason`."""

    def hold_fills(self) -> None:
        """From now on the stand-in accepts market orders but never fills them."""

    def go_offline(self) -> None:
        """The broker becomes unreachable (server stopped, folder gone, socket closed)."""


def wait_for(predicate: Callable[[], bool], timeout: float = 8.0) -> bool:
    """Poll until `predicate()` holds (the adapters update in the background)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def account(snapshot: Snapshot, account_id: str) -> Account:
    return next(a for a in snapshot.accounts if a.id == account_id)


def held(broker: Broker, account_id: str, family: str = "NQ") -> int:
    """The account's signed position in the family, in the broker's contracts."""
    found = account(broker.snapshot(), account_id)
    return sum(p.qty for p in found.positions if CATALOG.parse(p.instrument).family == family)


def settled(broker: Broker, tag: str, timeout: float = 8.0) -> OrderReport | None:
    report: list[OrderReport | None] = [None]

    def final() -> bool:
        report[0] = broker.find_tag(tag)
        return report[0] is not None and report[0].final

    wait_for(final, timeout)
    return report[0]


class BrokerContract:
    """The behaviour every adapter owes the enforcer."""

    def test_snapshots_are_built_by_the_fast_reader_as_pydantic_builds_them(
            self, harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
        """The adapter's snapshot data (accounts, a position, a working stop, quotes) is read
        by the fast reader, not by the pydantic fallback, and gives what model_validate gives
        for the same data; a snapshot taken again with nothing changed reuses the accounts."""
        from .test_fast_reader import canonical  # a test module's helper

        built: list[tuple[Any, Snapshot | None]] = []

        def watched(builder: base.SnapshotBuilder, data: dict[str, Any]) -> Snapshot:
            snapshot = builder._reader.convert(data)
            built.append((data, snapshot))
            return snapshot if snapshot is not None else Snapshot.model_validate(data)

        monkeypatch.setattr(base.SnapshotBuilder, "__call__", watched)
        harness.set_position(harness.follower, 2, 18000.0)
        assert wait_for(lambda: held(harness.broker, harness.follower) == 2)
        answer = harness.broker.place_order(harness.follower, harness.symbol, "sell", 2,
                                            "stop", "CLR-900009-stop", 17900.0)
        assert answer.ok, answer
        assert wait_for(lambda: bool(account(harness.broker.snapshot(),
                                             harness.follower).orders))
        first, second = harness.broker.snapshot(), harness.broker.snapshot()
        assert built
        for data, snapshot in built:
            assert snapshot is not None, data  # the fast path read it
            assert canonical(snapshot) == canonical(Snapshot.model_validate(data))
        follower = account(second, harness.follower)
        assert follower.positions
        assert follower.positions == account(first, harness.follower).positions
        if account(first, harness.follower).updated_at == follower.updated_at:
            assert follower is account(first, harness.follower)  # unchanged: the same object

    def test_snapshot_lists_the_watched_accounts_connected(self, harness: Harness) -> None:
        snapshot = harness.broker.snapshot()
        ids = {a.id for a in snapshot.accounts}
        assert {harness.leader, harness.follower} <= ids
        roles = {a.id: a.role for a in snapshot.accounts}
        assert roles[harness.leader] == "leader"
        assert roles[harness.follower] == "follower"
        assert account(snapshot, harness.follower).connected

    def test_a_position_change_reaches_the_snapshot_in_catalog_terms(
            self, harness: Harness) -> None:
        harness.set_position(harness.follower, 2, 18000.0)
        assert wait_for(lambda: held(harness.broker, harness.follower) == 2)
        position = next(p for p in account(harness.broker.snapshot(), harness.follower).positions
                        if p.qty)
        assert CATALOG.parse(position.instrument).symbol == CATALOG.parse(harness.symbol).symbol
        harness.set_position(harness.follower, -1, 18010.0)
        assert wait_for(lambda: held(harness.broker, harness.follower) == -1)

    def test_close_position_flattens_with_one_close_and_is_found_by_tag(
            self, harness: Harness) -> None:
        harness.set_position(harness.follower, 3, 18000.0)
        assert wait_for(lambda: held(harness.broker, harness.follower) == 3)
        answer = harness.broker.close_position(harness.follower, harness.symbol, "CLR-900001")
        assert answer.ok, answer
        assert wait_for(lambda: held(harness.broker, harness.follower) == 0)
        closes = [r for r in harness.received() if r["kind"] == "close"]
        assert len(closes) == 1
        assert closes[0]["account"] == harness.follower
        assert not [r for r in harness.received() if r["account"] == harness.leader]
        report = settled(harness.broker, "CLR-900001")
        assert report is not None
        assert report.state == "filled"

    def test_market_order_carries_its_tag_and_is_reconciled(self, harness: Harness) -> None:
        answer = harness.broker.place_order(harness.follower, harness.symbol, "buy", 2,
                                            "market", "CLR-900002")
        assert answer.ok, answer
        assert wait_for(lambda: held(harness.broker, harness.follower) == 2)
        places = [r for r in harness.received() if r["kind"] == "place"]
        assert [(p["side"], p["qty"], p["type"]) for p in places] == [("buy", 2, "market")]
        assert places[0].get("tag", "").startswith("CLR-900002")
        report = settled(harness.broker, "CLR-900002")
        assert report is not None
        assert (report.state, report.account) == ("filled", harness.follower)

    def test_stop_order_works_until_cancelled_by_its_id(self, harness: Harness) -> None:
        harness.set_position(harness.follower, 1, 18000.0)
        assert wait_for(lambda: held(harness.broker, harness.follower) == 1)
        answer = harness.broker.place_order(harness.follower, harness.symbol, "sell", 1,
                                            "stop", "CLR-900003-stop", 17900.0)
        assert answer.ok, answer

        def working_stop() -> list[Any]:
            return [o for o in account(harness.broker.snapshot(), harness.follower).orders
                    if o.type == "stop" and o.status in ("working", "pending")]

        assert wait_for(lambda: len(working_stop()) == 1)
        stop = working_stop()[0]
        assert stop.stop_price == pytest.approx(17900.0)
        assert stop.side == "sell"
        cancel = harness.broker.cancel_order(harness.follower, stop.id, "CLR-900004")
        assert cancel.ok, cancel
        assert wait_for(lambda: not working_stop())
        cancels = [r for r in harness.received() if r["kind"] == "cancel"]
        assert [c["order_id"] for c in cancels] == [stop.id]

    def test_cancel_orders_cancels_each_working_order_never_all_accounts(
            self, harness: Harness) -> None:
        harness.set_position(harness.follower, 2, 18000.0)
        harness.set_position(harness.leader, 2, 18000.0)
        assert wait_for(lambda: held(harness.broker, harness.follower) == 2)
        for n, account_id in enumerate((harness.follower, harness.follower, harness.leader)):
            answer = harness.broker.place_order(account_id, harness.symbol, "sell", 1, "stop",
                                                f"CLR-90001{n}-stop", 17900.0 - n)
            assert answer.ok, answer

        def stops(account_id: str) -> int:
            return sum(1 for o in account(harness.broker.snapshot(), account_id).orders
                       if o.status in ("working", "pending"))

        assert wait_for(lambda: stops(harness.follower) == 2 and stops(harness.leader) == 1)
        answer = harness.broker.cancel_orders(harness.follower, harness.symbol, "CLR-900020")
        assert answer.ok, answer
        assert wait_for(lambda: stops(harness.follower) == 0)
        assert stops(harness.leader) == 1
        cancels = [r for r in harness.received() if r["kind"] == "cancel"]
        assert cancels
        assert {c["account"] for c in cancels} == {harness.follower}

    def test_a_refusal_is_rejected_with_the_brokers_reason(self, harness: Harness) -> None:
        harness.reject_next("max position size reached")
        answer = harness.broker.place_order(harness.follower, harness.symbol, "buy", 1,
                                            "market", "CLR-900030")
        if answer.status != "rejected":  # some brokers refuse after accepting
            report = settled(harness.broker, "CLR-900030")
            assert report is not None
            answer = report.answer()
        assert answer.status == "rejected"
        assert "max position" in answer.reason
        assert held(harness.broker, harness.follower) == 0

    def test_a_tag_never_received_is_unknown(self, harness: Harness) -> None:
        assert harness.broker.find_tag("CLR-999999") is None

    def test_an_order_that_never_fills_stays_working(self, harness: Harness) -> None:
        harness.hold_fills()
        answer = harness.broker.place_order(harness.follower, harness.symbol, "buy", 1,
                                            "market", "CLR-900040")
        assert answer.status == "accepted", answer
        time.sleep(0.3)
        report = harness.broker.find_tag("CLR-900040")
        assert report is not None
        assert report.state == "working"
        assert held(harness.broker, harness.follower) == 0

    def test_an_unreachable_broker_is_unavailable_never_a_refusal(
            self, harness: Harness) -> None:
        harness.go_offline()
        answer = _answer(lambda: harness.broker.close_position(harness.follower,
                                                               harness.symbol, "CLR-900050"))
        assert answer.status in ("unavailable", "accepted"), answer
        if answer.status == "accepted":  # file-based: accepted, then no result comes
            report = harness.broker.find_tag("CLR-900050")
            assert report is None or not report.final or report.state != "filled"

        def unreachable() -> bool:
            found = account(harness.broker.snapshot(), harness.follower)
            return not found.connected or found.data_age(harness.broker.snapshot().time) > 5

        assert wait_for(unreachable, timeout=12.0) or not harness.broker.health().ok


def _answer(request: Callable[[], BrokerAnswer]) -> BrokerAnswer:
    from copilink_rules.adapters.base import call_broker

    return call_broker(request)
