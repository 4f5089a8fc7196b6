"""Regenerate the recorded firm sessions: `python examples/generate_firms.py`.

For each firm, `examples/firms/<firm>-breaches.jsonl` is one trading day (Monday 2 March 2026,
a snapshot a minute from 09:30 New York, every 5 s around each event) of a leader and four
followers, all at that firm with 50K accounts, in which each of the firm's limits is breached
once, at a known time:

  10:00  everyone holds one contract more than the firm allows (the copier copied it)
  10:30  a news release (examples/firms/news.yaml) while everyone holds 1 NQ
  11:00  F2's open loss reaches the act level of its drawdown
  13:00  F3's day loss reaches the act level of the daily loss limit (firms that have one)
  14:00  F1 long ES while F4 holds short MES: a hedge across the firm's accounts
  flat-by  everyone still holds 1 NQ at the firm's flat-by time

The numbers per firm are the published 50K limits (FIRMS.md), not anything the engine computes.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent / "firms"
DAY = datetime(2026, 3, 2, 14, 30, tzinfo=UTC)  # 09:30 New York (EST)

# firm: (max contracts, act-level loss on the drawdown, act-level day loss or None, flat-by UTC)
FIRMS: dict[str, tuple[int, float, float | None, str | None]] = {
    "apex": (10, 2250.0, None, "21:59"),           # 2,500 x 90%; 16:59 ET
    "topstep": (5, 900.0, 900.0, "21:07"),          # daily 1,000 x 90% comes first; 15:07 CT
    "mffu": (0, 1350.0, None, None),                # 1,500 x 90%; no contract limit, no flat-by
    "takeprofit": (6, 1800.0, None, None),          # 2,000 x 90%
    "tradeify": (5, 1800.0, 1125.0, "21:59"),       # 2,000 x 90%; daily 1,250 x 90%; 16:59 ET
}


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def session(firm: str) -> list[dict[str, Any]]:
    max_contracts, drawdown_loss, day_loss, flat_by = FIRMS[firm]
    moments = {DAY + timedelta(minutes=m) for m in range(0, 7 * 60 + 31)}
    for minute in (30, 60, 90, 210, 270):  # dense around each event
        moments |= {DAY + timedelta(minutes=minute, seconds=s) for s in range(-60, 61, 5)}
    if flat_by:
        hour, minute = (int(x) for x in flat_by.split(":"))
        at = DAY.replace(hour=hour, minute=minute)
        moments |= {at + timedelta(seconds=s) for s in range(-60, 61, 5)}
    lines = []
    for moment in sorted(moments):
        minutes = (moment - DAY).total_seconds() / 60
        lines.append(snapshot(firm, moment, minutes, max_contracts, drawdown_loss, day_loss,
                              flat_by))
    return lines


def snapshot(firm: str, moment: datetime, minutes: float, max_contracts: int,
             drawdown_loss: float, day_loss: float | None, flat_by: str | None
             ) -> dict[str, Any]:
    def position(instrument: str, qty: int, price: float = 18000.0) -> dict[str, Any]:
        return {"instrument": instrument, "qty": qty, "avg_price": price,
                "opened_at": iso(DAY + timedelta(minutes=int(minutes)))}

    common: list[dict[str, Any]] = []
    if 30 <= minutes < 31 and max_contracts:  # 10:00: one over the limit, everyone
        common = [position("NQH6", max_contracts + 1)]
    elif 59 <= minutes < 62 or 89 <= minutes < 92:  # 10:30 news and 11:00 drawdown: 1 NQ
        common = [position("NQH6", 1)]
    late = False
    if flat_by:
        hour, minute = (int(x) for x in flat_by.split(":"))
        deadline = DAY.replace(hour=hour, minute=minute)
        late = deadline - timedelta(minutes=6) <= moment < deadline + timedelta(minutes=1)
        if late:
            common = [position("NQH6", 1)]
    accounts = [{"id": "LEAD", "role": "leader", "firm": firm, "size": 50000,
                 "balance": 50000.0, "positions": common}]
    for name in ("F1", "F2", "F3", "F4"):
        account: dict[str, Any] = {"id": name, "role": "follower", "leader": "LEAD",
                                   "firm": firm, "size": 50000, "balance": 50000.0,
                                   "positions": list(common)}
        if name == "F2" and 89 <= minutes < 92:  # 11:00: the drawdown's act level
            account["unrealized_pnl"] = -drawdown_loss if minutes >= 90 else -100.0
        if name == "F3" and day_loss is not None and 209 <= minutes < 212:  # 13:00
            account["realized_pnl"] = -day_loss if minutes >= 210 else -100.0
            account["balance"] = 50000.0 + account["realized_pnl"]
        if 270 <= minutes < 271 and name in ("F1", "F4"):  # 14:00: a hedge across accounts
            account["positions"] = ([position("ESH6", 1, 5000.0)] if name == "F1"
                                    else [position("MESH6", -10, 5000.0)])
        accounts.append(account)
    return {"time": iso(moment),
            "quotes": {"NQH6": {"bid": 17999.75, "ask": 18000.0, "last": 18000.0},
                       "ESH6": {"bid": 4999.75, "ask": 5000.0, "last": 5000.0},
                       "MESH6": {"bid": 4999.75, "ask": 5000.0, "last": 5000.0}},
            "accounts": accounts}


def main() -> None:
    HERE.mkdir(exist_ok=True)
    for firm in FIRMS:
        with (HERE / f"{firm}-breaches.jsonl").open("w", encoding="utf-8") as handle:
            for line in session(firm):
                handle.write(json.dumps(line, separators=(",", ":")) + "\n")
    (HERE / "news.yaml").write_text(
        "# The news calendar of the recorded firm sessions\n"
        "events:\n"
        '  - {time: "2026-03-02T10:30:00-05:00", name: "Example release", impact: high, '
        "instruments: [all]}\n", encoding="utf-8")


if __name__ == "__main__":
    main()
