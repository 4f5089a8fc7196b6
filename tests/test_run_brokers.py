"""`copilink-rules run --config` against each broker's protocol stand-in, as a trader runs it:
a separate process, the desync rules, the journal on disk. In one session it must send nothing
while the followers are in line (a follower a moment behind the leader is normal copy lag),
flatten a stuck follower once after the grace, flatten an opposite one, never touch the
leader, and — killed with SIGKILL and started again on the same journal — send nothing twice.
Every check reads the stand-in's own record of what it received."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any, Protocol

import pytest

from .adapter_contract import wait_for
from .conftest import REPO

LEADER, FOLLOWERS = "LEAD", ("F1", "F2")


class World(Protocol):
    """A started stand-in, as the session test needs it."""

    settings: dict[str, Any]
    env: dict[str, str]

    def set_position(self, account: str, qty: int) -> None: ...
    def received(self) -> list[dict[str, Any]]: ...
    def stop(self) -> None: ...


class NinjaTraderWorld:
    def __init__(self, root: Path) -> None:
        from .standins.ninjatrader import NinjaTraderStandIn

        self.standin = NinjaTraderStandIn(root / "NinjaTrader 8", [LEADER, *FOLLOWERS]).start()
        self.standin.set_connected(True)
        self.settings = {"folder": str(root / "NinjaTrader 8"), "ati_port": 0}
        self.env: dict[str, str] = {}

    def set_position(self, account: str, qty: int) -> None:
        self.standin.set_position(account, "NQH6", qty, 18000.0)

    def received(self) -> list[dict[str, Any]]:
        return list(self.standin.received)

    def stop(self) -> None:
        self.standin.stop()


class TradovateWorld:
    def __init__(self, root: Path) -> None:
        from .standins.tradovate import PASSWORD, SEC, USER, TradovateStandIn

        self.standin = TradovateStandIn({LEADER: 101, "F1": 102, "F2": 103}).start()
        self.settings = {"rest_url": self.standin.rest_url, "ws_url": self.standin.ws_url,
                         "md_url": self.standin.md_url, "username": USER,
                         "app_id": "copilink-test", "cid": 1234, "device_id": "test-device"}
        self.env = {"TRADOVATE_PASSWORD": PASSWORD, "TRADOVATE_SEC": SEC}

    def set_position(self, account: str, qty: int) -> None:
        self.standin.set_position(account, "NQH6", qty, 18000.0)

    def received(self) -> list[dict[str, Any]]:
        return self.standin.commands()

    def stop(self) -> None:
        self.standin.stop()


class ProjectXWorld:
    def __init__(self, root: Path) -> None:
        from .standins.projectx import API_KEY, USERNAME, ProjectXStandIn

        self.standin = ProjectXStandIn({LEADER: 101, "F1": 102, "F2": 103}).start()
        self.settings = {"api_url": self.standin.api_url,
                         "user_hub_url": self.standin.hub_url("user"),
                         "market_hub_url": self.standin.hub_url("market"),
                         "username": USERNAME, "api_key_env": "PROJECTX_TEST_KEY"}
        self.env = {"PROJECTX_TEST_KEY": API_KEY}

    def set_position(self, account: str, qty: int) -> None:
        self.standin.set_position(account, "CON.F.US.ENQ.H26", qty, 18000.0)

    def received(self) -> list[dict[str, Any]]:
        return [dict(c) for c in self.standin.commands]

    def stop(self) -> None:
        self.standin.stop()


WORLDS: dict[str, Callable[[Path], World]] = {
    "ninjatrader": NinjaTraderWorld, "tradovate": TradovateWorld, "projectx": ProjectXWorld}


@pytest.fixture(params=list(WORLDS))
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, World]]:
    made = WORLDS[request.param](tmp_path)
    yield request.param, made
    made.stop()


def write_config(path: Path, broker: str, world: World) -> None:
    settings = ", ".join(f"{k}: {v!r}" if isinstance(v, str) else f"{k}: {v}"
                         for k, v in world.settings.items())
    path.write_text(textwrap.dedent(f"""
        broker:
          name: {broker}
          settings: {{{settings}}}
        accounts:
          - {{id: {LEADER}, role: leader}}
          - {{id: F1, role: follower, leader: {LEADER}}}
          - {{id: F2, role: follower, leader: {LEADER}}}
        rules: [{REPO / "rules" / "desync.yaml"}]
        kill_file: null
        tick: 250ms
    """))


class Run:
    """`copilink-rules run` in its own process."""

    def __init__(self, config: Path, journal: Path, env: dict[str, str], log: Path) -> None:
        self.log = log.open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "copilink_rules", "run", "--config", str(config),
             "--journal", str(journal), "--duration", "120", "--no-view"],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **env},
            cwd=config.parent)
        self.journal = journal

    def ticks(self) -> int:
        try:
            with closing(sqlite3.connect(f"file:{self.journal}?mode=ro", uri=True,
                                         timeout=1)) as db:
                return int(db.execute("SELECT COUNT(*) FROM ticks").fetchone()[0])
        except sqlite3.Error:
            return 0

    def wait_ticking(self, more: int = 4) -> None:
        start = self.ticks()
        assert wait_for(lambda: self.ticks() >= start + more or self.process.poll() is not None,
                        60), "the run never started ticking"
        assert self.process.poll() is None, "run exited"

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.log.close()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(20)
        self.log.close()
        return code


def closes(world: World, account: str) -> list[dict[str, Any]]:
    return [c for c in world.received() if c["kind"] == "close" and c["account"] == account]


def test_a_session_is_corrected_on_the_real_protocol_and_survives_a_sigkill(
        world: tuple[str, World], tmp_path: Path) -> None:
    broker, stand_in = world
    config, journal, log = tmp_path / "copilink.yaml", tmp_path / "j.db", tmp_path / "run.log"
    write_config(config, broker, stand_in)
    run = Run(config, journal, stand_in.env, log)
    try:
        run.wait_ticking()
        # a quiet session, then an entry copied with normal lag: nothing is sent
        stand_in.set_position(LEADER, 2)
        stand_in.set_position("F1", 2)
        time.sleep(0.6)
        stand_in.set_position("F2", 2)
        run.wait_ticking(8)
        assert stand_in.received() == [], log.read_text()
        # the leader exits; F2 follows at once, F1 is stuck: one close to F1 after the grace
        stand_in.set_position(LEADER, 0)
        stand_in.set_position("F2", 0)
        assert wait_for(lambda: len(closes(stand_in, "F1")) == 1, 20), log.read_text()
        run.wait_ticking(6)
        # SIGKILL, then a restart on the same journal: the close is not sent again
        run.kill()
        run = Run(config, journal, stand_in.env, log)
        run.wait_ticking(12)
        assert len(closes(stand_in, "F1")) == 1, log.read_text()
        # an opposite position: F1 short while the leader is long, flattened
        stand_in.set_position(LEADER, 1)
        stand_in.set_position("F2", 1)
        stand_in.set_position("F1", -1)
        assert wait_for(lambda: len(closes(stand_in, "F1")) == 2, 20), log.read_text()
        run.wait_ticking(6)
    finally:
        if run.process.poll() is None:
            run.stop()
    received = stand_in.received()
    assert [c for c in received if c["account"] in (LEADER, "F2")] == [], received
    assert [c["kind"] for c in received if c["account"] == "F1"] in (
        ["close", "close"], ["close", "cancel", "close", "cancel"], ["close", "close", "cancel"])
    text = log.read_text()
    assert "Traceback" not in text
    assert "copier: external" in text
    assert "ACT NOW: pause copying onto F1" in text  # the opposite position's pause


# --- connect, --duration, --record --------------------------------------------------------------

def cli(*argv: str) -> tuple[int, str, str]:
    import io

    from copilink_rules.cli import run

    out, err = io.StringIO(), io.StringIO()
    code = run(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def test_connect_prints_what_the_broker_shows(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    made = TradovateWorld(tmp_path)
    try:
        for name, value in made.env.items():
            monkeypatch.setenv(name, value)
        made.set_position("F1", -2)
        config = tmp_path / "copilink.yaml"
        write_config(config, "tradovate", made)
        code, out, err = cli("connect", "--config", str(config))
        assert (code, err) == (0, "")
        lines = {line.split()[0]: line for line in out.splitlines()[2:]}
        assert set(lines) == {LEADER, "F1", "F2"}
        assert "NQH6 -2 @ 18000" in lines["F1"]
        assert " flat;" in lines[LEADER]
        assert "connected" in lines["F2"]
        assert made.received() == []  # read-only
    finally:
        made.stop()


def test_connect_says_exactly_what_failed_and_never_shows_the_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from .standins.projectx import API_KEY

    made = ProjectXWorld(tmp_path)
    try:
        monkeypatch.setenv("PROJECTX_TEST_KEY", API_KEY)
        made.settings["username"] = "someone@example.com"
        config = tmp_path / "copilink.yaml"
        write_config(config, "projectx", made)
        code, out, err = cli("connect", "--config", str(config))
        assert code == 1
        assert "check the username" in err
        assert API_KEY not in out + err
        assert len(err.strip().splitlines()) == 1
    finally:
        made.stop()
    made.settings["username"] = "trader-test"
    write_config(config, "projectx", made)  # the stand-in is stopped: nothing listens
    code, _, err = cli("connect", "--config", str(config), "--timeout", "3")
    assert code == 1
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_run_stops_after_duration_on_a_broker_and_records_a_replayable_timeline(
        tmp_path: Path) -> None:
    config = tmp_path / "copilink.yaml"
    config.write_text(textwrap.dedent(f"""
        broker: {{name: fake}}
        accounts:
          - {{id: {LEADER}, role: leader}}
          - {{id: F1, role: follower}}
        rules: [{REPO / "rules" / "desync.yaml"}]
        kill_file: null
    """))
    record = tmp_path / "day.jsonl"
    code, out, err = cli("run", "--config", str(config), "--journal", str(tmp_path / "j.db"),
                         "--duration", "1.5", "--record", str(record), "--no-view")
    assert (code, err) == (0, "")
    assert "copier: external" in out
    lines = record.read_text().splitlines()
    assert len(lines) >= 3
    code, out, err = cli("replay", "--rules", str(REPO / "rules" / "desync.yaml"),
                         "--format", "jsonl", str(record))
    assert (code, err) == (0, "")
