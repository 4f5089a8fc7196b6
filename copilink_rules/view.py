"""The live terminal view (rich): accounts, positions, states and locks, data age, and the
last decisions. Without a terminal, alerts are printed as plain lines instead."""

from __future__ import annotations

from datetime import datetime

from rich.console import Group
from rich.table import Table
from rich.text import Text

from .session import Session

_STYLE = {"critical": "bold red", "warning": "yellow", "info": "green", "error": "magenta"}


def render(session: Session, title: str = "copilink-rules") -> Group:
    snapshot = session.last_snapshot
    accounts = Table(title=title, expand=True)
    for column in ("account", "role", "link", "data age", "copier", "positions", "P&L", "lock"):
        accounts.add_column(column)
    if snapshot is not None:
        for account in snapshot.accounts:
            age = account.data_age(snapshot.time)
            link = Text("up", "green") if account.connected else Text("DOWN", "bold red")
            positions = ", ".join(f"{p.qty:+d} {p.instrument}" for p in account.positions) or "flat"
            lock = session.engine.lock_book.get(account.id)
            accounts.add_row(
                account.id, account.role, link, f"{age:.1f}s",
                (Text(account.copier, "bold red") if account.copier == "paused" else
                 account.copier) if account.role == "follower" else "",
                positions, f"{account.realized_pnl + account.unrealized_pnl:,.2f}",
                f"{lock.state} until {lock.until:%H:%M}" if lock else "")
    recent = Table(title="last decisions", expand=True)
    for column in ("time", "rule", "action", "account", "reason"):
        recent.add_column(column, overflow="fold")
    for decision in list(session.recent)[-8:]:
        recent.add_row(decision.time.strftime("%H:%M:%S"), decision.rule,
                       Text(decision.action, _STYLE.get(decision.severity, "")),
                       decision.account or "(all)", decision.reason)
    status = Text(f"ticks {session.ticks}   commands {session.journal.count('commands')}   "
                  f"incidents {session.journal.count('incidents')}   "
                  f"kill switch {'ENGAGED' if session.kill_switch.engaged else 'off'}   "
                  f"{'DRY RUN' if session.dry_run else ''}")
    copier = session.builtin
    if copier is not None and copier.paused:  # how to resume, where the trader looks
        status.append(f"\ncopying paused onto {', '.join(sorted(copier.paused))}: resume with "
                      f"copilink-rules resume <follower> --journal {session.journal.path}",
                      "bold red")
    stamp = Text(snapshot.time.strftime("%Y-%m-%d %H:%M:%S UTC") if snapshot else
                 datetime.now().strftime("waiting for the first snapshot"), "dim")
    return Group(stamp, accounts, recent, status)
