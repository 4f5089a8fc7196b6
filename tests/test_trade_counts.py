"""`account.trades_today` and `account.losing_streak`: trades counted from position changes
and realized P&L, per trading day, kept across a restart."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from copilink_rules.engine import Engine

from .conftest import account, at, pos, snap

STREAK = """
    ruleset: streak
    timezone: America/New_York
    rules:
      - id: three-losers
        when: account.losing_streak >= 3
        then:
          - alert:
              message: >-
                {account.id}: {account.losing_streak} losers in a row,
                {account.trades_today} today
"""


def f1(t: float, qty: int, realized: float, when: datetime | None = None) -> object:
    positions = [pos("NQH6", qty)] if qty else []
    return snap(when or at(t), account("LEAD", "leader"),
                account("F1", positions=positions, realized_pnl=realized))


def test_three_losing_trades_in_a_row_fire_and_a_winner_resets_the_streak(
        engine_of: Callable[..., Engine]) -> None:
    engine = engine_of(STREAK)
    # long (loses 50), short (loses 30), a reversal long -> short (loses 20): three losers
    path = [(0, 1, 0.0), (5, 0, -50.0), (10, -1, -50.0), (15, 0, -80.0), (20, 2, -80.0),
            (25, -1, -100.0), (30, 0, -90.0)]
    said = []
    for t, qty, realized in path:
        said += [d.reason for d in engine.evaluate(f1(t, qty, realized)) if d.action == "alert"]
    # the third loser is the reversal at 25 s; the short then won 10: streak back to 0
    assert said == ["F1: 3 losers in a row, 3 today"]
    engine.evaluate(f1(35, 0, -90.0))
    saved = engine.save_state()
    assert saved["metrics"]["F1"]["trades"] == 4
    assert saved["metrics"]["F1"]["streak"] == 0


def test_trade_counts_survive_a_restart_and_start_again_each_trading_day(
        engine_of: Callable[..., Engine]) -> None:
    engine = engine_of(STREAK)
    for t, qty, realized in [(0, 1, 0.0), (5, 0, -10.0), (6, 1, -10.0), (7, 0, -20.0)]:
        engine.evaluate(f1(t, qty, realized))
    restarted = engine_of(STREAK)
    restarted.restore_state(engine.save_state())
    said = []
    for t, qty, realized in [(8, -1, -20.0), (9, 0, -30.0)]:
        said += [d.reason for d in restarted.evaluate(f1(t, qty, realized))
                 if d.action == "alert"]
    assert said == ["F1: 3 losers in a row, 3 today"]
    # 18:00 New York (23:00 UTC in March) starts a new trading day: the counts start at 0
    evening = datetime(2026, 3, 2, 23, 0, 5, tzinfo=UTC)
    restarted.evaluate(f1(0, 0, 0.0, evening))
    assert restarted.save_state()["metrics"]["F1"]["trades"] == 0
