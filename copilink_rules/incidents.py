"""The incident report a trader can send a prop firm: timestamps, accounts, positions, what the
engine did and why (`copilink-rules incidents --db FILE`)."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta
from typing import Any

from .journal import Journal


def collect(journal: Journal, since: str | None = None) -> list[dict[str, Any]]:
    """Incidents, each with the commands sent to its account within the next minute."""
    incidents = journal.incidents(since)
    commands = journal.commands()
    for incident in incidents:
        start = _parse(incident["time"])
        incident["commands"] = [
            {"time": c.time, "tag": c.tag, "action": c.action, "status": c.status,
             "attempt": c.attempt, "reason": c.reason}
            for c in commands
            if c.account == incident["account"] and
            start - timedelta(seconds=1) <= _parse(c.time) <= start + timedelta(minutes=1)]
    return incidents


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


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
