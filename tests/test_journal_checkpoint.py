"""Issue 10, item 4: no WAL checkpoint on a command's path, a WAL that stays bounded, and the
garbage collector kept out of the tick. Real SQLite files; behaviour only, never time."""

from __future__ import annotations

import gc
import hashlib
import logging
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from copilink_rules.adapters.sim import SimBroker, SimFollower, SimScenario
from copilink_rules.alerts import Alerts
from copilink_rules.journal import CommandRow, Journal, iso
from copilink_rules.scheduler import LiveRunner, gc_held
from copilink_rules.session import Session

from .conftest import REPO

DESYNC = REPO / "rules" / "desync.yaml"
NOW = datetime(2026, 3, 2, 14, 30, tzinfo=UTC)


def wal_size(journal: Journal) -> int:
    wal = Path(f"{journal.path}-wal")
    return wal.stat().st_size if wal.exists() else 0


def wal_header(journal: Journal) -> bytes:
    """The WAL's 32-byte header: rewritten (checkpoint sequence, salts) when the WAL restarts,
    and fsynced then."""
    with open(f"{journal.path}-wal", "rb") as wal:
        return wal.read(32)


def digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Watched:
    """A sim session on a journal file, watching what happens between the snapshot a tick
    reads and each command reaching the broker adapter."""

    def __init__(self, path: Path, checkpoint_pages: int, seed: int = 3) -> None:
        self.broker = SimBroker(SimScenario(seed=seed, random_trades=6, random_faults=6,
                                            followers=[SimFollower(id=f"F{i}")
                                                       for i in range(1, 6)]))
        self.journal = Journal(path, checkpoint_pages=checkpoint_pages)
        self.commands = 0
        self.at_read: tuple[int, str] = (0, "")
        self.on_path: list[str] = []  # what changed on a command's path, if anything
        original = self.broker.snapshot

        def read() -> Any:
            snapshot = original()
            self.at_read = (self.journal.checkpoints, digest(self.journal.path))
            return snapshot

        self.broker.snapshot = read  # type: ignore[method-assign]
        self.session = Session(self.broker, self.journal, Alerts(), [DESYNC],
                               rules_path=[REPO / "rules"],
                               before_tick=lambda: self.broker.advance(0.25),
                               on_command=self.reached)
        self.session.start()

    def reached(self, kind: str, account: str, tag: str) -> None:
        self.commands += 1
        checkpoints, main_file = self.at_read
        if self.journal.checkpoints != checkpoints:
            self.on_path.append(f"{tag}: the journal checkpointed")
        if digest(self.journal.path) != main_file:  # only a checkpoint writes the main file
            self.on_path.append(f"{tag}: the database file was written")


