"""Account locks: one book, one set of rules, read by everyone who needs to know.

A `lock_account` decision locks an account `halted` (only orders that reduce exposure pass) or
`reducing` (nothing that adds exposure passes) until a moment worked out once, when the lock is
decided (`lock_until`: the firm's next trading day, DST and all, or a clock time or duration).

The engine owns the book (`Engine.lock_book`): it places a lock when it decides one, and a
replay or a dry run, which have no enforcer, lock all the same. The session hands the same book
to the enforcer, which journals each lock it carries out (the journal keeps them across
restarts) and refuses catch-ups on a locked account; the pre-trade gate and the live view read
it. The rules, here and nowhere else:

* a halted lock in force is never replaced by a reducing one, whichever ends later;
* any other lock replaces the one in force (a later decision on the same account wins);
* a lock is over at its `until` (at that moment, not a tick later).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .rules.loader import TradingDay

HALTED = "halted"
REDUCING = "reducing"


@dataclass(slots=True)
class Lock:
    """One account's lock: its state, when it ends, and which rule asked for it and why."""

    account: str
    state: str  # halted | reducing
    until: datetime
    reason: str
    rule: str | None


def lock_until(text: str, now: datetime, zone: Any, trading_day: TradingDay) -> datetime:
    """When a lock given as next_trading_day / next_session / HH:MM / a duration ends."""
    if text in ("next_trading_day", "next_session"):
        return trading_day.next_start(now)
    if text[-1] in "smh" and ":" not in text:
        unit = {"s": 1, "m": 60, "h": 3600}[text[-1]]
        return now + timedelta(seconds=float(text[:-1]) * unit)
    return TradingDay(zone, text).next_start(now)


class Locks:
    """The locks in force, by account."""

    def __init__(self) -> None:
        self._book: dict[str, Lock] = {}

    def place(self, account: str, state: str, until: datetime, reason: str,
              rule: str | None) -> Lock:
        """Lock `account`, unless a stricter lock stands. Returns the lock in force after it:
        the new one, or the halted lock a reducing one could not replace."""
        current = self._book.get(account)
        if current is not None and current.state == HALTED and state == REDUCING:
            return current
        lock = self._book[account] = Lock(account, state, until, reason, rule)
        return lock

    def expire(self, now: datetime) -> list[Lock]:
        """Remove the locks over at `now`; returns them, in the order they were placed."""
        ended = [lock for lock in self._book.values() if lock.until <= now]
        for lock in ended:
            del self._book[lock.account]
        return ended

    def restore(self, locks: list[Lock]) -> None:
        """Start again from saved locks (the engine's state), forgetting any others."""
        self._book = {lock.account: lock for lock in locks}

    def get(self, account: str) -> Lock | None:
        return self._book.get(account)

    def state(self, account: str) -> str:
        """"halted", "reducing", or "" when the account is not locked."""
        lock = self._book.get(account)
        return lock.state if lock is not None else ""

    def states(self) -> dict[str, str]:
        """Account -> lock state, what the pre-trade gate checks an order against."""
        return {account: lock.state for account, lock in self._book.items()}

    def as_tuples(self) -> dict[str, tuple[str, datetime, str]]:
        """Account -> (state, until, rule) of every lock in force."""
        return {a: (lock.state, lock.until, lock.rule or "") for a, lock in self._book.items()}

    def __setitem__(self, account: str, lock: Lock) -> None:
        """Put a lock in force as it is (a lock read back from the journal, a test's)."""
        self._book[account] = lock

    def __contains__(self, account: object) -> bool:
        return account in self._book

    def __iter__(self) -> Iterator[str]:
        return iter(self._book)

    def __len__(self) -> int:
        return len(self._book)

    def values(self) -> list[Lock]:
        return list(self._book.values())
