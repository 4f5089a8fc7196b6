"""The journal: SQLite (WAL) record of every tick, decision, command, broker answer, lock and
incident, written before or as it happens, with a schema version.

Commands are written *before* they are sent (status `sending`) and updated with the broker's
answer, so after a crash the engine knows what it may already have sent and asks the broker
(by tag) instead of sending it again. The engine's own state is saved with every tick.

Checkpoints (copying the WAL into the database file, an fsync of each) never land on a
command's path. SQLite's automatic checkpoint runs inside whichever commit makes the WAL reach
1,000 pages, which may be a command's insert: it is switched off. Instead the journal
checkpoints at the end of a tick: after saving the engine's state (the session's last write of
a tick, after its commands went out) once the WAL holds about `checkpoint_pages` pages, and on
close. The first write after a checkpoint restarts the WAL and fsyncs its header; the journal
makes that write itself, right after the checkpoint, so the next tick's writes do not pay it.
A journal written without ticks (no engine state saved) checkpoints after any write but a
command's once the WAL holds 4 times as much: the WAL never grows without bound.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import StateError
from .model import Decision

log = logging.getLogger("copilink_rules.journal")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ticks (
    id INTEGER PRIMARY KEY, time TEXT NOT NULL, digest TEXT NOT NULL, accounts INTEGER);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY, time TEXT NOT NULL, rule TEXT, action TEXT, account TEXT,
    instrument TEXT, severity TEXT, suppressed TEXT, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS commands (
    tag TEXT PRIMARY KEY, time TEXT NOT NULL, account TEXT NOT NULL, instrument TEXT,
    family TEXT, action TEXT NOT NULL, rule TEXT, args TEXT NOT NULL, status TEXT NOT NULL,
    attempt INTEGER NOT NULL, reason TEXT, updated TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS answers (
    id INTEGER PRIMARY KEY, tag TEXT NOT NULL, time TEXT NOT NULL, status TEXT NOT NULL,
    reason TEXT);
CREATE TABLE IF NOT EXISTS locks (
    account TEXT PRIMARY KEY, state TEXT NOT NULL, until TEXT NOT NULL, reason TEXT,
    rule TEXT, time TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS incidents (
    id INTEGER PRIMARY KEY, time TEXT NOT NULL, account TEXT, instrument TEXT, rule TEXT,
    severity TEXT NOT NULL, summary TEXT NOT NULL, positions TEXT NOT NULL,
    actions TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY, time TEXT NOT NULL, severity TEXT NOT NULL, account TEXT,
    message TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS engine_state (
    id INTEGER PRIMARY KEY CHECK (id = 1), time TEXT, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS copying (
    account TEXT PRIMARY KEY, state TEXT NOT NULL, reason TEXT, time TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS commands_status ON commands (status);
CREATE INDEX IF NOT EXISTS incidents_time ON incidents (time);
"""

OPEN_STATUSES = ("sending", "pending", "retrying", "cancelling")

# the WAL's size (pages of 4 KB) at which the journal checkpoints at the end of a tick: SQLite's
# own default for its automatic checkpoint
CHECKPOINT_PAGES = 1000
# without ticks: a checkpoint after any write but a command's, at this many times that size
_UNTICKED_FACTOR = 4


def _lock_file(handle: Any) -> None:
    """An exclusive, non-blocking lock on an open file; OSError if another process has it."""
    if sys.platform == "win32":  # pragma: no cover - NinjaTrader users run Windows
        import msvcrt  # noqa: PLC0415 - exists on Windows only

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        import fcntl  # noqa: PLC0415 - exists on POSIX only

        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class CommandRow:
    tag: str
    time: str
    account: str
    instrument: str | None
    family: str | None
    action: str
    rule: str | None
    args: dict[str, Any]
    status: str
    attempt: int
    reason: str | None
    updated: str


def _close_refused(db: sqlite3.Connection | None) -> None:
    """Close the connection to a file refused as a journal: no file stays open behind the error
    (a process that tries again and again would otherwise pile them up)."""
    if db is not None:
        with suppress(sqlite3.Error):
            db.close()


