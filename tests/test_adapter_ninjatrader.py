"""The NinjaTrader 8 adapter against its stand-in: a folder NT8 would own, played by a thread,
and an ATI socket server on 127.0.0.1."""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest

from copilink_rules.adapters import ninjatrader
from copilink_rules.adapters.base import AccountSpec, call_broker, create_adapter
from copilink_rules.adapters.ninjatrader import NinjaTraderBroker, Settings, find_folder
from copilink_rules.errors import BrokerUnavailable

from .adapter_contract import BrokerContract, account, held, settled, wait_for
from .standins.ninjatrader import AtiStandIn, Naming, NinjaTraderStandIn

LEADER, FOLLOWER = "SimBias Momentum", "Sim_VWAP_Pullback_v2"  # a space, underscores
OIF_NAME = re.compile(r"oif_\d{6}_[0-9a-f]{32}\.txt")
FAST = {"ati_port": 0, "poll_interval": 0.03, "confirm_wait": 1.0, "order_file_timeout": 3.0}


def specs() -> list[AccountSpec]:
    return [AccountSpec(LEADER, "leader"),
            AccountSpec(FOLLOWER, "follower", leader=LEADER, size=50000.0)]


def adapter(root: Path, **settings: Any) -> NinjaTraderBroker:
    broker = ninjatrader.create(Settings(folder=root, **{**FAST, **settings}), specs())
    broker.connect(timeout=2.0)
    return broker


class NinjaHarness:
    leader, follower, symbol = LEADER, FOLLOWER, "NQH6"

    def __init__(self, root: Path, naming: Naming | None = None, **settings: Any) -> None:
        self.standin = NinjaTraderStandIn(root, [LEADER, FOLLOWER],
                                          naming=naming or Naming()).start()
        self.broker = adapter(root, **settings)

    def set_position(self, account_id: str, qty: int, avg_price: float) -> None:
        self.standin.set_position(account_id, self.symbol, qty, avg_price)

    def received(self) -> list[dict[str, Any]]:
        return list(self.standin.received)

    def reject_next(self, reason: str) -> None:
        self.standin.reject_next(reason)

    def hold_fills(self) -> None:
        self.standin.hold_fills()

    def go_offline(self) -> None:
        self.standin.go_offline()

    def close(self) -> None:
        self.broker.close()
        self.standin.stop()


def assert_clean(standin: NinjaTraderStandIn) -> None:
    """Nothing NT8 would drop or run against every account, and only OIFs moved in whole."""
    assert standin.violations == []
    assert all(OIF_NAME.fullmatch(name) for name in standin.names_seen), standin.names_seen
    assert len(set(standin.names_seen)) == len(standin.names_seen)
    for line in standin.lines:
        fields = line.split(";")
        assert len(fields) == 13, line
        assert fields[0] in ("PLACE", "CLOSEPOSITION", "CANCEL"), line
        assert fields[0] != "PLACE" or fields[5] in ("MARKET", "STOPMARKET"), line


@pytest.fixture
def nt(tmp_path: Path) -> Iterator[NinjaHarness]:
    harness = NinjaHarness(tmp_path / "NinjaTrader 8")
    yield harness
    harness.close()
    assert_clean(harness.standin)


class TestNinjaTraderContract(BrokerContract):
    """The contract run ends, every test, with the stand-in's own check: no STOP, no
    CANCELALLORDERS / FLATTENEVERYTHING, 13 fields, only `oif_<seq>_<uuid>.txt` names."""

    @pytest.fixture
    def harness(self, nt: NinjaHarness) -> NinjaHarness:
        return nt


# --- file names and contents ---------------------------------------------------------------


@pytest.mark.parametrize("word", ["Position", "position"])
@pytest.mark.parametrize("exchange", ["Globex", "Default"])
@pytest.mark.parametrize("style", ["dash", "month", "cme"])
def test_every_position_file_naming_variant_is_read(tmp_path: Path, word: Any, exchange: Any,
                                                    style: Any) -> None:
    naming = Naming(word, exchange, style)
    standin = NinjaTraderStandIn(tmp_path, [LEADER, FOLLOWER], naming=naming)
    standin.set_connected(True)
    standin.set_position(FOLLOWER, "MNQU6", -3, 18010.5)
    standin.set_position(LEADER, "NQH6", 2, 18000.0)
    # an account we do not watch, whose name ends like a watched one
    standin.set_position("Pullback_v2", "NQH6", 7)
    broker = adapter(tmp_path)
    try:
        snapshot = broker.snapshot()
        assert [(p.instrument, p.qty, p.avg_price)
                for p in account(snapshot, FOLLOWER).positions] == [("MNQU6", -3, 18010.5)]
        assert [(p.instrument, p.qty) for p in account(snapshot, LEADER).positions] == [
            ("NQH6", 2)]
    finally:
        broker.close()


