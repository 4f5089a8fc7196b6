"""Chaos sessions and the SPEC section 7 invariants, read from the broker's own record.

A chaos session is a seeded sim session with random faults of every kind the sim has (missed
entries and exits, reversals, disconnects, stale data, rejections, delayed fills of the
engine's own orders, NaN and missing quotes), a kill switch engaged and released mid-session,
and crashes at random points inside a tick, each followed by a restart on the same SQLite
journal and the same broker (or the broker reloaded from its saved state, when the crash came
after the tick saved it, as `run --sim-state` does).

In copier mode (`copier="builtin"`) the sim's own copier is off and copilink-rules' built-in
copier (copier.py `BuiltinCopier`) copies the leader onto three followers (1:1, micros, ratio
0.5), through the broker's faults (lost, stuck, rejected and delayed orders, manual orders,
reversals, disconnects, stale data); the rules may lock a follower (halted) and pause and
resume copying onto it; crashes also come inside the copier's send (before and after the broker
has the order) and after it sent but before its state was saved. Each restart is a new Session
and a new BuiltinCopier on the same journal. After the last fault the session runs on for
END_GRACE seconds, and the copier invariants (COPIER_INVARIANTS) are checked besides the
others.

The checks read `broker.log` (every command the broker received, with how the account stood
when it arrived and what became of it) and the positions sampled after every tick; the journal
is used only to know what the engine itself escalated to a person and, in copier mode, which
orders were the copier's and what each meant (a close, or what the follower would hold); the
pauses, locks and the leader's position are sampled from the session after every tick and at
every crash.

Used by tests/test_chaos.py, tests/test_copier_chaos.py, tests/test_invariants.py and
benchmarks/soak.py.
"""

from __future__ import annotations

import math
import random
import textwrap
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, get_args
from unittest import mock

from copilink_rules.adapters.base import BrokerAnswer
from copilink_rules.adapters.sim import FaultKind, SimBroker, SimFollower, SimScenario, SimTrade
from copilink_rules.alerts import Alerts
from copilink_rules.copier import BuiltinCopier, FollowerCopy
from copilink_rules.enforcer import KillSwitch
from copilink_rules.instruments import default_catalog
from copilink_rules.journal import Journal
from copilink_rules.rules.loader import Policy, load_policy
from copilink_rules.session import Session

REPO = Path(__file__).resolve().parent.parent
CATALOG = default_catalog()

TICK = 0.25
STALE_AFTER = 5.0  # desync's stale_after
STUCK_GRACE = 2.0  # desync's stuck_grace (opposite_grace is shorter)
MAX_DELAY = 3.0  # the longest late fill the sim's random `delay` faults draw
BACKOFF = 4.0  # the enforcer's longest wait before another attempt after a refusal
# a stuck follower, reachable and unblocked, is flat within its grace, a late fill, the
# copier's latency and a few ticks
STUCK_BOUND = STUCK_GRACE + MAX_DELAY + 1.5

FIRM = "chaosfirm"
FIRM_LIMIT = 2  # contracts, micros counted as MICRO_WEIGHT each
MICRO_WEIGHT = 0.1
RULES = textwrap.dedent(f"""
    ruleset: {FIRM}
    firm: {FIRM}
    description: a small firm with a hard contract limit, for the chaos tests
    extends: [desync]
    timezone: America/New_York
    trading_day_start: "18:00"
    params:
      {FIRM}_max_contracts: {FIRM_LIMIT}
      {FIRM}_micro_weight: {MICRO_WEIGHT}
    rules: []
""").lstrip()

ORDER_KINDS = ("flatten", "place_market", "place_stop", "cancel_orders")  # orders on an account
CORRECTIVE_KINDS = ("flatten", "place_market", "cancel_orders")  # one at a time per family
ALL_FAULTS: list[FaultKind] = list(get_args(FaultKind))
CRASH_POINTS = ("tick_start", "on_command", "after_send", "before_save", "after_save")
# ... and with the built-in copier: `on_command` is also inside the copier's send (journaled,
# not yet at the broker), `after_send` after the broker has it; `after_copy` once the copier
# sent this tick's copies, before its bookkeeping is saved
COPIER_CRASH_POINTS = (*CRASH_POINTS, "on_command", "after_send", "after_copy")
INVARIANTS = ("unreachable", "kill_switch", "one_working", "contract_limit", "opposite",
              "catch_up_after_flatten", "stuck_bound", "sent_twice", "unjournaled", "restart")
