"""The copier ports (SPEC section 2, "copier"): who copies the leader onto the followers.

    sim       the sim broker's own copier (adapters/sim.py `SimCopier`): pause, resume and
              skip-entry really happen
    external  a copier we cannot steer (Replikanto, CrossTrade, Tradesyncer...): pause, resume
              and skip-entry become instructions to the trader — "pause copying onto F3 in your
              copier now" — and the journal records that a person must act. Flattening still
              happens: it goes to the broker, not to the copier.
    builtin   copilink-rules copies the leader itself (`BuiltinCopier`), through the broker's
              order port, every order asked of the pre-trade gate first
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from .adapters.base import (
    CANCEL_AGAIN,
    BrokerAnswer,
    CopierPort,
    OrderPort,
    OrderReport,
    Side,
    call_broker,
    find_tag,
)
from .adapters.sim import SimBroker, SimCopier
from .errors import InstrumentError
from .facts import Family, account_exposure, contracts_for, reachable
from .gate import Gate, OrderRequest
from .instruments import Catalog, Instrument, default_catalog
from .journal import CommandRow, Journal, iso
from .model import Account, Snapshot

COPIER_NAMES = ("sim", "external", "builtin")


class ExternalCopier:
    """A copier only the trader can steer: every request is an instruction to a person."""

    name = "external"
    steerable = False

    def pause(self, follower: str, tag: str) -> BrokerAnswer:
        return BrokerAnswer("manual", f"pause copying onto {follower} in your copier now: "
                            "copilink-rules cannot reach your copier")

    def resume(self, follower: str, tag: str) -> BrokerAnswer:
        return BrokerAnswer("manual", f"copying onto {follower} may resume: switch it back on "
                            "in your copier when you are ready")

    def skip_entry(self, follower: str, instrument: str, tag: str) -> BrokerAnswer:
        return BrokerAnswer("manual", f"keep {follower} out of the leader's current "
                            f"{instrument} trade: do not let your copier enter it late")


def make_copier(name: str, broker: Any, journal: Journal | None = None,
                followers: Sequence[FollowerCopy] = ()) -> CopierPort:
    """The copier called `name` for `broker` (`sim` needs the sim broker, `builtin` the
    journal and the followers of copilink.yaml)."""
    if name == "external":
        return ExternalCopier()
    if name == "builtin":
        if journal is None:
            raise LookupError("copier 'builtin' needs the journal")
        return BuiltinCopier(broker, journal, followers)
    if name == "sim":
        if not isinstance(broker, SimBroker):
            raise LookupError("copier 'sim' is the sim broker's own copier; with a real "
                              "broker use copier: builtin or external")
        return SimCopier(broker)
    raise LookupError(f"No copier named {name!r}; known: {', '.join(COPIER_NAMES)}")


# --- the built-in copier ------------------------------------------------------------------------

# the journal's names for the built-in copier's commands (the enforcer leaves them to it)
COPIER_ACTIONS = ("copy", "copy_stop", "copy_stop_cancel")
# seconds a fill the broker reported may take to show in the account's positions
FILL_SHOWS_WITHIN = 1.0
# an entry into a leader position opened longer ago than this is a late entry, priced by the
# gate against the leader's entry (`catch_up_max_ticks`)
LATE_AFTER = 2.0


class CopierHost(Protocol):
    """What the built-in copier needs of the enforcer it works beside (enforcer.py)."""

    dry_run: bool
    stale_after: float
    entry_max_data_age: float
    max_contracts: Any
    gate: Gate

    def blocked(self, now: datetime) -> str | None: ...

    def busy(self, account: str, family: str) -> bool: ...

    def gate_locks(self) -> dict[str, tuple[str, datetime, str]]: ...

    def broker_trouble(self, answer: BrokerAnswer, now: datetime, account: str) -> None: ...

    def alert(self, now: datetime, severity: str, message: str, account: str | None) -> None: ...

    def new_tag(self) -> str: ...


@dataclass(frozen=True)
class FollowerCopy:
    """How one follower copies its leader (copilink.yaml `accounts[]`)."""

    id: str
    leader: str | None = None
    ratio: float = 1.0
    instrument: str | None = None  # its own contract when not the leader's (MNQH6 for micros)
    max_qty: int | None = None  # never more than this many of its own contracts
    copy_stops: bool = True  # mirror the leader's protective stop orders
    enabled: bool = True  # False: never copied onto (the rules still watch it)


@dataclass
class _InFlight:
    """A copied order the broker has not yet shown done in the account's positions."""

    tag: str
    account: str
    family: str
    instrument: str
    expected: float  # the account's exposure in the family once it is done (full contracts)
    sent_at: datetime
    status: str = "pending"  # pending | unanswered (the broker could not be reached) | cancelling
    order_id: str | None = None
    filled_at: datetime | None = None  # the broker says filled, positions do not show it yet
    others: tuple[str, ...] = ()  # the other closes of a family held in several contracts
    cancel_at: datetime | None = None  # when it was last asked to cancel it


@dataclass
class _Stop:
    """A follower's copy of one of the leader's protective stop orders."""

    tag: str
    order_id: str
    account: str
    instrument: str
    side: str
    qty: int
    price: float
    placed_at: datetime


