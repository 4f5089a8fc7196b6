"""Pure evaluation: snapshot (+ the engine's own small state) -> decisions.

The engine has no clock: time is the snapshot's `time`. Its state — how long each condition has
held, which episodes already fired, cooldowns, what was done about each leader trade, when each
position was first seen — serialises to versioned JSON (`Engine.save_state` / `restore_state`),
so a restarted session continues where it stopped.

Semantics (SPEC section 3):
* a rule fires when `when` has held continuously for `for`, once per episode; it fires again only
  after `when` was false at least once and `cooldown` has passed;
* conflicts on one account: the most restrictive action wins, the higher priority among equals;
  every suppressed decision is still reported with its reason;
* an order (flatten, cancel, catch-up) is never decided for a disconnected or stale account: it is
  held, reported once, and the rule fires again once the account is reachable;
* an evaluation error is reported once per rule and target (until it changes or clears), and the
  condition's timer is left as it was: never a crash, never a silent false.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .errors import EvaluationError, StateError
from .instruments import Catalog, Instrument, default_catalog
from .model import ORDER_ACTIONS, Account, Decision, Snapshot
from .namespace import (
    FLAT_FIELDS,
    AccountsView,
    AccountView,
    Env,
    InstrumentView,
    MissingQuote,
    PairView,
    PositionView,
    QuoteView,
)
from .rules.loader import CompiledRule, Policy

STATE_VERSION = 1
DEFAULT_STALE_AFTER = 5.0

DEFAULT_SEVERITY = {
    "flatten": "critical", "lock_account": "critical", "cancel_orders": "warning",
    "pause_copier": "warning", "skip_entry": "warning", "block_order": "warning",
    "reduce_order": "warning", "catch_up": "info", "resume_copier": "info",
}
# How restrictive an action is (SPEC section 3); alerts never conflict.
RANK = {
    "flatten": 50, "lock_account:halted": 40, "lock_account:reducing": 30, "pause_copier": 30,
    "skip_entry": 30, "cancel_orders": 30, "block_order": 30, "reduce_order": 20,
    "catch_up": 10, "resume_copier": 10, "alert": 0,
}
ENTRY_PRECEDENCE = {"flatten": 3, "skip_entry": 2, "catch_up": 1}


@dataclass(slots=True)
class _RuleState:
    since: datetime
    fired: bool = False
    held: bool = False


@dataclass(slots=True)
class _Family:
    """One account's exposure in one instrument family."""

    qty: int
    equiv: float
    instrument: Instrument
    symbol: str
    avg_price: float
    opened_at: datetime | None


@dataclass(slots=True)
class _Target:
    key: str
    account: Account | None
    env: Env
    family: str | None = None
    instrument: str | None = None
    pair_key: str | None = None
    trade: str | None = None
    catch_up_qty: int = 0
    stop_price: float | None = None


@dataclass(slots=True)
class _Proposal:
    rule: CompiledRule
    order: int
    target: _Target
    action: str
    args: dict[str, Any]
    reason: str
    held_for: float
    suppressed: str | None = None


@dataclass
class _AccountInfo:
    account: Account
    view: AccountView
    families: dict[str, _Family] = field(default_factory=dict)
    reachable: bool = True
    why_unreachable: str = ""