COPIER_INVARIANTS = (*INVARIANTS, "paused_copy", "locked_copy", "copied_twice", "end_in_line")
COPIERS = ("sim", "builtin")

# the built-in copier's followers: one 1:1, one copying NQ as micros, one at half the size
COPIER_FOLLOWERS = (FollowerCopy("F1", "LEAD"), FollowerCopy("F2", "LEAD", instrument="MNQH6"),
                    FollowerCopy("F3", "LEAD", ratio=0.5))
# seconds the session runs on after the last fault and kill switch, for the rules' graces
END_GRACE = 12.0
# the copier mode's firm: a follower over the contract limit is flattened and halted for a
# while, one caught on the other side of its leader is halted too (beside desync's flatten and
# pause), and a paused follower that is reachable and flat again copies again
COPIER_RULES = RULES.replace("rules: []\n", textwrap.dedent(f"""
    rules:
      - id: chaos-over-limit
        description: over the firm's contract limit - flatten, halted for a while
        scope: account
        applies_to: {{roles: [follower]}}
        when: >
          account.minis + account.micros * params.{FIRM}_micro_weight
          > params.{FIRM}_max_contracts
        then:
          - flatten: {{}}
          - lock_account: {{state: halted, until: 8s}}
          - alert: {{severity: critical, message: "{{account.id}} over the limit: halted"}}
        priority: 920
      - id: chaos-opposite-halt
        description: a follower on the other side of its leader is halted for a while
        scope: pair
        when: not leader.flat and not follower.flat and leader.side != follower.side
        for: 1s
        then:
          - lock_account: {{state: halted, until: 6s}}
        priority: 890
      - id: chaos-resume
        description: a paused follower, reachable and flat for a while, copies again
        scope: account
        applies_to: {{roles: [follower]}}
        when: account.copier == "paused" and account.reachable and account.flat
        for: 4s
        then:
          - resume_copier: {{}}
          - alert: {{severity: info, message: "{{account.id}}: copying resumes"}}
    """).lstrip())


def write_rules(folder: Path, copier: str = "sim") -> Path:
    """The chaos firm's rule file for the `copier` mode (`sim` or `builtin`)."""
    path = folder / (f"{FIRM}.yaml" if copier == "sim" else f"{FIRM}-{copier}.yaml")
    path.write_text(RULES if copier == "sim" else COPIER_RULES, encoding="utf-8")
    return path


class Crash(BaseException):
    """The process dies here (a BaseException: nothing in the engine may catch it)."""


_POLICIES: dict[str, Policy] = {}


@contextmanager
def policies_loaded_once() -> Iterator[None]:
    """Sessions load their rule files once per process: a restarted process reads the same
    unchanged files again, so the policy is the same; loading it is most of a short session's
    time."""
    import copilink_rules.session as module

    def cached(rules: Any, overrides: Any = None, rules_path: Any = ()) -> Policy:
        key = repr((list(map(str, rules)), overrides, list(map(str, rules_path))))
        if key not in _POLICIES:
            _POLICIES[key] = load_policy(rules, overrides, rules_path)
        return _POLICIES[key]

    with mock.patch.object(module, "load_policy", cached):
        yield


# --- one chaos session --------------------------------------------------------------------------