@pytest.mark.parametrize("word", ["PARTFILLED", "PARTIALLYFILLED"])
def test_both_partial_fill_words_are_read(nt: NinjaHarness, word: str) -> None:
    nt.standin.drop_next()  # we play NT's answers by hand
    answer = nt.broker.place_order(FOLLOWER, "NQH6", "sell", 3, "stop", "CLR-000101-stop",
                                   17900.0)
    assert answer.status == "accepted"
    nt.standin.write_order_file(FOLLOWER, "CLR-000101-stop", f"{word};1;17899.75")

    def partly() -> bool:
        report = nt.broker.find_tag("CLR-000101-stop")
        return report is not None and report.filled_qty == 1

    assert wait_for(partly)
    report = nt.broker.find_tag("CLR-000101-stop")
    assert report is not None
    assert report.state == "working"
    [order] = account(nt.broker.snapshot(), FOLLOWER).orders
    assert (order.qty, order.status, order.type) == (2, "working", "stop")
    nt.standin.write_order_file(FOLLOWER, "CLR-000101-stop", "FILLED;3;17899.5")
    report = settled(nt.broker, "CLR-000101-stop")
    assert report is not None
    assert (report.state, report.filled_qty) == ("filled", 3)


def test_the_standin_partial_fill_sequence_reaches_filled(tmp_path: Path) -> None:
    nt = NinjaHarness(tmp_path)
    nt.standin.partial_word = "PARTIALLYFILLED"
    nt.standin.fill_in_parts()
    try:
        assert nt.broker.place_order(FOLLOWER, "NQH6", "buy", 3, "market", "CLR-000102").ok
        report = settled(nt.broker, "CLR-000102")
        assert report is not None
        assert (report.state, report.filled_qty) == ("filled", 3)
        assert wait_for(lambda: held(nt.broker, FOLLOWER) == 3)
    finally:
        nt.close()
    assert_clean(nt.standin)


def test_a_half_written_or_nan_file_is_no_news_and_the_account_goes_stale(
        nt: NinjaHarness, caplog: pytest.LogCaptureFixture) -> None:
    nt.standin.set_position(FOLLOWER, "NQH6", 2, 18000.0)
    assert wait_for(lambda: held(nt.broker, FOLLOWER) == 2)
    name = Naming().position_file("NQH6", FOLLOWER)
    (nt.standin.outgoing / name).write_text("")  # NT8 mid-write
    before = account(nt.broker.snapshot(), FOLLOWER).updated_at
    assert wait_for(lambda: account(nt.broker.snapshot(), FOLLOWER).updated_at != before)
    assert held(nt.broker, FOLLOWER) == 2
    (nt.standin.outgoing / name).write_text("LONG;2;nan")
    assert wait_for(lambda: "cannot read position file" in caplog.text)
    frozen = account(nt.broker.snapshot(), FOLLOWER).updated_at
    assert wait_for(lambda: account(nt.broker.snapshot(), LEADER).updated_at != frozen)
    snapshot = nt.broker.snapshot()
    assert account(snapshot, FOLLOWER).updated_at == frozen  # stale, not refreshed
    [position] = account(snapshot, FOLLOWER).positions
    assert (position.qty, position.avg_price) == (2, 18000.0)
    assert all(math.isfinite(p.avg_price) for p in account(snapshot, FOLLOWER).positions)
    assert caplog.text.count("cannot read position file") == 1


# --- what is sent, and how ---------------------------------------------------------------------


def test_every_command_is_a_valid_13_field_line_and_never_a_cancel_all(
        nt: NinjaHarness) -> None:
    nt.set_position(FOLLOWER, 2, 18000.0)
    nt.standin.set_position(FOLLOWER, "ESH6", -1, 6000.0)
    assert wait_for(lambda: len(account(nt.broker.snapshot(), FOLLOWER).positions) == 2)
    assert nt.broker.place_order(FOLLOWER, "NQH6", "sell", 2, "stop", "CLR-000201-stop",
                                 17950.25).ok
    assert nt.broker.cancel_orders(FOLLOWER, None, "CLR-000202").ok
    assert nt.broker.close_position(FOLLOWER, None, "CLR-000203").ok
    assert wait_for(lambda: not account(nt.broker.snapshot(), FOLLOWER).positions)
    assert nt.standin.lines[0] == (
        f"PLACE;{FOLLOWER};NQ 03-26;SELL;2;STOPMARKET;0;17950.25;GTC;;CLR-000201-stop;;")
    assert nt.standin.lines[1] == "CANCEL;;;;;;;;;;CLR-000201-stop;;"
    assert sorted(nt.standin.lines[2:]) == [f"CLOSEPOSITION;{FOLLOWER};ES 03-26;;;;;;;;;;",
                                            f"CLOSEPOSITION;{FOLLOWER};NQ 03-26;;;;;;;;;;"]
    assert_clean(nt.standin)
    assert not list((nt.standin.root / "copilink").glob("*.part"))


