"""Wiring a live session together for `run` and `demo`: broker, journal, alerts, session,
scheduler and terminal view."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.live import Live

from .adapters.base import Broker
from .adapters.sim import SimBroker, SimFault, SimFollower, SimScenario, SimTrade
from .alerts import Alert, Alerts, Webhook
from .config import RunConfig
from .errors import CopilinkError, InputError
from .scheduler import LiveRunner
from .session import Session
from .view import render

log = logging.getLogger("copilink_rules.live")

# The demo: the three desyncs of the seed article, a broker rejection and a disconnect.
DEMO_SCENARIO = SimScenario(
    seed=7,
    followers=[SimFollower(id="F1", firm="apex"), SimFollower(id="F2", firm="topstep"),
               SimFollower(id="F3", firm="tradeify", instrument="MNQH6"),
               SimFollower(id="F4", firm="apex")],
    trades=[SimTrade(at=4, side="long", qty=2, hold=12),
            SimTrade(at=24, side="short", qty=1, hold=14),
            SimTrade(at=44, side="long", qty=1, hold=10)],
    faults=[
        SimFault(kind="missed_entry", account="F2", trade=0),   # missed entry -> catch up
        SimFault(kind="missed_exit", account="F3", trade=0),    # stuck follower -> flatten
        SimFault(kind="reversal", account="F4", at=29),         # opposite -> flatten + pause
        SimFault(kind="disconnect", account="F1", at=50, duration=8),  # misses the exit
        SimFault(kind="reject", account="F1", at=57, count=1),  # first flatten refused
    ],
)


def alert_printer(out: TextIO) -> Callable[[Alert], None]:
    def show(alert: Alert) -> None:
        out.write(alert.line() + "\n")
        out.flush()

    return show


def build_alerts(config: RunConfig, base: Path, terminal: Callable[[Alert], None] | None
                 ) -> Alerts:
    log_file = base / config.alerts.log_file if config.alerts.log_file else None
    hooks = [Webhook(h.url, h.style, h.chat_id, h.min_severity) for h in config.alerts.webhooks]
    return Alerts(terminal=terminal, log_file=log_file, webhooks=hooks)


def run_live(session: Session, broker: Broker, *, tick: float, speed: float,
             until: float | None, out: TextIO, view: bool, pre_session: str | None = None,
             timezone: str = "America/New_York", sim_state: Path | None = None,
             title: str = "copilink-rules", record: TextIO | None = None,
             copy_every: float | None = None) -> LiveRunner:
    """Run until Ctrl-C / SIGTERM, until `until` seconds have passed (simulated seconds on
    the sim, real ones on a broker), or until the session stops enforcing (its journal
    cannot be written). `record` receives every snapshot evaluated, as a timeline line."""
    interval = tick
    if isinstance(broker, SimBroker):
        # the engine always sees the market every `tick` of simulated time; a faster speed
        # means more ticks per real second, not coarser ones
        sim = broker
        interval = tick / speed

        def advance() -> None:
            sim.advance(tick)

        session.before_tick = advance
    console = Console(file=out) if view else None
    live: Any = Live(render(session, title), console=console, refresh_per_second=4,
                     transient=False) if console is not None else nullcontext()

    if sim_state is not None and isinstance(broker, SimBroker):
        state_file, sim_broker = sim_state, broker

        def save_sim() -> None:
            sim_broker.save(state_file)

        session.after_commands = save_sim

    recorded: list[object] = [None]

    def after_tick() -> None:
        snapshot = session.last_snapshot
        if record is not None and snapshot is not None and snapshot is not recorded[0]:
            recorded[0] = snapshot
            record.write(snapshot.model_dump_json(exclude_defaults=True) + "\n")
            record.flush()
        if console is not None:
            live.update(render(session, title))

    deadline = None if until is None or isinstance(broker, SimBroker) else \
        time.monotonic() + until  # the clock at the edge: how long the user asked to run

    def finished() -> bool:
        if session.stopped is not None:
            return True
        if until is None:
            return False
        if isinstance(broker, SimBroker):
            return broker.elapsed >= until
        return deadline is not None and time.monotonic() >= deadline

    # between ticks the built-in copier copies what a real broker pushed (the sim moves only
    # at a tick: nothing to copy between two)
    copy_seconds = copy_every if copy_every and copy_every < tick and \
        not isinstance(broker, SimBroker) else None
    runner = LiveRunner(session, tick_seconds=interval, pre_session_at=pre_session,
                        timezone=timezone, should_stop=finished, on_tick=after_tick,
                        copy_seconds=copy_seconds)
    with live:
        runner.run(install_signals=True)
    return runner


def make_sim(settings: dict[str, Any], sim_state: Path | None) -> SimBroker:
    if sim_state is not None and sim_state.exists():
        try:
            return SimBroker.load(sim_state)
        except CopilinkError:
            raise
        except Exception as exc:  # noqa: BLE001 - any damage is one line, never a traceback
            detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise InputError(f"{sim_state}: not a saved sim broker ({detail}): name another "
                             "--sim-state file, or delete this one to start a new sim") from None
    return SimBroker(SimScenario.model_validate(settings))


