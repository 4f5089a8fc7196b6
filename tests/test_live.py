"""Journal, alerts, scheduler, the run/demo/incidents/kill commands, and crash-restart."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from freezegun import freeze_time
from rich.console import Console

from copilink_rules.adapters import create_adapter
from copilink_rules.adapters.sim import SimBroker, SimCopier
from copilink_rules.alerts import Alert, Alerts, Webhook
from copilink_rules.cli import run
from copilink_rules.config import load_config
from copilink_rules.enforcer import Lock
from copilink_rules.errors import StateError
from copilink_rules.journal import Journal
from copilink_rules.live import DEMO_SCENARIO
from copilink_rules.scheduler import LiveRunner, daily_trigger, next_fire_times
from copilink_rules.session import Session
from copilink_rules.view import render

from .conftest import REPO
from .test_invariants import check_invariants


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    return run(list(argv), out, err), out.getvalue(), err.getvalue()


# --- journal --------------------------------------------------------------------------------

def test_journal_uses_wal_and_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    Journal(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="schema version 99 was written by a newer"):
        Journal(path)
    assert _open_files(path) == []  # refused, and closed: nothing left open behind the error
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = 'x1' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="no valid schema version"):
        Journal(path, read_only=True)
    assert _open_files(path) == []
    other = tmp_path / "prices.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE prices (symbol TEXT, price REAL)")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="not a copilink-rules journal"):
        Journal(other)
    assert _open_files(other) == []


def _open_files(path: Path) -> list[str]:
    """This process's open file descriptors on `path` (or its WAL and shared memory)."""
    fds = Path("/proc/self/fd")
    assert fds.is_dir(), "needs Linux's /proc"
    found = []
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):  # the directory's own descriptor is gone by now
            target = os.readlink(fd)
            if target.startswith(str(path)):
                found.append(target)
    return found