def test_the_standin_catches_what_nt8_would_drop_or_run_everywhere(tmp_path: Path) -> None:
    standin = NinjaTraderStandIn(tmp_path, [FOLLOWER]).start()
    try:
        (tmp_path / "incoming" / "verify_mkt_1.txt").write_text("CANCELALLORDERS;;;;;;;;;;;;")
        (tmp_path / "incoming" / "oif1.txt").write_text(
            f"PLACE;{FOLLOWER};NQ 03-26;SELL;1;STOP;0;17900;GTC;;X1;;\n"
            "FLATTENEVERYTHING;;;;;;;;;;;;\n"
            f"CANCELALLORDERS;{FOLLOWER};NQ 03-26;;;;;;;;;;;;")
        assert wait_for(lambda: len(standin.violations) == 4)
    finally:
        standin.stop()
    assert not (tmp_path / "outgoing" / f"{FOLLOWER}_X1.txt").exists()  # STOP: no file
    with pytest.raises(AssertionError):
        assert_clean(standin)


def test_a_command_without_an_order_file_is_its_own_failure(tmp_path: Path) -> None:
    nt = NinjaHarness(tmp_path, order_file_timeout=0.5, confirm_wait=0.1)
    try:
        nt.standin.drop_next()
        answer = nt.broker.place_order(FOLLOWER, "NQH6", "buy", 1, "market", "CLR-000301")
        assert answer.status == "accepted"  # nothing yet: not a refusal either
        report = settled(nt.broker, "CLR-000301")
        assert report is not None
        assert report.state == "rejected"
        assert report.filled_qty == 0
        assert report.reason == ("no order file from NinjaTrader within 0.5s — is ATI "
                                 "enabled and the line valid?")
        assert [r["tag"] for r in nt.received()] == ["CLR-000301"]
        assert not account(nt.broker.snapshot(), FOLLOWER).orders
    finally:
        nt.close()


def test_a_command_waiting_past_the_timeout_answers_the_failure_itself(tmp_path: Path) -> None:
    nt = NinjaHarness(tmp_path, order_file_timeout=0.3, confirm_wait=1.0)
    try:
        nt.standin.drop_next()
        answer = nt.broker.place_order(FOLLOWER, "NQH6", "buy", 1, "market", "CLR-000302")
        assert answer.status == "rejected"
        assert "no order file from NinjaTrader within 0.3s" in answer.reason
    finally:
        nt.close()


@pytest.mark.parametrize("write_log", [True, False])
def test_a_rejection_carries_the_log_reason_or_says_there_is_none(
        tmp_path: Path, write_log: bool) -> None:
    nt = NinjaHarness(tmp_path)
    nt.standin.write_log = write_log
    try:
        nt.reject_next("Order exceeds max position size")
        answer = nt.broker.place_order(FOLLOWER, "NQH6", "buy", 1, "market", "CLR-000303")
        assert answer.status == "rejected"
        if write_log:
            assert answer.reason == ("NinjaTrader rejected the order: Order exceeds max "
                                     "position size")
        else:
            assert "gives no reason" in answer.reason
    finally:
        nt.close()


def test_a_tag_is_never_sent_twice(nt: NinjaHarness) -> None:
    assert nt.broker.place_order(FOLLOWER, "NQH6", "buy", 1, "market", "CLR-000304").ok
    again = call_broker(lambda: nt.broker.place_order(FOLLOWER, "NQH6", "buy", 1, "market",
                                                      "CLR-000304"))
    assert again.status == "rejected"
    assert "already used" in again.reason
    assert [r["tag"] for r in nt.received()] == ["CLR-000304"]


def test_an_order_id_never_seen_on_the_account_is_not_cancelled(nt: NinjaHarness) -> None:
    nt.standin.write_order_file("Other Account", "ABC", "WORKING;0;0")
    from copilink_rules.errors import OrderRejected

    with pytest.raises(OrderRejected, match="no order 'ABC'"):
        nt.broker.cancel_order(FOLLOWER, "ABC", "CLR-000305")
    assert nt.received() == []


