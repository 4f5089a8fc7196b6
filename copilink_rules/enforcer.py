"""Decisions become broker commands, tracked until the broker's world shows they worked.

Lifecycle of a corrective action (flatten, catch-up, cancel):

    pending --(snapshot shows it done)--> confirmed
       |  \\--(rejected, or not done within `verify_after`)--> retrying --(backoff)--> pending
       \\--(attempts exhausted)--> escalated: critical alert, incident, every follower paused

Each attempt is its own journal row and tag (`CLR-000007`, `CLR-000007~2`, ...); when a new
attempt is sent, the previous row becomes `retried`, so only the latest attempt is ever open.

Safety, whatever the rules say:
* at most one outstanding corrective action per account and instrument family — at the broker
  too: an attempt the broker accepted but did not finish is asked about by tag, cancelled if it
  still works, and a new attempt goes out only once the old one is final;
* a flatten is the broker's close-position command (it closes what is held when it runs, so
  it can never cross through zero into the opposite side);
* no order to a disconnected or stale account (it waits until the account is reachable);
* a catch-up passes the pre-trade gate first — every contract limit of the account's firm,
  locks, hedges, news blackouts, flat-by windows — and is cut to fit or refused;
* the kill switch (file, signal or call), a broker's rate limit and a refused log-in stop every
  automatic order at once; the engine holds its decisions and proposes them again once the
  block lifts (`blocked()`);
* a broker that cannot be reached is not a broker that refused: the command waits and is
  asked about by tag before it is sent again;
* `dry_run` journals what would be sent and sends nothing; its alerts say "would".

Every command is journaled as `sending` before it goes out and updated with the answer; a
restarted enforcer asks the broker about those by tag instead of sending them again.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from .adapters.base import (
    CANCEL_AGAIN,
    Broker,
    BrokerAnswer,
    CopierPort,
    OrderReport,
    call_broker,
    find_tag,
)
from .alerts import Alert, Alerts
from .calendar import Calendar
from .copier import COPIER_ACTIONS, BuiltinCopier, ExternalCopier
from .engine import DEFAULT_STALE_AFTER
from .facts import account_exposure, contracts_for, reachable
from .gate import Gate, OrderRequest
from .instruments import Catalog, default_catalog
from .journal import OPEN_STATUSES, CommandRow, Journal, iso
from .locks import Lock, Locks, lock_until
from .model import Account, Decision, Snapshot
from .rules.loader import DEFAULT_TRADING_DAY, Policy

log = logging.getLogger("copilink_rules.enforcer")

CORRECTIVE = ("flatten", "catch_up", "cancel_orders")


class KillSwitch:
    """Stops every automatic order: engaged by `engage()`, a signal handler, or a file."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self._engaged = False
        self.reason = ""

    def engage(self, reason: str = "kill switch engaged") -> None:
        self._engaged = True
        self.reason = reason

    def release(self) -> None:
        self._engaged = False
        if self.path is not None and self.path.exists():
            self.path.unlink()

    @property
    def engaged(self) -> bool:
        if self._engaged:
            return True
        if self.path is not None and self.path.exists():
            self.reason = f"kill file {self.path} exists"
            return True
        return False


@dataclass
class Action:
    """One corrective action and its lifecycle."""

    tag: str
    base_tag: str
    account: str
    instrument: str | None
    family: str | None
    kind: str
    rule: str | None
    args: dict[str, Any]
    status: str = "pending"
    attempt: int = 1
    sent_at: datetime | None = None
    next_try: datetime | None = None
    reason: str = ""
    cancel_at: datetime | None = None  # when the broker was last asked to cancel it

    @property
    def key(self) -> tuple[str, str]:
        return (self.account, self.family or "*")


