"""The built-in copier (`copier: builtin`) in a real `copilink-rules run --config` process,
against each broker's protocol stand-in: one leader, three followers — F1 at ratio 1, F2 copying
NQ as MNQ micros, F3 at ratio 0.5 on an Apex 25K account whose 4-contract limit the leader's
add breaks. The leader is driven through the stand-in (entry, add, a stop placed by hand, exit)
and every check reads the stand-in's own record of what it received, or the journal.

On NinjaTrader the leader's stop cannot be mirrored: NT8's order files carry no instrument,
size or price for an order someone else placed (README, "What it cannot know"), so there the
test checks that the copier never invents one.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any, Protocol

import pytest

from .adapter_contract import wait_for
from .conftest import REPO
from .test_run_brokers import LEADER, Run

FOLLOWERS = ("F1", "F2", "F3")
PRICE = 18000.0
STOP, MOVED = 17950.0, 17975.0
# id, firm, size, ratio, contract kind ("micro": the micro of the leader's contract)
ACCOUNTS = ((LEADER, "apex", 50000, None, None), ("F1", "apex", 50000, 1.0, None),
            ("F2", "apex", 100000, 1.0, "micro"), ("F3", "apex", 25000, 0.5, None))
SIZES = {a[0]: a[2] for a in ACCOUNTS}


class CopyWorld(Protocol):
    """A started stand-in with a leader and three followers, as these tests drive it."""

    settings: dict[str, Any]
    env: dict[str, str]
    nq: str  # the leader's contract, in the form this adapter's config uses
    mnq: str  # its micro, likewise
    sees_manual_stops: bool

    def set_leader(self, qty: int) -> None: ...
    def place_leader_stop(self, qty: int, price: float) -> Any: ...
    def cancel_leader_stop(self, handle: Any) -> None: ...
    def quote(self) -> None: ...
    def held(self, account: str) -> dict[str, int]: ...
    def working_stops(self, account: str) -> int: ...
    def received(self) -> list[dict[str, Any]]: ...
    def stop(self) -> None: ...


class NinjaTraderCopyWorld:
    nq, mnq, sees_manual_stops = "NQ 03-26", "MNQ 03-26", False

    def __init__(self, root: Path) -> None:
        from .standins.ninjatrader import AtiStandIn, NinjaTraderStandIn

        # fills of 100 micros at NT8's pace of one state a step: a short step keeps it quick
        self.standin = NinjaTraderStandIn(root / "NinjaTrader 8", [LEADER, *FOLLOWERS],
                                          step=0.005).start()
        self.ati = AtiStandIn().start()  # quotes: an entry's price is checked against them
        self.settings = {"folder": str(root / "NinjaTrader 8"), "ati_port": self.ati.port}
        self.env: dict[str, str] = {}

    def set_leader(self, qty: int) -> None:
        self.standin.set_position(LEADER, "NQH6", qty, PRICE)

    def place_leader_stop(self, qty: int, price: float) -> Any:
        # what NT8 writes for an order placed in its own window: state only
        self.standin.write_order_file(LEADER, "manualstop1", "WORKING;0;0")
        return "manualstop1"

    def cancel_leader_stop(self, handle: Any) -> None:
        self.standin.write_order_file(LEADER, handle, "CANCELLED;0;0")

    def quote(self) -> None:
        for name in (self.nq, self.mnq):
            for kind, price in ((0, PRICE + 0.25), (1, PRICE), (2, PRICE)):
                self.ati.send_data(kind, name, str(price))

    def held(self, account: str) -> dict[str, int]:
        with self.standin._lock:
            return {s: q for (a, s), (q, _) in self.standin.positions.items()
                    if a == account and q}

    def working_stops(self, account: str) -> int:
        with self.standin._lock:
            return sum(1 for o in self.standin.orders.values() if o.account == account and
                       o.type == "stop" and o.state not in ("FILLED", "CANCELLED", "REJECTED"))

    def received(self) -> list[dict[str, Any]]:
        out = []
        for c in list(self.standin.received):
            entry = dict(c)
            if entry["kind"] == "place":
                entry["contract"] = "micro" if entry["instrument"].startswith("M") else "mini"
            out.append(entry)
        return out

    def stop(self) -> None:
        self.ati.stop()
        self.standin.stop()


class TradovateCopyWorld:
    nq, mnq, sees_manual_stops = "NQH6", "MNQH6", True

    def __init__(self, root: Path) -> None:
        from .standins.tradovate import PASSWORD, SEC, USER, TradovateStandIn

        self.standin = TradovateStandIn(
            {LEADER: 101, "F1": 102, "F2": 103, "F3": 104}).start()
        for account, size in SIZES.items():
            self.standin.set_cash(account, float(size))
        self.settings = {"rest_url": self.standin.rest_url, "ws_url": self.standin.ws_url,
                         "md_url": self.standin.md_url, "username": USER,
                         "app_id": "copilink-test", "cid": 1234, "device_id": "test-device"}
        self.env = {"TRADOVATE_PASSWORD": PASSWORD, "TRADOVATE_SEC": SEC}

    def set_leader(self, qty: int) -> None:
        self.standin.set_position(LEADER, "NQH6", qty, PRICE)

    def place_leader_stop(self, qty: int, price: float) -> Any:
        return self.standin.place_manual_order(LEADER, "NQH6", "Sell", qty, price)

    def cancel_leader_stop(self, handle: Any) -> None:
        self.standin.cancel_manual_order(handle)

    def quote(self) -> None:
        for name in (self.nq, self.mnq):
            self.standin.push_quote(name, PRICE, PRICE + 0.25, PRICE)

    def held(self, account: str) -> dict[str, int]:
        aid, names = self.standin.accounts[account], self.standin.contracts
        return {names[p["contractId"]]: p["netPos"] for p in
                list(self.standin.positions.values()) if p["accountId"] == aid and p["netPos"]}

    def working_stops(self, account: str) -> int:
        aid = self.standin.accounts[account]
        return sum(1 for o in list(self.standin.orders.values()) if o["accountId"] == aid and
                   o["ordStatus"] == "Working" and
                   self.standin.versions[o["id"]]["orderType"] == "Stop")

    def received(self) -> list[dict[str, Any]]:
        out = []
        for c in self.standin.commands():
            body = c.pop("body")
            if c["kind"] == "place":
                c["contract"] = "micro" if str(body.get("symbol")).startswith("M") else "mini"
                c["stop_price"] = body.get("stopPrice")
            out.append(c)
        return out

    def stop(self) -> None:
        self.standin.stop()


class ProjectXCopyWorld:
    nq, mnq, sees_manual_stops = "CON.F.US.ENQ.H26", "CON.F.US.MNQ.H26", True

    def __init__(self, root: Path) -> None:
        from .standins.projectx import API_KEY, USERNAME, ProjectXStandIn

        self.standin = ProjectXStandIn({LEADER: 101, "F1": 102, "F2": 103, "F3": 104})
        for account, size in SIZES.items():
            self.standin.accounts[account]["balance"] = float(size)
        self.standin.start()
        self.settings = {"api_url": self.standin.api_url,
                         "user_hub_url": self.standin.hub_url("user"),
                         "market_hub_url": self.standin.hub_url("market"),
                         "username": USERNAME, "api_key_env": "PROJECTX_TEST_KEY"}
        self.env = {"PROJECTX_TEST_KEY": API_KEY}

    def set_leader(self, qty: int) -> None:
        self.standin.set_position(LEADER, self.nq, qty, PRICE)

    def place_leader_stop(self, qty: int, price: float) -> Any:
        return self.standin.place_manual_order(LEADER, self.nq, "sell", qty, price)

    def cancel_leader_stop(self, handle: Any) -> None:
        self.standin.cancel_manual_order(handle)

    def quote(self) -> None:
        for contract in (self.nq, self.mnq):
            self.standin.push_quote(contract, {"bestBid": PRICE, "bestAsk": PRICE + 0.25,
                                               "lastPrice": PRICE})

    def held(self, account: str) -> dict[str, int]:
        aid = self.standin.account_id(account)
        with self.standin._lock:
            return {c: q for (a, c), (q, _) in self.standin.positions.items() if a == aid and q}

    def working_stops(self, account: str) -> int:
        aid = self.standin.account_id(account)
        with self.standin._lock:
            return sum(1 for o in self.standin.orders.values() if o["accountId"] == aid and
                       o["type"] == 4 and o["status"] in (1, 6))

    def received(self) -> list[dict[str, Any]]:
        out = []
        for c in self.standin.commands:
            entry = dict(c)
            if entry["kind"] == "place":
                entry["contract"] = "micro" if ".MNQ." in entry["contract"] else "mini"
            out.append(entry)
        return out

    def stop(self) -> None:
        self.standin.stop()


WORLDS: dict[str, Callable[[Path], CopyWorld]] = {
    "ninjatrader": NinjaTraderCopyWorld, "tradovate": TradovateCopyWorld,
    "projectx": ProjectXCopyWorld}


class Ticker:
    """A market that keeps quoting (every 0.2 s), as a real one does."""

    def __init__(self, world: CopyWorld) -> None:
        self.world = world
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="quotes")
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            try:
                self.world.quote()
            except Exception:  # noqa: BLE001 - a stand-in stopping under the ticker
                return
            self.done.wait(0.2)

    def stop(self) -> None:
        self.done.set()
        self.thread.join(5)


@pytest.fixture(params=list(WORLDS))
def copy_world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, CopyWorld]]:
    made = WORLDS[request.param](tmp_path)
    ticker = Ticker(made)
    yield request.param, made
    ticker.stop()
    made.stop()


def write_copier_config(path: Path, broker: str, world: CopyWorld) -> None:
    settings = ", ".join(f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}"
                         for k, v in world.settings.items())
    rows = []
    for account, firm, size, ratio, contract in ACCOUNTS:
        row = f"id: {account}, role: {'leader' if ratio is None else 'follower'}, firm: {firm}"
        row += f", size: {size}"
        if ratio is not None:
            row += f", ratio: {ratio}"
        if contract == "micro":
            row += f", instrument: {world.mnq!r}"
        rows.append(f"  - {{{row}}}")
    accounts = "\n".join(rows)
    path.write_text(textwrap.dedent(f"""\
        broker:
          name: {broker}
          settings: {{{settings}}}
        copier: builtin
        accounts:
        """) + accounts + textwrap.dedent(f"""
        rules: [{REPO / "rules" / "firms" / "apex.yaml"}]
        # apex_flat_by 18:00 makes the flat-by window [18:00, 18:00) empty: the test must not
        # depend on the hour it runs at
        params: {{missed_entry_grace: 500ms, apex_flat_by: "18:00"}}
        kill_file: null
        tick: 100ms
        """))


def copying(follower: str, verb: str, journal: Path) -> None:
    """`copilink-rules pause|resume F1 --journal ...`, a second process beside the run."""
    done = subprocess.run([sys.executable, "-m", "copilink_rules", verb, follower,
                           "--journal", str(journal)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def journal_rows(journal: Path) -> list[dict[str, Any]]:
    """The built-in copier's rows of the journal's `commands` table, oldest first."""
    with closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5)) as db:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute("SELECT * FROM commands WHERE rule = 'copier' "
                                            "ORDER BY rowid")]
    for row in rows:
        row["args"] = json.loads(row["args"])
    return rows


def to(world: CopyWorld, account: str, kind: str = "place",
       order_type: str | None = "market") -> list[dict[str, Any]]:
    return [c for c in world.received() if c["account"] == account and c["kind"] == kind and
            (order_type is None or c.get("type") == order_type)]


def signed(orders: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(o["contract"], o["qty"] if o["side"] == "buy" else -o["qty"]) for o in orders]


def test_builtin_copier_copies_each_follower_in_its_own_contract_on_the_real_protocol(
        copy_world: tuple[str, CopyWorld], tmp_path: Path) -> None:
    broker, world = copy_world
    config, journal, log = tmp_path / "copilink.yaml", tmp_path / "j.db", tmp_path / "run.log"
    write_copier_config(config, broker, world)
    run = Run(config, journal, world.env, log)

    def copied(expected: dict[str, list[tuple[str, int]]]) -> bool:
        return all(signed(to(world, f)) == want for f, want in expected.items())

    def settled(more: int = 3) -> None:
        """A few ticks more: time for anything that would wrongly go out."""
        run.wait_ticking(more)

    try:
        run.wait_ticking()
        # --- trade 1: entry 4, add 6 (F3's copy cut by Apex 25K's limit of 4) ---------------
        world.set_leader(4)
        trade1 = {"F1": [("mini", 4)], "F2": [("micro", 40)], "F3": [("mini", 2)]}
        assert wait_for(lambda: copied(trade1), 20), (world.received(), log.read_text())
        assert wait_for(lambda: world.held("F3"), 10)
        settled()
        world.set_leader(10)
        trade1 = {"F1": [("mini", 4), ("mini", 6)], "F2": [("micro", 40), ("micro", 60)],
                  "F3": [("mini", 2), ("mini", 2)]}
        assert wait_for(lambda: copied(trade1), 20), (world.received(), log.read_text())
        held = {"F1": 10, "F2": 100, "F3": 4}
        assert wait_for(lambda: all(sum(world.held(f).values()) == q for f, q in held.items()),
                        10), {f: world.held(f) for f in FOLLOWERS}
        # --- the leader protects the trade with a stop placed by hand ----------------------
        stop = world.place_leader_stop(10, STOP)
        if world.sees_manual_stops:
            want = {"F1": 10, "F2": 100, "F3": 4}  # F3: 5 at ratio 0.5, capped at the 4 held
            assert wait_for(lambda: all(len(to(world, f, order_type="stop")) == 1
                                        for f in FOLLOWERS), 20), log.read_text()
            for follower, qty in want.items():
                [copy] = to(world, follower, order_type="stop")
                assert (copy["side"], copy["qty"], copy["stop_price"]) == ("sell", qty, STOP)
                assert copy["contract"] == ("micro" if follower == "F2" else "mini")
            assert wait_for(lambda: all(world.working_stops(f) == 1 for f in FOLLOWERS), 10)
            # the leader moves its stop: each copy is cancelled, then placed at the new price
            world.cancel_leader_stop(stop)
            stop = world.place_leader_stop(10, MOVED)
            assert wait_for(lambda: all(len(to(world, f, order_type="stop")) == 2 and
                                        len(to(world, f, "cancel", None)) == 1
                                        for f in FOLLOWERS), 20), log.read_text()
            for follower, qty in want.items():
                moved = to(world, follower, order_type="stop")[-1]
                assert (moved["side"], moved["qty"], moved["stop_price"]) == ("sell", qty, MOVED)
            assert wait_for(lambda: all(world.working_stops(f) == 1 for f in FOLLOWERS), 10)
        settled()
        # --- SIGKILL mid-trade, restart on the same journal: nothing goes out again ---------
        before = world.received()
        run.kill()
        run = Run(config, journal, world.env, log)
        run.wait_ticking(10)
        assert world.received() == before, log.read_text()
        # --- the leader exits: every follower is closed, its copied stop goes with it -------
        world.cancel_leader_stop(stop)
        world.set_leader(0)
        assert wait_for(lambda: all(len(to(world, f, "close", None)) == 1 for f in FOLLOWERS),
                        20), (world.received(), log.read_text())
        assert wait_for(lambda: not any(world.held(f) for f in FOLLOWERS), 10), \
            {f: world.held(f) for f in FOLLOWERS}
        assert wait_for(lambda: not any(world.working_stops(f) for f in FOLLOWERS), 10)
        settled()

        # --- trade 2 with F1 paused from a second process: no copy to F1 -------------------
        copying("F1", "pause", journal)
        settled(2)
        world.set_leader(2)
        trade2 = {"F1": trade1["F1"], "F2": [*trade1["F2"], ("micro", 20)],
                  "F3": [*trade1["F3"], ("mini", 1)]}
        assert wait_for(lambda: copied(trade2), 20), (world.received(), log.read_text())
        time.sleep(0.8)  # past missed_entry_grace: no rule catches F1 up while it is paused
        settled()
        assert copied(trade2)
        assert world.held("F1") == {}
        world.set_leader(0)
        assert wait_for(lambda: all(len(to(world, f, "close", None)) == 2 for f in ("F2", "F3")),
                        20), (world.received(), log.read_text())
        settled()
        # --- resumed: F1 gets the next entry; SIGKILL the moment F1's copy reaches the
        # broker (F2's and F3's may or may not be out yet): after the restart each follower
        # holds exactly one copy of it
        copying("F1", "resume", journal)
        settled(2)
        world.set_leader(2)
        assert wait_for(lambda: len(to(world, "F1")) > len(trade2["F1"]), 20), log.read_text()
        run.kill()
        run = Run(config, journal, world.env, log)
        run.wait_ticking(5)
        trade3 = {"F1": [*trade2["F1"], ("mini", 2)], "F2": [*trade2["F2"], ("micro", 20)],
                  "F3": [*trade2["F3"], ("mini", 1)]}
        assert wait_for(lambda: copied(trade3), 20), (world.received(), log.read_text())
        time.sleep(0.8)  # past missed_entry_grace: no catch-up on top of a copy
        settled()
        assert copied(trade3), world.received()
        world.set_leader(0)
        assert wait_for(lambda: len(to(world, "F1", "close", None)) == 2 and
                        all(len(to(world, f, "close", None)) == 3 for f in ("F2", "F3")),
                        20), (world.received(), log.read_text())
        assert wait_for(lambda: not any(world.held(f) for f in FOLLOWERS), 10)
        settled()
    finally:
        if run.process.poll() is None:
            # SIGKILL, not SIGTERM: a SIGTERM can deadlock the run (scheduler.py's handler sets
            # a threading.Event from the signal handler), which would fail this test on a race
            run.kill()

    received = world.received()
    # never an order to the leader; nothing beyond the copies above
    assert [c for c in received if c["account"] == LEADER] == []
    assert copied(trade3)
    stops = 2 if world.sees_manual_stops else 0  # placed, then moved
    for follower in FOLLOWERS:
        assert len(to(world, follower, order_type="stop")) == stops
        assert len(to(world, follower, "close", None)) == (2 if follower == "F1" else 3)
    # each order its own tag, the copier's
    tags = [c["tag"] for c in received if c.get("tag")]
    assert all(t.startswith("CLR-") for t in tags), tags
    assert [t for t, n in Counter(tags).items() if n > 1] == []
    assert len(tags) >= sum(1 for c in received if c["kind"] == "place")
    # the journal: F3's add cut by the gate, every order of the copier's, rule "copier"
    rows = journal_rows(journal)
    [cut] = [r for r in rows if r["account"] == "F3" and "reduced_from" in r["args"]]
    assert (cut["action"], cut["args"]["reduced_from"], cut["args"]["qty"]) == ("copy", 3, 2)
    assert cut["args"]["target"] == 5  # 10 x 0.5, of which Apex 25K allows 4 in all
    assert cut["args"]["reduced_because"].startswith("reduced from 3 to 2: apex allows 4")
    paused = [r for r in rows if r["account"] == "F1" and r["status"] == "not_copied"]
    assert paused
    assert all("paused" in r["reason"] for r in paused)
    # "lost": journaled, then SIGKILLed before it went out (copied afresh after the restart)
    sent = [r for r in rows if r["action"] in ("copy", "copy_stop") and
            r["status"] not in ("not_copied", "blocked", "lost")]
    assert len(sent) == sum(1 for c in received if c["kind"] in ("place", "close"))
    assert {r["action"] for r in rows} <= {"copy", "copy_stop", "copy_stop_cancel"}
    # the stops each follower's copier cancelled: its first when the leader moved it; at the
    # exit the leader's stop and position go in two steps, so the copy of the moved stop is
    # either cancelled too (a tick saw the stop go first) or goes with the close (a tick saw
    # both at once). A cancel left unanswered is sent again for the same order.
    cancelled: dict[str, set[str]] = {}
    for r in rows:
        if r["action"] == "copy_stop_cancel":
            cancelled.setdefault(r["account"], set()).add(r["args"]["order_id"])
    if stops:
        assert set(cancelled) == set(FOLLOWERS), cancelled
        assert all(len(ids) in (1, 2) for ids in cancelled.values()), cancelled
    else:
        assert cancelled == {}
    text = log.read_text()
    assert "Traceback" not in text
    assert "copier: builtin" in text
