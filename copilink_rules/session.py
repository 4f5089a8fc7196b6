"""A live session: each tick reads a snapshot from the broker, evaluates the rules, journals
everything, and lets the enforcer act. The scheduler (scheduler.py) calls `tick` on a timer;
tests and benchmarks call it in a loop.

Order within a tick, chosen for crash safety: the decisions are journaled first; each command
is journaled as `sending` before it goes out and updated with the broker's answer; the
engine's state is saved last. A crash at any point leaves either a command the journal knows
about (and the restarted enforcer asks the broker about it by tag) or an engine state from
before the tick (and the rule fires again, meeting the outstanding command instead of sending
a second one).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .adapters.base import Broker, CopierPort
from .alerts import Alert, Alerts
from .calendar import Calendar
from .copier import BuiltinCopier, make_copier
from .enforcer import Enforcer, KillSwitch
from .engine import Engine
from .errors import CopilinkError, StateError
from .instruments import Catalog, default_catalog
from .journal import Journal
from .model import Decision, Snapshot, snapshot_digest
from .rules.loader import Policy, expand_paths, load_policy

log = logging.getLogger("copilink_rules.session")


@dataclass
class Session:
    broker: Broker
    journal: Journal
    alerts: Alerts
    rules: Sequence[str | Path]
    overrides: dict[str, str] = field(default_factory=dict)
    rules_path: Sequence[str | Path] = ()
    dry_run: bool = False
    kill_switch: KillSwitch = field(default_factory=KillSwitch)
    catalog: Catalog = field(default_factory=default_catalog)
    calendar: Calendar | None = None
    before_tick: Callable[[], None] | None = None  # e.g. advance the sim's clock
    # after a tick's commands went out, before the engine's state is saved: e.g. save the sim,
    # so a crash never leaves the broker's clock behind the journal's
    after_commands: Callable[[], None] | None = None
    on_command: Callable[[str, str, str], None] | None = None
    # account -> the contract it trades, over what the broker knows (copilink.yaml's wins)
    contracts: dict[str, str] = field(default_factory=dict)
    # who copies: the sim's own copier on the sim broker, else one only the trader can steer
    copier: CopierPort | None = None

    def __post_init__(self) -> None:
        self.policy: Policy = load_policy(self.rules, self.overrides, self.rules_path)
        self.engine = Engine(self.policy, self.catalog, self.calendar)
        if self.copier is None:
            self.copier = make_copier("sim" if self.broker.name == "sim" else "external",
                                      self.broker)
        self.enforcer = Enforcer(self.broker, self.journal, self.alerts, self.policy,
                                 copier=self.copier, dry_run=self.dry_run,
                                 kill_switch=self.kill_switch, catalog=self.catalog,
                                 calendar=self.calendar, on_command=self.on_command,
                                 contracts={**self._broker_contracts(), **self.contracts},
                                 locks=self.engine.lock_book)  # one book: the engine's
        self.enforcer.still_wanted = lambda action: self.engine.episode_live(
            action.rule, action.account, action.instrument)
        # copilink-rules' own copier: it copies after the rules' commands each tick
        self.builtin = self.copier if isinstance(self.copier, BuiltinCopier) else None
        if self.builtin is not None:
            self.builtin.attach(self.enforcer)
        # why enforcement stopped for good (the journal cannot be written): never act
        # unjournaled
        self.stopped: str | None = None
        self._last_problem: str | None = None
        self._copier_problem: str | None = None
        self._copier_saved: dict[str, Any] | None = None
        self._health: str | None = None
        self.recent: deque[Decision] = deque(maxlen=12)
        self.last_snapshot: Snapshot | None = None
        self.ticks = 0
        self._tick_lock = threading.Lock()
        self._mtimes = self._rule_mtimes()

    def _broker_contracts(self) -> dict[str, str]:
        try:
            return dict(self.broker.contracts())
        except Exception as exc:  # noqa: BLE001 - without them, copilink.yaml's contracts do
            log.warning("the broker could not say which contract each follower trades (%s); "
                        "catch-ups use copilink.yaml's accounts[].instrument, else the "
                        "leader's contract", exc)
            return {}

    def start(self) -> list[str]:
        """Continue from the journal, if it holds a previous run. Returns notes."""
        notes: list[str] = []
        saved = self.journal.engine_state()
        if saved is not None:
            notes += self.engine.restore_state(saved)
            notes.append(f"continuing from the journal {self.journal.path} (engine state of "
                         f"{saved.get('time')})")
        # what was decided after the last saved state (a crash between journaling a tick's
        # decisions and saving the engine's state): the episodes it began still hold
        later = self.journal.decisions_after(self.engine.last_time)
        replayed = self.engine.replay_decisions(later)
        if replayed:
            notes.append(f"rebuilt {replayed} decision(s) journaled after the saved state "
                         "(a skipped or flattened entry stays so for its leader trade)")
        snapshot = self.broker.snapshot()
        last = self.engine.last_time
        if last is not None and snapshot.time < last:
            raise StateError(
                f"the journal {self.journal.path} holds a session up to {last.isoformat()}, "
                f"later than the broker's time {snapshot.time.isoformat()}: name a new "
                "journal (--journal) to start afresh, or, with the sim, keep its state "
                "(--sim-state) so a restart meets the same broker")
        notes += self.enforcer.restore(snapshot.time)
        if self.builtin is not None:
            notes += self.builtin.restore(snapshot.time)
        self._prepare(self.engine, snapshot)
        return notes

    @staticmethod
    def _prepare(engine: Engine, snapshot: Snapshot) -> None:
        """The rules' batches for these accounts compiled now, not inside the first tick
        (which may have to act at once). Only time is at stake: a tick compiles what is
        missing."""
        try:
            engine.prepare(snapshot)
        except Exception:  # the ticks compile on first need instead
            log.warning("could not compile the rules ahead of the first tick", exc_info=True)

    def tick(self) -> list[Decision]:
        """One evaluation. Never raises for a broker or input problem: it alerts instead. If
        the journal cannot be written, enforcement stops (`stopped` says why): an action that
        is not journaled is never taken."""
        if self.stopped is not None:
            return []
        if not self._tick_lock.acquire(blocking=False):
            log.warning("tick skipped: the previous tick is still running")
            return []
        try:
            return self._tick()
        except sqlite3.Error as exc:
            self._journal_failed(exc)
            return []
        finally:
            self._tick_lock.release()

    def _tick(self) -> list[Decision]:
        if self.before_tick is not None:
            self.before_tick()
        try:
            snapshot = self.broker.snapshot()
            if self.builtin is not None:  # the rules see whom our copier copies onto
                snapshot = self.builtin.overlay(snapshot)
            self._watch_health(snapshot.time)
            blocked = self.enforcer.blocked(snapshot.time)
            decisions = self.engine.evaluate(snapshot, blocked=blocked)
        except (CopilinkError, ValueError) as exc:
            self._problem(f"tick skipped: {exc}")
            return []
        except Exception as exc:  # noqa: BLE001 - a broker failure must not stop the run
            self._problem(f"tick skipped: broker error {type(exc).__name__}: {exc}")
            return []
        digest = snapshot_digest(snapshot)
        with self.journal.transaction():
            self.journal.tick(snapshot.time, digest, len(snapshot.accounts))
            self.journal.decisions(decisions)
        self.enforcer.process(snapshot, decisions)
        for decision in self.enforcer.again:
            self.engine.rearm(decision.rule, decision.account, decision.instrument,
                              decision.action, decision.args.get("episodes"))
        if self.builtin is not None:
            self._copy(snapshot)
        if self.after_commands is not None:
            self.after_commands()
        self.journal.save_engine_state(snapshot.time, self.engine.save_state_text())
        self.recent.extend(d for d in decisions if d.suppressed is False)
        self.last_snapshot = snapshot
        self._last_problem = None
        self.ticks += 1
        return decisions

    def copy_tick(self) -> None:
        """The built-in copier between two rule ticks (`copy_every`): a leader's fill is
        copied within tens of milliseconds instead of waiting for the next evaluation. It
        shares the tick's lock, so it never runs beside a tick (nor beside the enforcer)."""
        if self.builtin is None or self.stopped is not None:
            return
        if not self._tick_lock.acquire(blocking=False):
            return  # a tick (which copies too) is running
        try:
            snapshot = self.builtin.overlay(self.broker.snapshot())
            self._copy(snapshot)
        except sqlite3.Error as exc:
            self._journal_failed(exc)
        except Exception as exc:  # noqa: BLE001 - a broker failure: the next tick says it
            log.warning("copy between ticks skipped: %s: %s", type(exc).__name__, exc)
        finally:
            self._tick_lock.release()

    def _copy(self, snapshot: Snapshot) -> None:
        """The built-in copier's turn. A journal error stops the session (as anywhere); any
        other failure is one critical alert, and the rules keep watching the followers."""
        assert self.builtin is not None
        try:
            self.builtin.sync(snapshot)
            self._copier_problem = None
        except sqlite3.Error:
            raise
        except Exception as exc:  # a copier failure must not stop the rules
            message = (f"copier: {type(exc).__name__}: {exc} — copying may have stopped; the "
                       "rules keep watching the followers")
            if message != self._copier_problem:  # once, not every tick
                self._copier_problem = message
                log.exception("the copier failed")
                self._send(snapshot.time, "critical", message, None)
        state = self.builtin.state()
        if state != self._copier_saved:  # between ticks mostly nothing changed: no write
            self._copier_saved = state
            self.journal.save_copier_state(state)

    def _watch_health(self, now: datetime) -> None:
        """Tell the trader when the broker connection changes state (a ProjectX logout, a
        lost socket, back again), and let orders resume once a refused log-in is accepted
        again — at most once a minute, so wrong credentials are not retried in a burst."""
        health = self.broker.health()
        if health.state != self._health:
            if self._health is not None or not health.ok:
                severity = "info" if health.ok else "critical"
                detail = f": {health.detail}" if health.detail else ""
                self._send(now, severity, f"broker {self.broker.name} {health.state}{detail}",
                           None)
            self._health = health.state
        enforcer = self.enforcer
        if enforcer.auth_failed and health.ok and enforcer.auth_failed_at is not None and \
                (now - enforcer.auth_failed_at).total_seconds() >= 60:
            enforcer.broker_back(now)

    def _journal_failed(self, exc: sqlite3.Error) -> None:
        self.stopped = (f"the journal {self.journal.path} cannot be written ({exc}): "
                        "enforcement stopped, nothing more is sent — free disk space or fix "
                        "the file, then start again on the same journal")
        moment = self.last_snapshot.time if self.last_snapshot else datetime.now().astimezone()
        # not journaled (that is what failed): terminal, log file and webhooks only
        self.alerts.send(Alert(moment, "critical", self.stopped, None))

    def pre_session_check(self) -> list[Decision]:
        """Evaluate the pre-session rules now and alert what is not ready."""
        snapshot = self.broker.snapshot()
        engine = Engine(self.policy, self.catalog, self.calendar)  # no history: its own
        decisions = engine.evaluate(snapshot, as_if_held=True, stage="pre_session")
        blocking = [d for d in decisions if d.suppressed is False]
        self.journal.decisions(decisions)
        if blocking:
            for d in blocking:
                self._send(snapshot.time, d.severity, f"pre-session: {d.reason}", d.account)
        else:
            self._send(snapshot.time, "info", f"pre-session check: READY "
                       f"({len(snapshot.accounts)} accounts)", None)
        return decisions

    # --- hot reload -----------------------------------------------------------------------------

    def _rule_mtimes(self) -> dict[str, float]:
        files, _ = expand_paths(self.rules)
        for info in self.policy.rulesets:
            files.append(Path(info.file))
        out = {}
        for file in files:
            try:
                out[str(file)] = file.stat().st_mtime
            except OSError:
                out[str(file)] = -1.0
        return out

    def reload_if_changed(self) -> str | None:
        """Reload the rules when a file changed. All or nothing: a bad file keeps the old
        rules in force and says why. Returns what happened, or None if nothing changed."""
        mtimes = self._rule_mtimes()
        if mtimes == self._mtimes:
            return None
        self._mtimes = mtimes
        now = self.last_snapshot.time if self.last_snapshot else datetime.now().astimezone()
        try:
            policy = load_policy(self.rules, self.overrides, self.rules_path)
        except CopilinkError as exc:
            message = f"rule files changed but are not valid; the old rules stay in force:\n{exc}"
            self._send(now, "critical", message, None)
            return message
        with self._tick_lock:
            state = self.engine.save_state()
            try:
                engine = Engine(policy, self.catalog, self.calendar)
                engine.restore_state(state)
            except Exception as exc:  # noqa: BLE001 - the old rules stay in force, said loudly
                message = (f"rule files changed and load, but cannot be used ({exc}); the old "
                           "rules stay in force")
                self._send(now, "critical", message, None)
                return message
            if self.last_snapshot is not None:
                self._prepare(engine, self.last_snapshot)
            self.policy = policy
            self.engine = engine
            self.enforcer.locks = engine.lock_book  # restored from the old engine's
            self.enforcer.use_policy(policy)
        message = f"rules reloaded: {policy.name} version {policy.version}"
        self._send(now, "info", message, None)
        return message

    def _problem(self, message: str) -> None:
        if message == self._last_problem:
            return  # a broker down for a minute is one alert, not 240
        self._last_problem = message
        moment = self.last_snapshot.time if self.last_snapshot else datetime.now().astimezone()
        self._send(moment, "critical", message, None)

    def _send(self, moment: datetime, severity: str, message: str, account: str | None) -> None:
        self.journal.alert(moment, severity, account, message)
        self.alerts.send(Alert(moment, severity, message, account))

    def summary(self) -> dict[str, Any]:
        return {"ticks": self.ticks, "commands": self.journal.count("commands"),
                "incidents": self.journal.count("incidents"),
                "decisions": self.journal.count("decisions")}