class Engine:
    """Evaluates a Policy against snapshots, one after another, keeping its state."""

    def __init__(self, policy: Policy, catalog: Catalog | None = None) -> None:
        self.policy = policy
        self.catalog = catalog or default_catalog()
        self.params = policy.param_values
        self.stale_after = float(policy.param("stale_after", DEFAULT_STALE_AFTER))
        self._states: dict[str, dict[str, _RuleState]] = {r.id: {} for r in policy.rules}
        self._last_fired: dict[str, dict[str, datetime]] = {r.id: {} for r in policy.rules}
        self._errors: dict[str, dict[str, str]] = {r.id: {} for r in policy.rules}
        self._entries: dict[str, tuple[str, str]] = {}  # pair -> (leader trade, action)
        self._first_seen: dict[str, tuple[int, datetime]] = {}  # account|family -> (side, t)
        self.last_time: datetime | None = None

    # --- public API -------------------------------------------------------------------------

    def evaluate(self, snapshot: Snapshot, *, as_if_held: bool = False,
                 stage: str = "session") -> list[Decision]:
        """Decisions for one snapshot. `as_if_held` treats every true condition as having held
        for its `for` (a single snapshot has no history: dry-run and check)."""
        now = snapshot.time.astimezone(UTC)
        if self.last_time is not None and now < self.last_time:
            raise StateError(f"snapshot time {now.isoformat()} is earlier than the previous "
                             f"one ({self.last_time.isoformat()}); the engine's time cannot go "
                             "back")
        infos = self._accounts(snapshot, now)
        proposals: list[_Proposal] = []
        decisions: list[Decision] = []
        rules = [r for r in self.policy.rules if r.stage == stage]
        targets_by_scope = {
            "account": self._account_targets(snapshot, infos, now),
            "pair": self._pair_targets(snapshot, infos, now),
            "global": self._global_targets(snapshot, infos, now),
        }
        for order, rule in enumerate(rules):
            self._evaluate_rule(rule, order, targets_by_scope[rule.scope], now, as_if_held,
                                proposals, decisions)
        decisions.extend(self._resolve(proposals, infos, now))
        self.last_time = now
        return decisions

    def save_state(self) -> dict[str, Any]:
        """The engine's state as versioned, JSON-ready data."""
        def iso(moment: datetime) -> str:
            return moment.isoformat()

        return {
            "version": STATE_VERSION,
            "policy_version": self.policy.version,
            "time": iso(self.last_time) if self.last_time else None,
            "rules": {
                rule: {t: {"since": iso(s.since), "fired": s.fired, "held": s.held}
                       for t, s in states.items()}
                for rule, states in self._states.items() if states
            },
            "last_fired": {rule: {t: iso(m) for t, m in fired.items()}
                           for rule, fired in self._last_fired.items() if fired},
            "entries": {pair: list(entry) for pair, entry in self._entries.items()},
            "first_seen": {key: [side, iso(m)] for key, (side, m) in self._first_seen.items()},
        }

    def save_state_json(self) -> str:
        return json.dumps(self.save_state(), indent=1, sort_keys=True)

    def restore_state(self, data: Any) -> list[str]:
        """Continue from saved state; returns notes about anything that was dropped."""
        if not isinstance(data, dict) or "version" not in data:
            raise StateError("saved engine state is not an object with a 'version'")
        version = data["version"]
        if not isinstance(version, int) or version > STATE_VERSION:
            raise StateError(f"saved engine state has version {version!r}; this copilink-rules "
                             f"reads version {STATE_VERSION} or older: upgrade copilink-rules")
        notes = []
        if data.get("policy_version") not in (None, self.policy.version):
            notes.append(f"the rules changed since the state was saved (was "
                         f"{data.get('policy_version')}, now {self.policy.version}); timers of "
                         "rules that still exist are kept")
        try:
            moment = data.get("time")
            self.last_time = datetime.fromisoformat(moment) if moment else None
            for rule, states in data.get("rules", {}).items():
                if rule not in self._states:
                    notes.append(f"dropped the timers of rule {rule!r}, which no longer exists")
                    continue
                self._states[rule] = {
                    t: _RuleState(datetime.fromisoformat(s["since"]), bool(s["fired"]),
                                  bool(s.get("held", False)))
                    for t, s in states.items()
                }
            for rule, fired in data.get("last_fired", {}).items():
                if rule in self._last_fired:
                    self._last_fired[rule] = {t: datetime.fromisoformat(m)
                                              for t, m in fired.items()}
            self._entries = {p: (str(e[0]), str(e[1])) for p, e in data.get("entries", {}).items()}
            self._first_seen = {k: (int(v[0]), datetime.fromisoformat(v[1]))
                                for k, v in data.get("first_seen", {}).items()}
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise StateError(f"saved engine state is damaged: {exc!r}") from None
        return notes

    # --- building what expressions see ------------------------------------------------------

    def _accounts(self, snapshot: Snapshot, now: datetime) -> dict[str, _AccountInfo]:
        infos: dict[str, _AccountInfo] = {}
        seen_keys: set[str] = set()
        for account in snapshot.accounts:
            families: dict[str, _Family] = {}
            contracts = 0
            overnight = {self.catalog.parse(s).symbol for s in account.overnight}
            undeclared = 0
            for position in account.positions:
                if position.qty == 0:
                    continue
                instrument = self.catalog.parse(position.instrument)
                contracts += abs(position.qty)
                if instrument.symbol not in overnight:
                    undeclared += 1
                family = families.get(instrument.family)
                equiv = position.qty * instrument.size
                if family is None:
                    families[instrument.family] = _Family(
                        position.qty, equiv, instrument, position.instrument,
                        position.avg_price, position.opened_at)
                else:
                    main_is_new = abs(equiv) > abs(family.equiv)
                    family.qty += position.qty
                    family.equiv += equiv
                    if main_is_new:
                        family.instrument, family.symbol = instrument, position.instrument
                        family.avg_price, family.opened_at = position.avg_price, position.opened_at
            for name, family in families.items():
                key = f"{account.id}|{name}"
                seen_keys.add(key)
                side = (family.equiv > 0) - (family.equiv < 0)
                first = self._first_seen.get(key)
                if first is None or first[0] != side:
                    self._first_seen[key] = (side, family.opened_at or now)
                if family.opened_at is None:
                    family.opened_at = self._first_seen[key][1]
            age = (now - account.updated_at).total_seconds() if account.updated_at else 0.0
            stale = age > self.stale_after
            reachable = account.connected and not stale
            view = AccountView(
                id=account.id, role=account.role, firm=account.firm or "",
                leader_id=account.leader or "", ratio=account.ratio if account.role ==
                "follower" else 1.0, connected=account.connected, stale=stale,
                reachable=reachable, data_age=age, copier=account.copier,
                balance=account.balance, realized_pnl=account.realized_pnl,
                unrealized_pnl=account.unrealized_pnl,
                pnl=account.realized_pnl + account.unrealized_pnl, flat=not families,
                contracts=contracts, positions=len(families),
                working_orders=sum(1 for o in account.orders if o.status in ("working",
                                                                             "pending")),
                undeclared_positions=undeclared,
            )
            why = "" if reachable else (
                f"account {account.id} is disconnected" if not account.connected
                else f"account {account.id} data is stale ({age:.1f}s old)")
            infos[account.id] = _AccountInfo(account, view, families, reachable, why)
        for key in [k for k in self._first_seen if k not in seen_keys]:
            del self._first_seen[key]
        return infos

    def _env(self, now: datetime) -> Env:
        env = Env()
        env.params = self.params
        env.now = now
        return env

    def _account_targets(self, snapshot: Snapshot, infos: dict[str, _AccountInfo],
                         now: datetime) -> list[_Target]:
        targets = []
        for info in infos.values():
            env = self._env(now)
            env.account = info.view
            targets.append(_Target(info.account.id, info.account, env))
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
        leaders = [i for i in infos.values() if i.account.role == "leader"]
        targets = []
        live_pairs: set[str] = set()
        for info in infos.values():
            follower = info.account
            if follower.role != "follower":
                continue
            leader = infos.get(follower.leader) if follower.leader else (
                leaders[0] if len(leaders) == 1 else None)
            if leader is None:
                continue
            overnight = {self.catalog.parse(s).family for s in follower.overnight}
            for family in sorted(set(leader.families) | set(info.families)):
                lead = leader.families.get(family)
                foll = info.families.get(family)
                main = lead or foll
                assert main is not None
                pair_key = f"{follower.id}|{leader.account.id}|{family}"
                live_pairs.add(pair_key)
                trade = (f"{(lead.equiv > 0) - (lead.equiv < 0)}@{lead.opened_at.isoformat()}"
                         if lead and lead.opened_at else "")
                entry = self._entries.get(pair_key)
                if entry is not None and entry[0] != trade:
                    del self._entries[pair_key]
                    entry = None
                env = self._env(now)
                env.account = info.view
                env.leader_account = leader.view
                env.leader = _position_view(lead, now, False)
                env.follower = _position_view(foll, now, family in overnight)
                expected = (lead.equiv if lead else 0.0) * follower.ratio
                env.pair = PairView(family=family, ratio=follower.ratio, expected_equiv=expected,
                                    entry_action=entry[1] if entry else "")
                instrument = main.instrument
                env.instrument = InstrumentView(
                    symbol=instrument.symbol, root=instrument.root, family=instrument.family,
                    tick_size=instrument.tick_size, tick_value=instrument.tick_value,
                    micro=instrument.micro)
                env.quote = self._quote(snapshot, instrument)
                catch_up_qty = round(expected / instrument.size) if lead else 0
                targets.append(_Target(
                    pair_key, follower, env, family,
                    foll.symbol if foll else main.symbol, pair_key, trade, catch_up_qty,
                    _protective_stop(leader.account, family, self.catalog),
                ))
        for key in [k for k in self._entries if k not in live_pairs]:
            del self._entries[key]
        return targets

    def _quote(self, snapshot: Snapshot, instrument: Instrument) -> QuoteView | MissingQuote:
        for symbol, quote in snapshot.quotes.items():
            if self.catalog.parse(symbol).symbol == instrument.symbol:
                return QuoteView(instrument.symbol, quote.bid, quote.ask, quote.last)
        return MissingQuote(instrument.symbol)

    # --- evaluation -------------------------------------------------------------------------

    def _evaluate_rule(self, rule: CompiledRule, order: int, targets: list[_Target],
                       now: datetime, as_if_held: bool, proposals: list[_Proposal],
                       decisions: list[Decision]) -> None:
        states = self._states[rule.id]
        errors = self._errors[rule.id]
        evaluate = rule.when.evaluate
        zone = rule.timezone
        local = now.astimezone(zone)
        now_local = local.time()
        weekday = local.weekday()
        seen: set[str] | None = set() if states or errors else None
        for target in targets:
            account = target.account
            if account is not None and (rule.roles or rule.firms or rule.accounts) and \
                    not rule.applies(account.id, account.role, account.firm):
                continue
            key = target.key
            if seen is not None:
                seen.add(key)
            env = target.env
            env.local, env.now_local, env.weekday = local, now_local, weekday
            try:
                result = evaluate(env)
                if result is not True and result is not False:
                    raise EvaluationError(f"the condition gave {result!r}, not true or false")
            except Exception as exc:  # noqa: BLE001 - a user's expression may raise anything
                message = exc.args[0] if isinstance(exc, EvaluationError) else \
                    f"{type(exc).__name__}: {exc}"
                if errors.get(key) != message:
                    errors[key] = message
                    decisions.append(self._error_decision(rule, target, now, message))
                continue
            if errors and key in errors:
                del errors[key]
            if not result:
                if states and key in states:
                    del states[key]
                continue
            state = states.get(key)
            if state is None:
                state = states[key] = _RuleState(now)
            if state.fired:
                continue
            held = (now - state.since).total_seconds()
            if not as_if_held and held < rule.hold:
                continue
            last = self._last_fired[rule.id].get(key)
            if last is not None and (now - last).total_seconds() < rule.cooldown:
                continue
            state.fired = True
            for action, template in zip(rule.actions, rule.templates, strict=True):
                proposals.append(self._proposal(rule, order, target, action.name,
                                                dict(action.args), template, held, as_if_held))
        if seen is not None:
            for key in [k for k in states if k not in seen]:
                del states[key]
            for key in [k for k in errors if k not in seen]:
                del errors[key]

    def _proposal(self, rule: CompiledRule, order: int, target: _Target, action: str,
                  args: dict[str, Any], template: Any, held: float,
                  as_if_held: bool) -> _Proposal:
        if template is not None:
            args["message"] = template.render(target.env)
        if action == "catch_up":
            args["qty"] = target.catch_up_qty
            if target.stop_price is not None:
                args["stop_price"] = target.stop_price
        reason = args.get("message") if action == "alert" and args.get("message") else (
            rule.description or f"when: {rule.when.source}")
        if rule.hold > 0:
            reason += (f" (as if held for {rule.hold:g}s: a single snapshot has no history)"
                       if as_if_held and held < rule.hold else f" (held {held:.1f}s)")
        return _Proposal(rule, order, target, action, args, str(reason), held)

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
                 now: datetime) -> list[Decision]:
        proposals = self._hold_unreachable(proposals, infos)
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
                    extra.append(_Proposal(
                        p.rule, p.order, p.target, "alert",
                        {"severity": p.rule.severity or "warning"},
                        f"would {', '.join(a.name for a in p.rule.actions)}: {p.reason}",
                        p.held_for))
            else:
                active.append(p)
        proposals = proposals + extra
        active.extend(extra)

        ranked = sorted(active, key=lambda p: (-_rank(p), -p.rule.priority, p.order))
        winners: dict[tuple[str | None, str, str | None], _Proposal] = {}
        kept: dict[str | None, list[_Proposal]] = {}
        for p in ranked:
            account = p.target.account.id if p.target.account else None
            if p.action != "alert":
                same = (account, p.action, p.target.family)
                first = winners.get(same)
                if first is not None:
                    p.suppressed = (f"{p.action} already decided by rule {first.rule.id} "
                                    f"(priority {first.rule.priority})")
                    continue
                winners[same] = p
            stronger = _stronger(p, kept.get(account, []), self._entries)
            if stronger:
                p.suppressed = stronger
                continue
            kept.setdefault(account, []).append(p)

        decisions = []
        for p in proposals:
            if p.suppressed is None:
                self._record(p, now)
            decisions.append(self._decision(p, now))
        return decisions

    def _hold_unreachable(self, proposals: list[_Proposal],
                          infos: dict[str, _AccountInfo]) -> list[_Proposal]:
        """Hold orders for unreachable accounts: report once, fire again when reachable."""
        held: dict[tuple[str, str], bool] = {}  # (rule, target) -> report (False: repeat)
        for p in proposals:
            account = p.target.account
            if p.action not in ORDER_ACTIONS or account is None or infos[account.id].reachable:
                continue
            group = (p.rule.id, p.target.key)
            if group not in held:
                state = self._states[p.rule.id][p.target.key]
                state.fired = False
                held[group] = not state.held
                state.held = True
        kept = []
        for p in proposals:
            report = held.get((p.rule.id, p.target.key))
            if report is False:
                continue  # already reported while this account is unreachable
            if report and p.action in ORDER_ACTIONS and p.target.account is not None:
                why = infos[p.target.account.id].why_unreachable
                p.suppressed = f"{why}: no orders until it is reachable again"
            kept.append(p)
        return kept

    def _record(self, p: _Proposal, now: datetime) -> None:
        """Remember what a decision that passed means for cooldowns and the leader's trade."""
        if p.action in ORDER_ACTIONS:
            state = self._states[p.rule.id].get(p.target.key)
            if state is not None:
                state.held = False  # a later disconnect in this episode is reported again
        if p.rule.cooldown > 0:
            self._last_fired[p.rule.id][p.target.key] = now
        if p.target.pair_key is None or p.action not in ENTRY_PRECEDENCE or not p.target.trade:
            return
        current = self._entries.get(p.target.pair_key)
        if current is None or ENTRY_PRECEDENCE[p.action] > ENTRY_PRECEDENCE[current[1]]:
            self._entries[p.target.pair_key] = (p.target.trade, p.action)

    def _decision(self, p: _Proposal, now: datetime) -> Decision:
        severity = (p.args.get("severity") if p.action == "alert" else None) or \
            p.rule.severity or DEFAULT_SEVERITY.get(p.action, "warning")
        args = {k: v for k, v in p.args.items() if v is not None}
        return Decision(
            time=now, ruleset=p.rule.ruleset, rule=p.rule.id, action=p.action,
            account=p.target.account.id if p.target.account else None,
            instrument=p.target.instrument, severity=severity, reason=p.reason,
            suppressed=p.suppressed or False, args=args, scope=p.rule.scope,
            mode=p.rule.mode, version=self.policy.version,
            as_if_held=p.held_for < p.rule.hold,
        )




