"""The Tradovate adapter against its protocol stand-in: the contract suite, then Tradovate's
own behaviour (login, renewal, sync bodies, reconnects, 429, p-tickets, budget, restarts)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import pytest

from copilink_rules.adapters.base import AccountSpec
from copilink_rules.adapters.tradovate import Settings, TradovateBroker, create
from copilink_rules.errors import AuthFailed, BrokerUnavailable, RateLimited

from .adapter_contract import BrokerContract, account, held, wait_for
from .standins.tradovate import PASSWORD, SEC, USER, TradovateStandIn, max_in_window

SPECS = [AccountSpec("LEAD", "leader"), AccountSpec("F1", "follower", leader="LEAD")]


def settings(standin: TradovateStandIn, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "rest_url": standin.rest_url, "ws_url": standin.ws_url, "md_url": standin.md_url,
        "username": USER, "app_id": "copilink-test", "cid": 1234, "device_id": "test-device",
        "request_timeout": 2.0, "heartbeat_interval": 0.5, "socket_timeout": 2.0,
        "reconnect_min": 0.1, "reconnect_max": 0.4, "reconcile_interval": 5.0}
    values.update(overrides)
    return Settings.model_validate(values)


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRADOVATE_PASSWORD", PASSWORD)
    monkeypatch.setenv("TRADOVATE_SEC", SEC)


@pytest.fixture
def standin() -> Iterator[TradovateStandIn]:
    server = TradovateStandIn().start()
    yield server
    server.stop()


class Connected:
    """A connected adapter; closed on exit."""

    def __init__(self, standin: TradovateStandIn, **overrides: Any) -> None:
        self.broker = create(settings(standin, **overrides), SPECS)

    def __enter__(self) -> TradovateBroker:
        self.broker.connect(timeout=5.0)
        return self.broker

    def __exit__(self, *exc: object) -> None:
        self.broker.close()


class TradovateHarness:
    leader, follower, symbol = "LEAD", "F1", "NQH6"

    def __init__(self, standin: TradovateStandIn) -> None:
        self.standin = standin
        self.broker = create(settings(standin), SPECS)
        self.broker.connect(timeout=5.0)

    def set_position(self, account: str, qty: int, avg_price: float) -> None:
        self.standin.set_position(account, self.symbol, qty, avg_price)

    def received(self) -> list[dict[str, Any]]:
        return self.standin.commands()

    def reject_next(self, reason: str) -> None:
        self.standin.reject_next(reason)

    def hold_fills(self) -> None:
        self.standin.hold_fills()

    def go_offline(self) -> None:
        self.standin.stop()


class TestTradovateContract(BrokerContract):
    @pytest.fixture
    def harness(self, standin: TradovateStandIn, secrets: None) -> Iterator[TradovateHarness]:
        harness = TradovateHarness(standin)
        yield harness
        harness.broker.close()


# --- login and session -------------------------------------------------------------------


def test_a_refused_login_names_the_user_never_the_password(
        standin: TradovateStandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRADOVATE_PASSWORD", "wrong-password-not-real")
    monkeypatch.setenv("TRADOVATE_SEC", SEC)
    broker = create(settings(standin), SPECS)
    with pytest.raises(AuthFailed) as caught:
        broker.connect(timeout=3.0)
    broker.close()
    message = str(caught.value)
    assert USER in message
    assert "Incorrect username or password" in message
    assert "wrong-password-not-real" not in message + repr(broker) + repr(broker.settings)
    assert broker.health().state != "connected"
    logins = standin.requests("auth/accesstokenrequest")
    assert len(logins) == 1  # a refused password is never retried
    assert logins[0].body is not None
    assert logins[0].body["deviceId"] == "test-device"


def test_a_missing_secret_is_named_by_its_variable(
        standin: TradovateStandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRADOVATE_PASSWORD", raising=False)
    monkeypatch.setenv("TRADOVATE_SEC", SEC)
    broker = create(settings(standin), SPECS)
    with pytest.raises(AuthFailed, match="TRADOVATE_PASSWORD"):
        broker.connect(timeout=3.0)
    broker.close()
    assert standin.requests() == []


def test_the_token_is_renewed_before_it_expires_and_the_session_goes_on(secrets: None) -> None:
    standin = TradovateStandIn(token_lifetime=2.0).start()
    try:
        with Connected(standin, renew_margin=1.5) as broker:
            assert wait_for(lambda: len(standin.requests("auth/renewaccesstoken")) >= 3)
            answer = broker.place_order("F1", "NQH6", "buy", 1, "market", "CLR-000101")
            assert answer.ok, answer
            assert len(standin.requests("auth/accesstokenrequest")) == 1
            last = standin.requests("order/placeorder")[-1]
            assert last.body is not None
            assert last.body["customTag50"] == "CLR-000101"
            assert broker.health().ok
    finally:
        standin.stop()


@pytest.mark.parametrize("variant", ["users", "accounts"])
def test_each_syncrequest_body_variant_syncs(variant: str, secrets: None) -> None:
    standin = TradovateStandIn(sync_bodies=(variant,)).start()
    try:
        standin.set_position("F1", "NQH6", 2, 18000.0)
        with Connected(standin, sync_body=variant) as broker:
            assert held(broker, "F1") == 2
            syncs = [text for _, kind, text in standin.frames
                     if kind == "user" and text.startswith("user/syncrequest")]
            assert len(syncs) == 1
            body = syncs[0].split("\n", 3)[3]
            expected = '{"users": [7]}' if variant == "users" else '{"accounts": [101, 102]}'
            assert body == expected
    finally:
        standin.stop()


def test_the_wrong_syncrequest_body_is_a_precise_connect_failure(secrets: None) -> None:
    standin = TradovateStandIn(sync_bodies=("accounts",)).start()
    try:
        broker = create(settings(standin, sync_body="users"), SPECS)
        with pytest.raises(BrokerUnavailable, match="syncrequest answered s=400"):
            broker.connect(timeout=1.5)
        broker.close()
    finally:
        standin.stop()


def test_a_dropped_user_socket_goes_stale_then_resyncs(
        standin: TradovateStandIn, secrets: None) -> None:
    with Connected(standin) as broker:
        standin.set_position("F1", "NQH6", 1, 18000.0)
        assert wait_for(lambda: held(broker, "F1") == 1)
        standin.drop_sockets(refuse=True)
        assert wait_for(lambda: not broker.health().ok)
        frozen = account(broker.snapshot(), "F1").updated_at
        standin.set_position("F1", "NQH6", 3, 18000.0)  # happens while we cannot see it
        time.sleep(0.8)
        down = account(broker.snapshot(), "F1")
        assert down.updated_at == frozen
        assert down.positions[0].qty == 1
        standin.drop_sockets(refuse=False)
        assert wait_for(lambda: held(broker, "F1") == 3)
        assert broker.health().ok
        assert wait_for(lambda: account(broker.snapshot(), "F1").updated_at != frozen)
        syncs = [t for _, kind, t in standin.frames if kind == "user" and "syncrequest" in t]
        assert len(syncs) >= 2


def test_a_revoked_token_on_the_socket_means_a_new_login(
        standin: TradovateStandIn, secrets: None) -> None:
    with Connected(standin) as broker:
        standin.revoke_tokens()
        assert wait_for(lambda: len(standin.requests("auth/accesstokenrequest")) == 2)
        standin.set_position("F1", "NQH6", -2, 18000.0)
        assert wait_for(lambda: held(broker, "F1") == -2)
        assert broker.place_order("F1", "NQH6", "buy", 2, "market", "CLR-000111").ok


# --- request budget and penalties --------------------------------------------------------


def test_a_429_stops_every_request_for_an_hour(standin: TradovateStandIn, secrets: None) -> None:
    with Connected(standin, reconcile_interval=0.2, renew_margin=10_000.0) as broker:
        standin.set_rate_limited()
        with pytest.raises(RateLimited) as first:
            broker.place_order("F1", "NQH6", "buy", 1, "market", "CLR-000201")
        assert first.value.retry_after == 3600
        count = len(standin.requests())
        with pytest.raises(RateLimited) as second:
            broker.close_position("F1", "NQH6", "CLR-000202")
        assert 3500 < second.value.retry_after <= 3600
        time.sleep(0.8)  # background renewals and reconciliation polls would fire by now
        assert len(standin.requests()) == count


def test_a_penalty_ticket_is_waited_out_and_resent_with_the_ticket(
        standin: TradovateStandIn, secrets: None) -> None:
    with Connected(standin) as broker:
        standin.penalize("order/placeorder", p_time=0.3)
        answer = broker.place_order("F1", "NQH6", "buy", 1, "market", "CLR-000301")
        assert answer.ok, answer
        places = standin.requests("order/placeorder")
        assert len(places) == 2  # the stand-in re-issues a ticket to a resend that came early
        assert places[0].body is not None
        assert places[1].body is not None
        assert "p-ticket" not in places[0].body
        assert places[1].body["p-ticket"] == "ticket-order/placeorder"
        assert {k: v for k, v in places[1].body.items() if k != "p-ticket"} == places[0].body


def test_a_captcha_penalty_is_rate_limited_for_an_hour_without_resending(
        standin: TradovateStandIn, secrets: None) -> None:
    with Connected(standin) as broker:
        standin.penalize("order/cancelorder", p_time=1.0, captcha=True)
        with pytest.raises(RateLimited, match="captcha") as caught:
            broker.cancel_order("F1", "12345", "CLR-000311")
        assert caught.value.retry_after == 3600
        assert len(standin.requests("order/cancelorder")) == 1


def test_a_burst_of_commands_is_throttled_within_the_budget(
        standin: TradovateStandIn, secrets: None) -> None:
    with Connected(standin, request_budget=20, budget_window=1.0) as broker:
        start = time.monotonic()
        answers = [broker.place_order("F1", "NQH6", "buy", 1, "stop", f"CLR-0004{n:02d}-stop",
                                      19000.0 + n) for n in range(50)]
        assert all(a.status == "accepted" for a in answers)
        times = [r.at for r in standin.requests() if r.at >= start]
        assert len(standin.requests("order/placeorder")) == 50
        assert max_in_window(times, 1.0) <= 20
        assert max_in_window([r.at for r in standin.requests()], 1.0) <= 20


def test_every_command_is_automated_and_carries_its_tag(
        standin: TradovateStandIn, secrets: None) -> None:
    with Connected(standin) as broker:
        standin.set_position("F1", "NQH6", 2, 18000.0)
        assert wait_for(lambda: held(broker, "F1") == 2)
        broker.place_order("F1", "NQH6", "sell", 1, "stop", "CLR-000501-stop", 17900.0)
        broker.place_order("F1", "NQH6", "buy", 1, "market", "CLR-000502")
        assert wait_for(lambda: held(broker, "F1") == 3)
        assert wait_for(lambda: len(account(broker.snapshot(), "F1").orders) == 1)
        broker.cancel_orders("F1", "NQH6", "CLR-000503")
        broker.close_position("F1", "NQH6", "CLR-000504")
        commands = standin.commands()
        assert [c["kind"] for c in commands] == ["place", "place", "cancel", "close"]
        assert [c["tag"] for c in commands] == ["CLR-000501-stop", "CLR-000502", "CLR-000503",
                                                "CLR-000504"]
        assert all(c["body"]["isAutomated"] is True for c in commands)
        assert commands[3]["body"]["admin"] is False
        assert commands[0]["body"]["timeInForce"] == "GTC"


# --- reconciliation and data quality -----------------------------------------------------


def test_a_restarted_adapter_finds_a_tag_from_order_list(secrets: None) -> None:
    standin = TradovateStandIn(tags_in_sync=False).start()
    try:
        with Connected(standin) as first:
            first.place_order("F1", "NQH6", "sell", 1, "stop", "CLR-000601-stop", 17900.0)
        lists_before = len(standin.requests("order/list"))
        with Connected(standin) as second:
            report = second.find_tag("CLR-000601-stop")
            assert report is not None
            assert (report.state, report.account, report.instrument) == ("working", "F1", "NQH6")
            assert len(standin.requests("order/list")) == lists_before + 1
            assert second.find_tag("CLR-000699") is None
    finally:
        standin.stop()


def test_a_non_finite_number_is_missing_data_never_a_number(
        standin: TradovateStandIn, secrets: None) -> None:
    standin.set_position("F1", "NQH6", 1, 18000.0)
    standin.push_quote("NQH6", 17999.75, 18000.0, 18000.0)
    with Connected(standin) as broker:

        def bid() -> float | None:
            quote = broker.snapshot().quotes.get("NQH6")
            return quote.bid if quote else None

        assert wait_for(lambda: bid() == 17999.75)
        standin.push_quote("NQH6", math.nan, 18000.25, math.inf)
        assert wait_for(lambda: broker.snapshot().quotes["NQH6"].ask == 18000.25)
        quote = broker.snapshot().quotes["NQH6"]
        assert (quote.bid, quote.last) == (None, None)

        def data_age_frozen() -> bool:
            first = account(broker.snapshot(), "F1").updated_at
            time.sleep(0.5)  # the stand-in's heartbeats (0.3 s) refresh a healthy account
            return account(broker.snapshot(), "F1").updated_at == first

        assert not data_age_frozen()
        standin.set_cash("F1", math.nan)
        assert wait_for(data_age_frozen)
        assert account(broker.snapshot(), "F1").balance == 50000.0
        standin.set_cash("F1", 49000.0, -1000.0)
        assert wait_for(lambda: account(broker.snapshot(), "F1").balance == 49000.0)
        assert account(broker.snapshot(), "F1").realized_pnl == -1000.0
        assert not data_age_frozen()


def test_an_account_the_broker_never_reported_is_disconnected(
        standin: TradovateStandIn, secrets: None) -> None:
    broker = create(settings(standin), [*SPECS, AccountSpec("GHOST", "follower", leader="LEAD")])
    broker.connect(timeout=5.0)
    try:
        ghost = account(broker.snapshot(), "GHOST")
        assert not ghost.connected
        assert ghost.updated_at is None
        assert account(broker.snapshot(), "F1").connected
    finally:
        broker.close()


def test_a_configured_instrument_is_found_by_name_and_quoted(
        standin: TradovateStandIn, secrets: None) -> None:
    specs = [SPECS[0], AccountSpec("F1", "follower", leader="LEAD", instrument="MNQ 03-26")]
    broker = create(settings(standin), specs)
    broker.connect(timeout=5.0)
    try:
        assert broker.contracts() == {"F1": "MNQ 03-26"}
        standin.push_quote("MNQH6", 18000.0, 18000.25, 18000.25)
        assert wait_for(lambda: "MNQH6" in broker.snapshot().quotes)
        assert broker.snapshot().quotes["MNQH6"].ask == 18000.25
        finds = standin.requests("contract/find")
        assert [r.query for r in finds] == [{"name": "MNQH6"}]
    finally:
        broker.close()
