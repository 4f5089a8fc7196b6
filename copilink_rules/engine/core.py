"""The Engine: evaluates a Policy against snapshots, one after another, keeping its state.

How a tick goes: the accounts' facts (facts.py) and views, the targets of each scope
(targets.py), each group's conditions evaluated and episodes advanced (episodes.py), then
conflicts resolved and decisions recorded (resolve.py); what it remembers is state.py, its
locks the lock book (locks.py)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from operator import attrgetter, is_
from typing import Any

from pydantic import ValidationError

import copilink_rules.engine as engine_package
from copilink_rules.calendar import Calendar
from copilink_rules.errors import EvaluationError, StateError
from copilink_rules.facts import (
    NO_ORDERS,
    ORDER_FLOATS,
    POSITION_FLOATS,
    PositionFacts,
    contracts_for,
    derive_orders,
    derive_positions,
    position_view,
    same_records,
    same_sides,
    staleness,
)
from copilink_rules.instruments import Catalog, Instrument, default_catalog
from copilink_rules.locks import Lock, Locks, lock_until
from copilink_rules.model import ORDER_ACTIONS, Account, Decision, Snapshot, build_model
from copilink_rules.namespace import (
    NAMES,
    AccountsView,
    AccountView,
    Clock,
    Env,
    InstrumentView,
    MissingQuote,
    PairView,
    QuoteView,
)
from copilink_rules.rules.loader import CompiledRule, Policy

from .episodes import _Group, _groups, _Run, _Subset, account_kind
from .resolve import ENTRY_PRECEDENCE, _Proposal, _rank, _Step, _stronger, plan, rank_of
from .state import (
    STATE_VERSION,
    _count_trades,
    _Metrics,
    _RuleState,
    _SavedState,
    fast_saved_json,
)
from .targets import _AccountInfo, _mark_hedges, _PairSet, _PairsUndo, _Target

DEFAULT_STALE_AFTER = 5.0
_DECISION_FIELDS = frozenset(Decision.model_fields)  # a decision sets every one
_FIRM = attrgetter("firm")
_NO_COUNTS: Counter[str | None] = Counter()  # accounts per firm when no rule reads them (read-only)
_BUILDERS = {"account": "_account_targets", "pair": "_pair_targets", "global": "_global_targets"}
_MAX_QUOTE_VIEWS = 4096  # quote views kept between ticks (a snapshot has a few dozen)
_UNKNOWN: Any = object()  # a rule subset not looked for yet (None: no rule applies)
_KEY = attrgetter("key")  # how conflicts rank a proposal (_Proposal.key)
_OVERRIDABLE = frozenset({"flatten", "catch_up", "resume_copier"})  # what _stronger can override
_NONE_KEPT: list[_Proposal] = []  # no proposal kept for an account yet (read-only)
_NONE_TRACKED: list[int] = []  # no rule of a group has state to clear (read-only)
_KIND = attrgetter("kind")  # a target's (id, role, firm)
_blank_view = object.__new__  # a view with no field set yet: `_accounts` sets each one
# an account view's fields worked out from its money and metrics, in three groups, each stored
# only when some rule reads one of its fields (Engine._money): equity and its peaks (what a
# trailing drawdown reads), the broker's money, and profit (what a consistency rule reads)
_EQUITY_FIELDS = frozenset({"size", "equity", "day_pnl", "peak", "peak_eod"})
_CASH_FIELDS = frozenset({"balance", "realized_pnl", "unrealized_pnl", "pnl"})
_PROFIT_FIELDS = frozenset({"total_profit", "best_day", "day_share"})
_MONEY_GROUPS = (_EQUITY_FIELDS, _CASH_FIELDS, _PROFIT_FIELDS)
# an account's link to its leader and its trading day: only rules read them (the engine reads
# the record and its metrics), none of the shipped ones
_LINK_FIELDS = frozenset({"leader_id", "ratio", "trading_day"})
# the names under which an expression reads an account's view (account, leader_account)
_ACCOUNT_NAMES = tuple(name for name, (kind, _, _) in NAMES.items() if kind == "account")


class Engine:
    """Evaluates a Policy against snapshots, one after another, keeping its state."""

    def __init__(self, policy: Policy, catalog: Catalog | None = None,
                 calendar: Calendar | None = None, *, reuse: bool = True) -> None:
        self.policy = policy
        self.calendar = calendar
        self.catalog = catalog or default_catalog()
        self.params = policy.param_values
        self.stale_after = float(policy.param("stale_after", DEFAULT_STALE_AFTER))
        self._states: dict[str, dict[str, _RuleState]] = {r.id: {} for r in policy.rules}
        self._last_fired: dict[str, dict[str, datetime]] = {r.id: {} for r in policy.rules}
        self._errors: dict[str, dict[str, str]] = {r.id: {} for r in policy.rules}
        self._entries: dict[str, tuple[str, str]] = {}  # pair -> (leader trade, action)
        self._first_seen: dict[str, tuple[int, datetime]] = {}  # account|family -> (side, t)
        self.last_time: datetime | None = None
        self._instrument_views: dict[str, Any] = {}
        self._metrics: dict[str, _Metrics] = {}
        self.lock_book = Locks()  # the one book of locks (locks.py): the enforcer's too
        self._days: dict[str | None, tuple[str, datetime]] = {}  # firm -> (label, next start)
        self._notes: list[Decision] = []  # lock expiries, reported with the next decisions
        max_subsets = engine_package.MAX_SUBSETS  # the package's knob (tests lower it)
        self._groups = {stage: _groups([r for r in policy.rules if r.stage == stage],
                                       max_subsets)
                        for stage in ("session", "pre_session")}
        # the scopes whose targets a stage's groups are evaluated against, in a fixed order
        self._scopes = {stage: sorted({g.scope for g in groups})
                        for stage, groups in self._groups.items()}
        # this tick's local time, time of day and weekday in each zone its groups use
        self._local: dict[Any, tuple[Any, int]] = {}
        # symbol -> (the snapshot's quote, its canonical symbol, its view): a view reused while
        # its quote is the same object (a reader reuses an unchanged quote)
        self._quote_views: dict[str, tuple[Any, str, QuoteView]] = {}
        # The account-view fields the rules read (an account view used whole, `{account}` in
        # a message, shows every field): only those that cost a pass over all accounts, a
        # group of money fields or trade counting are worked out only when a rule reads one.
        read = policy.view_fields(_ACCOUNT_NAMES)

        def reads(names: frozenset[str] | set[str]) -> bool:
            return read is None or not read.isdisjoint(names)

        # cross-account hedges cost a pass over all accounts: only when a rule reads them
        self._hedges = reads({"hedged", "hedged_with"})
        # rules with an order among their actions: held (all their actions) while unreachable
        self._order_rules = {r.id for r in policy.rules
                             if any(a.name in ORDER_ACTIONS for a in r.actions)}
        # each rule's default reason and its actions as proposals take them (resolve.plan),
        # with its order among its stage's rules, as its group holds it (conflicts' last key)
        self._plans = {rule.id: plan(rule, order) for groups in self._groups.values()
                       for group in groups for order, rule in group.rules}
        self._firm_counts = reads({"firm_accounts"})  # likewise a pass over accounts
        # an account view's money fields (_MONEY_GROUPS) are stored each tick only when some
        # rule reads one of their group (desync's read none, apex's the equity group); else
        # they are None, never a stale value. The metrics behind them are kept either way
        # (the saved state, a reload that adds a firm's rules).
        self._money = tuple(reads(fields) for fields in _MONEY_GROUPS)
        self._trade_counts = reads({"trades_today", "losing_streak"})
        self._links = reads(_LINK_FIELDS)  # stored each tick only when read (else None)
        # each account's facts of the last tick, reused while its positions (orders) are the
        # same (facts.py); `reuse=False` derives everything every tick (the reference path)
        self.reuse = reuse
        # each account's info (facts, view ...), kept from tick to tick
        self._infos: dict[str, _AccountInfo] = {}
        self._locks_shown = False  # some account's view showed a lock last tick
        # the accounts whose views were marked hedged last tick (None: no view is marked)
        self._hedge_marks: list[str] | None = None
        self._clock = Clock()  # this tick's time, which position views' ages follow
        self._pair_sets: dict[str, _PairSet] = {}  # follower -> its pair targets, last tick
        # the pair targets of the last tick (in order), and the infos they were made from: while
        # every account of a tick is one of those, with only its time and money moved
        # (`_accounts`' origins), so are the pairs, and they are refreshed as they are
        self._pair_list: list[_Target] = []
        self._pairs_infos: dict[str, _AccountInfo] | None = None
        self._pairs_stand = False  # this tick's pairs are the last tick's (_accounts says)
        self._entries_unchecked = False  # entries taken in from outside a tick (journal)
        # group (by id) -> the targets its rules' tables were last cleaned of gone targets
        # against: while a tick's are those same objects, there is nothing to clean
        self._cleaned: dict[int, list[_Target]] = {}
        # group (by id) -> its rules' state and error tables, in bit order, its whole subset
        # and the bits of its rules that send orders
        self._tables: dict[int, tuple[list[dict[str, _RuleState]], list[dict[str, str]],
                                      _Subset, int]] = {}
        self._runs: dict[int, _Run] = {}  # group (by id) -> its run of the last tick

    # --- public API -------------------------------------------------------------------------

    def evaluate(self, snapshot: Snapshot, *, as_if_held: bool = False,
                 stage: str = "session", blocked: str | None = None,
                 origins: Sequence[Account | None] | None = None) -> list[Decision]:
        """Decisions for one snapshot. `as_if_held` treats every true condition as having held
        for its `for` (a single snapshot has no history: dry-run and check). `blocked` says
        why no order may go out now (the kill switch, say): order decisions are then held as
        for an unreachable account — reported once, proposed again once the block lifts.
        `origins` (a reader's `FastReader.origins` for this snapshot) names, for each of its
        accounts, the account of the snapshot before that it differs from only in its time and
        money: for an account whose origin is the very one this engine evaluated last tick
        under that id, only its time and money are worked out again. Decisions are the same
        with or without."""
        now = snapshot.time.astimezone(UTC)
        if self.last_time is not None and now < self.last_time:
            raise StateError(f"snapshot time {now.isoformat()} is earlier than the previous "
                             f"one ({self.last_time.isoformat()}); the engine's time cannot go "
                             "back")
        if self.lock_book:
            self._expire_locks(now)
        infos = self._accounts(snapshot, now, origins)
        groups = self._groups[stage]
        targets_by_scope = {scope: getattr(self, _BUILDERS[scope])(snapshot, infos, now)
                            for scope in self._scopes[stage]}
        self._local = {}  # the groups' local times of this tick (_evaluate_group)
        proposals: list[_Proposal] = []
        errors: list[tuple[int, int, Decision]] = []
        live_keys: dict[str, set[str]] = {}  # scope -> its targets' keys, once some rule has state
        cleaned = self._cleaned
        for group in groups:
            targets = targets_by_scope[group.scope]
            # taken out while the group runs: a tick cut short by an exception leaves it out,
            # so the next one searches the tables whole
            last = cleaned.pop(id(group), None)
            # the very targets this group was last evaluated with and its tables cleaned
            # against (reused objects keep their keys: no state or error is a gone target's,
            # and the group's run of them stands)
            same = last is not None and len(last) == len(targets) and \
                all(map(is_, last, targets))
            self._evaluate_group(group, targets, same, now, as_if_held, proposals, errors,
                                 infos, blocked)
            if not same:
                self._drop_gone(group, targets, live_keys)
            if self.reuse:
                cleaned[id(group)] = targets
        if not proposals and not errors and not self._notes:  # most ticks: nothing to say
            self.last_time = now
            return []
        errors.sort(key=lambda e: (e[0], e[1]))
        proposals.sort(key=lambda p: (p.order, p.target_index))
        decisions = self._notes + [decision for _, _, decision in errors]
        self._notes = []
        decisions.extend(self._resolve(proposals, infos, now, blocked))
        self.last_time = now
        return decisions

    def prepare(self, snapshot: Snapshot, stage: str = "session") -> None:
        """Compile, ahead of the ticks, the condition batches that `stage`'s ticks will need
        for the accounts of `snapshot`, which a tick otherwise compiles when it first meets a
        kind of account (some milliseconds each, inside that tick: a live session's first
        tick is the one that may have to act at once), and the stage's alert messages, which
        a tick otherwise compiles when a rule first fires (a fifth of a millisecond each).
        Decides nothing and changes nothing the engine remembers or saves: ticks decide the
        same with or without it."""
        for group in self._groups[stage]:
            group.prepare(snapshot.accounts)
            for _, rule in group.rules:
                for template in rule.templates:
                    if template is not None:
                        template.prepare()

    def _drop_gone(self, group: _Group, targets: list[_Target],
                   live_keys: dict[str, set[str]]) -> None:
        """A target that is gone (a pair gone flat, an account removed) ends its episodes:
        the group's rules forget its timers and errors. `live_keys` holds each scope's target
        keys, built on first need and shared by the tick's groups."""
        for _, rule in group.rules:
            for table in (self._states[rule.id], self._errors[rule.id]):
                if table:
                    live = live_keys.get(group.scope)
                    if live is None:
                        live = live_keys[group.scope] = {t.key for t in targets}
                    for key in [k for k in table if k not in live]:
                        del table[key]

    def _expire_locks(self, now: datetime) -> None:
        for lock in self.lock_book.expire(now):
            rule = lock.rule or "(journal)"
            self._notes.append(Decision(
                time=now, ruleset="(engine)", rule=rule, action="alert",
                account=lock.account, instrument=None, severity="info",
                reason=f"{lock.account}: the {lock.state} lock from {rule} ended",
                args={"lock_expired": lock.state}, version=self.policy.version))

    @property
    def locks(self) -> dict[str, tuple[str, datetime, str]]:
        """Account -> (state, until, rule) of every lock in force (`lock_book` has them
        whole)."""
        return self.lock_book.as_tuples()

    def save_state(self) -> dict[str, Any]:
        """The engine's state as versioned, JSON-ready data: `_SavedState` (state.py), read
        from the live state by attribute name."""
        return _SavedState.model_validate({
            "version": STATE_VERSION,
            "policy_version": self.policy.version,
            "time": self.last_time,
            "rules": {rule: states for rule, states in self._states.items() if states},
            "last_fired": {rule: fired for rule, fired in self._last_fired.items() if fired},
            "entries": self._entries,
            "first_seen": self._first_seen,
            "metrics": self._metrics,
            "locks": {lock.account: lock for lock in self.lock_book.values()},
        }).model_dump(mode="json")

    def save_state_json(self) -> str:
        return json.dumps(self.save_state(), indent=1, sort_keys=True)

    def save_state_text(self) -> str:
        """`save_state`'s data as compact JSON, for saving every tick: written straight from
        the live state (`state.fast_saved_json`), through the models when that has any
        doubt. Reads back (json.loads) as exactly `save_state()`."""
        text = fast_saved_json(
            STATE_VERSION, self.policy.version, self.last_time, self._states,
            self._last_fired, self._entries, self._first_seen, self._metrics,
            self.lock_book.values())
        if text is None:
            return json.dumps(self.save_state())
        return text.decode()

    def restore_state(self, data: Any) -> list[str]:
        """Continue from saved state; returns notes about anything that was dropped."""
        if not isinstance(data, dict) or "version" not in data:
            raise StateError("saved engine state is not an object with a 'version'")
        version = data["version"]
        if not isinstance(version, int) or version > STATE_VERSION:
            raise StateError(f"saved engine state has version {version!r}; this copilink-rules "
                             f"reads version {STATE_VERSION} or older: upgrade copilink-rules")
        try:
            saved = _SavedState.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise StateError(f"saved engine state is damaged: {where}: {first['msg']}") from None
        notes = []
        if saved.policy_version not in (None, self.policy.version):
            notes.append(f"the rules changed since the state was saved (was "
                         f"{saved.policy_version}, now {self.policy.version}); timers of "
                         "rules that still exist are kept")
        self.last_time = saved.time
        for rule, states in saved.rules.items():
            if rule not in self._states:
                notes.append(f"dropped the timers of rule {rule!r}, which no longer exists")
                continue
            self._states[rule] = {t: s.live(_RuleState) for t, s in states.items()}
        for rule, fired in saved.last_fired.items():
            if rule in self._last_fired:
                self._last_fired[rule] = dict(fired)
        self._entries = dict(saved.entries)
        self._first_seen = dict(saved.first_seen)
        self._infos = {}  # their facts are dated by the old first-seen table
        self._hedge_marks = None
        self._cleaned = {}  # the restored tables may hold any target's keys
        self._tables = {}  # and are new dicts
        self._runs = {}  # (their targets are all new: none would be run again anyway)
        self._pairs_infos = None  # and the pair sets are rebuilt
        self._entries_unchecked = True  # and the restored entries' pairs may be gone
        # the pair sets stay: none is reused (they were built from facts just dropped), and a
        # tick without pair rules (pre_session) still reads the follower's trades from them
        self._metrics = {a: m.live(_Metrics) for a, m in saved.metrics.items()}
        self.lock_book.restore([lock.live(Lock, account=a) for a, lock in saved.locks.items()])
        return notes

    # --- building what expressions see ------------------------------------------------------

    def _accounts(self, snapshot: Snapshot, now: datetime,
                  origins: Sequence[Account | None] | None = None) -> dict[str, _AccountInfo]:
        infos: dict[str, _AccountInfo] = {}
        days: dict[str | None, str] = {}  # firm -> trading day, this tick
        stale_after, metrics_of = self.stale_after, self._metrics
        equity_read, cash_read, profit_read = self._money
        # an account whose data has no time: its facts depend only on its connection (by
        # whether it is connected: False, True)
        undated = (staleness(False, None, now, stale_after),
                   staleness(True, None, now, stale_after))
        lock_states = self.lock_book.states() if len(self.lock_book) else {}
        # the views' locks are stored while some account has one, and once more after the
        # last one ends (they are "" from then on)
        show_locks = bool(lock_states) or self._locks_shown
        first_seen, catalog = self._first_seen, self.catalog
        # what only some rules read is stored each tick only when one does: firm counts
        # (`firm_accounts`), trade counts, hedges (_mark_hedges, below); else the view keeps
        # what it was made with (0, 0 and no hedge)
        firm_counts, trade_counts, hedges = self._firm_counts, self._trade_counts, self._hedges
        at_firm = Counter(map(_FIRM, snapshot.accounts)) if firm_counts else _NO_COUNTS  # in C
        # Each account's info of the last tick (only accounts of the last snapshot) holds its
        # facts, reused while its positions (orders) are the same: an account gone for a tick
        # is derived again (its first-seen times were dropped meanwhile). The reference path
        # (`reuse=False`) derives everything every tick.
        reuse, trading_day, links = self.reuse, self._trading_day, self._links
        old_infos = self._infos if reuse else {}
        used: list[PositionFacts] = []  # every account's, an id that repeats included
        moved = 0  # accounts worked out from their origins
        if origins is not None and len(origins) != len(snapshot.accounts):
            origins = None  # not this snapshot's: none taken
        # every account the same as last tick (positions, firm), none new, none gone? And
        # (what hedges follow from) each holding the same sides of the same families? (Not
        # when there were none: after a failed tick, or in the reference path, the first-seen
        # table may hold gone accounts' keys, even when this snapshot has no account.)
        same = sides_same = len(old_infos) == len(snapshot.accounts) and bool(old_infos)
        try:
            for index, account in enumerate(snapshot.accounts):
                # Hot path: read fields from the model's __dict__, several times faster than
                # attribute access on a pydantic model (whose class defines __getattr__).
                a = account.__dict__
                account_id = a["id"]
                info = old_infos.get(account_id)
                updated_at, connected = a["updated_at"], a["connected"]
                age, stale, reachable = staleness(connected, updated_at, now, stale_after) \
                    if updated_at is not None else undated[connected]
                if info is not None and origins is not None and \
                        origins[index] is info.account:
                    # last tick's account with only its time and money moved (its reader says
                    # so): its facts, its kind and all that follows from them stand
                    info.account = account
                    view = info.view
                    _, role, firm = info.kind
                    facts, families = info.facts, info.families
                    used.append(facts)
                    infos[account_id] = info
                    view.stale, view.reachable, view.data_age = stale, reachable, age
                    moved += 1
                else:
                    firm = a["firm"]
                    positions, orders = a["positions"], a["orders"]
                    if info is None:
                        last_facts = last_orders = None
                    else:
                        last_facts, last_orders = info.facts, info.orders
                    overnight = a["overnight"]
                    if last_facts is None or overnight != last_facts.overnight or \
                            firm != last_facts.firm or \
                            (positions is not last_facts.positions and
                             not same_records(positions, last_facts.positions,
                                              POSITION_FLOATS)):
                        facts = derive_positions(account_id, firm, positions, overnight,
                                                 catalog, first_seen, now)
                        same = False
                        if sides_same and (last_facts is None or
                                           not same_sides(facts, last_facts)):
                            sides_same = False
                    else:  # the same again: next time, tell so by identity
                        facts = last_facts
                        facts.positions = positions
                    used.append(facts)
                    if not orders:
                        order_facts = NO_ORDERS
                    elif last_orders is None or (orders is not last_orders.orders and
                                                 not same_records(orders, last_orders.orders,
                                                                  ORDER_FLOATS)):
                        order_facts = derive_orders(orders)
                    else:  # (never NO_ORDERS here: its orders are none)
                        order_facts = last_orders
                        order_facts.orders = orders
                    families = facts.families
                    role = a["role"]
                    # the account's info and view of the last tick, stored into (which costs
                    # less than building anew): what its facts say only when they are other
                    # facts, its id, role and firm only when they moved, the rest every tick;
                    # the reference path starts from blank ones
                    if info is None:
                        view = _blank_view(AccountView)
                        info = _AccountInfo(account, view, families, facts, order_facts,
                                            (account_id, role, firm))
                        view.id, view.role, view.firm = account_id, role, firm or ""
                        for fields, read in zip((*_MONEY_GROUPS, _LINK_FIELDS),
                                                (*self._money, links), strict=True):
                            if not read:  # never worked out (None: a sum with one fails loudly)
                                for name in fields:
                                    setattr(view, name, None)
                        view.lock, view.locked, view.firm_accounts = "", False, 0
                        view.trades_today = view.losing_streak = 0
                        view.hedged, view.hedged_with = False, ""
                        derived = True
                    else:
                        view = info.view
                        derived = facts is not last_facts or order_facts is not last_orders
                        info.account, info.families, info.facts, info.orders = \
                            account, families, facts, order_facts
                        kind = info.kind  # (id, role, firm): new only when role or firm moved
                        if kind[1] != role or kind[2] != firm:
                            info.kind = (account_id, role, firm)
                            view.role, view.firm = role, firm or ""
                    infos[account_id] = info
                    if derived:  # the same facts say the same
                        view.flat = not families
                        view.contracts, view.positions = facts.contracts, len(families)
                        view.working_orders = order_facts.working
                        view.undeclared_positions = facts.undeclared
                        view.minis, view.micros = facts.minis, facts.micros
                    view.connected, view.stale, view.reachable, view.data_age = \
                        connected, stale, reachable, age
                    view.copier = a["copier"]
                    if links:
                        view.leader_id = a["leader"] or ""
                        view.ratio = a["ratio"] if role == "follower" else 1.0
                # its money, and what follows from it and from the time
                balance, unrealized = a["balance"], a["unrealized_pnl"]
                equity = balance + unrealized
                day = days.get(firm)
                if day is None:
                    day = days[firm] = trading_day(firm, now)
                metrics = metrics_of.get(account_id)
                size = a["size"]
                if metrics is None or metrics.day != day:
                    metrics = self._roll_metrics(account, equity, day)
                elif size is not None:  # _roll_metrics' only change to the metrics of today
                    metrics.size = size
                peak = metrics.peak
                if equity > peak:  # max(), without the call
                    peak = metrics.peak = equity
                metrics.last_equity = equity
                if trade_counts:
                    _count_trades(metrics, families, a["realized_pnl"])
                # the view's money, each group when a rule reads it (the metrics are kept anyway)
                if equity_read:
                    view.size, view.equity = metrics.size, equity
                    view.day_pnl = equity - metrics.day_start
                    view.peak, view.peak_eod = peak, metrics.peak_eod
                if cash_read:
                    realized = a["realized_pnl"]
                    view.balance, view.realized_pnl, view.unrealized_pnl = \
                        balance, realized, unrealized
                    view.pnl = realized + unrealized
                if profit_read:
                    day_pnl = equity - metrics.day_start
                    total = equity - metrics.size
                    best_day = metrics.best_day
                    view.total_profit = total
                    view.best_day = day_pnl if day_pnl > best_day else best_day
                    view.day_share = day_pnl / total if total > 0 and day_pnl > 0 else 0.0
                if links:
                    view.trading_day = day
                if show_locks:
                    lock = lock_states.get(account_id, "")
                    view.lock, view.locked = lock, lock != ""
                if firm_counts:
                    view.firm_accounts = at_firm[firm] if firm else 0
                if trade_counts:
                    view.trades_today, view.losing_streak = metrics.trades, metrics.streak
        except BaseException:
            # The infos of the last tick were being stored into (their facts, their views) when
            # this one failed (a symbol the catalog does not know, say): the next tick starts
            # from none, as a new engine's first tick does, so that nothing half-taken stands
            # (the facts' first-seen times and the metrics are kept).
            self._infos, self._hedge_marks, self._locks_shown = {}, None, False
            raise
        self._locks_shown = bool(lock_states)
        # every account last tick's with only its time and money moved, each id once, none
        # gone, and the last tick's pairs made from last tick's infos: they stand
        self._pairs_stand = moved == len(infos) == len(old_infos) == len(snapshot.accounts) \
            and self._pairs_infos is old_infos
        if reuse:
            self._infos = infos
        # first-seen keys no facts use any more are dropped: only when some facts are new (or
        # an account is gone, or an id repeats), and then only when the counts differ (a key
        # in use is always in the table)
        if (not same or len(infos) != len(used)) and \
                (sum(len(facts.first_seen) for facts in used) != len(first_seen) or
                 len(infos) != len(used)):
            seen_keys = {key for facts in used for key in facts.first_seen}
            for key in [k for k in first_seen if k not in seen_keys]:
                del first_seen[key]
        if hedges:
            # hedges follow from the sides of the families each account holds and its firm
            # alone: while none changed, last tick's marks stand in the views (each view is
            # last tick's, as is each account); else they are taken off the views that have
            # them and marked again
            last_marks = self._hedge_marks
            if last_marks is None or not sides_same or len(infos) != len(used):
                self._hedge_marks = None
                try:
                    for account_id in last_marks or ():
                        found = infos.get(account_id)
                        if found is not None:
                            found.view.hedged, found.view.hedged_with = False, ""
                    _mark_hedges(infos)
                except BaseException:  # marks half made: the next tick starts from none
                    self._infos, self._locks_shown = {}, False
                    raise
                if reuse:
                    self._hedge_marks = [i for i, info in infos.items() if info.view.hedged]
        return infos

    def _trading_day(self, firm: str | None, now: datetime) -> str:
        cached = self._days.get(firm)
        if cached is None or now >= cached[1]:
            trading_day = self.policy.trading_day(firm)
            cached = self._days[firm] = (trading_day.label(now).isoformat(),
                                         trading_day.next_start(now))
        return cached[0]

    def _roll_metrics(self, account: Account, equity: float, day: str) -> _Metrics:
        """An account's metrics when they are new, its trading day changed or the snapshot
        gives its size; the caller then follows this tick's equity."""
        metrics = self._metrics.get(account.id)
        if metrics is None:
            start = account.balance - account.realized_pnl  # the broker's today's realized
            size = account.size or start
            metrics = self._metrics[account.id] = _Metrics(
                day, start, max(size, equity), max(size, start), 0.0, equity, size)
        elif metrics.day != day:  # a new trading day: close the previous one
            metrics.best_day = max(metrics.best_day, metrics.last_equity - metrics.day_start)
            metrics.peak_eod = max(metrics.peak_eod, metrics.last_equity)
            metrics.day_start = metrics.last_equity
            metrics.day = day
            metrics.trades = metrics.streak = 0
            # the broker's realized P&L starts again at 0: a trade still open starts from it
            metrics.opens = {f: (side, 0.0) for f, (side, _) in metrics.opens.items()}
        if account.size is not None:
            metrics.size = account.size
        return metrics

    def _env(self, now: datetime, families: Any = None) -> Env:
        env = Env()
        env.params = self.params
        env.now = now
        env.calendar = self.calendar
        env.families = families
        return env

    def _account_targets(self, snapshot: Snapshot, infos: dict[str, _AccountInfo],
                         now: datetime) -> list[_Target]:
        targets = []
        # each account's target of the last tick (its info's), its env refreshed: what a tick
        # changes is set in every tick, so nothing of the last one is left; an info of the
        # reference path is new every tick, so is its target
        for account_id, info in infos.items():
            target = info.target
            if target is None:
                env = Env()  # the hot path: _env() inlined
                env.params, env.calendar = self.params, self.calendar
                env.account = info.view  # the info's view, stored into from tick to tick
                target = info.target = _Target(account_id, info.account, env)
            else:
                env = target.env
                target.account = info.account
            target.kind = info.kind
            env.now = now
            env.families = info.facts.family_names
            targets.append(target)
        return targets

    def _global_targets(self, snapshot: Snapshot, infos: dict[str, _AccountInfo],
                        now: datetime) -> list[_Target]:
        env = self._env(now)
        views = [i.view for i in infos.values()]
        env.accounts = AccountsView(
            total=len(views), leaders=sum(v.role == "leader" for v in views),
            followers=sum(v.role == "follower" for v in views),
            disconnected=sum(not v.connected for v in views),
            stale=sum(v.stale for v in views),
            paused=sum(v.role == "follower" and v.copier == "paused" for v in views),
            open_positions=sum(v.positions for v in views),
        )
        return [_Target("*", None, env)]

    def _pair_targets(self, snapshot: Snapshot, infos: dict[str, _AccountInfo],
                      now: datetime) -> list[_Target]:
        quotes = self._quotes(snapshot)
        self._clock.now = now  # what the ages of the position views follow
        if self._pairs_stand and not self._entries_unchecked:
            # every account is last tick's with only its time and money moved: so are the
            # pairs (their facts, leaders, ratios and the leaders' orders)
            targets = self._pair_list
            reused = [(infos[follower_id].account, pairs)
                      for follower_id, pairs in self._pair_sets.items()]
        else:
            targets, reused = self._pair_sets_of(infos, now, quotes)
        # the reused targets' time, quote, account and entry action, refreshed (new ones were
        # made with them)
        entries = self._entries
        for follower, pairs in reused:
            for target in pairs.targets:
                env = target.env
                env.now = now
                # env.leader, env.follower: the same families' views, their ages following
                # the engine's clock (PositionView)
                symbol = target.quote_symbol
                env.quote = quotes.get(symbol) or MissingQuote(symbol)  # type: ignore[arg-type]
                target.account = follower
                if entries:
                    pair_key = target.key
                    entry = entries.get(pair_key)
                    if entry is not None and entry[0] != target.trade:
                        del entries[pair_key]
                        entry = None
                    env.pair.entry_action = entry[1] if entry else ""
                else:
                    env.pair.entry_action = ""
        self._pair_list, self._pairs_infos = targets, infos
        return targets

    def _pair_sets_of(self, infos: dict[str, _AccountInfo], now: datetime,
                      quotes: dict[str, QuoteView]) -> tuple[list[_Target],
                                                              list[tuple[Account, _PairSet]]]:
        """Each follower's pair targets (one per instrument family either it or its leader
        holds), in the infos' order; and the followers whose targets are last tick's, reused
        (their time, quote and entry action still to refresh: `_pair_targets`)."""
        entries = self._entries
        # a follower's pair targets of the last tick: reused (their time, quote and episode
        # fields refreshed) while its and its leader's positions are the same, stored into
        # while its leader, ratio and families are; this tick's are kept (the reference path
        # too: `_record` reads their trades)
        old_sets = self._pair_sets if self.reuse else {}
        new_sets: dict[str, _PairSet] = {}
        # what this tick stores into last tick's pair sets, put back if it fails, as if it
        # had not begun
        undo = _PairsUndo()
        try:
            targets, reused, rebuilt = self._pair_sets_loop(
                infos, now, quotes, old_sets, new_sets, undo)
        except BaseException:
            undo.put_back()
            raise
        # a pair that is gone (flat on both sides) ends its leader trade's entry; while every
        # follower's pair targets are last tick's (as many, none built anew), the pairs are
        # too, and each entry was recorded for one of them, unless replay_decisions took it in
        if entries and (rebuilt or len(new_sets) != len(self._pair_sets) or
                        self._entries_unchecked):
            live = {key for pairs in new_sets.values() for key in pairs.keys}
            for key in [k for k in entries if k not in live]:
                del entries[key]
        self._entries_unchecked = False
        self._pair_sets = new_sets
        return targets, reused

    def _pair_sets_loop(self, infos: dict[str, _AccountInfo], now: datetime,
                        quotes: dict[str, QuoteView], old_sets: dict[str, _PairSet],
                        new_sets: dict[str, _PairSet], undo: _PairsUndo
                        ) -> tuple[list[_Target], list[tuple[Account, _PairSet]], bool]:
        """`_pair_sets_of`'s work: each follower's pair set into `new_sets`; the targets, the
        reused sets, and whether some set was built anew."""
        leaders: list[_AccountInfo] | None = None  # found when a follower names no leader
        targets: list[_Target] = []
        reused: list[tuple[Account, _PairSet]] = []
        params, calendar, catalog = self.params, self.calendar, self.catalog
        rebuilt = False
        for info in infos.values():
            follower = info.account
            f = follower.__dict__  # hot path: see _accounts
            if f["role"] != "follower":
                continue
            if f["leader"]:
                leader = infos.get(f["leader"])
            else:  # the only leader, if there is one
                if leaders is None:
                    leaders = [i for i in infos.values() if i.kind[1] == "leader"]  # (id, role, _)
                leader = leaders[0] if len(leaders) == 1 else None
            if leader is None:
                continue
            ratio, follower_id, leader_id = f["ratio"], f["id"], leader.view.id
            orders = leader.orders
            pairs = old_sets.get(follower_id)
            if pairs is not None and (pairs.leader_id != leader_id or not (
                    pairs.ratio is ratio or (pairs.ratio == ratio and
                                             type(pairs.ratio) is type(ratio)))):
                pairs = None  # another leader or ratio: its pair targets are built anew
            if pairs is not None and pairs.follower is info.facts and \
                    pairs.leader is leader.facts:
                # The same facts are the same infos (an account's facts live in its info, and
                # a new info derives new ones; a tick that fails in _accounts drops them all):
                # the targets' envs hold these views already, and the follower's kind (id,
                # role, firm: its firm is its facts').
                new_sets[follower_id] = pairs
                if orders is not pairs.orders:  # the leader's orders changed: its stops
                    stops = orders.stops
                    for target in pairs.targets:
                        family = target.family
                        target.stop_price = stops[family] if family in stops else \
                            orders.stop(family, catalog)  # type: ignore[arg-type]
                    pairs.orders = orders  # only once all are taken (a symbol may raise)
                reused.append((follower, pairs))
                targets.extend(pairs.targets)
                continue
            lead_families, foll_families = leader.families, info.families
            overnight_families = info.facts.overnight_set(catalog)
            if not foll_families or foll_families.keys() == lead_families.keys():
                families: list[str] = sorted(lead_families)
            elif not lead_families:
                families = sorted(foll_families)
            else:
                families = sorted(lead_families.keys() | foll_families.keys())
            if pairs is not None and pairs.families == families:
                # the same pairs (leader, ratio, families), other positions: last tick's
                # targets, stored into (a group then runs them as it did)
                self._restate_pairs(pairs, info, leader, now, quotes, overnight_families, undo)
                new_sets[follower_id] = pairs
                targets.extend(pairs.targets)
                continue
            rebuilt = True
            pairs = new_sets[follower_id] = _PairSet(info.facts, leader.facts, leader_id,
                                                     ratio, orders, [], [], families)
            for family in families:  # blank targets, then stored into as reused ones are
                pair_key = f"{follower_id}|{leader_id}|{family}"
                env = Env()  # the hot path: _env() inlined
                env.params, env.calendar = params, calendar
                env.families = (family,)
                env.pair = PairView(family, ratio, 0.0, "")  # FIELDS["pair"] order
                pairs.targets.append(_Target(pair_key, follower, env, family))
                pairs.keys.append(pair_key)
            self._restate_pairs(pairs, info, leader, now, quotes, overnight_families, None)
            targets.extend(pairs.targets)
        return targets, reused, rebuilt

    def _restate_pairs(self, pairs: _PairSet, info: _AccountInfo, leader: _AccountInfo,
                       now: datetime, quotes: dict[str, QuoteView],
                       overnight_families: Any, undo: _PairsUndo | None) -> None:
        """Store what a follower's and its leader's facts say into the follower's pair
        targets, one per family (`pairs.families`): into new blank ones, or last tick's
        while the pairs are the same (leader, ratio, families). The set takes the new facts
        last, so that a tick cut short here leaves it to be stored into again; what it
        replaces goes to `undo` (last tick's sets), to be put back if the tick fails."""
        catalog, entries, clock = self.catalog, self._entries, self._clock
        instrument_views = self._instrument_views
        lead_families, foll_families = leader.families, info.families
        follower, account_view, leader_view = info.account, info.view, leader.view
        orders, ratio = leader.orders, pairs.ratio
        for target, family in zip(pairs.targets, pairs.families, strict=True):
            lead = lead_families.get(family)
            foll = foll_families.get(family)
            trade = lead.trade_label() if lead else ""
            pair_key = target.key
            entry = entries.get(pair_key)
            if entry is not None and entry[0] != trade:
                del entries[pair_key]
                entry = None
            instrument = (lead or foll).instrument  # type: ignore[union-attr]
            expected = (lead.equiv if lead else 0.0) * ratio
            env = target.env
            env.now = now
            env.account = account_view
            env.leader_account = leader_view
            env.leader = position_view(lead, clock, False)
            env.follower = position_view(foll, clock, family in overnight_families)
            pair = env.pair
            pair.expected_equiv = expected
            pair.entry_action = entry[1] if entry else ""
            symbol = instrument.symbol
            env.instrument = instrument_views.get(symbol) or self._instrument_view(instrument)
            env.quote = quotes.get(symbol) or MissingQuote(symbol)
            target.account = follower
            target.instrument = foll.symbol if foll else lead.symbol  # type: ignore[union-attr]
            if undo is not None and trade != target.trade:
                undo.trades.append((target, target.trade))
            target.trade = trade
            target.catch_up_qty = contracts_for(expected, instrument.size) if lead else 0
            target.stop_price = orders.stop(family, catalog)
            target.quote_symbol = symbol
            target.kind = info.kind
        if undo is not None:
            undo.sets.append((pairs, pairs.follower, pairs.leader, pairs.orders))
        pairs.orders = orders
        pairs.follower, pairs.leader = info.facts, leader.facts

    def _quotes(self, snapshot: Snapshot) -> dict[str, QuoteView]:
        """The snapshot's quotes by canonical symbol (NQ 03-26 and NQH6 are one quote)."""
        out = {}
        known = self._quote_views
        for symbol, quote in snapshot.quotes.items():
            last = known.get(symbol)
            if last is not None and last[0] is quote:  # a Quote is frozen: the same view
                canonical, view = last[1], last[2]
            else:
                canonical = last[1] if last is not None else self.catalog.parse(symbol).symbol
                q = quote.__dict__  # hot path: see _accounts
                view = QuoteView(canonical, q["bid"], q["ask"], q["last"])
                if self.reuse:
                    if len(known) >= _MAX_QUOTE_VIEWS:  # symbols come and go: keep it bounded
                        known.clear()
                    known[symbol] = (quote, canonical, view)
            out[canonical] = view
        return out

    def _instrument_view(self, instrument: Instrument) -> Any:
        view = self._instrument_views.get(instrument.symbol)
        if view is None:
            view = self._instrument_views[instrument.symbol] = InstrumentView(
                symbol=instrument.symbol, root=instrument.root, family=instrument.family,
                tick_size=instrument.tick_size, tick_value=instrument.tick_value,
                micro=instrument.micro)
        return view

    # --- evaluation -------------------------------------------------------------------------

    def _evaluate_group(self, group: _Group, targets: list[_Target], same: bool,
                        now: datetime, as_if_held: bool, proposals: list[_Proposal],
                        errors_out: list[tuple[int, int, Decision]],
                        infos: dict[str, _AccountInfo], blocked: str | None) -> None:
        """Evaluate a group's conditions for its targets (`same`: the very targets of its last
        tick, by identity) and act on the true ones."""
        rules = group.rules
        states_of, errors_of = self._states, self._errors
        # local time is per rule set's zone: set on each target's env as it is evaluated
        zones = self._local
        found = zones.get(group.zone)
        if found is None:
            local = now.astimezone(group.zone)
            found = zones[group.zone] = (local.time(), local.weekday())
        now_local, weekday = found
        # rules whose per-target state must be cleared when their condition is false
        tables = self._tables.get(id(group))
        if tables is None:  # the group's rules' tables, in bit order (restore_state drops
            # them), the subset of all its rules, and the bits of its rules that send orders
            # (the reference path: none, so that every proposal is built)
            tables = self._tables[id(group)] = (
                [states_of[rule.id] for _, rule in rules],
                [errors_of[rule.id] for _, rule in rules], group.whole(),
                sum(1 << i for i, (_, rule) in enumerate(rules)
                    if rule.id in self._order_rules) if self.reuse else 0)
        rule_states, rule_errors, whole, order_bits = tables
        tracked = [i for i, states in enumerate(rule_states) if states or rule_errors[i]] \
            if any(rule_states) or any(rule_errors) else _NONE_TRACKED
        # the group's run: which of its targets it evaluates and with which subset of its rules,
        # kept while its targets are the same objects of the same kinds
        run = self._runs.get(id(group)) if same else None
        if run is None or (group.filtered and not all(map(is_, run.kinds,
                                                          map(_KIND, targets)))):
            run = self._run(group, targets, whole)
        # the outcome per target, kept only when some rule has state to clear afterwards: the
        # true mask, and above it (shifted by `width`) the mask of conditions that failed
        results: dict[str, int] | None = {} if tracked else None
        width = len(rules)
        for index, target, env, key, batch, allowed, clock in run.steps:
            # the local clock, stored when the subset's conditions read it (most do not); else
            # only before a condition is evaluated alone or a rule's message is made
            if clock:
                env.now_local, env.weekday = now_local, weekday
            # the hot path: one call evaluates the group's conditions for this target
            try:
                mask = batch(env) & allowed
                failed = 0
            # a user's expression may raise anything; find which, report it, never crash
            except Exception:  # noqa: BLE001
                env.now_local, env.weekday = now_local, weekday
                mask, failed = self._one_by_one(group, target, index, allowed, now,
                                                errors_out)
            if results is not None:
                results[key] = mask | failed << width
            while mask:
                low = mask & -mask
                mask ^= low
                bit = low.bit_length() - 1
                state = rule_states[bit].get(key)
                if state is not None:  # _on_true's tests that end it without a change, inlined
                    if state.fired:
                        continue  # this episode fired already
                    if state.held and low & order_bits and target.account is not None and \
                            (blocked or not infos[target.kind[0]].view.reachable):
                        continue  # its orders on hold, reported already (_on_true says more)
                order, rule = rules[bit]
                env.now_local, env.weekday = now_local, weekday  # its messages may read them
                self._on_true(rule, order, target, index, now, as_if_held, proposals, infos,
                              blocked)
        if results is None:
            return
        # a condition evaluated false ends its episode; one evaluated at all clears its error
        for i in tracked:
            bit, failed_bit = 1 << i, 1 << (i + width)
            states, errors = rule_states[i], rule_errors[i]
            if states:
                for key in [k for k in states
                            if k in results and not results[k] & (bit | failed_bit)]:
                    del states[key]
            if errors:
                for key in [k for k in errors if k in results and not results[k] & failed_bit]:
                    del errors[key]

    def _run(self, group: _Group, targets: list[_Target], whole: _Subset) -> _Run:
        """The group's run of these targets (kept for the next tick when reusing): each one's
        subset of the group's rules (those that apply to its account, when the group is
        filtered by firm, role or account; else all), a target with none left out."""
        filtered, reuse = group.filtered, self.reuse
        known = group.known_subsets  # what `subset` found already, looked up without a call
        kinds: list[tuple[str, str, str | None] | None] = []
        steps = []
        whole_batch = None  # the whole group's batch, compiled when a target first needs it
        for index, target in enumerate(targets):
            sub: _Subset | None = whole
            if filtered and (account := target.account) is not None:
                if reuse:
                    kind = target.kind  # (id, role, firm), set with the account
                    if kind is None:
                        kind = target.kind = account_kind(account)
                    sub = known.get(kind, _UNKNOWN)
                    if sub is _UNKNOWN:
                        sub = group.subset(kind, account)
                else:  # the reference path: every condition, masked
                    allowed = group.allowed(account)
                    sub = _Subset(group.batch, allowed, group.clock) if allowed else None
            kinds.append(target.kind)
            if sub is not None:
                if sub is not whole:
                    batch = sub.batch
                elif whole_batch is None:
                    batch = whole_batch = group.compiled_whole()
                else:
                    batch = whole_batch
                steps.append((index, target, target.env, target.key, batch, sub.allowed,
                              sub.clock))
        run = _Run(kinds, steps)
        if reuse:
            self._runs[id(group)] = run
        return run

    def _one_by_one(self, group: _Group, target: _Target, index: int, allowed: int,
                    now: datetime, errors_out: list[tuple[int, int, Decision]]) -> tuple[int,
                                                                                          int]:
        """Evaluate a group's conditions separately for one target: (true mask, failed mask).
        Each failure is reported once per rule and target, until it changes or clears."""
        mask = failed = 0
        for i, (order, rule) in enumerate(group.rules):
            if not (allowed >> i) & 1:
                continue
            try:
                if rule.when.evaluate(target.env):
                    mask |= 1 << i
            except Exception as exc:  # noqa: BLE001 - reported below, never a crash
                failed |= 1 << i
                message = exc.args[0] if isinstance(exc, EvaluationError) and exc.args else \
                    f"{type(exc).__name__}: {exc}"
                errors = self._errors[rule.id]
                if errors.get(target.key) != message:
                    errors[target.key] = message
                    errors_out.append((order, index,
                                       self._error_decision(rule, target, now, message)))
        return mask, failed

    def _on_true(self, rule: CompiledRule, order: int, target: _Target, index: int,
                 now: datetime, as_if_held: bool, proposals: list[_Proposal],
                 infos: dict[str, _AccountInfo], blocked: str | None) -> None:
        states = self._states[rule.id]
        key = target.key
        state = states.get(key)
        if state is None:
            state = states[key] = _RuleState(now)
        if state.fired:
            return
        held = (now - state.since).total_seconds()
        if not as_if_held and held < rule.hold:
            return
        last = self._last_fired[rule.id].get(key)
        if last is not None and (now - last).total_seconds() < rule.cooldown:
            return
        if state.held and self.reuse and rule.id in self._order_rules and \
                target.account is not None and \
                (blocked or not infos[target.account.id].view.reachable):
            # its orders are on hold and were reported already: _hold_unreachable would drop
            # every proposal of this rule and target, and leave it unfired, as here, without
            # building them (rendering their messages) first. `reuse=False` builds them.
            return
        state.fired = True
        default, steps = self._plans[rule.id]
        if rule.hold > 0:
            said = (f" (as if held for {rule.hold:g}s: a single snapshot has no history)"
                    if as_if_held and held < rule.hold else f" (held {held:.1f}s)")
        else:
            said = ""
        for step in steps:
            proposal = self._proposal(rule, order, target, step, default, said, held)
            proposal.target_index = index
            proposals.append(proposal)

    def _proposal(self, rule: CompiledRule, order: int, target: _Target, step: _Step,
                  default: str, said: str, held: float) -> _Proposal:
        """A proposal of one of `rule`'s actions (`step`): its args, and the reason it gives
        (an alert's message, else `default`, the rule's; then what `said` adds: how long the
        condition held)."""
        args = dict(step.args)
        action = step.action
        template = step.template
        if template is not None:
            args["message"] = template.render(target.env)
        if action == "catch_up":
            args["qty"] = target.catch_up_qty  # in the leader's contract
            args["equiv"] = round(target.env.pair.expected_equiv, 6)  # in full-size contracts
            if target.stop_price is not None:
                args["stop_price"] = target.stop_price
        message = args.get("message") if action == "alert" else None
        reason = str(message) + said if message else default + said
        return _Proposal(rule, order, target, action, args, reason, held, step.key,
                         step.severity)

    def _error_decision(self, rule: CompiledRule, target: _Target, now: datetime,
                        message: str) -> Decision:
        return Decision(
            time=now, ruleset=rule.ruleset, rule=rule.id, action="error",
            account=target.account.id if target.account else None,
            instrument=target.instrument, severity="error",
            reason=f"evaluation error: {message} (when: {rule.when.source})",
            scope=rule.scope, mode=rule.mode, version=self.policy.version,
        )

    # --- conflicts, modes, reachability -----------------------------------------------------

    def _resolve(self, proposals: list[_Proposal], infos: dict[str, _AccountInfo],
                 now: datetime, blocked: str | None = None) -> list[Decision]:
        proposals = self._hold_unreachable(proposals, infos, blocked)
        active: list[_Proposal] = []
        extra: list[_Proposal] = []
        for p in proposals:
            if p.suppressed is not None:
                continue
            if p.rule.mode == "dryrun":
                p.suppressed = "rule mode is dryrun: report only"
            elif p.rule.mode == "warn" and p.action != "alert":
                p.suppressed = "rule mode is warn: alert only"
                if not any(a.name == "alert" for a in p.rule.actions) and \
                        not any(e.rule is p.rule and e.target is p.target for e in extra):
                    severity = p.rule.severity or "warning"
                    extra.append(_Proposal(
                        p.rule, p.order, p.target, "alert", {"severity": severity},
                        f"would {', '.join(a.name for a in p.rule.actions)}: {p.reason}",
                        p.held_for, (-rank_of("alert", {}), -p.rule.priority, p.order),
                        severity))
            else:
                active.append(p)
        proposals = proposals + extra
        active.extend(extra)

        ranked = sorted(active, key=_KEY)
        winners: dict[tuple[str | None, str, str | None], _Proposal] = {}
        kept: dict[str | None, list[_Proposal]] = {}
        entries = self._entries
        for p in ranked:
            target, action = p.target, p.action
            account = target.account.id if target.account else None
            if action != "alert":
                same = (account, action, target.family)
                first = winners.get(same)
                if first is not None:  # ranks differ only for halted vs reducing locks
                    p.suppressed = (
                        f"{first.args.get('state', 'halted')} lock from rule {first.rule.id} "
                        "is more restrictive" if _rank(first) > _rank(p) else
                        f"{p.action} already decided by rule {first.rule.id} "
                        f"(priority {first.rule.priority})")
                    continue
                winners[same] = p
            # only these actions can be overridden by what an account has already (_stronger)
            stronger = _stronger(p, kept.get(account, _NONE_KEPT), entries) \
                if action in _OVERRIDABLE else None
            lock = self.lock_book.get(account) if stronger is None and \
                action == "catch_up" and account is not None else None
            if lock is not None:
                stronger = (f"account is locked ({lock.state}) by rule {lock.rule} until "
                            f"{lock.until.isoformat()}: no new exposure")
            if stronger:
                p.suppressed = stronger
                continue
            found = kept.get(account)
            if found is None:
                kept[account] = [p]
            else:
                found.append(p)

        record, decision = self._record, self._decision
        decisions = []
        for p in proposals:
            if p.suppressed is None:
                record(p, now)
            decisions.append(decision(p, now))
        return decisions

    def _hold_unreachable(self, proposals: list[_Proposal], infos: dict[str, _AccountInfo],
                          blocked: str | None = None) -> list[_Proposal]:
        """Hold orders for unreachable accounts (and all orders while `blocked`): report once,
        fire again when reachable (unblocked)."""
        held: dict[tuple[str, str], bool] = {}  # (rule, target) -> report (False: repeat)
        for p in proposals:
            account = p.target.account
            if p.action not in ORDER_ACTIONS or account is None or \
                    (infos[account.id].view.reachable and not blocked):
                continue
            group = (p.rule.id, p.target.key)
            if group not in held:
                state = self._states[p.rule.id][p.target.key]
                state.fired = False
                held[group] = not state.held
                state.held = True
        if not held:  # every order may go out: nothing to hold or mark
            return proposals
        kept = []
        for p in proposals:
            report = held.get((p.rule.id, p.target.key))
            if report is False:
                continue  # already reported while this account is unreachable
            if report and p.target.account is not None:
                why = infos[p.target.account.id].why_unreachable
                until = "it is reachable again"
                if not why and blocked:
                    why, until = blocked, "that is lifted"
                if p.action in ORDER_ACTIONS:
                    p.suppressed = f"{why}: no orders until {until}"
                elif p.action == "alert":  # its message tells of an order that is not sent
                    on_hold = f" [ON HOLD: {why}; the rule acts once {until}]"
                    p.reason += on_hold
                    if "message" in p.args:
                        p.args["message"] += on_hold
            kept.append(p)
        return kept

    def _record(self, p: _Proposal, now: datetime) -> None:
        """Remember what a decision that passed means for cooldowns, locks and the leader's
        trade."""
        action, rule, target = p.action, p.rule, p.target
        if action == "alert":  # the most common: no order, no lock, no trade
            if rule.cooldown > 0:
                self._last_fired[rule.id][target.key] = now
            return
        if action == "lock_account" and target.account is not None:
            self._lock(p, now)
        if action in ORDER_ACTIONS:
            state = self._states[rule.id].get(target.key)
            if state is not None:
                state.held = False  # a later disconnect in this episode is reported again
        if rule.cooldown > 0:
            self._last_fired[rule.id][target.key] = now
        if action not in ENTRY_PRECEDENCE:
            return
        if target.trade:  # a pair target: its leader trade
            episodes = [(target.key, target.trade)]
        elif action == "flatten" and target.account is not None:
            # an account-wide flatten (a firm rule: no hedging, a loss limit) ends the
            # follower's part in each leader trade it touches, as a pair flatten does
            pairs = self._pair_sets.get(target.account.id)  # its pairs' trades, this tick
            if pairs is None:
                return
            family_of = target.family
            episodes = [(t.key, t.trade) for t in pairs.targets
                        if t.trade and family_of in (None, t.family)]
        else:
            return
        for key, trade in episodes:
            self._entry(key, trade, p.action)
        if episodes:  # journaled with the decision: a restart rebuilds them from there
            p.args["episodes"] = [list(e) for e in episodes]

    def _entry(self, key: str, trade: str, action: str) -> None:
        current = self._entries.get(key)
        if current is None or current[0] != trade or \
                ENTRY_PRECEDENCE[action] > ENTRY_PRECEDENCE[current[1]]:
            self._entries[key] = (trade, action)

    def _keys(self, rule: str, account: str | None, instrument: str | None) -> list[str]:
        """The targets of `rule` that a decision about `account` / `instrument` came from."""
        states = self._states.get(rule, {})
        family = self.catalog.parse(instrument).family if instrument else None
        return [key for key in states
                if key == (account or "*") or (
                    account is not None and key.startswith(f"{account}|") and
                    (family is None or key.endswith(f"|{family}")))]

    def episode_live(self, rule: str | None, account: str | None,
                     instrument: str | None) -> bool:
        """Does the condition of `rule` still hold for that target (its episode goes on)?
        A retry of an order the rule asked for is sent only while it does: once the leader
        starts a new trade, a stuck-follower flatten is no longer what was asked."""
        if rule is None or rule not in self._states:
            return True  # not a rule's order (restored from an older journal): as before
        return bool(self._keys(rule, account, instrument))

    def rearm(self, rule: str | None, account: str | None, instrument: str | None,
              action: str | None = None, episodes: object = None) -> None:
        """The decision could not be carried out now (another order still working, the
        account unreachable at the last moment): propose it again while its condition
        holds, instead of treating it as done. A catch-up that was not sent does not end
        the follower's part in the leader trade (`episodes`, as the decision carries them):
        otherwise `pair.entry_action` would keep the rule from ever proposing it again."""
        if rule is None or rule not in self._states:
            return
        if action == "catch_up" and isinstance(episodes, list):
            for episode in episodes:
                if isinstance(episode, list | tuple) and len(episode) == 2 and \
                        self._entries.get(str(episode[0])) == (str(episode[1]), action):
                    del self._entries[str(episode[0])]
        for key in self._keys(rule, account, instrument):
            self._states[rule][key].fired = False
        self._last_fired[rule] = {k: m for k, m in self._last_fired[rule].items()
                                  if k not in self._keys(rule, account, instrument)}

    def replay_decisions(self, decisions: Iterable[dict[str, Any]]) -> int:
        """Take in decisions journaled after the saved state (`Decision.to_json_dict` form):
        the leader trades they skipped, flattened or caught up stay so. Returns how many
        counted."""
        count = 0
        for data in decisions:
            action = data.get("action")
            args = data.get("args")
            if data.get("suppressed") or action not in ENTRY_PRECEDENCE or \
                    not isinstance(args, dict):
                continue
            for episode in args.get("episodes") or ():
                if isinstance(episode, list) and len(episode) == 2 and \
                        all(isinstance(v, str) for v in episode):
                    self._entry(episode[0], episode[1], str(action))
                    self._entries_unchecked = True  # its pair may be gone: checked next tick
                    count += 1
        return count

    def _lock(self, p: _Proposal, now: datetime) -> None:
        account = p.target.account
        assert account is not None
        state = str(p.args.get("state", "halted"))
        until = lock_until(str(p.args.get("until", "next_trading_day")), now,
                           p.rule.timezone, self.policy.trading_day(account.firm))
        # the lock in force after it: this one, or a halted one it cannot replace
        lock = self.lock_book.place(account.id, state, until, p.reason, p.rule.id)
        p.args["until_time"] = lock.until.isoformat()

    def _decision(self, p: _Proposal, now: datetime) -> Decision:
        args = p.args  # the proposal's own: handed over, without the args that are None
        severity = (args.get("severity") if p.action == "alert" else None) or p.severity
        if None in args.values():
            args = {k: v for k, v in args.items() if v is not None}
        rule, target = p.rule, p.target
        # every value is the engine's own or a rule file's, checked when the rules loaded (the
        # severities are the spec's literals): built without validating them again, with every
        # field set, as Decision(...) builds it (build_model; a test holds the two equal)
        return build_model(Decision, {
            "time": now, "ruleset": rule.ruleset, "rule": rule.id, "action": p.action,
            "account": target.account.id if target.account else None,
            "instrument": target.instrument, "severity": severity, "reason": p.reason,
            "suppressed": p.suppressed or False, "args": args, "scope": rule.scope,
            "mode": rule.mode, "version": self.policy.version,
            "as_if_held": p.held_for < rule.hold,
        }, set(_DECISION_FIELDS))




def run_timeline(engine: Engine, snapshots: Iterable[Snapshot]) -> Iterable[Decision]:
    """Evaluate snapshots in order, yielding decisions as they are made."""
    for snapshot in snapshots:
        yield from engine.evaluate(snapshot)