class Journal:
    """One SQLite file. Safe to use from the scheduler's threads (one connection, a lock)."""

    _claim: Any = None  # the lock file held while this process enforces (claim())

    def __init__(self, path: str | Path, *, read_only: bool = False,
                 checkpoint_pages: int = CHECKPOINT_PAGES) -> None:
        """Open (or create) the journal at `path`; `read_only` opens an existing one for
        reports and never writes to it. Another program's SQLite file is refused.

        `checkpoint_pages`: the WAL's size at which the journal checkpoints at the end of a
        tick (see the module's docstring); 0 leaves checkpoints to SQLite's automatic one,
        which may land on any commit, a command's included (for comparisons only)."""
        self.path = str(path)
        self._lock = threading.RLock()
        self.checkpoint_pages = checkpoint_pages
        self.checkpoints = 0  # completed checkpoints this journal ran (none on a command's path)
        self._wal = False  # a WAL file (not ":memory:", not read-only)
        self._managed = False  # its checkpoints run by this journal, not by SQLite
        self._writes = 0  # write statements since the last checkpoint
        self._pages_per_write = 3.0  # WAL pages a write adds: learned at each checkpoint
        db: sqlite3.Connection | None = None  # closed again if it is refused as a journal
        try:
            if read_only:
                uri = Path(self.path).resolve().as_uri() + "?mode=ro"
                db = self._db = sqlite3.connect(uri, uri=True, check_same_thread=False,
                                                isolation_level=None)
            else:
                db = self._db = sqlite3.connect(self.path, check_same_thread=False,
                                                isolation_level=None)
            tables = {row[0] for row in self._db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if (tables or read_only) and "meta" not in tables:
                raise StateError(f"{self.path} is not a copilink-rules journal (a SQLite file "
                                 "without its tables): name another journal file")
            if not read_only:
                mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._wal = str(mode).lower() == "wal"
                if self._wal and checkpoint_pages > 0:
                    self._db.execute("PRAGMA wal_autocheckpoint=0")
                    self._managed = True
                self._db.executescript(_SCHEMA)
            version = self._meta("schema_version")
            if version is None and not read_only:
                self._set_meta("schema_version", str(SCHEMA_VERSION))
            elif version is None or not (version.isascii() and version.isdigit()):
                raise StateError(f"{self.path}: the journal has no valid schema version "
                                 f"({version!r}): not a copilink-rules journal")
            elif int(version) > SCHEMA_VERSION:
                raise StateError(f"{self.path}: journal schema version {version} was written "
                                 f"by a newer copilink-rules (this one reads {SCHEMA_VERSION}); "
                                 "upgrade")
        except StateError:
            _close_refused(db)
            raise
        except (sqlite3.Error, ValueError) as exc:  # ValueError: undecodable table names
            _close_refused(db)
            raise StateError(f"{self.path}: cannot open the journal: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                             ) from None

    def close(self) -> None:
        with self._lock:
            if self._managed:
                self._auto_checkpoint(restart=False)  # SQLite deletes the WAL on close
                self._managed = self._wal = False  # closed: nothing more to checkpoint
            self._db.close()
        self.release()

    # --- checkpoints (never on a command's path) ------------------------------------------------

    def checkpoint(self, *, restart: bool = True) -> tuple[int, int]:
        """A PASSIVE checkpoint: copy the WAL's pages into the database file, waiting for no
        reader (what a reader still uses is copied by a later one). When it copied everything,
        the WAL restarts: its first write fsyncs the WAL's header, so (unless `restart` is
        False) that write is made here too. Returns (pages in the WAL, pages copied); (0, 0)
        inside a transaction or when the journal is no WAL file (":memory:", read-only)."""
        with self._lock:
            if not self._wal or self._db.in_transaction:
                return (0, 0)
            row = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            pages, copied = int(row[1]), int(row[2])
            writes, self._writes = self._writes, 0
            if pages > 0 and copied == pages:
                if writes:
                    self._pages_per_write = max(0.1, pages / writes)
                self.checkpoints += 1
                if restart:
                    self._set_meta("checkpoints", str(self.checkpoints))  # restarts the WAL
                    self._writes = 0
            return (pages, copied)

    def _auto_checkpoint(self, *, restart: bool = True) -> None:
        """A checkpoint the journal chose to run. Like SQLite's own, a failed one is not a
        failed write (what was written is in the WAL): a warning, and the next one tries
        again."""
        try:
            self.checkpoint(restart=restart)
        except sqlite3.Error as exc:
            log.warning("%s: checkpoint failed (%s); the WAL keeps what it holds", self.path,
                        exc)

    def _wal_over(self, factor: int) -> bool:
        """The WAL holds at least `factor` x `checkpoint_pages` pages (an estimate)."""
        return self._managed and not self._db.in_transaction and \
            self._writes * self._pages_per_write >= factor * self.checkpoint_pages

    def _write(self, sql: str, params: tuple[Any, ...] = (), *, command: bool = False) -> None:
        """One write statement. After one that is not a command's, outside a transaction,
        with the WAL far over its size (a journal written without ticks): a checkpoint."""
        with self._lock:
            self._db.execute(sql, params)
            self._writes += 1
            if not command and self._wal_over(_UNTICKED_FACTOR):
                self._auto_checkpoint()

    # --- one enforcer per journal ---------------------------------------------------------------

    def claim(self) -> None:
        """Make this process the only one enforcing with this journal: an exclusive lock on
        `<journal>.lock` that the operating system drops when the process ends (even killed),
        so a second `run` on the same journal refuses instead of sending every command twice.
        StateError if another process holds it."""
        if self.path == ":memory:" or self._claim is not None:
            return
        lock_path = f"{self.path}.lock"
        try:
            handle = open(lock_path, "a+")  # noqa: SIM115 - held open for the whole run
        except OSError as exc:
            raise StateError(f"{lock_path}: cannot create the journal's lock file: "
                             f"{exc.strerror}") from None
        try:
            _lock_file(handle)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise StateError(f"{self.path} is in use by {holder}: one run per journal (two "
                             "would send every command twice); stop the other run or name "
                             "another journal") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"copilink-rules process {os.getpid()}")
        handle.flush()
        self._claim = handle

    def release(self) -> None:
        handle = self._claim
        if handle is not None:
            self._claim = None
            handle.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _exec(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, params)

    def _meta(self, key: str) -> str | None:
        row = self._exec("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        self._write("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE "
                    "SET value = excluded.value", (key, value))

    def next_sequence(self) -> int:
        """A counter that survives restarts (for order tags)."""
        with self.transaction():
            value = int(self._meta("sequence") or 0) + 1
            self._set_meta("sequence", str(value))
        return value

    # --- writing --------------------------------------------------------------------------------

    def tick(self, moment: datetime, digest: str, accounts: int) -> None:
        self._write("INSERT INTO ticks (time, digest, accounts) VALUES (?, ?, ?)",
                    (iso(moment), digest, accounts))

    def decisions(self, decisions: list[Decision]) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT INTO decisions (time, rule, action, account, instrument, severity, "
                "suppressed, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(iso(d.time), d.rule, d.action, d.account, d.instrument, d.severity,
                  d.suppressed or None, json.dumps(d.to_json_dict(), default=str))
                 for d in decisions])
            self._writes += 1

    def command(self, row: CommandRow) -> None:
        self._write(
            "INSERT INTO commands (tag, time, account, instrument, family, action, rule, args, "
            "status, attempt, reason, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row.tag, row.time, row.account, row.instrument, row.family, row.action, row.rule,
             json.dumps(row.args, default=str), row.status, row.attempt, row.reason,
             row.updated), command=True)

    def command_status(self, tag: str, status: str, moment: datetime,
                       reason: str | None = None) -> None:
        self._write("UPDATE commands SET status = ?, reason = COALESCE(?, reason), updated = ? "
                    "WHERE tag = ?", (status, reason, iso(moment), tag))

    def answer(self, tag: str, moment: datetime, status: str, reason: str) -> None:
        self._write("INSERT INTO answers (tag, time, status, reason) VALUES (?, ?, ?, ?)",
                    (tag, iso(moment), status, reason))

    def answers(self) -> list[tuple[str, str, str, str | None]]:
        """Every broker answer: (tag, time, status, reason), oldest first."""
        rows = self._exec("SELECT tag, time, status, reason FROM answers ORDER BY id").fetchall()
        return [(str(t), str(m), str(s), r) for t, m, s, r in rows]

    def lock(self, account: str, state: str, until: datetime, reason: str, rule: str | None,
             moment: datetime) -> None:
        self._write("INSERT INTO locks (account, state, until, reason, rule, time) VALUES "
                    "(?, ?, ?, ?, ?, ?) ON CONFLICT(account) DO UPDATE SET state = excluded.state,"
                    " until = excluded.until, reason = excluded.reason, rule = excluded.rule, "
                    "time = excluded.time", (account, state, iso(until), reason, rule,
                                              iso(moment)))

    def unlock(self, account: str) -> None:
        self._write("DELETE FROM locks WHERE account = ?", (account,))

    def incident(self, moment: datetime, account: str | None, instrument: str | None,
                 rule: str | None, severity: str, summary: str, positions: Any,
                 actions: list[str]) -> None:
        self._write("INSERT INTO incidents (time, account, instrument, rule, severity, summary, "
                    "positions, actions) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (iso(moment), account, instrument, rule, severity, summary,
                     json.dumps(positions, default=str), json.dumps(actions)))

    def alert(self, moment: datetime, severity: str, account: str | None, message: str) -> None:
        self._write("INSERT INTO alerts (time, severity, account, message) VALUES (?, ?, ?, ?)",
                    (iso(moment), severity, account, message))

    def save_engine_state(self, moment: datetime | None, data: dict[str, Any] | str) -> None:
        """The engine's state (its data, or that data as JSON text already), saved last in a
        tick, after its commands went out: so this is where the journal checkpoints, once the
        WAL has reached `checkpoint_pages`."""
        text = data if isinstance(data, str) else json.dumps(data)
        with self._lock:
            self._write("INSERT INTO engine_state (id, time, data) VALUES (1, ?, ?) ON "
                        "CONFLICT(id) DO UPDATE SET time = excluded.time, data = excluded.data",
                        (iso(moment) if moment else None, text))
            if self._wal_over(1):
                self._auto_checkpoint()

    def save_copier_state(self, data: dict[str, Any]) -> None:
        """The built-in copier's bookkeeping (what it copied, skips, its stops)."""
        self._set_meta("copier_state", json.dumps(data))

    def set_copying(self, account: str, state: str, reason: str, moment: datetime) -> None:
        """Copying onto `account` is `state` (active or paused) from now: written by the
        running copier and by `copilink-rules resume` alike, read by the copier every tick."""
        self._write("INSERT INTO copying (account, state, reason, time) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(account) DO UPDATE SET state = excluded.state, "
                    "reason = excluded.reason, time = excluded.time",
                    (account, state, reason, iso(moment)))

    # --- reading ----------------------------------------------------------------------------

    def copier_state(self) -> dict[str, Any] | None:
        text = self._meta("copier_state")
        return None if text is None else dict(json.loads(text))

    def copying(self) -> dict[str, tuple[str, str, str]]:
        """account -> (state, reason, time) of every follower whose copying was set."""
        try:
            rows = self._exec("SELECT account, state, reason, time FROM copying").fetchall()
        except sqlite3.OperationalError:  # a journal from before the built-in copier
            return {}
        return {str(a): (str(s), str(r or ""), str(t)) for a, s, r, t in rows}

    def engine_state(self) -> dict[str, Any] | None:
        row = self._exec("SELECT data FROM engine_state WHERE id = 1").fetchone()
        return None if row is None else dict(json.loads(row[0]))

    def decisions_after(self, moment: datetime | None,
                        actions: tuple[str, ...] = ("flatten", "skip_entry", "catch_up")
                        ) -> list[dict[str, Any]]:
        """Decisions that passed (not suppressed) after `moment` (all when None), oldest
        first, as journaled (`Decision.to_json_dict`)."""
        sql = "SELECT data FROM decisions WHERE suppressed IS NULL AND action IN " \
            f"({', '.join('?' * len(actions))})"  # noqa: S608 - placeholders only
        params: tuple[Any, ...] = actions
        if moment is not None:
            sql += " AND time > ?"
            params = (*actions, iso(moment))
        rows = self._exec(sql + " ORDER BY id", params).fetchall()
        return [dict(json.loads(r[0])) for r in rows]

    def commands(self, statuses: tuple[str, ...] | None = None) -> list[CommandRow]:
        sql = "SELECT tag, time, account, instrument, family, action, rule, args, status, " \
            "attempt, reason, updated FROM commands"
        params: tuple[Any, ...] = ()
        if statuses:
            sql += f" WHERE status IN ({', '.join('?' * len(statuses))})"
            params = statuses
        rows = self._exec(sql + " ORDER BY time, tag", params).fetchall()
        return [CommandRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7]), r[8],
                           r[9], r[10], r[11]) for r in rows]

    def locks(self) -> list[dict[str, Any]]:
        rows = self._exec("SELECT account, state, until, reason, rule, time FROM locks")
        return [dict(zip(("account", "state", "until", "reason", "rule", "time"), r,
                         strict=True)) for r in rows.fetchall()]

    def incidents(self, since: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT time, account, instrument, rule, severity, summary, positions, actions " \
            "FROM incidents"
        params: tuple[Any, ...] = ()
        if since:
            sql += " WHERE time >= ?"
            params = (since,)
        rows = self._exec(sql + " ORDER BY time, id", params).fetchall()
        return [{"time": r[0], "account": r[1], "instrument": r[2], "rule": r[3],
                 "severity": r[4], "summary": r[5], "positions": json.loads(r[6]),
                 "actions": json.loads(r[7])} for r in rows]

    def count(self, table: str) -> int:
        if table not in ("ticks", "decisions", "commands", "answers", "locks", "incidents",
                         "alerts"):
            raise ValueError(f"no journal table {table!r}")
        return int(self._exec(f"SELECT COUNT(*) FROM {table}").fetchone()[0])  # noqa: S608