def chaos_scenario(seed: int, trades: int = 2, faults: int = 5,
                   copier: str = "sim") -> SimScenario:
    """Short trades (a short session), three followers of one firm, one trading micros; with
    `copier="builtin"` the sim's own copier is off and the third follower copies at 0.5."""
    rng = random.Random(seed * 7919 + 1)
    drawn, at = [], 3.0
    for _ in range(trades):
        hold = round(rng.uniform(6.0, 10.0), 2)
        drawn.append(SimTrade(at=round(at, 2), side=rng.choice(["long", "short"]),
                              qty=rng.randint(1, 3), hold=hold))
        at += hold + rng.uniform(4.0, 7.0)
    if copier == "builtin":
        return SimScenario(seed=seed, trades=drawn, random_faults=faults,
                           random_fault_kinds=ALL_FAULTS, leader_firm=FIRM, own_copier=False,
                           followers=[SimFollower(id="F1", firm=FIRM),
                                      SimFollower(id="F2", firm=FIRM, instrument="MNQH6"),
                                      SimFollower(id="F3", firm=FIRM, ratio=0.5)])
    return SimScenario(seed=seed, trades=drawn, random_faults=faults,
                       random_fault_kinds=ALL_FAULTS, leader_firm=FIRM,
                       followers=[SimFollower(id="F1", firm=FIRM),
                                  SimFollower(id="F2", firm=FIRM),
                                  SimFollower(id="F3", firm=FIRM, instrument="MNQH6")])


@dataclass
class ChaosRun:
    seed: int
    broker: SimBroker
    states: list[dict[str, Any]]
    kill_windows: list[tuple[float, float]]
    crashes: list[tuple[float, str]]  # (sim time, where)
    escalated: dict[str, float]  # account -> sim time the engine handed it to a person
    journal_tags: set[str]
    commands: int
    restart_problems: list[str] = field(default_factory=list)
    copier: str = "sim"
    # copier mode: after every tick and at every crash, what the session held then: the
    # leader's exposure, the followers copying is paused onto, the locks, the kill switch
    controls: list[dict[str, Any]] = field(default_factory=list)
    # the journal's commands: tag -> (action, instrument, args)
    actions: dict[str, tuple[str, str | None, dict[str, Any]]] = field(default_factory=dict)

    @property
    def faults(self) -> int:
        return len(self.broker.faults)


@dataclass
class _Plan:
    """When and where the process dies, and when the kill switch is engaged."""

    crash_ticks: list[int]
    crash_points: list[str]
    kill_at: float | None
    kill_for: float

    @classmethod
    def draw(cls, seed: int, ticks: int, crashes: int | None = None,
             where: tuple[str, ...] = CRASH_POINTS) -> _Plan:
        rng = random.Random(seed * 104729 + 3)
        count = rng.choice((1, 1, 2, 2, 3)) if crashes is None else crashes
        at = sorted(rng.sample(range(4, max(ticks, count + 5)), count))
        points = [rng.choice(where) for _ in at]
        kill_at = rng.uniform(2.0, ticks * TICK) if rng.random() < 0.6 else None
        return cls(at, points, kill_at, rng.uniform(1.0, 6.0))


