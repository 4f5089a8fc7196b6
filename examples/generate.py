"""Regenerate the example sessions: `python examples/generate.py`.

Each scenario is a 20-second recorded session at 4 snapshots/s (one line every 250 ms) of a
leader and two followers on NQ, starting 2026-03-02 09:30:00 ET. The leader buys 2 NQH6 at
t=5 s and sells at t=15 s; followers copy with 250-750 ms of latency, except where the scenario
breaks them. A snapshot file (`<name>.json`) holds the moment that matters in each scenario.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
START = datetime(2026, 3, 2, 14, 30, tzinfo=UTC)  # 09:30 ET
STEP = 0.25
ENTRY, EXIT = 5.0, 15.0


def iso(seconds: float) -> str:
    moment = START + timedelta(seconds=seconds)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def price_at(t: float, runaway: bool) -> float:
    base = 18000.0
    if runaway and t > ENTRY:
        return base + 0.25 * min(20, int((t - ENTRY) * 8))  # 20 ticks up within 2.5 s
    return base + 0.25 * (int(t * 4) % 3)  # wiggles inside 2 ticks


def position(symbol: str, qty: int, price: float, opened: float) -> dict[str, Any]:
    return {"instrument": symbol, "qty": qty, "avg_price": price, "opened_at": iso(opened)}


Scenario = Callable[[float], dict[str, Any]]


def session(name: str, follower_f2: Callable[[float, float], dict[str, Any]],
            runaway: bool = False) -> list[dict[str, Any]]:
    lines = []
    entry_price = price_at(ENTRY, runaway) + 0.25
    t = 0.0
    while t <= 20.0 + 1e-9:
        last = price_at(t, runaway)
        leader_pos = ([position("NQH6", 2, entry_price, ENTRY)] if ENTRY <= t < EXIT else [])
        leader_orders = ([{"id": "L-stop", "instrument": "NQH6", "side": "sell", "qty": 2,
                           "type": "stop", "stop_price": entry_price - 20.0}]
                         if ENTRY <= t < EXIT else [])
        f1_pos = ([position("NQ 03-26", 2, entry_price, ENTRY + 0.25)]
                  if ENTRY + 0.25 <= t < EXIT + 0.5 else [])
        f2 = {"id": "F2", "role": "follower", "leader": "LEAD", "firm": "apex",
              "balance": 50000.0, "positions": [], "orders": []}
        f2.update(follower_f2(t, entry_price))
        lines.append({
            "time": iso(t),
            "quotes": {"NQH6": {"bid": last - 0.25, "ask": last, "last": last}},
            "accounts": [
                {"id": "LEAD", "role": "leader", "firm": "apex", "balance": 50000.0,
                 "positions": leader_pos, "orders": leader_orders},
                {"id": "F1", "role": "follower", "leader": "LEAD", "firm": "apex",
                 "balance": 50000.0, "positions": f1_pos, "orders": []},
                f2,
            ],
        })
        t += STEP
    return lines


def f2_normal(t: float, entry: float) -> dict[str, Any]:
    held = ENTRY + 0.75 <= t < EXIT + 0.75
    return {"positions": [position("NQH6", 2, entry, ENTRY + 0.75)] if held else []}


def f2_stuck(t: float, entry: float) -> dict[str, Any]:
    # the exit never replicated: F2 still holds after the leader is flat
    return {"positions": [position("NQH6", 2, entry, ENTRY + 0.75)] if t >= ENTRY + 0.75
            else []}


def f2_opposite(t: float, entry: float) -> dict[str, Any]:
    # a stale reversal during a reconnect leaves F2 short 20 MNQ (2 NQ worth) at t=8
    if ENTRY + 0.75 <= t < 8.0:
        return {"positions": [position("NQH6", 2, entry, ENTRY + 0.75)]}
    if 8.0 <= t < 12.0:
        return {"positions": [position("MNQH6", -20, entry + 1.0, 8.0)]}
    return {"positions": []}  # the trader closed it by hand at t=12


def f2_missed(t: float, entry: float) -> dict[str, Any]:
    return {"positions": []}  # the entry never reached F2


def f2_disconnected(t: float, entry: float) -> dict[str, Any]:
    # F2 drops at t=6 holding its copy; it misses the exit and comes back at t=18, still long
    out: dict[str, Any] = {
        "positions": [position("NQH6", 2, entry, ENTRY + 0.75)] if t >= ENTRY + 0.75 else []}
    if 6.0 <= t < 18.0:
        out["connected"] = False
        out["updated_at"] = iso(6.0)
    return out


SCENARIOS: dict[str, tuple[Callable[[float, float], dict[str, Any]], bool, float]] = {
    # name: (F2 behaviour, price runs away, time of the snapshot example)
    "clean-session": (f2_normal, False, 10.0),
    "stuck-follower": (f2_stuck, False, 17.0),
    "opposite-position": (f2_opposite, False, 9.0),
    "missed-entry": (f2_missed, False, 8.0),
    "missed-entry-runaway": (f2_missed, True, 8.0),
    "disconnected-follower": (f2_disconnected, False, 12.0),
}


def desync_session() -> list[dict[str, Any]]:
    """One 60-second session with all three desyncs of the article, on four followers.

    Trade 1: leader long 2 NQH6 from 5 s to 20 s. F2 misses the entry (caught up at 8 s, price
    still close); F3 misses the exit (stuck; flattened at 22 s, closed by hand at 25 s).
    Trade 2: leader short 1 NQH6 from 30 s to 50 s. F4 flips long 10 MNQ at 35 s after a
    reconnect (opposite; flattened and paused at 36 s, closed by hand at 40 s).
    """
    lines = []
    entry1, entry2 = 18000.25, 18003.0
    t = 0.0
    while t <= 60.0 + 1e-9:
        last = 18000.0 + 0.25 * (int(t * 4) % 3) + (3.0 if t >= 28 else 0.0)

        def holding(start: float, end: float, symbol: str, qty: int, price: float,
                    opened: float, t: float = t) -> list[dict[str, Any]]:
            return [position(symbol, qty, price, opened)] if start <= t < end else []

        lead = holding(5, 20, "NQH6", 2, entry1, 5) + holding(30, 50, "NQH6", -1, entry2, 30)
        lead_orders = []
        if 5 <= t < 20:
            lead_orders = [{"id": "L-stop-1", "instrument": "NQH6", "side": "sell", "qty": 2,
                            "type": "stop", "stop_price": entry1 - 20.0}]
        elif 30 <= t < 50:
            lead_orders = [{"id": "L-stop-2", "instrument": "NQH6", "side": "buy", "qty": 1,
                            "type": "stop", "stop_price": entry2 + 20.0}]
        f1 = holding(5.25, 20.5, "NQ 03-26", 2, entry1, 5.25) + \
            holding(30.5, 50.25, "NQ 03-26", -1, entry2, 30.5)
        f2 = holding(30.75, 50.5, "NQH6", -1, entry2, 30.75)  # missed trade 1's entry
        f3 = holding(5.5, 25, "NQH6", 2, entry1, 5.5) + \
            holding(30.5, 50.5, "NQH6", -1, entry2, 30.5)  # missed trade 1's exit
        f4 = holding(5.5, 20.75, "MNQH6", 20, entry1, 5.5) + \
            holding(30.5, 35, "MNQH6", -10, entry2, 30.5) + \
            holding(35, 40, "MNQH6", 10, entry2 + 0.5, 35)  # stale reversal at 35 s
        accounts: list[dict[str, Any]] = [
            {"id": "LEAD", "role": "leader", "firm": "apex", "balance": 50000.0,
             "positions": lead, "orders": lead_orders}]
        for name, held, firm in (("F1", f1, "apex"), ("F2", f2, "apex"),
                                 ("F3", f3, "topstep"), ("F4", f4, "tradeify")):
            follower: dict[str, Any] = {"id": name, "role": "follower", "leader": "LEAD",
                                        "firm": firm, "balance": 50000.0, "positions": held}
            if name == "F4":
                follower["ratio"] = 1.0
                if t >= 36.25:
                    follower["copier"] = "paused"  # the copier obeyed the pause
            accounts.append(follower)
        lines.append({"time": iso(t),
                      "quotes": {"NQH6": {"bid": last - 0.25, "ask": last, "last": last},
                                 "MNQH6": {"bid": last - 0.25, "ask": last, "last": last}},
                      "accounts": accounts})
        t += STEP
    return lines


def main() -> None:
    with (HERE / "desync-session.jsonl").open("w", encoding="utf-8") as handle:
        for line in desync_session():
            handle.write(json.dumps(line, separators=(",", ":")) + "\n")
    for name, (behaviour, runaway, moment) in SCENARIOS.items():
        lines = session(name, behaviour, runaway)
        with (HERE / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            for line in lines:
                handle.write(json.dumps(line, separators=(",", ":")) + "\n")
        snapshot = next(line for line in lines if line["time"] == iso(moment))
        (HERE / f"{name}.json").write_text(json.dumps(snapshot, indent=2) + "\n",
                                           encoding="utf-8")
    # pre-session check: one ready morning, one that is not
    ready = session("pre", f2_normal)[0]
    ready["time"] = "2026-03-02T14:20:00.000Z"
    (HERE / "pre-session-ready.json").write_text(json.dumps(ready, indent=2) + "\n",
                                                 encoding="utf-8")
    not_ready = json.loads(json.dumps(ready))
    not_ready["accounts"][1]["positions"] = [position("NQH6", 1, 17990.0, -3600.0)]
    not_ready["accounts"][2]["connected"] = False
    not_ready["accounts"][2]["copier"] = "paused"
    (HERE / "pre-session-not-ready.json").write_text(json.dumps(not_ready, indent=2) + "\n",
                                                     encoding="utf-8")


if __name__ == "__main__":
    main()
