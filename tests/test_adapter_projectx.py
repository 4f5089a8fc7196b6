"""The ProjectX adapter against its stand-in (REST on one port, SignalR hubs on another)."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from copilink_rules.adapters.base import AccountSpec, create_adapter
from copilink_rules.adapters.projectx import LOGOUT_MESSAGE, ProjectXBroker, Settings, create
from copilink_rules.errors import AuthFailed, OrderRejected, RateLimited

from .adapter_contract import BrokerContract, account, held, wait_for
from .standins.projectx import API_KEY, USERNAME, ProjectXStandIn

KEY_ENV = "PROJECTX_TEST_KEY"
NQ = "CON.F.US.ENQ.H26"
ACCOUNTS = {"LEAD": 101, "F1": 102}
SPECS = [AccountSpec("LEAD", "leader"), AccountSpec("F1", "follower", leader="LEAD")]


def settings(server: ProjectXStandIn, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api_url": server.api_url, "user_hub_url": server.hub_url("user"),
        "market_hub_url": server.hub_url("market"), "username": USERNAME,
        "api_key_env": KEY_ENV, "request_timeout": 2.0, "reconnect_min": 0.05,
        "reconnect_max": 0.5, "hub_ping_interval": 1}
    return Settings.model_validate(values | overrides)


@pytest.fixture
def server() -> Iterator[ProjectXStandIn]:
    stand_in = ProjectXStandIn(ACCOUNTS).start()
    yield stand_in
    stand_in.stop()


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, API_KEY)


@pytest.fixture
def brokers() -> Iterator[list[ProjectXBroker]]:
    made: list[ProjectXBroker] = []
    yield made
    for broker in made:
        broker.close()
    gc.collect()  # a leaked socket or task fails the test that leaked it, not a later one


def connected(server: ProjectXStandIn, brokers: list[ProjectXBroker],
              **overrides: Any) -> ProjectXBroker:
    broker = create(settings(server, **overrides), SPECS)
    brokers.append(broker)
    broker.connect(timeout=5.0)
    return broker


class ProjectXHarness:
    leader, follower, symbol = "LEAD", "F1", "NQH6"

    def __init__(self, server: ProjectXStandIn, broker: ProjectXBroker) -> None:
        self.server, self.broker = server, broker

    def set_position(self, account: str, qty: int, avg_price: float) -> None:
        self.server.set_position(account, NQ, qty, avg_price)

    def received(self) -> list[dict[str, Any]]:
        return [dict(c) for c in self.server.commands]

    def reject_next(self, reason: str) -> None:
        self.server.reject_next(reason)

    def hold_fills(self) -> None:
        self.server.hold_fills = True

    def go_offline(self) -> None:
        self.server.stop()


class TestProjectXContract(BrokerContract):
    @pytest.fixture(params=[False, True], ids=["bare", "wrapped"])
    def harness(self, request: pytest.FixtureRequest, server: ProjectXStandIn,
                brokers: list[ProjectXBroker]) -> ProjectXHarness:
        server.wrap_events = request.param
        return ProjectXHarness(server, connected(server, brokers))


# --- login ----------------------------------------------------------------------------------------


def test_unknown_user_says_to_check_the_username_and_never_shows_the_key(
        server: ProjectXStandIn, brokers: list[ProjectXBroker],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    broker = create(settings(server, username="someone@example.com"), SPECS)
    brokers.append(broker)
    with pytest.raises(AuthFailed) as error:
        broker.connect(timeout=2.0)
    assert "check the username" in str(error.value)
    assert "errorCode 1" in str(error.value)
    assert API_KEY not in str(error.value)
    assert API_KEY not in repr(broker)
    assert API_KEY not in caplog.text
    assert server.calls("Auth/loginKey")[0]["body"]["apiKey"] == API_KEY  # it was sent


@pytest.mark.parametrize(("code", "words"), [
    (2, "check the API key"), (3, "check the API key"), (9, "ApiSubscriptionNotFound"),
    (10, "ApiKeyAuthenticationDisabled"), (8, "errorCode 8: boom")])
def test_each_login_refusal_has_its_own_message(
        server: ProjectXStandIn, brokers: list[ProjectXBroker], code: int, words: str) -> None:
    server.login_error = (code, f"boom {API_KEY}")  # a server echoing the key is masked
    broker = create(settings(server), SPECS)
    brokers.append(broker)
    with pytest.raises(AuthFailed) as error:
        broker.connect(timeout=2.0)
    assert words in str(error.value)
    assert API_KEY not in str(error.value)
    assert broker.health().state == "auth_failed"


def test_a_missing_key_variable_is_named(server: ProjectXStandIn,
                                        brokers: list[ProjectXBroker],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    broker = create(settings(server), SPECS)
    brokers.append(broker)
    with pytest.raises(AuthFailed, match=KEY_ENV):
        broker.connect(timeout=2.0)
    assert not server.calls("Auth/loginKey")


def test_settings_refuse_unknown_keys_and_build_through_the_registry(
        server: ProjectXStandIn) -> None:
    with pytest.raises(ValueError, match="api_key"):
        Settings.model_validate({"username": "u", "api_key": "test-key-not-real"})
    values = settings(server).model_dump()
    from copilink_rules.adapters import base
    if "projectx" in base.adapter_names():  # registered by the lead
        broker = create_adapter("projectx", values, SPECS)
        assert isinstance(broker, ProjectXBroker)
        broker.close()


# --- events ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", [False, True], ids=["bare", "wrapped"])
def test_events_bare_or_wrapped_update_the_snapshot(
        server: ProjectXStandIn, brokers: list[ProjectXBroker], wrap: bool) -> None:
    broker = connected(server, brokers)
    position = {"id": 1, "accountId": 102, "contractId": NQ, "type": 2, "size": 3,
                "averagePrice": 18010.5, "creationTimestamp": "2026-03-02T14:30:00+00:00"}
    server.push_user("GatewayUserPosition", position, 102, wrap=wrap)
    server.push_user("GatewayUserAccount", {"id": 102, "name": "F1", "balance": 49250.0,
                                            "canTrade": True}, None, wrap=wrap)
    order = {"id": 77, "accountId": 102, "contractId": NQ, "status": 1, "type": 4, "side": 0,
             "size": 3, "stopPrice": 18100.0, "fillVolume": 0, "customTag": "CLR-000077"}
    server.push_user("GatewayUserOrder", order, 102, wrap=wrap)
    assert wait_for(lambda: held(broker, "F1") == -3 and
                    account(broker.snapshot(), "F1").balance == 49250.0 and
                    len(account(broker.snapshot(), "F1").orders) == 1)
    found = account(broker.snapshot(), "F1")
    assert found.positions[0].avg_price == 18010.5
    assert (found.orders[0].id, found.orders[0].type, found.orders[0].side) == \
        ("77", "stop", "buy")
    report = broker.find_tag("CLR-000077")  # a tag learnt from an event
    assert report is not None
    assert (report.state, report.order_id) == ("working", "77")


@pytest.mark.parametrize("wrap", [False, True], ids=["bare", "wrapped"])
def test_a_position_of_size_zero_is_flat(server: ProjectXStandIn,
                                         brokers: list[ProjectXBroker], wrap: bool) -> None:
    server.wrap_events = wrap
    broker = connected(server, brokers)
    server.set_position("F1", NQ, 2, 18000.0)
    assert wait_for(lambda: held(broker, "F1") == 2)
    server.set_position("F1", NQ, 0, 0.0)  # pushes size 0
    assert wait_for(lambda: held(broker, "F1") == 0)
    assert not account(broker.snapshot(), "F1").positions


def test_a_wrapped_remove_action_is_flat(server: ProjectXStandIn,
                                         brokers: list[ProjectXBroker]) -> None:
    broker = connected(server, brokers)
    server.set_position("F1", NQ, 2, 18000.0)
    assert wait_for(lambda: held(broker, "F1") == 2)
    server.push_user("GatewayUserPosition", {"id": 1, "accountId": 102, "contractId": NQ},
                     102, wrap=True, action=2)
    assert wait_for(lambda: held(broker, "F1") == 0)


def test_quotes_take_two_arguments_and_nan_is_missing(
        server: ProjectXStandIn, brokers: list[ProjectXBroker]) -> None:
    broker = connected(server, brokers)
    server.set_position("F1", NQ, 1, 18000.0)  # a held contract gets a quote subscription
    assert wait_for(lambda: any(i["arguments"] == [NQ]
                                for i in server.subscribed("SubscribeContractQuotes")))
    server.push_quote(NQ, {"symbol": "F.US.ENQ", "bestBid": 18000.25, "bestAsk": 18000.5,
                           "lastPrice": 18000.25})
    assert wait_for(lambda: "NQH26" in broker.snapshot().quotes)
    server.push_quote(NQ, {"bestBid": "NaN"})  # a partial update with no usable bid
    assert wait_for(lambda: broker.snapshot().quotes["NQH26"].bid is None)
    assert broker.snapshot().quotes["NQH26"].ask == 18000.5


def test_a_non_number_balance_makes_the_account_stale_not_a_number(
        server: ProjectXStandIn, brokers: list[ProjectXBroker]) -> None:
    broker = connected(server, brokers)
    server.push_user("GatewayUserAccount", {"id": 102, "balance": "Infinity"}, None)

    def stale() -> bool:
        snapshot = broker.snapshot()
        return account(snapshot, "F1").data_age(snapshot.time) > 0.3

    assert wait_for(stale)
    assert account(broker.snapshot(), "F1").balance == 50000.0
    server.push_user("GatewayUserAccount", {"id": 102, "balance": 49000.0}, None)
    assert wait_for(lambda: not stale())


# --- connection -----------------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [False, True], ids=["negotiate", "skip-negotiation"])
def test_both_negotiation_variants_connect(server: ProjectXStandIn,
                                           brokers: list[ProjectXBroker], skip: bool) -> None:
    broker = connected(server, brokers, skip_negotiation=skip)
    assert broker.health().ok
    modes = {c["mode"] for c in server.connections}
    assert modes == {"direct" if skip else "negotiated"}
    assert {c["hub"] for c in server.connections} == {"user", "market"}
    # hubs live on their own host: the API port never saw a hub request
    assert not [r for r in server.rest if "hubs" in r["path"]]
    for invocation in server.invocations:  # the bearer token never rides in hub messages
        assert "headers" not in invocation["fields"]


@pytest.mark.parametrize("skip", [False, True], ids=["negotiate", "skip-negotiation"])
def test_a_hub_drop_goes_stale_then_reconnects_and_resubscribes(
        server: ProjectXStandIn, brokers: list[ProjectXBroker], skip: bool) -> None:
    broker = connected(server, brokers, skip_negotiation=skip)
    assert len(server.subscribed("SubscribePositions")) == 2
    server.refuse_hubs = True
    server.drop_hubs()
    assert wait_for(lambda: not broker.health().ok)
    assert broker.health().state == "disconnected"
    first = account(broker.snapshot(), "F1").updated_at
    time.sleep(0.2)
    later = broker.snapshot()
    assert account(later, "F1").updated_at == first  # no longer advancing
    assert account(later, "F1").data_age(later.time) >= 0.2
    server.set_position("F1", NQ, 4, 18000.0)  # missed while down: the resync brings it
    server.refuse_hubs = False
    assert wait_for(lambda: broker.health().ok)
    assert sorted(i["arguments"][0] for i in server.subscribed("SubscribePositions")) == \
        [101, 101, 102, 102]
    assert len(server.subscribed("SubscribeAccounts")) == 2
    assert held(broker, "F1") == 4
    snapshot = broker.snapshot()
    updated = account(snapshot, "F1").updated_at
    assert updated is not None
    assert first is not None
    assert updated > first


def test_gateway_logout_is_a_critical_health_and_stops_commands(
        server: ProjectXStandIn, brokers: list[ProjectXBroker]) -> None:
    broker = connected(server, brokers)
    logins = len(server.calls("Auth/loginKey"))
    server.logout()
    assert wait_for(lambda: broker.health().state == "auth_failed")
    assert broker.health().detail == LOGOUT_MESSAGE
    with pytest.raises(AuthFailed, match="logged this session out"):
        broker.place_order("F1", "NQH6", "buy", 1, "market", "CLR-000100")
    time.sleep(0.3)
    assert len(server.calls("Auth/loginKey")) == logins  # never logs the other session out
    assert not server.calls("Order/place")


def test_an_expired_token_gets_one_login_then_the_command_succeeds(
        server: ProjectXStandIn, brokers: list[ProjectXBroker]) -> None:
    broker = connected(server, brokers)
    logins = len(server.calls("Auth/loginKey"))
    server.expire_tokens()
    answer = broker.place_order("F1", "NQH6", "buy", 1, "market", "CLR-000101")
    assert answer.ok
    assert len(server.calls("Auth/loginKey")) == logins + 1
    assert [r["status"] for r in server.calls("Order/place")] == [401, 200]


def test_a_session_refused_after_a_fresh_login_is_auth_failed(
        server: ProjectXStandIn, brokers: list[ProjectXBroker]) -> None:
    broker = connected(server, brokers)
    logins = len(server.calls("Auth/loginKey"))
    server.refuse_tokens = True
    server.expire_tokens()
    with pytest.raises(AuthFailed, match="401"):
        broker.cancel_order("F1", "5", "CLR-000102")
    assert len(server.calls("Auth/loginKey")) == logins + 1  # once, not a loop
    assert len(server.calls("Order/cancel")) == 2


# --- orders ---------------------------------------------------------------------------------------


def test_a_429_is_rate_limited_and_never_retried_in_a_burst(
        server: ProjectXStandIn, brokers: list[ProjectXBroker]) -> None:
    broker = connected(server, brokers)
    server.rate_limit_next(1, retry_after=7)
    with pytest.raises(RateLimited) as error:
        broker.place_order("F1", "NQH6", "buy", 1, "market", "CLR-000110")
    assert error.value.retry_after == 7
    with pytest.raises(RateLimited) as again:  # refused here, not sent
        broker.place_order("F1", "NQH6", "buy", 1, "market", "CLR-000110~2")
    assert 0 < again.value.retry_after <= 7
    assert len(server.calls("Order/place")) == 1


def test_a_reused_custom_tag_is_rejected_with_the_brokers_reason(
        server: ProjectXStandIn, brokers: list[ProjectXBroker]) -> None:
    broker = connected(server, brokers)
    server.reject_next("max position size reached")
    first = broker.place_order("F1", "NQH6", "buy", 1, "market", "CLR-000120")
    assert (first.status, first.reason) == \
        ("rejected", "max position size reached (errorCode 2 OrderRejected)")
    again = broker.place_order("F1", "NQH6", "buy", 1, "market", "CLR-000120")
    assert again.status == "rejected"
    assert "custom tag already in use" in again.reason
    assert [c["tag"] for c in server.commands] == ["CLR-000120", "CLR-000120"]
    assert broker.place_order("F1", "NQH6", "buy", 1, "market", "CLR-000120~2").ok


def test_a_restarted_adapter_finds_a_previous_tag_through_order_search(
        server: ProjectXStandIn, brokers: list[ProjectXBroker]) -> None:
    first = connected(server, brokers)
    server.hold_fills = True
    assert first.place_order("F1", "NQH6", "sell", 1, "stop", "CLR-000130-stop", 17900.0).ok
    assert first.place_order("F1", "NQH6", "buy", 1, "market", "CLR-000131").ok
    first.close()
    second = connected(server, brokers)
    assert server.calls("Order/search")
    for tag, state in (("CLR-000130-stop", "working"), ("CLR-000131", "working")):
        report = second.find_tag(tag)
        assert report is not None, tag
        assert (report.state, report.account) == (state, "F1")
    stop = next(o for o in account(second.snapshot(), "F1").orders if o.type == "stop")
    assert second.cancel_order("F1", stop.id, "CLR-000132").ok
    assert wait_for(lambda: getattr(second.find_tag("CLR-000130-stop"), "state", "") ==
                    "cancelled")


def test_close_position_uses_close_contract_and_cancels_orders_one_by_one(
        server: ProjectXStandIn, brokers: list[ProjectXBroker]) -> None:
    broker = connected(server, brokers)
    server.set_position("F1", NQ, 2, 18000.0)
    for n in range(2):
        assert broker.place_order("F1", "NQH6", "sell", 1, "stop", f"CLR-00014{n}-stop",
                                  17900.0 - n).ok
    assert broker.place_order("LEAD", "NQH6", "sell", 1, "stop", "CLR-000142-stop",
                              17900.0).ok
    answer = broker.close_position("F1", "NQH6", "CLR-000143")
    assert answer.ok
    kinds = [(c["kind"], c["account"]) for c in server.commands[3:]]
    assert kinds == [("close", "F1"), ("cancel", "F1"), ("cancel", "F1")]
    assert not server.calls("Order/place")[3:]  # never a market order sized by us
    assert wait_for(lambda: getattr(broker.find_tag("CLR-000143"), "state", "") == "filled")


def test_250_rapid_calls_stay_under_200_per_minute_at_the_broker(
        server: ProjectXStandIn, brokers: list[ProjectXBroker]) -> None:
    broker = connected(server, brokers)
    outcomes = {"rejected": 0, "limited": 0}
    waits = []
    for n in range(250):
        try:
            answer = broker.cancel_order("F1", str(10 + n), f"CLR-{200000 + n}")
        except RateLimited as limited:
            waits.append(limited.retry_after)
            outcomes["limited"] += 1
        else:
            assert answer.status == "rejected"  # no such order: the broker answered
            outcomes["rejected"] += 1
    assert all(wait > 0 for wait in waits)
    assert outcomes["limited"] > 0
    assert server.max_in_window(60.0) < 200
    assert not [r for r in server.rest if r["status"] == 429]
    assert len(server.calls("Order/cancel")) == outcomes["rejected"]


def test_snapshot_times_are_utc_and_unreported_accounts_are_disconnected(
        server: ProjectXStandIn, brokers: list[ProjectXBroker]) -> None:
    broker = create(settings(server), [*SPECS, AccountSpec("GHOST", "follower", leader="LEAD")])
    brokers.append(broker)
    broker.connect(timeout=5.0)
    snapshot = broker.snapshot()
    ghost = account(snapshot, "GHOST")
    assert not ghost.connected
    assert ghost.updated_at is None
    assert isinstance(account(snapshot, "F1").updated_at, datetime)
    with pytest.raises(OrderRejected, match="GHOST"):
        broker.place_order("GHOST", "NQH6", "buy", 1, "market", "CLR-000150")