def run_chaos(seed: int, folder: Path, rules: Path, *, trades: int = 2, faults: int = 5,
              crashes: int | None = None, copier: str = "sim") -> ChaosRun:
    """A chaos session to its end; the journal is `folder/chaos-<seed>.db`. `copier`: `sim`
    (the sim's own copier) or `builtin` (copilink-rules' copier, the sim's off; `rules` from
    `write_rules(folder, "builtin")`)."""
    if copier not in COPIERS:
        raise ValueError(f"copier {copier!r}: one of {', '.join(COPIERS)}")
    builtin = copier == "builtin"
    broker = SimBroker(chaos_scenario(seed, trades, faults, copier))
    # the copier mode runs on past the last fault: the rules' graces, then the final check
    finish = broker.end + END_GRACE if builtin else broker.end
    plan = _Plan.draw(seed, int(broker.end / TICK), crashes,
                      COPIER_CRASH_POINTS if builtin else CRASH_POINTS)
    journal_path = folder / f"chaos-{seed}.db"
    sim_path = folder / f"chaos-{seed}.sim.json"
    kill = KillSwitch()
    armed: list[str | None] = [None]  # the crash point armed now
    reload = [False]
    states: list[dict[str, Any]] = []
    controls: list[dict[str, Any]] = []
    kill_windows: list[tuple[float, float]] = []
    crashed: list[tuple[float, str]] = []
    problems: list[str] = []

    def fire(point: str) -> None:
        if armed[0] == point:
            armed[0] = None
            crashed.append((broker.elapsed, point))
            raise Crash(point)

    def before_tick() -> None:
        broker.advance(TICK)
        # the copier mode gives the rules their grace after the kill switch too
        release = kill_windows[-1][0] + plan.kill_for if kill_windows else math.inf
        if builtin:
            release = min(release, broker.end)
        if plan.kill_at is not None and not kill.engaged and broker.elapsed >= plan.kill_at \
                and not kill_windows and broker.elapsed < (broker.end if builtin else math.inf):
            kill.engage("chaos test")
            kill_windows.append((broker.elapsed, math.inf))
        elif kill.engaged and broker.elapsed >= release:
            kill.release()
            kill_windows[-1] = (kill_windows[-1][0], broker.elapsed)
        fire("tick_start")

    def on_command(kind: str, account: str, tag: str) -> None:
        fire("on_command")  # journaled as `sending`, not sent

    def after_commands() -> None:
        fire("before_save")  # sent, the sim not saved, the engine's state not saved
        if armed[0] == "after_save":
            broker.save(sim_path)
            reload[0] = True
            fire("after_save")  # the sim saved, the engine's state not

    def patch(target: SimBroker) -> None:
        """The broker carries out the command, then the process dies before the answer."""
        for name in ("close_position", "place_order", "cancel_orders", "cancel_order"):
            original: Callable[..., BrokerAnswer] = getattr(target, name)

            def after_send(*args: Any, _original: Callable[..., BrokerAnswer] = original,
                           **kwargs: Any) -> BrokerAnswer:
                answer = _original(*args, **kwargs)
                fire("after_send")
                return answer

            setattr(target, name, after_send)

    def new_copier(journal: Journal) -> BuiltinCopier:
        """A new process's copier: `on_command` inside its send, `after_copy` once it sent."""
        own = BuiltinCopier(broker, journal, COPIER_FOLLOWERS)
        own.on_send = on_command
        sync = own.sync

        def sync_then_crash(snapshot: Any) -> None:
            sync(snapshot)
            fire("after_copy")  # its copies sent, its bookkeeping not saved

        own.sync = sync_then_crash  # type: ignore[method-assign]
        return own

    def open_session() -> tuple[Journal, Session]:
        journal = Journal(journal_path)
        session = Session(broker, journal, Alerts(), [rules], rules_path=[REPO / "rules"],
                          kill_switch=kill, before_tick=before_tick,
                          after_commands=after_commands, on_command=on_command,
                          copier=new_copier(journal) if builtin else None)
        try:
            session.start()
        except Exception as exc:  # noqa: BLE001 - a restart that fails is a violation
            problems.append(f"restart at {broker.elapsed:.2f}s failed: "
                            f"{type(exc).__name__}: {exc}")
            session.stopped = "could not restart"
        return journal, session

    def control(session: Session) -> None:
        """What the session holds now (after a tick, or as it dies)."""
        if builtin:
            controls.append(session_controls(broker, session, kill.engaged))

    patch(broker)
    with policies_loaded_once():
        journal, session = open_session()
        tick = 0
        while broker.elapsed < finish and session.stopped is None:
            tick += 1
            if plan.crash_ticks and tick >= plan.crash_ticks[0] and armed[0] is None:
                plan.crash_ticks.pop(0)
                armed[0] = plan.crash_points.pop(0)
            try:
                session.tick()
            except Crash:
                control(session)
                journal.close()  # the process is gone: what it had not committed is lost
                if reload[0]:
                    broker = SimBroker.load(sim_path)
                    reload[0] = False
                    patch(broker)
                journal, session = open_session()
                continue
            control(session)
            states.append(follower_states(broker))
            states[-1]["killed"] = kill.engaged
    if kill.engaged:
        kill.release()
        kill_windows[-1] = (kill_windows[-1][0], broker.elapsed)
    escalated: dict[str, float] = {}
    start = broker.scenario.start
    rows = journal.commands()
    for row in rows:
        if row.status == "escalated":
            moment = datetime.fromisoformat(row.updated.replace("Z", "+00:00"))
            seconds = (moment - start).total_seconds()
            escalated[row.account] = min(escalated.get(row.account, math.inf), seconds)
    run = ChaosRun(seed, broker, states, kill_windows, crashed, escalated,
                   {r.tag for r in rows}, len(rows), problems, copier, controls,
                   {r.tag: (r.action, r.instrument, r.args) for r in rows})
    journal.close()
    return run


