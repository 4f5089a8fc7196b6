"""APScheduler (3.x) jobs for a live session: the evaluation tick (default every 250 ms, never
overlapping, a missed run logged and skipped rather than piled up), the pre-session check at a
configured local time, the daily reset at the trading-day boundary, and hot reload of rule files.

Ctrl-C / SIGTERM stop it cleanly; SIGUSR1 engages the kill switch.

The cyclic garbage collector is kept out of the tick: it is held off while a tick runs (a
collection stops every thread, so none may land between a snapshot and its commands) and runs,
on Python's usual schedule, right after; and once the first tick has run, what start-up built
(modules, rules, engine, adapters) is frozen out of every later collection (`gc.freeze`), so a
full collection walks only what the run itself keeps. `benchmarks/bench_latency.py` measures it.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, time
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from .session import Session

log = logging.getLogger("copilink_rules.scheduler")
# APScheduler reports a skipped run in its own words too; ours (below) says it once
logging.getLogger("apscheduler.executors.default").setLevel(logging.ERROR)
logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)


@contextmanager
def gc_held() -> Iterator[None]:
    """No cyclic garbage collection (in any thread) inside the block; what it allocated is
    collected, on Python's usual schedule, at the first allocation after it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def daily_trigger(at: str, zone: str) -> CronTrigger:
    """A trigger firing every day at local time `at` ("HH:MM") in `zone`, DST-aware."""
    moment = time.fromisoformat(at)
    return CronTrigger(hour=moment.hour, minute=moment.minute, second=moment.second,
                       timezone=ZoneInfo(zone))


@dataclass
class LiveRunner:
    """Runs a Session on a real-time schedule until stopped (or `should_stop` says so)."""

    session: Session
    tick_seconds: float = 0.25
    pre_session_at: str | None = None
    day_start: str = "18:00"
    timezone: str = "America/New_York"
    reload_every: float = 2.0
    # the built-in copier between rule ticks, every this many seconds (None: with ticks only)
    copy_seconds: float | None = None
    should_stop: Callable[[], bool] | None = None
    on_tick: Callable[[], None] | None = None
    missed: int = 0
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stopped = threading.Event()
        self.signalled = False  # SIGINT / SIGTERM received (set by the handler, read by run)
        self.scheduler = BackgroundScheduler(job_defaults={
            "coalesce": True, "max_instances": 1, "misfire_grace_time": 1})
        self.scheduler.add_listener(self._on_event, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES |
                                    EVENT_JOB_ERROR)
        self._frozen = False  # start-up's objects frozen out of the garbage collector

    def jobs(self) -> None:
        self.scheduler.add_job(self._tick, IntervalTrigger(seconds=self.tick_seconds),
                               id="tick", name="evaluation tick")
        if self.pre_session_at:
            self.scheduler.add_job(self.session.pre_session_check,
                                   daily_trigger(self.pre_session_at, self.timezone),
                                   id="pre_session", name="pre-session check")
        # a reset at each firm's trading-day start (18:00 New York unless a firm file says)
        boundaries = {(info.trading_day_start, info.timezone)
                      for info in self.session.policy.firms.values()}
        boundaries.add((self.day_start, self.timezone))
        for index, (start, zone) in enumerate(sorted(boundaries)):
            self.scheduler.add_job(self._daily_reset, daily_trigger(start, zone),
                                   id=f"daily_reset_{index}",
                                   name=f"trading-day reset {start} {zone}")
        if self.copy_seconds and self.session.builtin is not None:
            self.scheduler.add_job(self.session.copy_tick,
                                   IntervalTrigger(seconds=self.copy_seconds), id="copy",
                                   name="built-in copier")
        if self.reload_every > 0:
            self.scheduler.add_job(self.session.reload_if_changed,
                                   IntervalTrigger(seconds=self.reload_every), id="reload",
                                   name="rule-file reload")

    def tick_once(self) -> None:
        """One evaluation, as the schedule runs it: the garbage collector held off during the
        tick and, after the first one (start-up is over), start-up's objects frozen out of it.
        """
        with gc_held():
            self.session.tick()
        if not self._frozen:
            self._frozen = True
            gc.collect()
            gc.freeze()

    def thaw(self) -> None:
        """Give start-up's objects back to the garbage collector (the run is over)."""
        if self._frozen:
            self._frozen = False
            gc.unfreeze()

    def _tick(self) -> None:
        self.tick_once()
        if self.on_tick is not None:
            self.on_tick()
        if self.should_stop is not None and self.should_stop():
            self.stopped.set()

    def _daily_reset(self) -> None:
        """A new trading day: expired locks go (the enforcer checks expiry each tick too)."""
        now = self.session.last_snapshot.time if self.session.last_snapshot else None
        if now is not None:
            self.session.enforcer._expire_locks(now)
        log.info("new trading day at %s %s", self.day_start, self.timezone)

    def _on_event(self, event: Any) -> None:
        if event.code in (EVENT_JOB_MISSED, EVENT_JOB_MAX_INSTANCES):
            self.missed += 1
            log.warning("job %s skipped: the previous run was still going", event.job_id)
        elif event.code == EVENT_JOB_ERROR:
            self.errors.append(f"{event.job_id}: {event.exception!r}")
            log.error("job %s failed: %r", event.job_id, event.exception)

    def run(self, install_signals: bool = True) -> None:
        """Block until stopped: Ctrl-C, SIGTERM, `stop()`, or `should_stop`."""
        previous: dict[signal.Signals, Any] = {}
        if install_signals and threading.current_thread() is threading.main_thread():
            # a signal handler runs on the main thread between two bytecodes, possibly while
            # that thread holds the Event's lock inside wait(): it only sets a flag (taking
            # the lock there would deadlock the run, which then never stops); the loop below
            # reads the flag
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._on_signal)
            if hasattr(signal, "SIGUSR1"):
                previous[signal.SIGUSR1] = signal.signal(
                    signal.SIGUSR1,
                    lambda *_: self.session.kill_switch.engage("SIGUSR1 received"))
        self.jobs()
        self.scheduler.start()
        try:
            while not self.signalled and not self.stopped.wait(0.1):
                pass
            self.stopped.set()
        finally:
            self.scheduler.shutdown(wait=True)
            self.thaw()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signalled = True  # no lock taken here (see run)

    def stop(self) -> None:
        self.stopped.set()


def next_fire_times(trigger: CronTrigger, after: datetime, count: int) -> list[datetime]:
    """The next `count` fire times of `trigger` after `after` (for checks and tests)."""
    out: list[datetime] = []
    previous = None
    now = after
    for _ in range(count):
        fire = trigger.get_next_fire_time(previous, now)
        if fire is None:
            break
        out.append(fire)
        previous = fire
        now = fire
    return out