def _rank(p: _Proposal) -> int:
    if p.action == "lock_account":
        return RANK[f"lock_account:{p.args.get('state', 'halted')}"]
    return RANK.get(p.action, 0)


def _stronger(p: _Proposal, kept: list[_Proposal],
              entries: dict[str, tuple[str, str]]) -> str | None:
    """Why a more restrictive decision on the same account overrides `p`, if one does."""
    if p.action == "catch_up":
        entry = entries.get(p.target.pair_key or "")
        if entry is not None and entry[0] == p.target.trade and entry[1] != "catch_up":
            return (f"no catch-up after {entry[1]} in the same leader trade "
                    f"(follower {p.target.account.id if p.target.account else '?'})")
        for other in kept:
            same_family = other.target.family in (None, p.target.family)
            if other.action in ("flatten", "skip_entry") and same_family:
                return f"{other.action} from rule {other.rule.id} is more restrictive"
            if other.action == "lock_account":
                return (f"account is locked ({other.args.get('state')}) by rule "
                        f"{other.rule.id}: no new exposure")
            if other.action == "pause_copier":
                return f"copier paused by rule {other.rule.id}"
    if p.action == "resume_copier":
        for other in kept:
            if other.action == "pause_copier":
                return f"pause_copier from rule {other.rule.id} is more restrictive"
    if p.action == "lock_account" and p.args.get("state") == "reducing":
        for other in kept:
            if other.action == "lock_account" and other.args.get("state") == "halted":
                return f"halted lock from rule {other.rule.id} is more restrictive"
    return None


def _position_view(family: _Family | None, now: datetime, overnight: bool) -> PositionView:
    if family is None:
        return PositionView(**{**FLAT_FIELDS, "overnight": overnight})
    side = "long" if family.equiv > 0 else "short"
    opened = family.opened_at
    return PositionView(
        qty=family.qty, side=side, flat=False, equiv=round(family.equiv, 6),
        avg_price=family.avg_price, opened_at=opened,
        age=(now - opened).total_seconds() if opened else 0.0,
        instrument=family.symbol, overnight=overnight,
    )


def _protective_stop(leader: Account, family: str, catalog: Catalog) -> float | None:
    for order in leader.orders:
        if order.type in ("stop", "stop_limit") and order.stop_price is not None and \
                order.status in ("working", "pending") and \
                catalog.parse(order.instrument).family == family:
            return order.stop_price
    return None


def run_timeline(engine: Engine, snapshots: Iterable[Snapshot]) -> Iterable[Decision]:
    """Evaluate snapshots in order, yielding decisions as they are made."""
    for snapshot in snapshots:
        yield from engine.evaluate(snapshot)