def session_controls(broker: SimBroker, session: Session, killed: bool) -> dict[str, Any]:
    """The leader's exposure now, and whom the session would let a copy add exposure to: the
    followers the copier has paused, the enforcer's locks, the kill switch."""
    leader = broker.accounts[broker.scenario.leader]
    paused = set(session.builtin.paused) if session.builtin is not None else set()
    return {"time": broker.elapsed, "lead": broker.exposure(leader, "NQ"), "paused": paused,
            "locks": {a: lock[0] for a, lock in session.enforcer.gate_locks().items()},
            "killed": killed}


# --- what the broker saw --------------------------------------------------------------------


def follower_states(broker: SimBroker, family: str = "NQ") -> dict[str, Any]:
    """Per follower, now: (leader exposure, follower exposure) in `family`, connected, and
    whether its data is fresh."""
    leader = broker.accounts[broker.scenario.leader]
    lead = broker.exposure(leader, family)
    out: dict[str, Any] = {"time": broker.elapsed}
    for account in broker.accounts.values():
        if account.role == "follower":
            out[account.id] = (lead, broker.exposure(account, family), account.connected,
                               account.frozen is None)
    return out


def engine_entries(log: Iterable[dict[str, Any]], kinds: tuple[str, ...] = ORDER_KINDS
                   ) -> list[dict[str, Any]]:
    return [e for e in log if e.get("kind") in kinds and str(e["tag"]).startswith("CLR-")]


def _family(entry: dict[str, Any]) -> str | None:
    instrument = entry.get("instrument")
    return CATALOG.parse(instrument).family if instrument else None


def _where(entry: dict[str, Any]) -> str:
    return (f"{entry['tag']} {entry['kind']} to {entry['account']} at "
            f"{entry['time']:.2f}s ({entry['status']})")


def unreachable_orders(log: Iterable[dict[str, Any]], stale_after: float = STALE_AFTER
                       ) -> list[str]:
    """Orders that reached a disconnected account, or one whose data was stale."""
    problems = []
    for entry in engine_entries(log):
        if entry.get("connected") is False:
            problems.append(f"{_where(entry)} sent to a disconnected account")
        if entry.get("data_age", 0.0) > stale_after + 1e-9:
            problems.append(f"{_where(entry)} sent with data {entry['data_age']:.2f}s old")
    return problems


def _killed_orders(run: ChaosRun) -> list[str]:
    return [f"{_where(e)} sent while the kill switch was engaged ({a:.2f}s to {b:.2f}s)"
            for e in engine_entries(run.broker.log) for a, b in run.kill_windows
            if a - 1e-9 <= e["time"] < b - 1e-9]


def _overlapping(log: list[dict[str, Any]]) -> list[str]:
    """A corrective order sent while another engine order on the account and instrument
    family still worked at the broker (accepted, its fill or cancel still to come)."""
    problems = []
    entries = engine_entries(log, CORRECTIVE_KINDS)
    for index, first in enumerate(entries):
        if first["kind"] not in ("flatten", "place_market") or first["status"] == "rejected":
            continue
        start = first["time"]
        end = {"filled": first.get("filled_at", start), "cancelled": first.get("cancelled_at",
                                                                               start)
               }.get(first["status"], math.inf)
        if end <= start:
            continue  # filled as it arrived
        for later in entries[index + 1:]:
            if later["account"] != first["account"] or later["tag"] == first["tag"]:
                continue
            if None not in (_family(first), _family(later)) and \
                    _family(first) != _family(later):
                continue
            if start - 1e-9 <= later["time"] < end - 1e-9:
                problems.append(f"{_where(later)} sent while {first['tag']} {first['kind']} "
                                f"(accepted at {start:.2f}s, final at {end:.2f}s) still worked")
    return problems


def _fills(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in engine_entries(log, ("flatten", "place_market"))
            if e["status"] == "filled" and "after" in e]


def _weighted(held: dict[str, int]) -> float:
    return sum(abs(qty) * (MICRO_WEIGHT if CATALOG.parse(symbol).micro else 1.0)
               for symbol, qty in held.items())