@dataclass
class Enforcer:
    broker: Broker
    journal: Journal
    alerts: Alerts
    policy: Policy
    copier: CopierPort = field(default_factory=ExternalCopier)
    dry_run: bool = False
    kill_switch: KillSwitch = field(default_factory=KillSwitch)
    catalog: Catalog = field(default_factory=default_catalog)
    calendar: Calendar | None = None
    backoff: tuple[float, ...] = (1.0, 2.0, 4.0)
    verify_after: float = 5.0
    on_command: Callable[[str, str, str], None] | None = None  # (kind, account, tag): hooks
    # account -> the contract it trades, when not the leader's (MNQH6 to copy NQ as micros)
    contracts: dict[str, str] = field(default_factory=dict)
    outstanding: dict[tuple[str, str], Action] = field(default_factory=dict)
    # the book of locks (locks.py); a session hands the engine's over, so both read one book
    locks: Locks = field(default_factory=Locks)
    escalated: list[Action] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._follower_ids: list[str] = []
        # the broker asked us to wait (rate limit) / refused our log-in: nothing is sent
        self.hold_until: datetime | None = None
        self.hold_reason = ""
        self.auth_failed = ""
        self.auth_failed_at: datetime | None = None
        self._last_snapshot: Snapshot | None = None
        # decisions refused for a passing reason this tick (the session re-arms their rules)
        self.again: list[Decision] = []
        self._quiet: set[tuple[str | None, str | None, str | None]] = set()
        self._again = False
        self._refused: dict[tuple[str | None, str, str | None], str] = {}
        # does the rule that asked for an action still want it? (the engine's episodes)
        self.still_wanted: Callable[[Action], bool] = lambda action: True
        # while a tick's decisions are carried out, the broker's answers to them are told
        # after them, so "flattening F1" reads before "broker rejected flatten"
        self._told_later: list[Alert] | None = None
        self._journaled: dict[str, datetime] = {}  # account -> until, of the journal's locks
        self.use_policy(self.policy)

    def use_policy(self, policy: Policy) -> None:
        """Take the numbers the enforcer needs from `policy` (at start and on hot reload)."""
        self.policy = policy
        # every order the engine sends asks the pre-trade gate first: the same limits
        self.gate = Gate(policy, self.catalog, self.calendar)
        self.max_contracts = policy.param("max_contracts", None)
        self.entry_max_data_age = float(policy.param("entry_max_data_age", 1.0))
        self.stale_after = float(policy.param("stale_after", DEFAULT_STALE_AFTER))
        self._zones = {r.id: r.timezone for r in policy.rules}

    # --- restart ----------------------------------------------------------------------------

    def restore(self, now: datetime) -> list[str]:
        """Pick up open commands and locks from the journal; ask the broker about commands
        whose answer was never journaled. Returns notes for the log."""
        notes = []
        rows = self.journal.commands()
        last_attempt: dict[str, int] = {}  # base tag -> its latest attempt
        for row in rows:
            base = row.tag.split("~")[0]
            last_attempt[base] = max(last_attempt.get(base, 0), row.attempt)
        for row in rows:
            if row.status not in OPEN_STATUSES or row.action in COPIER_ACTIONS:
                continue  # the built-in copier's orders are its own (BuiltinCopier.restore)
            if row.attempt < last_attempt[row.tag.split("~")[0]]:
                # an attempt a later one replaced (journals written before `retried` existed)
                self.journal.command_status(row.tag, "retried", now)
                continue
            action = Action(row.tag, row.tag.split("~")[0], row.account, row.instrument,
                            row.family, row.action, row.rule, row.args, row.status, row.attempt,
                            datetime.fromisoformat(row.updated.replace("Z", "+00:00")))
            if row.status == "retrying":
                action.next_try = now  # its backoff ran out while we were down
            if row.status == "sending":
                report = self._find(row.tag)
                answer = report.answer() if report is not None else None
                if answer is None:
                    action.status = "retrying"  # never reached the broker: send it again
                    action.next_try = now
                    notes.append(f"{row.tag}: never reached the broker; will send it again")
                else:
                    self._answered(action, answer, now)
                    notes.append(f"{row.tag}: the broker has it ({answer.status})")
            if action.kind in CORRECTIVE:
                self.outstanding[action.key] = action
        for lock in self.journal.locks():
            until = datetime.fromisoformat(lock["until"].replace("Z", "+00:00"))
            self._journaled[lock["account"]] = until
            if until > now:  # the journal is never behind the engine's saved state
                self.locks[lock["account"]] = Lock(lock["account"], lock["state"], until,
                                                   lock["reason"], lock["rule"])
        return notes

    # --- each tick ----------------------------------------------------------------------------

    def blocked(self, now: datetime) -> str | None:
        """Why no automatic order may go out now (kill switch, the broker's rate limit, a
        refused log-in), or None. The engine holds its order decisions while this says so
        and proposes them again once it clears."""
        if self.kill_switch.engaged:
            return f"kill switch: {self.kill_switch.reason}"
        if self.auth_failed:
            return f"the broker refused our log-in ({self.auth_failed})"
        if self.hold_until is not None:
            if now < self.hold_until:
                return (f"the broker asked us to wait until {iso(self.hold_until)} "
                        f"({self.hold_reason})")
            self.hold_until = None
        return None

    # --- what the built-in copier asks (copier.CopierHost) ---------------------------------

    def busy(self, account: str, family: str) -> bool:
        """Is a corrective action outstanding on `account` in `family`?"""
        return (account, family) in self.outstanding or (account, "*") in self.outstanding

    def gate_locks(self) -> dict[str, tuple[str, datetime, str]]:
        return self.locks.as_tuples()

    def broker_trouble(self, answer: BrokerAnswer, now: datetime, account: str) -> None:
        """A rate limit or a refused log-in met by another sender: every automatic order
        stops as if an action of ours had met it."""
        if answer.status == "rate_limited":
            self.hold_until = now + timedelta(seconds=max(answer.retry_after or 60.0,
                                                          self.backoff[0]))
            self.hold_reason = f"rate limited: {answer.reason}"
            self._alert(now, "critical", f"the broker rate-limited us ({answer.reason}): no "
                        f"orders until {iso(self.hold_until)}; watch {account} by hand",
                        account)
        elif answer.status == "auth_failed":
            self.auth_failed = answer.reason or "authentication failed"
            self.auth_failed_at = now
            self._alert(now, "critical", f"the broker refused our log-in ({answer.reason}): "
                        "no orders are sent until it accepts it again — check the credentials "
                        f"and act on {account} by hand", account)

    def alert(self, now: datetime, severity: str, message: str, account: str | None) -> None:
        self._alert(now, severity, message, account)

    def new_tag(self) -> str:
        return self._tag()

    def broker_back(self, now: datetime) -> None:
        """The adapter logged in again: sending may resume."""
        if self.auth_failed:
            self.auth_failed = ""
            self._alert(now, "info", "the broker accepted our log-in again: orders resume",
                        None)

    def process(self, snapshot: Snapshot, decisions: list[Decision]) -> list[Action]:
        """Follow up open actions against `snapshot`, then carry out new decisions."""
        now = snapshot.time
        self._last_snapshot = snapshot
        # a rule re-armed last tick fires again while it waits: said once, not every tick
        self._quiet = {(d.rule, d.account, d.instrument) for d in self.again}
        self.again = []
        accounts = {a.id: a for a in snapshot.accounts}
        self._follower_ids = [a.id for a in snapshot.accounts if a.role == "follower"]
        self._expire_locks(now)
        self._follow_up(snapshot, accounts, now)
        started = []
        self._told_later = []
        try:
            for decision in decisions:
                if decision.suppressed is not False or decision.action == "error":
                    continue
                action = self._carry_out(decision, snapshot, accounts, now)
                if action is not None:
                    started.append(action)
        finally:
            later, self._told_later = self._told_later, None
            for alert in later:
                self.alerts.send(alert)
        return started

    def _expire_locks(self, now: datetime) -> None:
        # the engine reports the end of a lock (an info alert decision) and, in a session, has
        # taken it out of the book already; this tidies up the book and the journal's rows
        self.locks.expire(now)
        for account, until in list(self._journaled.items()):
            if until <= now:
                del self._journaled[account]
                self.journal.unlock(account)

    def _reachable(self, account: Account | None, now: datetime) -> bool:
        return reachable(account, now, self.stale_after)

    def _done(self, action: Action, account: Account | None) -> bool:
        """Does the broker's world show the action worked?"""
        if account is None:
            return False
        families = account_exposure(account, self.catalog)
        held = families.get(action.family) if action.family is not None else None
        if action.kind == "flatten":
            return not families if action.family is None else held is None
        if action.kind == "cancel_orders":
            return not [o for o in account.orders if o.status in ("working", "pending") and (
                action.family is None or
                self.catalog.parse(o.instrument).family == action.family)]
        if action.kind == "catch_up":
            wanted = int(action.args.get("qty", 0))
            equiv = held.equiv if held is not None else 0.0 if action.family is not None \
                else sum(f.equiv for f in families.values())
            return wanted != 0 and equiv * wanted > 0
        return True

    def _follow_up(self, snapshot: Snapshot, accounts: dict[str, Account],
                   now: datetime) -> None:
        for key, action in list(self.outstanding.items()):
            account = accounts.get(action.account)
            if action.status in ("pending", "sending", "cancelling") and \
                    self._done(action, account):
                action.status = "confirmed"
                self.journal.command_status(action.tag, "confirmed", now, "verified in snapshot")
                del self.outstanding[key]
                continue
            late = action.status == "pending" and action.sent_at is not None and \
                (now - action.sent_at).total_seconds() >= self.verify_after
            if late or action.status == "cancelling":
                self._overdue(action, now)
            if action.status == "retrying" and action.next_try is not None and \
                    now >= action.next_try:
                if not self._reachable(account, now) or self.blocked(now):
                    continue  # waits: never an order to an unreachable account
                if not self._previous_final(action, now):
                    continue
                if action.kind == "catch_up":
                    self._finish(action, now, "failed", "catch-up not retried: price moves on")
                    continue
                if not self.still_wanted(action):
                    self._finish(action, now, "failed", f"not retried: the condition of "
                                 f"{action.rule} no longer holds (the rule decides again if "
                                 "it comes back)")
                    continue
                self._send(action, now, retry=True)

    def _overdue(self, action: Action, now: datetime) -> None:
        """An accepted attempt not done in time: while the broker still works it, cancel it
        and wait for its final state; a second order beside a working one could fill too
        (long 2 closed twice is short 2)."""
        report = self._find(action.tag)
        if report is not None and not report.final:
            if action.status != "cancelling":
                action.status = "cancelling"
                self.journal.command_status(action.tag, "cancelling", now,
                                            f"still working {self.verify_after:g}s after the "
                                            "broker accepted it: cancelling it first")
            # asked again while it works (a cancel refused or unanswered): until it is final
            # nothing else goes to that account and family
            if report.order_id and (action.cancel_at is None or
                                    (now - action.cancel_at).total_seconds() >= CANCEL_AGAIN):
                action.cancel_at = now
                self._cancel_at_broker(action, report.order_id, now)
            return
        self._failed_attempt(action, now, f"not done {self.verify_after:g}s after the broker "
                             f"accepted it ({report.state if report else 'unknown to it'})")

    def _cancel_at_broker(self, action: Action, order_id: str, now: datetime) -> None:
        tag = f"{action.tag}-cancel"
        answer = call_broker(lambda: self.broker.cancel_order(action.account, order_id, tag))
        self.journal.answer(tag, now, answer.status, answer.reason)

    def _previous_final(self, action: Action, now: datetime) -> bool:
        """Before a new attempt: is the broker done with the previous one? An attempt it
        never answered (unreachable) may still have arrived."""
        report = self._find(action.tag)
        if report is None or report.final:
            return True
        if report.order_id:
            self._cancel_at_broker(action, report.order_id, now)
        return False

    def _find(self, tag: str) -> OrderReport | None:
        return find_tag(self.broker, tag)

    def _failed_attempt(self, action: Action, now: datetime, reason: str) -> None:
        if action.attempt > len(self.backoff):
            self._escalate(action, now, reason)
            return
        action.status = "retrying"
        action.next_try = now + timedelta(seconds=self.backoff[action.attempt - 1])
        action.reason = reason
        self.journal.command_status(action.tag, "retrying", now, reason)

    def _finish(self, action: Action, now: datetime, status: str, reason: str) -> None:
        action.status = status
        self.journal.command_status(action.tag, status, now, reason)
        self.outstanding.pop(action.key, None)

    def _escalate(self, action: Action, now: datetime, reason: str) -> None:
        self._finish(action, now, "escalated", reason)
        self.escalated.append(action)
        message = (f"{action.account}: {action.kind} {action.instrument or 'all instruments'} "
                   f"failed after {action.attempt} attempt(s) ({reason}); every follower paused "
                   "— act by hand now")
        self._alert(now, "critical", message, action.account, action.rule)
        self.journal.incident(now, action.account, action.instrument, action.rule, "critical",
                              message, {}, [f"escalated {action.tag}", "pause all followers"])
        for follower in self._followers():
            self._copier_command("pause_copier", follower, action.rule, now)

    def _followers(self) -> list[str]:
        """The followers of the last snapshot processed."""
        return list(self._follower_ids)

    # --- carrying out decisions ---------------------------------------------------------------

    def _carry_out(self, decision: Decision, snapshot: Snapshot,
                   accounts: dict[str, Account], now: datetime) -> Action | None:
        kind = decision.action
        if kind == "alert":
            if (decision.rule, decision.account, decision.instrument) not in self._quiet:
                self._decision_alert(decision, snapshot, accounts, now)
            return None
        if kind == "lock_account":
            self._lock(decision, now)
            return None
        if kind in ("pause_copier", "resume_copier", "skip_entry") and \
                (decision.rule, decision.account, decision.instrument) in self._quiet:
            return None  # done when the rule first fired; it only waits for its order
        if kind in ("pause_copier", "resume_copier"):
            targets = self._followers() if decision.args.get("all_followers") or \
                decision.account is None else [decision.account]
            for follower in targets:
                self._copier_command(kind, follower, decision.rule, now)
            return None
        if kind == "skip_entry":
            if decision.account and decision.instrument:
                self._copier_command(kind, decision.account, decision.rule, now,
                                     decision.instrument)
            return None
        if kind not in CORRECTIVE or decision.account is None:
            return None  # block_order / reduce_order belong to the pre-trade gate
        family = self.catalog.parse(decision.instrument).family if decision.instrument else None
        action = Action("", "", decision.account, decision.instrument, family, kind,
                        decision.rule, dict(decision.args))
        account = accounts.get(decision.account)
        if kind == "catch_up":
            self._in_own_contract(action)
            if isinstance(self.copier, BuiltinCopier):  # the follower's max_qty holds too
                self.copier.cap(action.account, action.args)
            # an order that adds exposure is checked against the freshest data there is
            account, now_fresh = self._fresh_account(decision.account, account, now)
        self._again = False
        refusal = self._refusal(action, account, now if kind != "catch_up" else now_fresh)
        if refusal:
            if self._again:  # not done, only not now: the engine proposes it again
                self.again.append(decision)
            said = (decision.rule, action.account, action.instrument)
            if self._refused.get(said) != refusal:  # journaled once, not every tick
                self._refused[said] = refusal
                tag = self._tag()
                self._journal_command(tag, action.account, action.instrument, family, kind,
                                      action.rule, action.args, "blocked", 1, now, refusal)
                log.info("%s %s %s blocked: %s", kind, action.account, action.instrument,
                         refusal)
            return None
        self._refused.pop((decision.rule, action.account, action.instrument), None)
        action.tag = action.base_tag = self._tag()
        self.outstanding[action.key] = action
        self._send(action, now)
        return action

    def _in_own_contract(self, action: Action) -> None:
        """A catch-up in the contract the follower trades: 2 NQ at ratio 1 is 20 MNQ for a
        follower that copies NQ as micros, never 2 NQ."""
        symbol = self.contracts.get(action.account)
        if symbol is None or symbol == action.instrument or "equiv" not in action.args:
            return
        own = self.catalog.parse(symbol)
        if own.family != action.family:
            return  # it trades another family: the leader's contract it is
        action.args["contract_of_leader"] = f"{action.args.get('qty')} {action.instrument}"
        action.instrument = symbol
        action.args["qty"] = contracts_for(float(action.args["equiv"]), own.size)

    def _fresh_account(self, account_id: str, seen: Account | None,
                       now: datetime) -> tuple[Account | None, datetime]:
        try:
            snapshot = self.broker.snapshot()
        except Exception:  # noqa: BLE001 - without a fresh read, the tick's data must do
            return seen, now
        fresh = next((a for a in snapshot.accounts if a.id == account_id), None)
        return fresh, snapshot.time

    def _refusal(self, action: Action, account: Account | None, now: datetime) -> str | None:
        copier = self.copier
        copying = next((order for key, order in copier.in_flight.items()
                        if key.split("|", 1)[0] == action.account and
                        action.family in (None, order.family)), None) \
            if isinstance(copier, BuiltinCopier) else None
        if copying is not None:
            self._again = True
            return f"the copier's order {copying.tag} is still open for this account and " \
                "instrument"
        existing = self._overlapping(action)
        if existing is not None and action.kind == "flatten" and existing.kind != "flatten" \
                and self._superseded(existing, now):
            existing = None
        if existing is not None:
            self._again = True
            return f"{existing.kind} {existing.tag} is still outstanding for this account " \
                "and instrument"
        blocked = self.blocked(now)
        if blocked:
            self._again = True
            return blocked
        if not self._reachable(account, now):
            self._again = True
            return f"account {action.account} is disconnected or stale: no orders"
        if action.kind != "catch_up" or account is None:
            return None
        age = account.data_age(now)
        if age > self.entry_max_data_age:
            return (f"data of {action.account} is {age:.1f}s old; an order that adds exposure "
                    f"needs data under {self.entry_max_data_age:g}s old")
        lock = self.locks.get(action.account)
        if lock is not None:
            return f"account is locked ({lock.state}) until {iso(lock.until)}: no new exposure"
        qty = int(action.args.get("qty", 0))
        if qty == 0:
            return "catch-up of 0 contracts"
        family = account_exposure(account, self.catalog).get(action.family or "")
        held = family.qty if family is not None else 0
        if held * qty < 0:
            return "the follower holds the other side: a catch-up would not fix that"
        if held != 0:
            return "the follower is no longer flat"
        return self._gate_refusal(action, account, qty, now)

    def _overlapping(self, action: Action) -> Action | None:
        """An outstanding action on the same account whose orders could meet this one's:
        the same family, or either of them over every instrument (a flatten of all beside a
        flatten of NQ would close NQ twice)."""
        exact = self.outstanding.get(action.key)
        if exact is not None:
            return exact
        if action.family is None:
            return next((a for a in self.outstanding.values() if a.account == action.account),
                        None)
        return self.outstanding.get((action.account, "*"))

    def _superseded(self, existing: Action, now: datetime) -> bool:
        """A flatten outranks an outstanding catch-up or cancel: once the broker is done
        with it (a working order is cancelled first), it is closed and the flatten goes."""
        report = self._find(existing.tag)
        if report is not None and not report.final:
            if report.order_id:
                self._cancel_at_broker(existing, report.order_id, now)
            return False
        self._finish(existing, now, "superseded", "a flatten took over")
        return True

    def _gate_refusal(self, action: Action, account: Account, qty: int,
                      now: datetime) -> str | None:
        """The pre-trade gate's answer to the catch-up: every contract limit of the account's
        firm (from whichever rule set states it), locks, hedges, blackouts, flat-by; and a
        `max_contracts` param, where the rules declare one, over every account."""
        assert action.instrument is not None
        snapshot = self._last_snapshot
        if snapshot is not None:
            self.gate.update(_with_account(snapshot, account), self.locks)
            verdict = self.gate.check(OrderRequest(
                account=action.account, instrument=action.instrument,
                side="buy" if qty > 0 else "sell", qty=abs(qty)))
            if verdict.verdict == "block":
                return f"pre-trade gate: {'; '.join(verdict.reasons)}"
            if verdict.verdict == "reduce":
                action.args["qty"] = verdict.qty if qty > 0 else -verdict.qty
                action.args["reduced_from"] = qty
                action.args["reduced_because"] = "; ".join(verdict.reasons)
                qty = int(action.args["qty"])
        if self.max_contracts is not None:
            total = sum(abs(p.qty) for p in account.positions)
            room = int(self.max_contracts) - total
            if room <= 0:
                return f"max_contracts {self.max_contracts} reached"
            if abs(qty) > room:
                action.args.setdefault("reduced_from", qty)
                action.args["qty"] = room if qty > 0 else -room
        return None

    def _send(self, action: Action, now: datetime, retry: bool = False) -> None:
        if retry:  # a new attempt, under its own tag; the previous one is closed with it
            previous = action.tag
            action.attempt += 1
            action.tag = f"{action.base_tag}~{action.attempt}"
            with self.journal.transaction():
                self.journal.command_status(previous, "retried", now)
                self._journal_command(action.tag, action.account, action.instrument,
                                      action.family, action.kind, action.rule, action.args,
                                      "sending", action.attempt, now)
        else:
            self._journal_command(action.tag, action.account, action.instrument, action.family,
                                  action.kind, action.rule, action.args, "sending",
                                  action.attempt, now)
        if self.dry_run:
            self._finish(action, now, "dry_run", "run --dry-run: not sent")
            return
        blocked = self.blocked(now)
        if blocked:
            self._finish(action, now, "blocked", blocked)
            return
        if self.on_command is not None:
            self.on_command(action.kind, action.account, action.tag)
        answer, stop = self._call(action)
        action.sent_at = now
        self._answered(action, answer, now)
        if stop is not None:
            self.journal.answer(f"{action.tag}-stop", now, stop.status, stop.reason)
            if not stop.ok:
                self._alert(now, "critical", f"{action.account}: the protective stop at "
                            f"{action.args.get('stop_price')} for catch-up {action.tag} was "
                            f"refused ({stop.reason}): the position has no stop, place one by "
                            "hand", action.account, action.rule)

    def _call(self, action: Action) -> tuple[BrokerAnswer, BrokerAnswer | None]:
        """The broker's answer, and for a catch-up its answer to the protective stop."""
        broker = self.broker
        if action.kind == "flatten":
            return call_broker(lambda: broker.close_position(
                action.account, action.instrument, action.tag)), None
        if action.kind == "cancel_orders":
            return call_broker(lambda: broker.cancel_orders(
                action.account, action.instrument, action.tag)), None
        qty = int(action.args["qty"])
        instrument = action.instrument
        assert instrument is not None
        stop_price = action.args.get("stop_price")
        if isinstance(self.copier, BuiltinCopier):  # the copier sends it: its order there
            return self.copier.place_catch_up(action.account, instrument, qty, action.tag,
                                              None if stop_price is None else float(stop_price))
        answer = call_broker(lambda: broker.place_order(
            action.account, instrument, "buy" if qty > 0 else "sell", abs(qty), "market",
            action.tag))
        stop = action.args.get("stop_price")
        if not answer.ok or stop is None:
            return answer, None
        return answer, call_broker(lambda: broker.place_order(
            action.account, instrument, "sell" if qty > 0 else "buy", abs(qty), "stop",
            f"{action.tag}-stop", float(stop)))

    def _answered(self, action: Action, answer: BrokerAnswer, now: datetime) -> None:
        self.journal.answer(action.tag, now, answer.status, answer.reason)
        if answer.ok:
            action.status = "pending"
            action.sent_at = action.sent_at or now
            self.journal.command_status(action.tag, "pending", now, answer.reason or None)
            return
        if answer.status == "rejected":
            self._alert(now, "warning", f"{action.account}: broker rejected {action.kind} "
                        f"({answer.reason}); attempt {action.attempt}", action.account,
                        action.rule)
            self._failed_attempt(action, now, f"rejected: {answer.reason}")
            return
        # not a refusal: the broker could not be reached, asked us to wait, or refused the
        # log-in. The attempt may still have arrived: it is asked about by tag before the
        # next one, which waits (never a burst of retries).
        wait = self.backoff[0]
        if answer.status == "rate_limited":
            wait = max(answer.retry_after or 60.0, wait)
            self.hold_until = now + timedelta(seconds=wait)
            self.hold_reason = f"rate limited: {answer.reason}"
            self._alert(now, "critical", f"the broker rate-limited us ({answer.reason}): no "
                        f"orders until {iso(self.hold_until)}; watch {action.account} by hand",
                        action.account, action.rule)
        elif answer.status == "auth_failed":
            self.auth_failed = answer.reason or "authentication failed"
            self.auth_failed_at = now
            self._alert(now, "critical", f"the broker refused our log-in ({answer.reason}): "
                        "no orders are sent until it accepts it again — check the credentials "
                        f"and act on {action.account} by hand", action.account, action.rule)
        else:
            self._alert(now, "warning", f"{action.account}: {action.kind} could not reach the "
                        f"broker ({answer.reason}); trying again when it is reachable",
                        action.account, action.rule)
        action.status = "retrying"
        action.next_try = now + timedelta(seconds=wait)
        action.reason = f"{answer.status}: {answer.reason}"
        self.journal.command_status(action.tag, "retrying", now, action.reason)

    def _copier_command(self, kind: str, follower: str, rule: str | None,
                        now: datetime, instrument: str | None = None) -> None:
        tag = self._tag()
        self._journal_command(tag, follower, instrument, None, kind, rule, {}, "sending", 1,
                              now)
        if self.dry_run:
            self.journal.command_status(tag, "dry_run", now)
            return
        copier = self.copier
        if kind == "pause_copier":
            answer = call_broker(lambda: copier.pause(follower, tag))
        elif kind == "resume_copier":
            answer = call_broker(lambda: copier.resume(follower, tag))
        else:
            answer = call_broker(lambda: copier.skip_entry(follower, instrument or "", tag))
        if answer.status == "manual":  # a copier only a person can steer
            self.journal.answer(tag, now, answer.status, answer.reason)
            self.journal.command_status(tag, "manual", now, f"a person must act: "
                                        f"{answer.reason}")
            self._alert(now, "critical", f"ACT NOW: {answer.reason}", follower, rule)
            return
        self._journal_answer(tag, answer, now)

    def _journal_answer(self, tag: str, answer: BrokerAnswer, now: datetime) -> None:
        """The answer to a one-shot copier command: accepted is done."""
        self.journal.answer(tag, now, answer.status, answer.reason)
        status = "confirmed" if answer.ok else "rejected"
        self.journal.command_status(tag, status, now, answer.reason or None)

    def _journal_command(self, tag: str, account: str, instrument: str | None,
                         family: str | None, kind: str, rule: str | None, args: dict[str, Any],
                         status: str, attempt: int, now: datetime,
                         reason: str | None = None) -> None:
        self.journal.command(CommandRow(tag, iso(now), account, instrument, family, kind, rule,
                                        args, status, attempt, reason, iso(now)))

    def _tag(self) -> str:
        return f"CLR-{self.journal.next_sequence():06d}"

    def _lock(self, decision: Decision, now: datetime) -> None:
        if decision.account is None:
            return
        state = str(decision.args.get("state", "halted"))
        # the engine worked out when the lock ends (the firm's trading day, DST and all)
        if "until_time" in decision.args:
            until = datetime.fromisoformat(str(decision.args["until_time"]))
        else:  # a decision made elsewhere: the CME trading day
            until = lock_until(str(decision.args.get("until", "next_trading_day")), now,
                               ZoneInfo("America/New_York"), DEFAULT_TRADING_DAY)
        # in a session the engine placed this lock already: placing it again changes nothing
        lock = self.locks.place(decision.account, state, until, decision.reason, decision.rule)
        if lock.state != state:
            return  # a halted lock in force is stricter than a reducing one (locks.py)
        self.journal.lock(decision.account, state, until, decision.reason, decision.rule, now)
        self._journaled[decision.account] = until
        zone = self._zones.get(decision.rule, ZoneInfo("UTC"))
        self._alert(now, "critical", f"{decision.account} locked ({state}) until "
                    f"{until.astimezone(zone):%Y-%m-%d %H:%M %Z}", decision.account,
                    decision.rule)

    def _decision_alert(self, decision: Decision, snapshot: Snapshot,
                        accounts: dict[str, Account], now: datetime) -> None:
        severity = str(decision.args.get("severity", decision.severity))
        self._alert(now, severity, decision.reason, decision.account, decision.rule,
                    at_once=True)
        if decision.args.get("incident"):
            own = accounts.get(decision.account or "")
            leader = own.leader if own is not None else None
            involved = [a for a in snapshot.accounts if a.id in (decision.account, leader)]
            positions = {a.id: [p.model_dump(mode="json") for p in a.positions]
                         for a in involved}
            self.journal.incident(now, decision.account, decision.instrument, decision.rule,
                                  severity, decision.reason, positions,
                                  [f"{decision.rule}: {decision.reason}"])

    def _alert(self, now: datetime, severity: str, message: str, account: str | None,
               rule: str | None = None, *, at_once: bool = False) -> None:
        """Journal an alert and tell it (`at_once`: even while decisions are being
        carried out)."""
        if self.dry_run:
            message = would(message)
        self.journal.alert(now, severity, account, message)
        alert = Alert(now, severity, message, account, rule)
        if self._told_later is None or at_once:
            self.alerts.send(alert)
        else:
            self._told_later.append(alert)


_DONE = re.compile(r"\b(flattened|flattening|paused|pausing|locked|locking|catching up|"
                   r"skipping|cancelled|cancelling|closed|closing)\b", re.IGNORECASE)
_WOULD = {"flattened": "would be flattened", "flattening": "would flatten",
          "paused": "would be paused", "pausing": "would pause", "locked": "would be locked",
          "locking": "would lock", "catching up": "would catch up", "skipping": "would skip",
          "cancelled": "would be cancelled", "cancelling": "would cancel",
          "closed": "would be closed", "closing": "would close"}


def would(message: str) -> str:
    """A rule's alert as a dry run tells it: nothing was done, so "flattened" reads "would be
    flattened", and the line says it is a dry run."""
    told = _DONE.sub(lambda m: _WOULD[m.group(0).lower()], message)
    return f"DRY RUN, nothing sent: {told}"


def _with_account(snapshot: Snapshot, fresh: Account) -> Snapshot:
    """`snapshot` with one account replaced by a fresher read of it."""
    accounts = tuple(fresh if a.id == fresh.id else a for a in snapshot.accounts)
    return snapshot.model_copy(update={"accounts": accounts})