def test_journal_sequence_survives_a_reopen(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db")
    assert [journal.next_sequence() for _ in range(3)] == [1, 2, 3]
    journal.close()
    again = Journal(tmp_path / "j.db")
    assert again.next_sequence() == 4
    again.close()
    assert _open_files(tmp_path / "j.db") == []


# --- alerts ---------------------------------------------------------------------------------

class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        _Hook.received.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook_server() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    _Hook.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook"
    server.shutdown()
    server.server_close()


def test_webhooks_post_discord_and_telegram_bodies(webhook_server: str, tmp_path: Path) -> None:
    log_file = tmp_path / "alerts.log"
    alerts = Alerts(log_file=log_file, webhooks=[
        Webhook(webhook_server, "discord"), Webhook(webhook_server, "telegram", chat_id="42"),
        Webhook(webhook_server, "json", min_severity="critical")])
    moment = datetime(2026, 3, 2, 14, 30, tzinfo=UTC)
    alerts.send(Alert(moment, "critical", "F2 flattened", "F2", "stuck-follower"))
    alerts.send(Alert(moment, "warning", "F3 skipped", "F3"))
    alerts.flush()
    alerts.close()
    bodies = _Hook.received
    assert {"content": "14:30:00 [CRITICAL] F2 flattened"} in bodies
    assert {"chat_id": "42", "text": "14:30:00 [WARNING] F3 skipped"} in bodies
    assert [b for b in bodies if "severity" in b] == [{
        "time": "2026-03-02T14:30:00+00:00", "severity": "critical", "account": "F2",
        "rule": "stuck-follower", "message": "F2 flattened"}]
    assert len(bodies) == 5
    assert log_file.read_text().count("\n") == 2
    assert alerts.failures == []


class _Stuck(BaseHTTPRequestHandler):
    """A webhook that takes a request and does not answer until released."""

    started = threading.Event()
    release = threading.Event()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        _Stuck.started.set()
        _Stuck.release.wait(10)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_hanging_webhook_never_blocks_enforcement() -> None:
    _Stuck.started.clear()
    _Stuck.release.clear()
    server = HTTPServer(("127.0.0.1", 0), _Stuck)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    alerts = Alerts(webhooks=[Webhook(f"http://127.0.0.1:{server.server_port}/", "json")],
                    timeout=10)
    moment = datetime(2026, 3, 2, 14, 30, tzinfo=UTC)
    alerts.send(Alert(moment, "critical", "first"))
    assert _Stuck.started.wait(10)  # the webhook holds the first alert and does not answer
    for _ in range(20):  # enforcement goes on: each send returns while the webhook hangs
        alerts.send(Alert(moment, "critical", "still enforcing"))
    assert not _Stuck.release.is_set()
    _Stuck.release.set()
    alerts.flush(timeout=20)
    alerts.close()
    server.shutdown()
    server.server_close()
    assert alerts.failures == []


def test_an_unreachable_webhook_is_a_recorded_failure() -> None:
    # 10.255.255.1 is not routable: a connect hangs until the timeout
    alerts = Alerts(webhooks=[Webhook("http://10.255.255.1:9/hook", "discord")], timeout=3)
    alerts.send(Alert(datetime(2026, 3, 2, 14, 30, tzinfo=UTC), "critical", "still enforcing"))
    alerts.flush(timeout=10)
    assert alerts.failures
    assert alerts.failures[0].startswith("webhook http://10.255.255.1:9/hook:")
    alerts.close()


class _Refusing(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(500)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_refusing_webhook_and_an_unwritable_log_are_recorded_not_raised(
        tmp_path: Path) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/hook"
    alerts = Alerts(log_file=tmp_path / "no such folder" / "alerts.log",
                    webhooks=[Webhook(url, "json")])
    alerts.send(Alert(datetime(2026, 3, 2, 14, 30, tzinfo=UTC), "critical", "F2 flattened"))
    alerts.flush()
    alerts.close()
    server.shutdown()
    server.server_close()
    assert sorted(alerts.failures) == [
        f"log file {tmp_path / 'no such folder' / 'alerts.log'}: No such file or directory",
        f"webhook {url}: HTTP 500"]


# --- adapters registry ----------------------------------------------------------------------

def test_unknown_adapters_are_a_clear_lookup_error() -> None:
    with pytest.raises(LookupError, match=r"No broker adapter named 'tradovat' \(did you mean "
                                          r"'tradovate'\?\); known: sim, fake, ninjatrader, "
                                          "tradovate, projectx$"):
        create_adapter("tradovat", {})
    assert isinstance(create_adapter("sim", {"seed": 3}), SimBroker)


def test_the_registry_lists_only_adapters_that_exist() -> None:
    from copilink_rules.adapters.base import adapter_names, settings_model

    for name in adapter_names():
        assert settings_model(name).model_json_schema()  # importable, with its settings


# --- scheduler ------------------------------------------------------------------------------

def test_daily_jobs_fire_at_local_time_across_the_trading_day_boundary_and_dst() -> None:
    trigger = daily_trigger("18:00", "America/New_York")
    with freeze_time("2026-03-06 22:59:59", tz_offset=0):
        start = datetime.now(UTC)
        fires = next_fire_times(trigger, start, 4)
    # Friday 18:00 EST = 23:00 UTC; after the spring change on Sunday 8 March, 22:00 UTC
    assert [f.astimezone(UTC).isoformat() for f in fires] == [
        "2026-03-06T23:00:00+00:00", "2026-03-07T23:00:00+00:00",
        "2026-03-08T22:00:00+00:00", "2026-03-09T22:00:00+00:00"]
    with freeze_time("2026-10-31 21:00:00"):
        fires = next_fire_times(trigger, datetime.now(UTC), 2)
    assert [f.astimezone(UTC).isoformat() for f in fires] == [
        "2026-10-31T22:00:00+00:00", "2026-11-01T23:00:00+00:00"]


def test_the_scheduler_ticks_without_overlap_and_stops_cleanly() -> None:
    broker = create_adapter("sim", {"random_trades": 2, "seed": 5})
    assert isinstance(broker, SimBroker)
    session = Session(broker, Journal(":memory:"), Alerts(), [REPO / "rules" / "desync.yaml"],
                      before_tick=lambda: broker.advance(0.25))
    slow_ticks = []

    def slow() -> None:
        slow_ticks.append(time.perf_counter())
        time.sleep(0.05)  # longer than the 20 ms interval: runs must not pile up

    runner = LiveRunner(session, tick_seconds=0.02, reload_every=0, on_tick=slow,
                        should_stop=lambda: session.ticks >= 15)
    thread = threading.Thread(target=runner.run, kwargs={"install_signals": False})
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive()
    assert session.ticks >= 15
    gaps = [b - a for a, b in itertools.pairwise(slow_ticks)]
    assert min(gaps) >= 0.045  # never two at once
    assert runner.errors == []


def test_hot_reload_is_all_or_nothing(tmp_path: Path) -> None:
    rules = tmp_path / "mine.yaml"
    rules.write_text("ruleset: mine\nextends: [desync]\nparams: {stuck_grace: 2s}\nrules: []\n")
    broker = create_adapter("sim", {"seed": 2})
    session = Session(broker, Journal(":memory:"), Alerts(), [rules],
                      rules_path=[REPO / "rules"])
    session.tick()
    version = session.policy.version
    os.utime(rules, (time.time() + 5, time.time() + 5))
    rules.write_text("ruleset: mine\nextends: [desync]\nparams: {stuck_grace: two}\nrules: []\n")
    message = session.reload_if_changed()
    assert message is not None
    assert "the old rules stay in force" in message
    assert session.policy.version == version
    rules.write_text("ruleset: mine\nextends: [desync]\nparams: {stuck_grace: 4s}\nrules: []\n")
    os.utime(rules, (time.time() + 10, time.time() + 10))
    assert (session.reload_if_changed() or "").startswith("rules reloaded")
    assert session.policy.params["stuck_grace"].value == 4.0
    assert session.enforcer.policy is session.policy
    rules.write_text("ruleset: mine\nextends: [desync]\nparams: {stuck_grace: 4s, "
                     "entry_max_data_age: 3s}\nrules: []\n")
    os.utime(rules, (time.time() + 20, time.time() + 20))
    session.reload_if_changed()
    assert session.enforcer.entry_max_data_age == 3.0
    assert session.reload_if_changed() is None


def test_the_live_view_shows_accounts_links_positions_locks_and_decisions() -> None:
    broker = SimBroker(DEMO_SCENARIO)
    session = Session(broker, Journal(":memory:"), Alerts(), [REPO / "rules" / "desync.yaml"],
                      before_tick=lambda: broker.advance(0.25))
    session.start()
    console = Console(record=True, width=200)
    console.print(render(session, "view test"))
    assert "waiting for the first snapshot" in console.export_text()
    while broker.elapsed < 53:  # F1 is down (50-58 s), F4 was flattened and paused at 30 s
        session.tick()
    session.enforcer.locks["F2"] = Lock("F2", "halted", datetime(2026, 3, 2, 23, 0,
                                                                 tzinfo=UTC), "test", None)
    console = Console(record=True, width=200)
    console.print(render(session, "view test"))
    text = console.export_text()
    rows = {line.split("│")[1].strip(): line for line in text.splitlines()
            if line.count("│") > 5 and line.split("│")[1].strip() in ("LEAD", "F1", "F2",
                                                                       "F4")}
    assert "DOWN" in rows["F1"]
    assert "+1 NQH6" in rows["F1"]  # still holding: no order while it is down
    assert "halted until 23:00" in rows["F2"]
    assert "paused" in rows["F4"]
    assert "up" in rows["LEAD"]
    assert "opposite-position" in text  # the last decisions
    assert f"ticks {session.ticks}" in text


# --- commands -------------------------------------------------------------------------------

def test_demo_resolves_the_three_desyncs_and_prints_the_incident_report(tmp_path: Path) -> None:
    journal = tmp_path / "demo.db"
    code, out, err = cli("demo", "--speed", "40", "--no-view", "--journal", str(journal))
    assert code == 0, err
    assert "catching up long" in out
    assert "F3 still holds long 20 MNQH6 while leader LEAD is flat" in out
    assert "F4 is long 1 NQH6 against leader LEAD short 1 NQH6" in out
    assert "# Incident report" in out
    assert out.rstrip().endswith("copilink-rules resume F1 --config copilink.yaml")  # how
    db = Journal(journal)
    statuses = {(c.action, c.account): c.status for c in db.commands()}
    assert statuses[("catch_up", "F2")] == "confirmed"
    assert statuses[("flatten", "F3")] == "confirmed"
    assert statuses[("flatten", "F4")] == "confirmed"
    assert statuses[("pause_copier", "F4")] == "confirmed"
    code, md, _ = cli("incidents", "--db", str(journal))
    assert code == 0
    assert md.startswith("# Incident report")
    assert "opposite-position" in md
    code, csv_text, _ = cli("incidents", "--db", str(journal), "--format", "csv")
    assert csv_text.splitlines()[0] == "time,account,instrument,rule,severity,summary," \
        "positions,actions,commands"
    code, js, _ = cli("incidents", "--db", str(journal), "--format", "json",
                      "--since", "2030-01-01T00:00:00Z")
    assert json.loads(js) == []
    # the demo never deletes a file it is pointed at: it may be a real journal
    before = journal.read_bytes()
    code, _, err = cli("demo", "--speed", "40", "--no-view", "--journal", str(journal))
    assert (code, err.strip()) == (1, f"{journal} exists; the demo writes a new journal: name "
                                      "a file that does not exist yet (or leave out --journal)")
    assert journal.read_bytes() == before


def test_incidents_since_a_date_or_a_time_with_any_offset(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db")
    for hour in (13, 15):
        journal.incident(datetime(2026, 3, 2, hour, 0, tzinfo=UTC), "F1", "NQH6", "r",
                         "critical", f"at {hour}:00 UTC", {}, [])
    journal.close()

    def since(text: str) -> list[str]:
        code, out, _ = cli("incidents", "--db", str(tmp_path / "j.db"), "--format", "json",
                           "--since", text)
        assert code == 0
        return [i["summary"] for i in json.loads(out)]

    assert since("2026-03-02") == ["at 13:00 UTC", "at 15:00 UTC"]
    assert since("2026-03-02T14:00:00Z") == ["at 15:00 UTC"]
    assert since("2026-03-02T09:30:00-05:00") == ["at 15:00 UTC"]  # 14:30 UTC
    assert since("2026-03-03") == []
    code, _, err = cli("incidents", "--db", str(tmp_path / "j.db"), "--since", "yesterday")
    assert code == 2
    assert "'yesterday' is not a date or time" in err


def test_incidents_of_a_missing_journal_is_a_clear_error(tmp_path: Path) -> None:
    code, _, err = cli("incidents", "--db", str(tmp_path / "none.db"))
    assert code == 1
    assert "no such journal" in err


def test_another_program_s_sqlite_file_is_never_taken_for_a_journal(tmp_path: Path) -> None:
    other = tmp_path / "prices.db"
    with contextlib.closing(sqlite3.connect(other)) as db:
        db.execute("CREATE TABLE prices (symbol TEXT, price REAL)")
        db.commit()
    before = other.read_bytes()
    code, _, err = cli("incidents", "--db", str(other))
    assert code == 1
    assert err.strip() == f"{other} is not a copilink-rules journal (a SQLite file without " \
        "its tables): name another journal file"
    with pytest.raises(StateError, match="not a copilink-rules journal"):
        Journal(other)  # nor as the journal of a run
    assert other.read_bytes() == before  # untouched
    # a real journal is read without being written to, even while a session holds it open
    live = Journal(tmp_path / "live.db")
    live.incident(datetime(2026, 3, 2, 14, 30, tzinfo=UTC), "F1", "NQH6", "opposite-position",
                  "critical", "F1 against LEAD", {}, [])
    code, out, _ = cli("incidents", "--db", str(tmp_path / "live.db"), "--format", "json")
    assert code == 0
    assert [i["summary"] for i in json.loads(out)] == ["F1 against LEAD"]
    live.close()


def test_kill_command_creates_and_releases_the_kill_file(tmp_path: Path) -> None:
    kill = tmp_path / "copilink.kill"
    assert cli("kill", "--file", str(kill))[0] == 0
    assert kill.exists()
    assert cli("kill", "--file", str(kill), "--release")[0] == 0
    assert not kill.exists()


def test_run_refuses_a_journal_ahead_of_the_broker_and_bad_numbers(tmp_path: Path) -> None:
    journal = str(tmp_path / "j.db")
    base = ("run", "--rules", str(REPO / "rules" / "desync.yaml"), "--journal", journal,
            "--no-view", "--speed", "1000")
    assert cli(*base, "--duration", "5")[0] == 0
    # a fresh sim starts its clock again: the journal's session is ahead of it
    code, _, err = cli(*base, "--duration", "5")
    assert code == 1
    # the session ran 5 simulated seconds, or a little more: at 1000x a busy host reaches the
    # tick that ends it late (seen: 14:30:07)
    assert re.match(rf"the journal {re.escape(journal)} holds a session up to "
                    r"2026-03-02T14:30:(0[5-9]|[1-5]\d)", err), err
    assert "name a new journal (--journal)" in err
    for option, value in (("--speed", "-5"), ("--speed", "0"), ("--duration", "nan")):
        code, _, err = cli(*base, option, value)
        assert code == 2
        assert f"argument {option}: '{value}' must be a number above 0" in err


def test_run_rejects_an_unknown_broker_and_a_bad_config(tmp_path: Path) -> None:
    code, _, err = cli("run", "--broker", "tradovat", "--rules", str(REPO / "rules"))
    assert code == 2
    assert "No broker adapter named 'tradovat'" in err
    config = tmp_path / "copilink.yaml"
    config.write_text("broker: {name: sim}\ntick: 250ms\njournl: x.db\n")
    code, _, err = cli("run", "--config", str(config))
    assert code == 1
    assert err.strip() == f"{config}:3: journl: unknown field (did you mean 'journal'?)"
    config.write_text("accounts:\n  - {id: L, role: leader}\n"
                      "  - {id: F1, role: follower, instrument: MNQX}\n")
    code, _, err = cli("run", "--config", str(config))
    assert code == 1
    assert err.startswith(f"{config}:3: accounts[1].instrument: unknown instrument 'MNQX'")
    for line, message in [
        ('pre_session: "25:99"', "pre_session: '25:99' is not a time of day (HH:MM)"),
        ("timezone: Mars/Base", "timezone: unknown timezone 'Mars/Base' (use an IANA name "
                                "such as America/New_York)"),
    ]:
        config.write_text(f"tick: 250ms\n{line}\n")
        code, _, err = cli("run", "--config", str(config))
        assert (code, err.strip()) == (1, f"{config}:2: {message}")
    config.write_text('pre_session: "9:25"\n')
    assert load_config(config)[0].pre_session == "09:25"


CONFIG = """
broker:
  name: sim
  speed: 20
  settings:
    seed: 11
    trades:
      - {{at: 3, side: long, qty: 2, hold: 8}}
      - {{at: 16, side: short, qty: 1, hold: 10}}
      - {{at: 32, side: long, qty: 1, hold: 8}}
    faults:
      - {{kind: missed_exit, account: F2, trade: 0}}
      - {{kind: reversal, account: F1, at: 20}}
      - {{kind: missed_exit, account: F3, trade: 2}}
accounts:
  - {{id: LEAD, role: leader, firm: apex}}
  - {{id: F1, role: follower, firm: apex}}
  - {{id: F2, role: follower, firm: apex}}
  - {{id: F3, role: follower, firm: apex}}
rules: [{rules}]
journal: journal.db
kill_file: copilink.kill
"""


def test_run_survives_sigkill_and_resumes_without_resending(tmp_path: Path) -> None:
    rules = tmp_path / "lockout.yaml"
    rules.write_text(textwrap.dedent("""
        ruleset: lockout
        extends: [desync]
        rules:
          - id: lock-after-opposite
            scope: pair
            when: not leader.flat and not follower.flat and leader.side != follower.side
            for: 1s
            then:
              - lock_account: {state: reducing, until: next_trading_day}
    """))
    (tmp_path / "copilink.yaml").write_text(CONFIG.format(rules=rules))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "copilink_rules", "run", "--config", "copilink.yaml",
               "--sim-state", "sim.json", "--duration", "45", "--no-view",
               "--rules-path", str(REPO / "rules")]
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    journal = tmp_path / "journal.db"
    deadline = time.time() + 60
    while time.time() < deadline:  # wait for the lock (t = 21 s): mid-session
        if journal.exists() and _count(journal, "locks") > 0:
            break
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)
    first.communicate(timeout=10)
    assert first.returncode == -signal.SIGKILL
    before = _count(journal, "commands")
    assert before > 0
    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert second.returncode == 0, second.stderr
    assert "continuing from the journal" in second.stdout
    broker = SimBroker.load(tmp_path / "sim.json")
    assert check_invariants(broker) == []
    # no order twice: each tag once at the broker, and one flatten per desync episode
    tags = [(e["tag"], e.get("instrument")) for e in broker.log if e["tag"].startswith("CLR-")]
    assert len(tags) == len(set(tags))
    flattens = [(e["account"]) for e in broker.log if e.get("kind") == "flatten"]
    assert sorted(flattens) == ["F1", "F2", "F3"]
    # the lock taken before the crash is still there, and still enforced
    db = Journal(journal)
    assert [(lock["account"], lock["state"]) for lock in db.locks()] == [("F1", "reducing")]
    db.close()


def _count(path: Path, table: str) -> int:
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=1)) as db:
            return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    except sqlite3.Error:
        return 0