def _past_limit(log: list[dict[str, Any]]) -> list[str]:
    problems = []
    for entry in _fills(log):
        if abs(entry["after"]) > abs(entry["before"]) + 1e-9 and \
                _weighted(entry.get("held_after", {})) > FIRM_LIMIT + 1e-9:
            problems.append(f"{_where(entry)} left {entry['account']} holding "
                            f"{entry['held_after']} ({_weighted(entry['held_after']):g} "
                            f"contracts, the limit is {FIRM_LIMIT})")
    return problems


def _opposite(run: ChaosRun) -> list[str]:
    return [f"{_where(e)} took {e['account']} from {e['before']:g} to {e['after']:g} "
            f"(through zero, filled at {e['filled_at']:.2f}s)"
            for e in _fills(run.broker.log) if e["before"] * e["after"] < 0 and
            not (run.copier == "builtin" and _changed_by_others(run, e))]


def _changed_by_others(run: ChaosRun, entry: dict[str, Any]) -> bool:
    """Whether a person's order or a reversal (faults of the sim) changed the account's
    position after the data the order was sized from, before it filled. A market order sized
    from what the account held crosses zero when someone else reversed the account in the
    meantime; no sender can know that (seed 1117, 3 trades and 12 faults, copier mode: a
    reversal 0.01 s before a copy sized from data 0.84 s old). Checked in copier mode, where
    the broker's faults hit the followers' orders."""
    account = entry["account"]
    seen = entry["time"] - entry.get("data_age", 0.0) - 1e-9
    filled = entry.get("filled_at", entry["time"]) + 1e-9
    manual = any(e.get("kind") == "manual" and e["account"] == account and
                 seen <= e["time"] <= filled for e in run.broker.log)
    return manual or any(f.kind == "reversal" and f.account == account and
                         seen <= f.at <= filled for f in run.broker.faults)


def _catch_up_after_flatten(run: ChaosRun) -> list[str]:
    problems = []
    ended: dict[tuple[str, int], dict[str, Any]] = {}  # (account, leader trade) -> by what
    for entry in run.broker.log:
        if not str(entry["tag"]).startswith("CLR-") or entry.get("trade") is None:
            continue
        action = _action(run, entry)
        if run.copier == "builtin" and action not in ("flatten", "catch_up") and not (
                action == "copy" and entry.get("kind") == "place_market" and
                _adds(run, entry)):
            # with the built-in copier a copied close (a reversal's first half, the leader's
            # exit) is no flatten of the rules and ends no episode, and a copy that reduces
            # is no entry: what counts is the rules' flatten, then a catch-up or a copy that
            # adds in the same leader trade
            continue
        key = (entry["account"], entry["trade"])
        if entry.get("kind") in ("flatten", "skip_entry") and entry["status"] != "rejected":
            ended.setdefault(key, entry)
        elif entry.get("kind") == "place_market" and key in ended:
            problems.append(f"{_where(entry)}: a catch-up in leader trade {entry['trade']} "
                            f"after {_where(ended[key])}")
    return problems


def _sent_twice(run: ChaosRun) -> list[str]:
    """The same tag twice, or the same intent under a new tag: a second catch-up in one
    leader trade, or a flatten of an account the engine had already flattened with nothing
    held since."""
    problems = []
    log = run.broker.log
    seen = Counter((e["tag"], e.get("kind"), e.get("instrument"))
                   for e in engine_entries(log, (*ORDER_KINDS, "copier_paused",
                                                 "copier_active", "skip_entry")))
    problems += [f"{tag} {kind} {instrument or ''} received {count} times"
                 for (tag, kind, instrument), count in seen.items() if count > 1]
    catch_ups: dict[tuple[str, int], dict[str, Any]] = {}
    for entry in engine_entries(log, ("place_market",)):
        if entry.get("trade") is None or entry["status"] == "rejected":
            continue
        if run.copier == "builtin" and _action(run, entry) != "catch_up":
            continue  # the copier's own copies: `copied_twice`
        key = (entry["account"], entry["trade"])
        first = catch_ups.setdefault(key, entry)
        if first["tag"].split("~")[0] != entry["tag"].split("~")[0]:
            problems.append(f"{_where(entry)}: a second catch-up in leader trade "
                            f"{entry['trade']} after {_where(first)}")
    flattened: dict[str, dict[str, Any]] = {}  # account -> its last flatten that filled
    for entry in engine_entries(log, ("flatten",)):
        if run.copier == "builtin" and _action(run, entry) != "flatten":
            # the copier's close of the leader's exit is another sender's order: the rules
            # may still see the position on data up to stale_after old and flatten it once
            # more, a close-position that finds nothing to close (delta 0) and does nothing
            continue
        previous = flattened.get(entry["account"])
        if entry.get("delta") == 0 and entry["status"] == "filled" and previous is not None \
                and previous["tag"].split("~")[0] != entry["tag"].split("~")[0] and \
                _flat_between(run, entry["account"], previous["filled_at"], entry["time"]):
            problems.append(f"{_where(entry)}: flattened again after {_where(previous)}, "
                            "with nothing held in between")
        if entry["status"] == "filled" and entry.get("filled_at") is not None:
            flattened[entry["account"]] = entry
    return problems


