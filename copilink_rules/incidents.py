"""The incident report a trader can send a prop firm: timestamps, accounts, positions, what the
engine did and why (`copilink-rules incidents --db FILE`).

A journal can be damaged (a disk that filled up, a copy cut short, a file edited by hand): every
row is checked before it is reported, and anything SQLite or JSON cannot read, or a row of the
wrong shape, is one line, "FILE: the journal is damaged: ...", never a traceback.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from .errors import StateError
from .journal import CommandRow, Journal
from .snapshots import MAX_ECHO, clip

# What reading a damaged journal can raise: SQLite's own errors, bad JSON or text
# (ValueError), a value of the wrong type, a time out of datetime's range, JSON nested too deep.
_DAMAGE = (sqlite3.Error, ValueError, TypeError, KeyError, IndexError, AttributeError,
           OverflowError, RecursionError)


class _DamagedRowError(ValueError):
    """A row of the journal that is readable but not of the shape the journal writes."""


def open_journal(path: str | Path) -> Journal:
    """The journal at `path`, opened read-only for a report; StateError in one line when it
    does not exist, is not a journal, or is too damaged to open."""
    file = str(path)
    if not Path(file).exists():
        raise StateError(f"{file}: no such journal")
    try:
        return Journal(file, read_only=True)
    except StateError as exc:  # a ValueError too; SQLite's message may quote a schema: one line
        raise StateError(clip(" ".join(str(exc).split()), 2 * MAX_ECHO + len(file))) from None
    except _DAMAGE as exc:  # e.g. a table name that is not UTF-8 any more
        raise StateError(_damaged(file, exc)) from None


def _damaged(file: str, exc: BaseException) -> str:
    detail = " ".join(str(exc).split()) or type(exc).__name__
    return f"{file}: the journal is damaged: {clip(detail)}"


def collect(journal: Journal, since: str | None = None) -> list[dict[str, Any]]:
    """Incidents, each with the commands sent to its account within the next minute.

    Raises StateError ("FILE: the journal is damaged: ...") when the journal cannot be read."""
    try:
        incidents = [_incident(row) for row in journal.incidents(since)]
        commands = [(_parse(c.time), _command(c)) for c in journal.commands()]
        for incident in incidents:
            start = _parse(incident["time"])
            low, high = start - timedelta(seconds=1), start + timedelta(minutes=1)
            incident["commands"] = [
                {"time": c.time, "tag": c.tag, "action": c.action, "status": c.status,
                 "attempt": c.attempt, "reason": c.reason}
                for moment, c in commands
                if c.account == incident["account"] and low <= moment <= high]
    except _DAMAGE as exc:
        raise StateError(_damaged(journal.path, exc)) from None
    return incidents


def _parse(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise _DamagedRowError(f"time {text!r} has no UTC offset")
    return moment


def _text(row: dict[str, Any], key: str, optional: bool = False) -> None:
    value = row[key]
    if not (isinstance(value, str) or (optional and value is None)):
        raise _DamagedRowError(f"{key} is {type(value).__name__}, not text")


def _incident(row: dict[str, Any]) -> dict[str, Any]:
    """`row` as read from the journal, after checking it has the shape the journal writes."""
    for key in ("time", "severity", "summary"):
        _text(row, key)
    for key in ("account", "instrument", "rule"):
        _text(row, key, optional=True)
    _parse(row["time"])
    positions, actions = row["positions"], row["actions"]
    if positions is not None:
        if not isinstance(positions, dict):
            raise _DamagedRowError("positions are not a mapping of accounts")
        for held in positions.values():
            if not isinstance(held, list) or not all(_position(p) for p in held):
                raise _DamagedRowError("a position is not {instrument, qty, avg_price}")
    if not isinstance(actions, list) or not all(isinstance(a, str) for a in actions):
        raise _DamagedRowError("actions are not a list of text")
    return row


def _position(held: object) -> bool:
    if not isinstance(held, dict):
        return False
    qty, price = held.get("qty"), held.get("avg_price")
    return (isinstance(held.get("instrument"), str) and isinstance(qty, int)
            and not isinstance(qty, bool) and isinstance(price, int | float)
            and not isinstance(price, bool) and math.isfinite(price))


def _command(row: CommandRow) -> CommandRow:
    for name in ("time", "tag", "account", "action", "status"):
        if not isinstance(getattr(row, name), str):
            raise _DamagedRowError(f"a command's {name} is not text")
    if not isinstance(row.attempt, int) or not (row.reason is None or isinstance(row.reason, str)):
        raise _DamagedRowError(f"command {clip(row.tag, 60)}: attempt or reason of the wrong type")
    return row


def render(incidents: list[dict[str, Any]], fmt: str, journal_path: str) -> str:
    if fmt == "json":
        return json.dumps(incidents, indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["time", "account", "instrument", "rule", "severity", "summary",
                         "positions", "actions", "commands"])
        for i in incidents:
            writer.writerow([i["time"], i["account"], i["instrument"], i["rule"], i["severity"],
                             i["summary"], json.dumps(i["positions"]), "; ".join(i["actions"]),
                             "; ".join(f"{c['time']} {c['action']} {c['tag']} {c['status']}"
                                       for c in i["commands"])])
        return out.getvalue()
    lines = [f"# Incident report — {journal_path}", "",
             f"{len(incidents)} incident(s). Times are UTC.", ""]
    for number, i in enumerate(incidents, start=1):
        lines += [f"## {number}. {i['time']} — {i['account'] or 'all accounts'} "
                  f"({i['severity']})", "", i["summary"], "",
                  f"- rule: `{i['rule']}`", f"- instrument: {i['instrument'] or '—'}"]
        for account, positions in (i["positions"] or {}).items():
            held = ", ".join(f"{p['qty']:+d} {p['instrument']} @ {p['avg_price']}"
                             for p in positions) or "flat"
            lines.append(f"- positions of {account} at the time: {held}")
        for c in i["commands"]:
            lines.append(f"- {c['time']}: {c['action']} `{c['tag']}` → {c['status']}"
                         f"{' (' + c['reason'] + ')' if c['reason'] else ''}")
        lines.append("")
    return "\n".join(lines)