# --- connection, folder, restart ---------------------------------------------------------------


def test_a_restarted_adapter_finds_the_previous_processes_tags(tmp_path: Path) -> None:
    nt = NinjaHarness(tmp_path)
    try:
        assert nt.broker.place_order(FOLLOWER, "NQH6", "buy", 2, "market", "CLR-000401").ok
        assert settled(nt.broker, "CLR-000401") is not None
        assert nt.broker.close_position(FOLLOWER, "NQH6", "CLR-000402").ok
        assert settled(nt.broker, "CLR-000402") is not None
        nt.broker.close()
        again = adapter(tmp_path)  # a new process: the ledger says what it sent
        try:
            report = again.find_tag("CLR-000401")
            assert report is not None
            assert (report.state, report.account, report.filled_qty) == ("filled", FOLLOWER, 2)
            close = again.find_tag("CLR-000402")
            assert close is not None
            assert close.state == "filled"
        finally:
            again.close()
        shutil.rmtree(tmp_path / "copilink")  # no ledger: the order file alone answers
        third = adapter(tmp_path)
        try:
            report = third.find_tag("CLR-000401")
            assert report is not None
            assert (report.state, report.account) == ("filled", FOLLOWER)
            assert third.find_tag("CLR-000499") is None
        finally:
            third.close()
    finally:
        nt.close()


def test_a_disconnected_connection_file_disconnects_every_account(nt: NinjaHarness) -> None:
    assert account(nt.broker.snapshot(), LEADER).connected
    nt.standin.set_connected(False)
    assert wait_for(lambda: not any(a.connected for a in nt.broker.snapshot().accounts))
    assert not nt.broker.health().ok
    with pytest.raises(BrokerUnavailable, match="DISCONNECTED"):
        nt.broker.place_order(FOLLOWER, "NQH6", "buy", 1, "market", "CLR-000501")
    nt.standin.set_connected(True)
    assert wait_for(lambda: all(a.connected for a in nt.broker.snapshot().accounts))
    assert nt.received() == []


def test_a_named_connection_is_the_only_one_that_counts(tmp_path: Path) -> None:
    standin = NinjaTraderStandIn(tmp_path, [LEADER, FOLLOWER], connection="Playback")
    standin.set_connected(True)
    (tmp_path / "outgoing" / "Live.txt").write_text("DISCONNECTED")
    broker = adapter(tmp_path, connection="Live")
    try:
        assert not account(broker.snapshot(), FOLLOWER).connected
        assert "Live" in broker.health().detail
    finally:
        broker.close()
    broker = adapter(tmp_path)  # any connection: Playback is up
    try:
        assert account(broker.snapshot(), FOLLOWER).connected
    finally:
        broker.close()


def test_a_vanished_folder_disconnects_and_commands_are_unavailable(nt: NinjaHarness) -> None:
    nt.standin.stop()
    shutil.rmtree(nt.standin.outgoing)
    shutil.rmtree(nt.standin.incoming)
    assert wait_for(lambda: not account(nt.broker.snapshot(), FOLLOWER).connected)
    with pytest.raises(BrokerUnavailable, match="incoming"):
        nt.broker.close_position(FOLLOWER, None, "CLR-000601")
    nt.standin.incoming.mkdir()
    nt.standin.outgoing.mkdir()
    (nt.standin.outgoing / "Live.txt").write_text("CONNECTED")
    assert wait_for(lambda: account(nt.broker.snapshot(), FOLLOWER).connected)