def test_sqlites_automatic_checkpoint_is_off_on_a_journal_file(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db")
    assert journal._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    assert journal._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    journal.close()
    # 0: SQLite's own, as before (for comparisons)
    before = Journal(tmp_path / "b.db", checkpoint_pages=0)
    assert before._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    before.close()
    memory = Journal(":memory:")  # no WAL: nothing to checkpoint, nothing breaks
    memory.save_engine_state(NOW, {"x": 1})
    assert memory.checkpoint() == (0, 0)
    memory.close()
    Journal(tmp_path / "r.db").close()
    reader = Journal(tmp_path / "r.db", read_only=True)
    assert reader.checkpoint() == (0, 0)
    reader.close()


def test_the_command_path_never_checkpoints_and_the_wal_stays_bounded(tmp_path: Path) -> None:
    pages = 40  # small, so that checkpoints are frequent and a wrong one would show
    watched = Watched(tmp_path / "j.db", checkpoint_pages=pages)
    page_size = int(watched.journal._db.execute("PRAGMA page_size").fetchone()[0])
    largest, ticks = 0, 0
    while watched.broker.elapsed < watched.broker.end:
        watched.session.tick()
        ticks += 1
        largest = max(largest, wal_size(watched.journal))
    assert watched.session.stopped is None
    assert watched.commands >= 3, "the scenario must send commands for this to mean much"
    assert ticks > 400
    assert watched.journal.checkpoints >= 10  # without them the WAL would be ~ticks pages
    assert watched.on_path == []
    # the WAL file is reused after each checkpoint: it never outgrows a few checkpoints' worth
    assert largest <= 4 * pages * (page_size + 24) + 32
    watched.journal.close()
    assert not Path(f"{watched.journal.path}-wal").exists()  # checkpointed and removed


def test_after_a_checkpoint_the_next_write_does_not_restart_the_wal(tmp_path: Path) -> None:
    # the first write after a checkpoint restarts the WAL and fsyncs its header: the journal
    # makes that write itself, so a command's insert right after never pays for it
    journal = Journal(tmp_path / "j.db")
    for i in range(30):
        journal.tick(NOW, f"d{i}", 3)
    first = wal_header(journal)
    pages, copied = journal.checkpoint()
    assert pages > 0
    assert copied == pages
    restarted = wal_header(journal)
    assert restarted != first  # a new checkpoint sequence and salts: restarted
    journal.command(CommandRow("CLR-000001", iso(NOW), "F1", "MNQH6", "NQ", "flatten", "r",
                               {}, "sending", 1, None, iso(NOW)))
    assert wal_header(journal) == restarted
    assert [row.tag for row in journal.commands()] == ["CLR-000001"]
    journal.close()


def test_a_journal_without_ticks_still_keeps_its_wal_bounded(tmp_path: Path) -> None:
    # no engine state is ever saved (the end of a tick): any other write but a command's
    # checkpoints, once the WAL is 4 times its size
    journal = Journal(tmp_path / "j.db", checkpoint_pages=20)
    page_size = int(journal._db.execute("PRAGMA page_size").fetchone()[0])
    largest = 0
    for i in range(3000):
        journal.alert(NOW, "info", "F1", f"alert {i} " + "x" * 200)
        largest = max(largest, wal_size(journal))
    assert journal.checkpoints >= 5
    assert largest <= 8 * 20 * (page_size + 24) + 32
    assert journal.count("alerts") == 3000
    journal.close()


def test_a_command_insert_never_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    journal = Journal(tmp_path / "j.db", checkpoint_pages=1)
    calls: list[int] = []
    original = journal.checkpoint
    monkeypatch.setattr(journal, "checkpoint", lambda **kw: calls.append(1) or original(**kw))
    for i in range(50):  # far over its size, and still no checkpoint in a command's insert
        journal.command(CommandRow(f"CLR-{i:06d}", iso(NOW), "F1", None, None, "flatten",
                                   None, {}, "sending", 1, None, iso(NOW)))
    assert calls == []
    journal.save_engine_state(NOW, {"episodes": []})  # the end of a tick: now
    assert calls == [1]
    journal.close()


def test_a_failed_checkpoint_is_a_warning_not_a_failed_tick(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    journal = Journal(tmp_path / "j.db", checkpoint_pages=1)

    def broken(**_: Any) -> tuple[int, int]:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(journal, "checkpoint", broken)
    with caplog.at_level(logging.WARNING, logger="copilink_rules.journal"):
        journal.tick(NOW, "d", 1)
        journal.save_engine_state(NOW, {"x": 1})  # written; its checkpoint failed
    assert journal.engine_state() == {"x": 1}
    assert "checkpoint failed" in caplog.text
    journal.close()


def test_claim_and_decisions_after_still_work_with_checkpoints(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db", checkpoint_pages=1)
    journal.claim()
    journal.save_engine_state(NOW, {"x": 1})
    assert journal.checkpoints >= 1
    assert journal.decisions_after(None) == []
    journal.close()
    again = Journal(tmp_path / "j.db")
    again.claim()  # released on close
    again.close()


# --- the garbage collector and the tick --------------------------------------------------------

class _Ticking:
    """What LiveRunner.tick_once needs of a session: a tick (here noting the collector)."""

    def __init__(self) -> None:
        self.enabled: list[bool] = []

    def tick(self) -> list[Any]:
        self.enabled.append(gc.isenabled())
        return []


def test_the_runner_holds_the_collector_off_in_a_tick_and_freezes_start_up() -> None:
    assert gc.isenabled()
    session = _Ticking()
    runner = LiveRunner(session, reload_every=0)  # type: ignore[arg-type]
    frozen = gc.get_freeze_count()
    try:
        runner.tick_once()
        assert gc.get_freeze_count() > frozen  # after the first tick: start-up frozen
        runner.tick_once()
        assert session.enabled == [False, False]
        assert gc.isenabled()  # and back on between ticks
    finally:
        runner.thaw()
    assert gc.get_freeze_count() == 0
    runner.thaw()  # twice: nothing more


def test_gc_held_restores_what_it_found() -> None:
    gc.disable()
    try:
        with gc_held():
            assert not gc.isenabled()
        assert not gc.isenabled()  # it was off: it stays off
    finally:
        gc.enable()
    with pytest.raises(RuntimeError), gc_held():
        raise RuntimeError("a failing tick")
    assert gc.isenabled()
