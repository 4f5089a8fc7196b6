"""`incidents --db` on a damaged journal: a copy cut short or with bytes changed anywhere gives
the report (what can still be read) or one line saying the journal is damaged, never a
traceback."""

from __future__ import annotations

import io
import json
import random
import shutil
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from copilink_rules.cli import run
from copilink_rules.errors import StateError
from copilink_rules.incidents import collect, open_journal, render
from copilink_rules.journal import CommandRow, Journal, iso

T0 = datetime(2026, 3, 2, 14, 30, tzinfo=UTC)


def _journal(path: Path) -> Path:
    """A real journal with incidents, commands, answers and ticks over several pages."""
    journal = Journal(path)
    for i in range(40):
        moment = T0 + timedelta(seconds=7 * i)
        account = f"F{i % 4 + 1}"
        journal.tick(moment, f"{i:016x}", 5)
        journal.command(CommandRow(f"CLR-{i:06d}", iso(moment), account, "NQH6", "NQ",
                                   "flatten", "stuck-follower", {"qty": -(i % 3 + 1)},
                                   "sending", 1, None, iso(moment)))
        journal.command_status(f"CLR-{i:06d}", "confirmed" if i % 5 else "rejected",
                               moment + timedelta(seconds=1), None if i % 5 else "no margin")
        journal.answer(f"CLR-{i:06d}", moment, "filled", "ok")
        journal.incident(moment, account, "NQH6", "stuck-follower", "critical",
                         f"{account} still holds long {i % 3 + 1} NQH6 while leader LEAD is "
                         "flat: flattening " + "x" * (i * 3),
                         {account: [{"instrument": "NQH6", "qty": i % 3 + 1,
                                     "avg_price": 18000.25 + i, "opened_at": iso(moment)}],
                          "LEAD": []},
                         [f"stuck-follower: flatten {account}"])
    journal.close()
    return path


def _incidents(db: Path, fmt: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run(["incidents", "--db", str(db), "--format", fmt], out, err)
    return code, out.getvalue(), err.getvalue()


def _report(db: Path, fmt: str) -> tuple[int, str, str]:
    """What `incidents` does, through incidents.py alone: open_journal, collect, render."""
    try:
        journal = open_journal(db)
        try:
            return 0, render(collect(journal), fmt, str(db)), ""
        finally:
            journal.close()
    except StateError as exc:
        return 1, "", f"{exc}\n"


def _damaged_copies(original: bytes) -> list[tuple[str, bytes]]:
    """About 400 deterministic ways to damage a journal: cut short, bytes changed, zeroed."""
    size = len(original)
    rng = random.Random(20260302)
    variants: list[tuple[str, bytes]] = []
    cuts = sorted({0, 1, 15, 16, 99, 100, 101, 512, 4095, 4096, 4097, size - 1,
                   *range(0, size, max(size // 60, 1))})
    variants += [(f"cut at {cut}", original[:cut]) for cut in cuts if cut < size]
    for n in range(300):
        data = bytearray(original)
        # the first 100 bytes (the header) and the first page matter most: hit them often
        span = 100 if n % 5 == 0 else 4096 if n % 5 == 1 else size
        flips = 1 if n % 3 else rng.randint(2, 12)
        for _ in range(flips):
            at = rng.randrange(min(span, size))
            data[at] ^= rng.randint(1, 255)
        variants.append((f"flip #{n}", bytes(data)))
    for page in range(0, size, 4096):
        zeroed = original[:page] + bytes(min(4096, size - page)) + original[page + 4096:]
        variants.append((f"page at {page} zeroed", zeroed))
    for n in range(20):  # a run of garbage somewhere
        at = rng.randrange(size)
        garbage = bytes(rng.randrange(256) for _ in range(rng.randint(8, 300)))
        variants.append((f"garbage #{n}", (original[:at] + garbage + original[at:])[:size]))
    return variants


@pytest.mark.parametrize("how", [
    pytest.param(_incidents, id="cli"),
    pytest.param(_report, id="incidents.py"),
])
def test_a_damaged_journal_is_reported_or_refused_in_one_line_never_a_traceback(
        tmp_path: Path, how: Callable[[Path, str], tuple[int, str, str]]) -> None:
    original = _journal(tmp_path / "journal.db").read_bytes()
    code, out, err = how(tmp_path / "journal.db", "json")
    assert (code, err) == (0, "")
    assert len(json.loads(out)) == 40

    variants = _damaged_copies(original)
    assert len(variants) > 350
    outcomes = {0: 0, 1: 0}
    for number, (damage, data) in enumerate(variants):
        folder = tmp_path / f"v{number}"
        folder.mkdir()
        db = folder / "copy.db"
        db.write_bytes(data)
        fmt = ("md", "csv", "json")[number % 3]
        try:
            code, out, err = how(db, fmt)
        except Exception as exc:  # noqa: BLE001 - the point of the test: name the variant
            pytest.fail(f"{damage}: incidents --format {fmt} raised {type(exc).__name__}: "
                        f"{exc}")
        assert code in (0, 1), damage
        outcomes[code] += 1
        if code == 0:
            assert err == "", damage
            if fmt == "json":
                assert isinstance(json.loads(out), list), damage
            elif fmt == "md":
                assert out.startswith("# Incident report"), damage
            else:
                assert out.startswith("time,account,instrument"), damage
        else:
            assert out == "", damage
            assert err.count("\n") == 1, (damage, err)
            assert err.endswith("\n"), (damage, err)
            assert err.startswith(str(db)), (damage, err)
            assert len(err) < 500, (damage, err)
        shutil.rmtree(folder)
    # both outcomes happen: damage the report can live with, and damage it refuses
    assert outcomes[0] > 0, outcomes
    assert outcomes[1] > 0, outcomes


def test_a_row_of_the_wrong_shape_is_damage_not_a_crash(tmp_path: Path) -> None:
    path = _journal(tmp_path / "journal.db")
    for sql in ["UPDATE incidents SET positions = '[1, 2]' WHERE id = 3",
                "UPDATE incidents SET positions = '{\"F1\": [{\"qty\": \"two\"}]}' WHERE id = 3",
                "UPDATE incidents SET actions = '{' WHERE id = 5",
                "UPDATE incidents SET time = 'yesterday' WHERE id = 2",
                "UPDATE incidents SET time = '2026-03-02T14:30:00' WHERE id = 2",
                "UPDATE incidents SET summary = x'00ff' WHERE id = 2",
                "UPDATE incidents SET time = '9999-12-31T23:59:59.999+00:00' WHERE id = 2",
                "UPDATE commands SET args = 'not json' WHERE tag = 'CLR-000001'",
                "UPDATE commands SET attempt = 'one' WHERE tag = 'CLR-000001'",
                "UPDATE commands SET time = 12 WHERE tag = 'CLR-000001'"]:
        copy = tmp_path / "copy.db"
        shutil.copy(path, copy)
        db = sqlite3.connect(copy)
        db.execute(sql)
        db.commit()
        db.close()
        code, out, err = _incidents(copy, "md")
        assert (code, out) == (1, ""), sql
        assert err.startswith(f"{copy}: the journal is damaged: "), (sql, err)
        assert err.count("\n") == 1, (sql, err)
        journal = Journal(copy, read_only=True)
        with pytest.raises(StateError, match="the journal is damaged"):
            collect(journal)
        journal.close()