def test_the_windows_default_folder_search_finds_onedrive(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("USERPROFILE", str(home))
    monkeypatch.delenv("OneDrive", raising=False)
    monkeypatch.setattr(Path, "home", lambda: home)
    with pytest.raises(BrokerUnavailable) as missing:
        find_folder(None, platform="win32")
    assert str(home / "Documents" / "NinjaTrader 8") in str(missing.value)
    assert str(home / "OneDrive" / "Documents" / "NinjaTrader 8") in str(missing.value)
    onedrive = home / "OneDrive" / "Documents" / "NinjaTrader 8"
    onedrive.mkdir(parents=True)
    assert find_folder(None, platform="win32") == onedrive
    (home / "Documents" / "NinjaTrader 8").mkdir(parents=True)
    assert find_folder(None, platform="win32") == home / "Documents" / "NinjaTrader 8"


def test_the_default_folder_elsewhere_is_documents_under_home(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Path, "home", lambda: tmp_path)
    broker = ninjatrader.create(Settings(ati_port=0), specs())
    with pytest.raises(BrokerUnavailable, match="no NinjaTrader 8 folder found"):
        broker.connect(timeout=1.0)
    folder = tmp_path / "Documents" / "NinjaTrader 8"
    (folder / "outgoing").mkdir(parents=True)
    with pytest.raises(BrokerUnavailable, match="incoming does not exist"):
        broker.connect(timeout=1.0)
    (folder / "incoming").mkdir()
    broker.connect(timeout=1.0)
    broker.close()
    broker.close()  # twice is fine
    assert broker.folder == folder


def test_settings_refuse_unknown_keys() -> None:
    with pytest.raises(pydantic.ValidationError):
        Settings.model_validate({"folder": "x", "api_key": "test-key-not-real"})
    defaults = Settings()
    assert (defaults.ati_host, defaults.ati_port, defaults.connection) == (
        "127.0.0.1", 36973, None)


def test_the_registry_builds_it_from_settings(tmp_path: Path) -> None:
    NinjaTraderStandIn(tmp_path, [FOLLOWER]).set_connected(True)
    broker = create_adapter("ninjatrader", {"folder": str(tmp_path), "ati_port": 0}, specs())
    assert isinstance(broker, NinjaTraderBroker)
    broker.connect(timeout=1.0)
    try:
        assert broker.health().ok
    finally:
        broker.close()


# --- the ATI socket ----------------------------------------------------------------------------


@pytest.fixture
def ati() -> Iterator[AtiStandIn]:
    server = AtiStandIn().start()
    yield server
    server.stop()


def test_ati_values_reach_balance_and_realized_pnl(nt: NinjaHarness, ati: AtiStandIn) -> None:
    ati.set_value(f"CashValue|{FOLLOWER}", "51234.5")
    ati.set_value(f"RealizedPnL|{FOLLOWER}", "-250.25")
    ati.set_value("CashValue|Someone Else", "1")
    broker = adapter(nt.standin.root, ati_port=ati.port, ati_retry=0.1)
    try:
        def money() -> tuple[float, float]:
            found = account(broker.snapshot(), FOLLOWER)
            return found.balance, found.realized_pnl

        assert wait_for(lambda: money() == (51234.5, -250.25))
        assert account(broker.snapshot(), LEADER).balance == 0.0  # unknown: no size either
        ati.set_value(f"CashValue|{FOLLOWER}", "NaN")
        assert wait_for(lambda: money() == (50000.0, -250.25))  # back to the spec's size
        nt.set_position(FOLLOWER, 1, 18000.0)
        assert wait_for(lambda: ["4", "NQ 03-26", "1"] in ati.received)
        ati.send_data(1, "NQ 03-26", "18001.25")
        ati.send_data(2, "NQ 03-26", "nan")
        assert wait_for(lambda: "NQH6" in broker.snapshot().quotes)
        quote = broker.snapshot().quotes["NQH6"]
        assert (quote.bid, quote.last) == (18001.25, None)
        ati.drop_clients()
        assert wait_for(lambda: ati.connections >= 2)  # it reconnects on its own
        ati.set_value(f"RealizedPnL|{FOLLOWER}", "10")
        assert wait_for(lambda: money()[1] == 10.0)
    finally:
        broker.close()


def test_an_unreachable_ati_socket_leaves_the_files_working(nt: NinjaHarness) -> None:
    server = AtiStandIn().start()
    port = server.port
    server.stop()
    broker = adapter(nt.standin.root, ati_port=port, ati_retry=0.1)
    try:
        assert account(broker.snapshot(), FOLLOWER).connected
        assert "ATI socket down" in broker.health().detail
        assert account(broker.snapshot(), FOLLOWER).balance == 50000.0
    finally:
        broker.close()


def test_a_position_in_a_contract_not_in_the_catalog_is_ignored_not_stale(
        nt: NinjaHarness, caplog: pytest.LogCaptureFixture) -> None:
    (nt.standin.outgoing / f"ZZQ 03-26 Globex_{FOLLOWER}_position.txt").write_text(
        "LONG;1;10.5")
    assert wait_for(lambda: "unknown instrument 'ZZQ 03-26 Globex'" in caplog.text)
    before = account(nt.broker.snapshot(), FOLLOWER).updated_at
    assert wait_for(lambda: account(nt.broker.snapshot(), FOLLOWER).updated_at != before)
    assert account(nt.broker.snapshot(), FOLLOWER).positions == ()