def _flat_between(run: ChaosRun, account: str, start: float, end: float) -> bool:
    return all(state[account][1] == 0 for state in run.states
               if start - 1e-9 <= state["time"] <= end + 1e-9)


def _unjournaled(run: ChaosRun) -> list[str]:
    tags = {e["tag"] for e in run.broker.log if str(e["tag"]).startswith("CLR-")}
    base = {t.removesuffix("-stop").removesuffix("-cancel") for t in tags}
    return [f"{t} reached the broker but is not in the journal"
            for t in sorted(base - run.journal_tags)]


def _stuck_too_long(run: ChaosRun) -> list[str]:
    """A follower holding a position its leader does not (flat or the other side), while it
    is reachable, the kill switch is off, the broker refuses it nothing and the engine has
    not handed it to a person, is back in line within STUCK_BOUND."""
    refused: dict[str, list[float]] = defaultdict(list)
    for entry in engine_entries(run.broker.log):
        if entry["status"] == "rejected":
            refused[entry["account"]].append(entry["time"])
    problems = []
    followers = [a for a in run.broker.accounts.values() if a.role == "follower"]
    for account in followers:
        since: float | None = None
        reported = False
        for state in run.states:
            now = state["time"]
            lead, held, connected, fresh = state[account.id]
            bad = (lead == 0 and held != 0) or lead * held < 0
            usable = connected and fresh and not state["killed"] and \
                now < run.escalated.get(account.id, math.inf) and \
                not any(r <= now < r + BACKOFF + 2 * TICK for r in refused[account.id])
            if not (bad and usable):
                since = None
                continue
            since = now if since is None else since
            if now - since > STUCK_BOUND + 1e-9 and not reported:
                reported = True
                problems.append(f"{account.id} held {held:g} against leader {lead:g} from "
                                f"{since:.2f}s to past {now:.2f}s while reachable and unblocked")
    return problems


# --- the built-in copier's own orders ---------------------------------------------------------

COPIER_SENDS = ("copy", "catch_up")  # market orders the copier sends: its own, the rules' catch-ups


def _action(run: ChaosRun, entry: dict[str, Any]) -> str | None:
    row = run.actions.get(str(entry["tag"]))
    return row[0] if row is not None else None


def _copier_orders(run: ChaosRun, lost: bool = False) -> list[dict[str, Any]]:
    """The copier's market orders and closes at the broker (`lost`: with those the broker
    lost, which were sent all the same)."""
    kinds = ("flatten", "place_market", *(("lost_order",) if lost else ()))
    return [e for e in engine_entries(run.broker.log, kinds)
            if _action(run, e) in COPIER_SENDS]


def _adds(run: ChaosRun, entry: dict[str, Any]) -> bool:
    """Whether the copier meant the order to add exposure (from its journal row: a close never
    does, a catch-up always does, a copy when it takes the follower further from flat)."""
    action, instrument, args = run.actions[str(entry["tag"])]
    if action == "catch_up":
        return True
    if args.get("close") or "expected" not in args or instrument is None:
        return False
    size = CATALOG.parse(instrument).size
    expected = float(args["expected"])
    return abs(expected) > abs(expected - float(args["qty"]) * size) + 1e-9