@dataclass(frozen=True)
class _Flat:
    """No position in a family (`facts.Family` for one that is held)."""

    equiv: float = 0.0
    symbols: Mapping[str, int] = field(default_factory=dict)
    avg_price: float | None = None
    opened_at: datetime | None = None


FLAT = _Flat()
Held = Family | _Flat


class BuiltinCopier:
    """copilink-rules' own copier: mirrors the leader's position in each instrument family
    onto every active follower through the broker's order port, each order asked of the
    pre-trade gate first and journaled with its own tag before it goes out.

    Position-driven: when the leader's exposure in a family changes, each follower's target is
    that exposure x its ratio in its own contract (capped by `max_qty`), and the order sent is
    the difference to what the follower holds. A copy that is lost, refused or not possible now
    (a paused, disconnected or halted follower, the kill switch) is not chased: the next change
    of the leader heals it, and the desync rules decide between now and then (catch up while the
    price is close, skip the trade, flatten a stuck follower). So a missed message never
    compounds and a late entry never goes out unchecked.

    Safety: at most one copied order per follower and family at the broker; none while the
    enforcer has a corrective action there; a reversal is a close, then (once the close shows)
    an entry — never one order through zero; an entry copied late is priced against the leader's
    entry by the gate. Pausing is per follower and kept in the journal (`copying` table), which
    `copilink-rules resume F3` writes too; the copier reads it every tick.
    """

    name = "builtin"
    steerable = True

    def __init__(self, broker: OrderPort, journal: Journal, followers: Sequence[FollowerCopy],
                 catalog: Catalog | None = None, *, verify_after: float = 5.0) -> None:
        self.broker = broker
        self.journal = journal
        self.followers = {f.id: f for f in followers}
        self.catalog = catalog or default_catalog()
        self.verify_after = verify_after
        self.host: CopierHost | None = None
        self.paused: dict[str, str] = {}  # follower -> why (from the journal)
        # follower|family -> the leader's exposure the copier last acted on (copied, or chose
        # not to copy): a change of the leader is a difference from this
        self.synced: dict[str, float] = {}
        # leader|family -> (trade number, side): a new trade when it opens or flips
        self.trades: dict[str, tuple[int, int]] = {}
        self.skips: dict[str, int] = {}  # follower|family -> the leader trade it sits out
        self.in_flight: dict[str, _InFlight] = {}  # follower|family -> the copied order
        self.stops: dict[str, _Stop] = {}  # follower|leader order id -> its copy
        self.started = False
        self._gate_ready = False
        self._exposure: dict[str, tuple[Account, dict[str, Family]]] = {}  # see _families
        # leaders whose data was not current ("*": all, after a restart): the entries they
        # made meanwhile are copied as late ones, priced by the gate
        self._gap: set[str] = set()
        self._late: set[str] = set()  # follower|family whose pending entry is a late one
        self._dry_stops: set[tuple[str, str, str, int, float]] = set()
        # follower|leader order id -> the copy the broker refused (not asked again as it is)
        self._refused_stops: dict[str, tuple[str, str, int, float]] = {}
        self.snapshot: Snapshot | None = None
        self.sent = 0  # orders sent (for the benchmark and the summary)
        # tag -> when the copier sent it (the latency benchmark reads it)
        self.on_send: Callable[[str, str, str], None] | None = None

    def attach(self, host: CopierHost) -> None:
        self.host = host

    # --- the CopierPort: what the rules ask of it ------------------------------------------

    def pause(self, follower: str, tag: str) -> BrokerAnswer:
        return self._set(follower, "paused", "paused by a rule", tag)

    def resume(self, follower: str, tag: str) -> BrokerAnswer:
        return self._set(follower, "active", "resumed by a rule", tag)

    def _set(self, follower: str, state: str, reason: str, tag: str) -> BrokerAnswer:
        if follower not in self.followers:
            return BrokerAnswer("rejected", f"{follower!r} is not a follower in copilink.yaml")
        now = self.snapshot.time if self.snapshot is not None else datetime.now(UTC)
        self.journal.set_copying(follower, state, f"{reason} ({tag})", now)
        if state == "paused":
            self.paused[follower] = reason
        else:
            self.paused.pop(follower, None)
            self._resync(follower)
        return BrokerAnswer("filled", "", tag)

    def _resync(self, follower: str) -> None:
        """Copying onto `follower` starts again from the leader's next change: what it missed
        meanwhile is for the rules (catch up while the price is close, or skip)."""
        snapshot = self.snapshot
        if snapshot is None:
            return
        spec = self.followers[follower]
        leader = self._leader_of(spec, {a.id: a for a in snapshot.accounts}, snapshot)
        if leader is None:
            return
        for family, position in self._families(leader).items():
            self.synced[f"{follower}|{family}"] = position.equiv

    def skip_entry(self, follower: str, instrument: str, tag: str) -> BrokerAnswer:
        if follower not in self.followers:
            return BrokerAnswer("rejected", f"{follower!r} is not a follower in copilink.yaml")
        try:
            family = self.catalog.parse(instrument).family
        except InstrumentError as exc:
            return BrokerAnswer("rejected", str(exc))
        spec = self.followers[follower]
        leader = spec.leader or self._only_leader()
        trade = self.trades.get(f"{leader}|{family}")
        if trade is not None and trade[1] != 0:
            self.skips[f"{follower}|{family}"] = trade[0]
        return BrokerAnswer("filled", "", tag)

    def cap(self, account: str, args: dict[str, Any]) -> None:
        """Cut a catch-up's `qty` (in `args`) to the follower's `max_qty`, saying why."""
        spec = self.followers.get(account)
        qty = int(args.get("qty", 0))
        if spec is None or spec.max_qty is None or abs(qty) <= spec.max_qty:
            return
        args.setdefault("reduced_from", qty)
        args["qty"] = int(math.copysign(spec.max_qty, qty))
        args["reduced_because"] = f"max_qty {spec.max_qty} for {account} in copilink.yaml"

    def place_catch_up(self, account: str, instrument: str, qty: int, tag: str,
                       stop_price: float | None) -> tuple[BrokerAnswer, BrokerAnswer | None]:
        """A catch-up the rules decided, sent by the copier (its stop mirrored from the
        leader's when the follower copies stops). The enforcer tracks it to the end, and the
        copier sends nothing there while it does (`CopierHost.busy`)."""
        family = self.catalog.parse(instrument).family
        key = f"{account}|{family}"
        side: Side = "buy" if qty > 0 else "sell"
        answer = call_broker(lambda: self.broker.place_order(account, instrument, side,
                                                             abs(qty), "market", tag))
        self.sent += 1
        spec = self.followers.get(account)
        if self.snapshot is not None and spec is not None:
            leader = self._leader_of(spec, {a.id: a for a in self.snapshot.accounts},
                                     self.snapshot)
            if leader is not None:
                self.synced[key] = self._families(leader).get(family, FLAT).equiv
        if not answer.ok or stop_price is None or (spec is not None and spec.copy_stops):
            return answer, None  # its stop: the copier mirrors the leader's next tick
        return answer, call_broker(lambda: self.broker.place_order(
            account, instrument, "sell" if qty > 0 else "buy", abs(qty), "stop",
            f"{tag}-stop", stop_price))

    # --- restart ----------------------------------------------------------------------------

    def restore(self, now: datetime) -> list[str]:
        """Pick up the journal's pauses, the copier's bookkeeping and its orders that were
        still open: each is asked about by tag before anything is copied there again."""
        notes = []
        state = self.journal.copier_state()
        if state is not None:
            self.synced = {k: float(v) for k, v in state.get("synced", {}).items()}
            self.trades = {k: (int(v[0]), int(v[1])) for k, v in state.get("trades", {}).items()}
            self.skips = {k: int(v) for k, v in state.get("skips", {}).items()}
            self.stops = {k: _Stop(**{**v, "placed_at": datetime.fromisoformat(v["placed_at"])})
                          for k, v in state.get("stops", {}).items()}
            self.started = True
            self._gap = {"*"}  # what the leaders did while we were down is late now
        for row in self.journal.commands(("sending", "pending", "cancelling")):
            if row.action in ("copy_stop", "copy_stop_cancel"):
                notes += self._settle(row, now)
                continue
            if row.action != "copy":
                continue
            family = row.family or self.catalog.parse(row.instrument or "").family
            if row.status == "sending" and self._find(row.tag) is None:
                # journaled, then the process died before the broker had it: copied afresh
                self.journal.command_status(row.tag, "lost", now, "never reached the broker "
                                            "(the process stopped): copied again if still due")
                notes.append(f"{row.tag}: a copy to {row.account} never reached the broker")
                continue
            self.in_flight[f"{row.account}|{family}"] = _InFlight(
                row.tag, row.account, family, row.instrument or "",
                float(row.args.get("expected", 0.0)),
                datetime.fromisoformat(row.updated.replace("Z", "+00:00")), row.status)
            notes.append(f"{row.tag}: a copy to {row.account} was open; asking the broker "
                         "about it before copying there again")
        self._read_pauses()
        if self.paused:
            notes.append("copying paused onto " + ", ".join(
                f"{f} ({why})" for f, why in sorted(self.paused.items())) +
                "; resume with: copilink-rules resume <follower> --config <copilink.yaml>")
        return notes

    def _settle(self, row: CommandRow, now: datetime) -> list[str]:
        """A stop (or a stop's cancel) whose answer a crash lost: a copied stop that works at
        the broker but is not in the saved bookkeeping is cancelled (the next tick places the
        stop the leader's asks for), so two never stand side by side."""
        report = self._find(row.tag)
        if row.action == "copy_stop" and report is not None and not report.final and \
                report.order_id and not any(s.tag == row.tag for s in self.stops.values()):
            answer = self._cancel(row.account, report.order_id, f"{row.tag}-cancel", now)
            self.journal.command_status(row.tag, "cancelled" if answer.ok else "lost", now,
                                        "open at a restart: cancelled, placed again if due")
            return [f"{row.tag}: a copied stop on {row.account} open at the restart was "
                    "cancelled; the leader's stop is copied again"]
        status = "lost" if report is None else ("confirmed" if report.final or
                                                 row.action == "copy_stop" else "lost")
        self.journal.command_status(row.tag, status, now, "settled at a restart")
        return []

    def state(self) -> dict[str, Any]:
        """The bookkeeping a restart needs (saved with the engine's state every tick)."""
        # copies, never the live dicts: the session compares this with what it saved last
        return {"synced": dict(self.synced),
                "trades": {k: list(v) for k, v in self.trades.items()},
                "skips": dict(self.skips),
                "stops": {k: {**asdict(v), "placed_at": v.placed_at.isoformat()}
                          for k, v in self.stops.items()}}

    def _read_pauses(self) -> None:
        paused = {f: "disabled in copilink.yaml" for f, spec in self.followers.items()
                  if not spec.enabled}
        for account, (state, reason, _) in self.journal.copying().items():
            if state == "paused" and account in self.followers:
                paused.setdefault(account, reason)
        resumed = [f for f in self.paused if f not in paused]
        self.paused = paused
        for follower in resumed:  # resumed from outside (copilink-rules resume)
            self._resync(follower)

    # --- what the engine sees -------------------------------------------------------------

    def overlay(self, snapshot: Snapshot) -> Snapshot:
        """`snapshot` with each follower's copier state as this copier has it."""
        self._read_pauses()
        changed = False
        accounts = []
        for account in snapshot.accounts:
            state = "paused" if account.id in self.paused else "active"
            if account.role == "follower" and account.id in self.followers and \
                    account.copier != state:
                accounts.append(account.model_copy(update={"copier": state}))
                changed = True
            else:
                accounts.append(account)
        return snapshot.model_copy(update={"accounts": tuple(accounts)}) if changed else \
            snapshot

    # --- each tick --------------------------------------------------------------------------

    def sync(self, snapshot: Snapshot) -> None:
        """Follow up the copier's open orders, copy each change of the leaders, mirror their
        stops. Never raises for a broker problem."""
        self.snapshot = snapshot
        now = snapshot.time
        accounts = {a.id: a for a in snapshot.accounts}
        self._follow_up(accounts, now)
        self._count_trades(snapshot)
        first = not self.started
        self.started = True
        host = self.host
        blocked = host.blocked(now) if host is not None else None
        self._gate_ready = False
        for spec in self.followers.values():
            follower = accounts.get(spec.id)
            leader = self._leader_of(spec, accounts, snapshot)
            if follower is None or leader is None:
                continue
            if not self._current(leader, now):
                # its changes are copied once its data is current again, an entry then
                # priced by the gate as a late one (it may have happened long ago)
                self._gap.add(leader.id)
                continue
            gap = "*" in self._gap or leader.id in self._gap
            lead = self._families(leader)
            held = self._families(follower)
            prefix = f"{spec.id}|"
            families = set(lead) | {k[len(prefix):] for k in self.synced if
                                    k.startswith(prefix)}
            for family in sorted(families):
                key = prefix + family
                lead_equiv = lead.get(family, FLAT).equiv
                if first:
                    self.synced[key] = lead_equiv  # at start: what is open is the rules'
                    continue
                if abs(self.synced.get(key, 0.0) - lead_equiv) < 1e-9:
                    if not lead_equiv:
                        self.synced.pop(key, None)
                    self._late.discard(key)
                    continue
                if gap:  # a change made while its leader was not current, or we were down
                    self._late.add(key)
                if key in self.in_flight or (host is not None and host.busy(spec.id, family)):
                    continue  # waits for the order there to finish: copied after it
                if host is not None and blocked is None:
                    blocked = host.blocked(now)  # a rate limit met by the previous copy
                why_not = self._why_not(spec, follower, now, blocked)
                if why_not:
                    self._not_copied(spec.id, family, lead_equiv, why_not, now)
                    self.synced[key] = lead_equiv
                    continue
                self._copy(spec, follower, leader, family, lead.get(family, FLAT),
                           held.get(family, FLAT), now)
                if abs(self.synced.get(key, 0.0) - lead_equiv) < 1e-9:
                    self._late.discard(key)
        for spec in self.followers.values():  # every leader current now has been copied from
            leader = self._leader_of(spec, accounts, snapshot)
            if leader is not None and self._current(leader, now):
                self._gap.discard(leader.id)
        self._gap.discard("*")
        if blocked is None:
            for spec in self.followers.values():
                if spec.copy_stops:
                    self._mirror_stops(spec, accounts, snapshot, now)

    def _current(self, account: Account, now: datetime) -> bool:
        return reachable(account, now, self.host.stale_after if self.host is not None else 5.0)

    def _entry_max_data_age(self) -> float:
        return self.host.entry_max_data_age if self.host is not None else 1.0

    def _why_not(self, spec: FollowerCopy, follower: Account, now: datetime,
                 blocked: str | None) -> str | None:
        if spec.id in self.paused:
            return f"copying onto {spec.id} is paused ({self.paused[spec.id]})"
        if blocked:
            return blocked
        if not self._current(follower, now):
            return f"{spec.id} is disconnected or its data is stale: no orders"
        return None

    def _copy(self, spec: FollowerCopy, follower: Account, leader: Account, family: str,
              lead: Held, held: Held, now: datetime) -> None:
        key = f"{spec.id}|{family}"
        if not lead.symbols and not held.symbols:
            self.synced[key] = lead.equiv  # both flat: nothing to copy
            return
        symbol, own = self._contract(spec, lead, held, family)
        target = contracts_for(lead.equiv * spec.ratio, own.size)
        if spec.max_qty is not None:
            target = max(-spec.max_qty, min(spec.max_qty, target))
        held_own = held.equiv / own.size
        trade = self.trades.get(f"{leader.id}|{family}", (0, 0))
        if self.skips.get(key) == trade[0] and trade[1] != 0:
            # sitting this leader trade out: never into it, only out of what is held
            target = 0 if held_own * target <= 0 else \
                int(math.copysign(min(abs(target), round(abs(held_own))), target))
        elif key in self.skips:
            del self.skips[key]  # that trade is over
        if held.equiv and (target == 0 or (held_own > 0) != (target > 0)):
            # out first (a reversal: the entry follows once the close shows, never one
            # order through zero)
            self._close(spec.id, family, held, now, lead.equiv)
            if target == 0 or key not in self.in_flight:
                # done with this change: flat is the target, or the close was refused (the
                # rules watch the follower: not chased every tick) or a dry run's
                self.synced[key] = lead.equiv
            return
        diff = target - round(held_own)
        # an entry into a leader position older than this change (the follower missed its
        # start: resumed, reconnected, a lost copy) is a late entry: priced by the gate
        late = not held.equiv and (key in self._late or self.synced.get(key, 0.0) *
                                   lead.equiv > 0 or (lead.opened_at is not None and (
                                       now - lead.opened_at).total_seconds() > LATE_AFTER))
        if late and diff and self._price(lead, "buy" if diff > 0 else "sell") is None:
            return  # priced once a quote is in (just after a restart there may be none yet)
        if diff == 0:
            self.synced[key] = lead.equiv
            return
        adds = abs(target) > abs(round(held_own))
        age, fresh = follower.data_age(now), self._entry_max_data_age()
        if not adds and age > fresh:
            # a reduction sized from old data could carry the follower through zero (it may
            # be flat by now): waits for fresh data (the broker refreshes it within a second
            # or two; the rules flatten a follower left holding)
            return
        self.synced[key] = lead.equiv
        if adds and age > fresh:
            # sized, and asked of the gate, from what the follower held `age` s ago: an order
            # placed since (by a person) would go unseen, past the firm's limit or through
            # zero. Not chased: the rules catch it up once its data is fresh again
            self._not_copied(spec.id, family, lead.equiv, f"data of {spec.id} is {age:.1f}s "
                             f"old; a copy that adds exposure needs data under {fresh:g}s old",
                             now)
            return
        side: Side = "buy" if diff > 0 else "sell"
        qty = abs(diff)
        args: dict[str, Any] = {"leader": leader.id, "leader_equiv": lead.equiv,
                                "ratio": spec.ratio, "target": target}
        reason = None
        host = self.host
        if host is not None:
            verdict = self._gate(host).check(OrderRequest(
                account=spec.id, instrument=symbol, side=side, qty=qty,
                price=self._price(lead, side) if late else None,
                leader_price=lead.avg_price if late else None))
            if verdict.verdict == "block":
                self._refused(spec.id, family, symbol, args, now,
                              f"pre-trade gate: {'; '.join(verdict.reasons)}")
                return
            if verdict.verdict == "reduce":
                args["reduced_from"] = qty
                reason = args["reduced_because"] = "; ".join(verdict.reasons)
                qty = verdict.qty
            limit = host.max_contracts
            if adds and limit is not None:
                room = int(limit) - sum(abs(p.qty) for p in follower.positions)
                if room <= 0:
                    self._refused(spec.id, family, symbol, args, now,
                                  f"max_contracts {limit} reached")
                    return
                if qty > room:
                    args.setdefault("reduced_from", qty)
                    reason = f"max_contracts {limit}"
                    qty = room
        signed = qty if side == "buy" else -qty
        args["qty"] = signed
        args["expected"] = held.equiv + signed * own.size
        tag = self._tag()
        self._journal(tag, spec.id, symbol, family, "copy", args, "sending", now, reason)
        if self._dry_run:
            self.journal.command_status(tag, "dry_run", now, "run --dry-run: not sent")
            return
        if self.on_send is not None:
            self.on_send("copy", spec.id, tag)
        answer = call_broker(lambda: self.broker.place_order(spec.id, symbol, side, qty,
                                                             "market", tag))
        self.sent += 1
        self._answered(tag, spec.id, family, symbol, float(args["expected"]), answer, now)
        if host is not None and (answer.ok or answer.status == "unavailable"):
            self._gate(host).commit(spec.id, symbol, signed)

    def _close(self, account: str, family: str, held: Held, now: datetime,
               lead_equiv: float) -> None:
        """Close what `account` holds in `family` with the broker's close-position command
        (it closes what is there when it runs, and cancels the working orders there)."""
        tags: list[str] = []
        for symbol in sorted(held.symbols):
            tag = self._tag()
            args = {"close": True, "held": held.symbols[symbol], "leader_equiv": lead_equiv,
                    "expected": 0.0}
            self._journal(tag, account, symbol, family, "copy", args, "sending", now, None)
            if self._dry_run:
                self.journal.command_status(tag, "dry_run", now, "run --dry-run: not sent")
                continue
            if self.on_send is not None:
                self.on_send("copy", account, tag)
            answer = self._call_close(account, symbol, tag)
            self.sent += 1
            self._answered(tag, account, family, symbol, 0.0, answer, now)
            if not answer.ok:
                break  # one open order per account and family
            tags.append(tag)
        order = self.in_flight.get(f"{account}|{family}")
        if order is not None and len(tags) > 1:
            order.others = tuple(t for t in tags if t != order.tag)
        self._forget_stops(account, family)

    def _call_close(self, account: str, symbol: str, tag: str) -> BrokerAnswer:
        return call_broker(lambda: self.broker.close_position(account, symbol, tag))

    def _cancel(self, account: str, order_id: str, tag: str, now: datetime) -> BrokerAnswer:
        answer = call_broker(lambda: self.broker.cancel_order(account, order_id, tag))
        self.journal.answer(tag, now, answer.status, answer.reason)
        return answer

    def _answered(self, tag: str, account: str, family: str, instrument: str,
                  expected: float, answer: BrokerAnswer, now: datetime) -> None:
        self.journal.answer(tag, now, answer.status, answer.reason)
        if answer.ok or answer.status == "unavailable":
            # "unavailable": it may still have arrived; asked about by tag at the next tick,
            # never sent again blindly
            self.in_flight[f"{account}|{family}"] = _InFlight(
                tag, account, family, instrument, expected, now,
                "pending" if answer.ok else "unanswered", answer.order_id,
                now if answer.status == "filled" else None)
            self.journal.command_status(tag, "pending", now, answer.reason or None)
            return
        self.journal.command_status(tag, answer.status, now, answer.reason or None)
        if answer.status in ("rate_limited", "auth_failed") and self.host is not None:
            self.host.broker_trouble(answer, now, account)
        else:
            self._alert(now, "warning", f"{account}: the broker refused the copy {tag} "
                        f"({answer.reason}); the desync rules watch {account}", account)

    def _follow_up(self, accounts: dict[str, Account], now: datetime) -> None:
        for key, order in list(self.in_flight.items()):
            account = accounts.get(order.account)
            if account is not None and abs(self._held(order.account, order.family, account) -
                                           order.expected) < 1e-9:
                for tag in (order.tag, *order.others):
                    self.journal.command_status(tag, "confirmed", now, "verified in snapshot")
                del self.in_flight[key]
                continue
            waited = (now - (order.filled_at or order.sent_at)).total_seconds()
            if order.filled_at is not None:
                if waited < FILL_SHOWS_WITHIN:
                    continue
            elif waited < (0 if order.status in ("unanswered", "cancelling") else
                           self.verify_after):
                continue  # (one restored as cancelling waited long enough before the crash)
            report = self._find(order.tag)
            if report is None:
                self.journal.command_status(order.tag, "lost", now, "the broker never "
                                            "received it: not re-sent, the desync rules watch "
                                            f"{order.account}")
                self._alert(now, "warning", f"{order.account}: the copy {order.tag} never "
                            "reached the broker", order.account)
                del self.in_flight[key]
            elif not report.final:
                if order.status != "cancelling":
                    order.status = "cancelling"
                    self.journal.command_status(order.tag, "cancelling", now, "still working "
                                                f"{self.verify_after:g}s later: cancelling it")
                # asked again while it works (a cancel refused, unanswered, or lost with a
                # restart): a working copy may still fill, and until it is final nothing
                # else goes to the follower's family, the rules' flatten included
                order_id = report.order_id or order.order_id
                if order_id and account is not None and self._current(account, now) and (
                        order.cancel_at is None or
                        (now - order.cancel_at).total_seconds() >= CANCEL_AGAIN):
                    order.cancel_at = now
                    self._cancel(order.account, order_id, f"{order.tag}-cancel", now)
            elif report.state == "filled" and order.filled_at is None:
                order.filled_at = now  # the positions should show it soon: wait once more
            else:
                self.journal.command_status(order.tag, report.state, now, report.reason or
                                            "the broker says it is final")
                del self.in_flight[key]

    def _mirror_stops(self, spec: FollowerCopy, accounts: dict[str, Account],
                      snapshot: Snapshot, now: datetime) -> None:
        """Keep a copy of each of the leader's protective stops on the follower, sized to
        what the follower holds: created, moved (cancelled, then placed at the new price) and
        cancelled as the leader's are."""
        follower = accounts.get(spec.id)
        leader = self._leader_of(spec, accounts, snapshot)
        if follower is None or leader is None or spec.id in self.paused or \
                self._why_not(spec, follower, now, None):
            return
        held = self._families(follower)
        wanted: dict[str, tuple[str, str, int, float]] = {}
        room: dict[str, int] = {}  # family -> contracts not yet protected
        for order in leader.orders:
            if order.type not in ("stop", "stop_limit") or order.stop_price is None or \
                    order.status not in ("working", "pending"):
                continue
            try:
                family = self.catalog.parse(order.instrument).family
            except InstrumentError:
                continue  # a contract the catalog does not know: not copied, never a crash
            position = held.get(family)
            if position is None or not position.equiv or f"{spec.id}|{family}" in \
                    self.in_flight or (self.host is not None and
                                       self.host.busy(spec.id, family)):
                continue
            symbol, qty = max(position.symbols.items(), key=lambda s: abs(s[1]))
            own = self.catalog.parse(symbol)
            closes = "sell" if qty > 0 else "buy"
            if order.side != closes:
                continue  # not protecting the follower's side
            size = abs(contracts_for(order.qty * self.catalog.parse(order.instrument).size *
                                     spec.ratio, own.size))
            # together the copies never close more than is held: all of them filling
            # would otherwise carry the follower through zero
            left = room.setdefault(family, abs(qty))
            size = min(max(size, 1), left)
            if size <= 0:
                continue
            room[family] = left - size
            wanted[f"{spec.id}|{order.id}"] = (symbol, closes, size, order.stop_price)
        working = {o.id for o in follower.orders if o.status in ("working", "pending")}
        for key, stop in list(self.stops.items()):
            if stop.account != spec.id:
                continue
            gone = stop.order_id not in working and \
                (now - stop.placed_at).total_seconds() >= 2.0
            want = wanted.get(key)
            if gone:
                del self.stops[key]  # filled, or cancelled with the position
                continue
            if want == (stop.instrument, stop.side, stop.qty, stop.price):
                continue
            if self._cancel_stop(stop, now):
                del self.stops[key]
        covered: dict[str, int] = {}  # family -> contracts of the copies still working
        for stop in self.stops.values():
            if stop.account == spec.id:
                family = self.catalog.parse(stop.instrument).family
                covered[family] = covered.get(family, 0) + stop.qty
        for key, (symbol, side, size, price) in wanted.items():
            if key in self.stops:
                continue
            family = self.catalog.parse(symbol).family
            held_qty = abs(held[family].symbols.get(symbol, 0)) if family in held else 0
            # a stop whose cancel is not yet confirmed still works: the new one only covers
            # what is left, so both filling never carries the follower through zero
            qty = min(size, held_qty - covered.get(family, 0))
            if qty <= 0:
                continue
            if self._refused_stops.get(key) == (symbol, side, qty, price):
                continue  # refused as it is: said once, not asked again every tick
            covered[family] = covered.get(family, 0) + qty
            self._place_stop(key, spec.id, symbol, side, qty, price, now)

    def _place_stop(self, key: str, account: str, symbol: str, side: str, qty: int,
                    price: float, now: datetime) -> None:
        family = self.catalog.parse(symbol).family
        if self.host is not None:
            verdict = self._gate(self.host).check(OrderRequest(account=account, instrument=symbol,
                                                        side=side, qty=qty, type="stop",
                                                        price=price))
            if verdict.verdict != "allow":
                self._refused(account, family, symbol, {"stop_price": price, "qty": qty}, now,
                              f"pre-trade gate: {'; '.join(verdict.reasons)}", "copy_stop")
                return
        if self._dry_run:
            if (key, symbol, side, qty, price) in self._dry_stops:
                return  # said once: a dry run never sees the stop at the broker
            self._dry_stops.add((key, symbol, side, qty, price))
        tag = self._tag()
        self._journal(tag, account, symbol, family, "copy_stop",
                      {"stop_price": price, "qty": qty, "side": side}, "sending", now, None)
        if self._dry_run:
            self.journal.command_status(tag, "dry_run", now, "run --dry-run: not sent")
            return
        answer = call_broker(lambda: self.broker.place_order(
            account, symbol, "buy" if side == "buy" else "sell", qty, "stop", tag, price))
        self.sent += 1
        self.journal.answer(tag, now, answer.status, answer.reason)
        self.journal.command_status(tag, "confirmed" if answer.ok else answer.status, now,
                                    answer.reason or None)
        if answer.ok:
            self.stops[key] = _Stop(tag, answer.order_id or tag, account, symbol, side, qty,
                                    price, now)
            self._refused_stops.pop(key, None)
            return
        if answer.status == "unavailable":
            # it may have arrived: asked about by tag and cancelled if it works, so a second
            # copy never stands beside it
            report = self._find(tag)
            if report is not None and not report.final and report.order_id:
                self._cancel(account, report.order_id, f"{tag}-cancel", now)
            return
        self._refused_stops[key] = (symbol, side, qty, price)
        if answer.status in ("rate_limited", "auth_failed") and self.host is not None:
            self.host.broker_trouble(answer, now, account)
            return
        self._alert(now, "critical", f"{account}: the copy of the leader's stop at "
                    f"{price:g} was refused ({answer.reason}): {account} has no stop, "
                    "place one by hand", account)

    def _cancel_stop(self, stop: _Stop, now: datetime) -> bool:
        tag = self._tag()
        family = self.catalog.parse(stop.instrument).family
        self._journal(tag, stop.account, stop.instrument, family, "copy_stop_cancel",
                      {"order_id": stop.order_id, "stop_price": stop.price}, "sending", now,
                      None)
        if self._dry_run:
            self.journal.command_status(tag, "dry_run", now, "run --dry-run: not sent")
            return True
        answer = self._cancel(stop.account, stop.order_id, tag, now)
        self.journal.command_status(tag, "confirmed" if answer.ok else answer.status, now,
                                    answer.reason or None)
        if answer.ok:
            return True
        report = self._find(stop.tag)  # refused: is the stop gone already (filled, cancelled)?
        return report is None or report.final

    def _forget_stops(self, account: str, family: str) -> None:
        """A close cancels the working orders there, the copied stops with them."""
        for key, stop in list(self.stops.items()):
            if stop.account == account and self.catalog.parse(stop.instrument).family == family:
                del self.stops[key]

    # --- helpers ----------------------------------------------------------------------------

    def _gate(self, host: CopierHost) -> Gate:
        """The enforcer's gate, given this tick's world once, with the copier's orders that
        still work counted as held (two families copied in two ticks must not each fit the
        firm's contract limit and break it together)."""
        if not self._gate_ready and self.snapshot is not None:
            host.gate.update(self.snapshot, host.gate_locks())
            self._gate_ready = True
            accounts = {a.id: a for a in self.snapshot.accounts}
            for order in self.in_flight.values():
                size = self.catalog.parse(order.instrument).size
                left = contracts_for(order.expected - self._held(
                    order.account, order.family, accounts.get(order.account)), size)
                host.gate.commit(order.account, order.instrument, left)
        return host.gate

    def _count_trades(self, snapshot: Snapshot) -> None:
        """Number each leader's trades per family: a new trade when it opens or flips."""
        for account in snapshot.accounts:
            if account.role != "leader":
                continue
            families = self._families(account)
            names = {k.split("|", 1)[1] for k in self.trades if k.startswith(f"{account.id}|")}
            for family in names | set(families):
                key = f"{account.id}|{family}"
                equiv = families.get(family, FLAT).equiv
                side = (equiv > 1e-9) - (equiv < -1e-9)
                number, last = self.trades.get(key, (0, 0))
                if side and side != last:
                    number += 1
                self.trades[key] = (number, side)

    def _families(self, account: Account) -> dict[str, Family]:
        """The account's exposure per family (facts.py: the one place positions are summed;
        `symbols` as the broker names them, so an order goes back in the same words).
        Derived once per account object: a leader read for each of its followers, and again
        for its trade numbers, is summed once per snapshot (the result is read, never changed)."""
        cached = self._exposure.get(account.id)
        if cached is not None and cached[0] is account:
            return cached[1]
        families = account_exposure(account, self.catalog)
        self._exposure[account.id] = (account, families)
        return families

    def _price(self, lead: Held, side: Side) -> float | None:
        """What an order on `side` would pay now, from the quote of the leader's contract
        (the follower's may be a micro with no quote of its own: same family, same price)."""
        if self.snapshot is None or not lead.symbols:
            return None
        quote = self.snapshot.quotes.get(next(iter(lead.symbols)))
        if quote is None:
            return None
        return (quote.ask if side == "buy" else quote.bid) or quote.last

    def _held(self, account: str, family: str, seen: Account | None = None) -> float:
        if seen is None and self.snapshot is not None:
            seen = next((a for a in self.snapshot.accounts if a.id == account), None)
        if seen is None:
            return 0.0
        return self._families(seen).get(family, FLAT).equiv

    def _contract(self, spec: FollowerCopy, lead: Held, held: Held,
                  family: str) -> tuple[str, Instrument]:
        """The contract the follower trades in `family`, named as the broker names it: its
        own (copilink.yaml) when of the same family (NQ copied as MNQ), else what it holds
        there, else the leader's."""
        if spec.instrument:
            own = self.catalog.parse(spec.instrument)
            if own.family == family:
                return spec.instrument, own
        symbols = held.symbols or lead.symbols
        symbol = max(symbols.items(), key=lambda s: abs(s[1]))[0]
        return symbol, self.catalog.parse(symbol)

    def _leader_of(self, spec: FollowerCopy, accounts: dict[str, Account],
                   snapshot: Snapshot) -> Account | None:
        if spec.leader:
            return accounts.get(spec.leader)
        leaders = [a for a in snapshot.accounts if a.role == "leader"]
        return leaders[0] if len(leaders) == 1 else None

    def _only_leader(self) -> str | None:
        if self.snapshot is None:
            return None
        leaders = [a.id for a in self.snapshot.accounts if a.role == "leader"]
        return leaders[0] if len(leaders) == 1 else None

    def _find(self, tag: str) -> OrderReport | None:
        return find_tag(self.broker, tag)

    @property
    def _dry_run(self) -> bool:
        return self.host is not None and self.host.dry_run

    def _tag(self) -> str:
        if self.host is not None:
            return self.host.new_tag()
        return f"CLR-{self.journal.next_sequence():06d}"

    def _journal(self, tag: str, account: str, instrument: str | None, family: str,
                 kind: str, args: dict[str, Any], status: str, now: datetime,
                 reason: str | None) -> None:
        self.journal.command(CommandRow(tag, iso(now), account, instrument, family, kind,
                                        "copier", args, status, 1, reason, iso(now)))

    def _not_copied(self, account: str, family: str, lead_equiv: float, why: str,
                    now: datetime) -> None:
        self._journal(self._tag(), account, None, family, "copy",
                      {"leader_equiv": lead_equiv}, "not_copied", now, why)

    def _refused(self, account: str, family: str, instrument: str, args: dict[str, Any],
                 now: datetime, reason: str, kind: str = "copy") -> None:
        self._journal(self._tag(), account, instrument, family, kind, args, "blocked", now,
                      reason)
        self._alert(now, "warning", f"{account}: not copied — {reason}", account)

    def _alert(self, now: datetime, severity: str, message: str, account: str | None) -> None:
        if self.host is not None:
            self.host.alert(now, severity, message, account)
        else:
            self.journal.alert(now, severity, account, message)