def test_the_pre_session_check_alerts_what_is_not_ready_or_says_ready() -> None:
    broker = SimBroker(DEMO_SCENARIO)
    session = Session(broker, Journal(":memory:"), Alerts(), [REPO / "rules" / "desync.yaml"])
    session.start()
    assert [d for d in session.pre_session_check() if d.suppressed is False] == []
    assert session.alerts.sent[-1].message == "pre-session check: READY (5 accounts)"
    SimCopier(broker).pause("F2", "manual")
    decisions = session.pre_session_check()
    assert [(d.rule, d.account) for d in decisions] == [("pre-session-copier-paused", "F2")]
    assert session.alerts.sent[-1].message.startswith(
        "pre-session: F2: copier is paused; resume it before the session")
    assert session.journal.count("alerts") == 2


SIGNAL_WHILE_LOCKED = textwrap.dedent("""
    import signal, sys
    from copilink_rules.adapters.sim import SimBroker, SimScenario
    from copilink_rules.alerts import Alerts
    from copilink_rules.journal import Journal
    from copilink_rules.scheduler import LiveRunner
    from copilink_rules.session import Session

    broker = SimBroker(SimScenario())
    session = Session(broker, Journal(":memory:"), Alerts(), [sys.argv[1]])
    session.start()
    runner = LiveRunner(session, tick_seconds=0.05)

    def on_tick():
        if runner.ticks_seen == 0:
            # the SIGTERM handler, run where a signal can land: while the thread it runs on
            # holds the stop Event's lock (the main thread inside Event.wait())
            handler = signal.getsignal(signal.SIGTERM)
            with runner.stopped._cond:
                handler(signal.SIGTERM, None)
        runner.ticks_seen += 1

    runner.ticks_seen = 0
    runner.on_tick = on_tick
    runner.run(install_signals=True)
    print("stopped cleanly")
""")


def test_a_sigterm_landing_while_the_run_waits_stops_it_and_never_deadlocks(
        tmp_path: Path) -> None:
    # The handler once called Event.set(): landing while the main thread held that Event's
    # lock inside wait(), it deadlocked, and the run kept ticking (and could send orders)
    # after the trader stopped it, holding the journal's lock for good.
    script = tmp_path / "signal_while_locked.py"
    script.write_text(SIGNAL_WHILE_LOCKED, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script), str(REPO / "rules" / "desync.yaml")],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert "stopped cleanly" in done.stdout