def _control_at(run: ChaosRun, moment: float) -> dict[str, Any] | None:
    """The session's controls of the tick at `moment` (sampled after it, or as it died: the
    copier sends after the rules paused, locked or resumed in that tick)."""
    return next((c for c in run.controls if abs(c["time"] - moment) < 1e-9), None)


def _paused_or_locked(run: ChaosRun, what: str) -> list[str]:
    """Copies and catch-ups that add exposure, sent to a follower copying is paused onto
    (`what` = "paused") or that a lock holds to reducing or halted ("locks")."""
    problems = []
    for entry in _copier_orders(run, lost=True):
        if not _adds(run, entry):
            continue
        control = _control_at(run, entry["time"])
        if control is None:
            problems.append(f"{_where(entry)}: no record of the session at that tick")
        elif entry["account"] in control[what]:
            state = "paused" if what == "paused" else control[what][entry["account"]]
            problems.append(f"{_where(entry)} adds exposure to {entry['account']} while "
                            f"{state}")
    return problems


def _copied_twice(run: ChaosRun) -> list[str]:
    """Two copies of one leader change: per follower, between two changes of the leader's
    position, at most one copied close and one copied entry or adjustment that the broker
    carried out (a reversal is a close, then an entry). A copy the broker lost, refused or
    cancelled unfilled did nothing; sending it again is not a duplicate."""
    segments: dict[float, int] = {}
    segment, last = 0, None
    for control in sorted(run.controls, key=lambda c: c["time"]):
        if last is not None and abs(control["lead"] - last) > 1e-9:
            segment += 1
        segments[round(control["time"], 6)] = segment
        last = control["lead"]
    done: dict[tuple[str, str | None, int, str], dict[str, Any]] = {}
    problems = []
    for entry in _copier_orders(run):
        if _action(run, entry) != "copy" or entry["status"] not in ("filled", "accepted") or \
                (entry["status"] == "filled" and entry.get("before") == entry.get("after")):
            continue
        key = (entry["account"], _family(entry), segments.get(round(entry["time"], 6), -1),
               entry["kind"])
        first = done.setdefault(key, entry)
        if first is not entry:
            problems.append(f"{_where(entry)}: a second copy of one leader change after "
                            f"{_where(first)}")
    return problems


def _end_in_line(run: ChaosRun) -> list[str]:
    """Once the leader is flat, the faults over and the rules given their grace, no follower
    holds a position its leader does not (unless the engine handed it to a person)."""
    if not run.states:
        return ["the session never ticked"]
    last = run.states[-1]
    problems = []
    for account in (a for a in run.broker.accounts.values() if a.role == "follower"):
        lead, held, _, _ = last[account.id]
        if ((lead == 0 and held != 0) or lead * held < 0) and account.id not in run.escalated:
            problems.append(f"{account.id} holds {held:g} against leader {lead:g} at the end "
                            f"({last['time']:.2f}s)")
    return problems


def check_chaos(run: ChaosRun) -> dict[str, list[str]]:
    """Every broken invariant of a chaos session, by invariant (empty when all hold)."""
    log = run.broker.log
    found = {
        "unreachable": unreachable_orders(log),
        "kill_switch": _killed_orders(run),
        "one_working": _overlapping(log),
        "contract_limit": _past_limit(log),
        "opposite": _opposite(run),
        "catch_up_after_flatten": _catch_up_after_flatten(run),
        "stuck_bound": _stuck_too_long(run),
        "sent_twice": _sent_twice(run),
        "unjournaled": _unjournaled(run),
        "restart": run.restart_problems,
    }
    if run.copier == "builtin":
        found |= {"paused_copy": _paused_or_locked(run, "paused"),
                  "locked_copy": _paused_or_locked(run, "locks"),
                  "copied_twice": _copied_twice(run), "end_in_line": _end_in_line(run)}
    return {name: problems for name, problems in found.items() if problems}


def describe(run: ChaosRun, found: dict[str, list[str]]) -> str:
    """A violation message: the seed, the crashes, and each broken invariant's entries."""
    mode = "" if run.copier == "sim" else f" (copier {run.copier})"
    lines = [f"seed {run.seed}{mode}: crashes {run.crashes}, kill switch {run.kill_windows}"]
    for name, problems in found.items():
        lines += [f"  [{name}] {p}" for p in problems]
    return "\n".join(lines)
