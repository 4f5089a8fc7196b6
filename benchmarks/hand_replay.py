"""The replay's floor: bench_replay.py's timeline replayed by hand-written Python, with the same
decisions as `Engine.evaluate` under desync.yaml (bench_replay.py checks that, alert messages
included, before it times anything).

Reading is msgspec decoding each line into the fast reader's structs (fastread._LineSnapshot:
the types and bounds checked in C; an account's positions kept as text and decoded only when
that text differs from the account's on the previous line, as the reader does), with none of
the reader's other checks (times, ids, leaders, signs of zeros) and no snapshot models built.
Evaluating is desync.yaml's session rules written out by hand, in the shape of the engine's
work: each account's reachability and each
follower/leader pair's exposure per instrument family derived from the line, the five
conditions, their `for` episodes, the one cooldown, the leader-trade bookkeeping
(`pair.entry_action`) and the alert messages. Like the engine, it derives an account's families
once for the same positions (here: equal positions, looked up by value) and a leader trade's
label once. It does not resolve conflicts between rules (none arise in this timeline), it
handles only what the timeline holds (every follower names its leader), and its decisions are
tuples where the engine's are Decision models. In this timeline only stuck-follower and
missed-entry-skip fire; every rule's condition is worked out on every line. It keeps no account
metrics (equity, day P&L, peaks) and builds no views: no desync rule reads them, where the
engine keeps the metrics of every account (for the firm rules a reload may add, and its saved
state) and builds each account's and pair's view every line.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from copilink_rules import fastread
from copilink_rules.instruments import default_catalog

# desync.yaml's params, as the engine reads them
STUCK_GRACE, OPPOSITE_GRACE, MISSED_ENTRY_GRACE = 2.0, 1.0, 3.0
CATCH_UP_MAX_TICKS, CATCH_UP_MAX_LATE = 4.0, 30.0
STALE_AFTER, DISCONNECT_GRACE, UNREACHABLE_COOLDOWN = 5.0, 1.0, 60.0
ENTRY_PRECEDENCE = {"flatten": 3, "skip_entry": 2, "catch_up": 1}
UNSET = msgspec.UNSET
MAX_CACHED = 4096  # positions whose families are kept

# (time, rule, account, action, the alert's message or ""): the engine's Decision in a tuple
Decided = tuple[datetime, str, str, str, str]


class _Family:
    """One account's exposure in one instrument family (facts.family_exposure, by hand)."""

    __slots__ = ("avg_price", "equiv", "instrument", "opened_at", "qty", "side", "symbol",
                 "trade")

    def __init__(self, qty: int, equiv: float, instrument: Any, symbol: str, avg_price: float,
                 opened_at: datetime | None) -> None:
        self.qty, self.equiv, self.instrument, self.symbol = qty, equiv, instrument, symbol
        self.avg_price, self.opened_at = avg_price, opened_at
        self.side = self.trade = ""  # set once the family is whole (_families)


class HandReplay:
    """desync.yaml's session rules over decoded lines, by hand."""

    def __init__(self) -> None:
        self.decode = msgspec.json.Decoder(fastread._LineSnapshot).decode
        self.decode_positions = msgspec.json.Decoder(tuple[fastread._Position, ...]).decode
        # account -> the text of its positions on the previous line, and their families
        self.last_positions: dict[str, tuple[Any, dict[str, _Family]]] = {}
        self.parse = default_catalog().parse
        self.times: dict[str, datetime] = {}  # a position's opening time, parsed once
        self.families_of: dict[Any, dict[str, _Family]] = {}  # positions -> their families
        # target -> rule -> since when its condition is true (an open episode); fired ones
        self.since: dict[str, dict[str, datetime]] = {}
        self.fired: set[tuple[str, str]] = set()
        self.last_fired: dict[str, datetime] = {}  # account-unreachable's cooldown
        self.entries: dict[str, tuple[str, str]] = {}  # pair -> (leader trade, action)

    def _time(self, text: Any) -> datetime | None:
        if text is UNSET or not text:
            return None
        found = self.times.get(text)
        if found is None:
            found = self.times[text] = datetime.fromisoformat(text)
        return found

    def _families(self, positions: Any) -> dict[str, _Family]:
        if positions is UNSET or not positions:
            return {}
        families = self.families_of.get(positions)  # frozen structs: equal positions, one key
        if families is not None:
            return families
        families = {}
        parse = self.parse
        for p in positions:
            qty = p.qty
            if qty == 0:
                continue
            instrument = parse(p.instrument)
            equiv = qty * instrument.size
            family = families.get(instrument.family)
            if family is None:
                families[instrument.family] = _Family(qty, equiv, instrument, p.instrument,
                                                      p.avg_price, self._time(p.opened_at))
            else:
                main_is_new = abs(equiv) > abs(family.equiv)
                family.qty += qty
                family.equiv += equiv
                if main_is_new:
                    family.instrument, family.symbol = instrument, p.instrument
                    family.avg_price, family.opened_at = p.avg_price, self._time(p.opened_at)
        for family in families.values():
            family.side = "long" if family.equiv > 0 else "short"
            if family.opened_at is not None:
                sign = (family.equiv > 0) - (family.equiv < 0)
                family.trade = f"{sign}@{family.opened_at.isoformat()}"
        if len(self.families_of) >= MAX_CACHED:
            self.families_of.clear()
        self.families_of[positions] = families
        return families

    def _episodes(self, key: str, now: datetime,
                  conditions: tuple[tuple[str, bool, float], ...]) -> list[str]:
        """The rules that fire for `key` now: each condition true for its hold (seconds), once
        per episode; a false one ends its episode."""
        states = self.since.get(key)
        if states is None:
            states = self.since[key] = {}
        firing = []
        for rule, true, hold in conditions:
            if not true:
                if rule in states:
                    del states[rule]
                    self.fired.discard((rule, key))
                continue
            since = states.get(rule)
            if since is None:
                since = states[rule] = now
            if (now - since).total_seconds() >= hold and (rule, key) not in self.fired:
                self.fired.add((rule, key))
                firing.append(rule)
        if not states:
            del self.since[key]
        return firing

    def __call__(self, raw: Any) -> list[Decided]:
        """The decisions of one decoded line (`self.decode(line)`)."""
        now = datetime.fromisoformat(raw.time)
        decided: list[Decided] = []
        accounts = raw.accounts if raw.accounts is not UNSET else ()
        quotes = {}
        if raw.quotes is not UNSET:
            for name, quote in raw.quotes.items():
                quotes[self.parse(name).symbol] = quote.last
        since = self.since
        families: dict[str, dict[str, _Family]] = {}
        for a in accounts:
            text = a.positions
            last = self.last_positions.get(a.id)
            if last is not None and last[0] == text:  # the same text: the same positions
                families[a.id] = last[1]
            else:
                found = self._families(UNSET if text is UNSET else self.decode_positions(text))
                families[a.id] = found
                self.last_positions[a.id] = (text, found)
            # account-unreachable: not account.reachable, for 1 s, cooldown 60 s
            updated = self._time(a.updated_at)
            age = (now - updated).total_seconds() if updated else 0.0
            reachable = a.connected is not False and age <= STALE_AFTER
            if (reachable and a.id not in since) or not self._episodes(
                    a.id, now, (("account-unreachable", not reachable, DISCONNECT_GRACE),)):
                continue
            last = self.last_fired.get(a.id)
            if last is not None and (now - last).total_seconds() < UNREACHABLE_COOLDOWN:
                self.fired.discard(("account-unreachable", a.id))  # not yet: again next line
                continue
            self.last_fired[a.id] = now
            decided += [(now, "account-unreachable", a.id, "pause_copier", ""),
                        (now, "account-unreachable", a.id, "alert",
                         f"{a.id} is unreachable (connected: "
                         f"{'false' if a.connected is False else 'true'}, data age {age:.10g}s)"
                         ": copier paused, no orders until it is back")]
        live: set[str] = set()
        entries = self.entries
        for a in accounts:
            if a.role != "follower" or not a.leader or a.leader not in families:
                continue
            lead_families, foll_families = families[a.leader], families[a.id]
            overnight = {self.parse(s).family for s in a.overnight} \
                if a.overnight is not UNSET else ()
            active = a.copier is UNSET or a.copier == "active"
            names = sorted(lead_families) if not foll_families or \
                foll_families.keys() == lead_families.keys() else \
                sorted(lead_families.keys() | foll_families.keys())
            for name in names:
                lead, foll = lead_families.get(name), foll_families.get(name)
                key = f"{a.id}|{a.leader}|{name}"
                live.add(key)
                trade = lead.trade if lead is not None else ""
                entry = entries.get(key)
                if entry is not None and entry[0] != trade:
                    del entries[key]
                    entry = None
                # stuck-follower: leader.flat and not follower.flat and not follower.overnight
                stuck = lead is None and foll is not None and name not in overnight
                # opposite-position: both hold, on other sides
                opposite = lead is not None and foll is not None and lead.side != foll.side
                # missed entry: the leader holds, the follower is flat, copying, no entry yet
                missed = lead is not None and foll is None and active and entry is None
                near = False
                ticks = age = 0.0
                if missed:
                    assert lead is not None
                    ticks = abs(quotes[lead.instrument.symbol] - lead.avg_price) \
                        / lead.instrument.tick_size
                    age = (now - lead.opened_at).total_seconds() if lead.opened_at else 0.0
                    near = ticks <= CATCH_UP_MAX_TICKS and age <= CATCH_UP_MAX_LATE
                if not (stuck or opposite or missed) and key not in since:
                    continue  # no condition true, no episode open: nothing to do
                firing = self._episodes(key, now, (
                    ("stuck-follower", stuck, STUCK_GRACE),
                    ("opposite-position", opposite, OPPOSITE_GRACE),
                    ("missed-entry-catch-up", missed and near, MISSED_ENTRY_GRACE),
                    ("missed-entry-skip", missed and not near, MISSED_ENTRY_GRACE)))
                for rule in firing:
                    if rule == "stuck-follower":
                        assert foll is not None
                        actions = ("flatten", "alert")
                        message = (f"{a.id} still holds {foll.side} {abs(foll.qty)} "
                                   f"{foll.symbol} while leader {a.leader} is flat: flattening")
                    elif rule == "opposite-position":
                        assert lead is not None
                        assert foll is not None
                        actions = ("flatten", "pause_copier", "alert")
                        message = (f"{a.id} is {foll.side} {abs(foll.qty)} {foll.symbol} "
                                   f"against leader {a.leader} {lead.side} {abs(lead.qty)} "
                                   f"{lead.symbol}: flattened and copier paused")
                    elif rule == "missed-entry-catch-up":
                        assert lead is not None
                        actions = ("catch_up", "alert")
                        message = (f"{a.id} missed the entry on {lead.symbol}: catching up "
                                   f"{lead.side} at {quotes[lead.instrument.symbol]:.10g} "
                                   f"(leader entered {lead.avg_price:.10g})")
                    else:
                        assert lead is not None
                        actions = ("skip_entry", "alert")
                        message = (f"{a.id} missed the entry on {lead.symbol} and price is "
                                   f"{ticks:.10g} ticks away after {age:.10g}s: skipping this "
                                   "trade")
                    for action in actions:
                        decided.append((now, rule, a.id, action,
                                        message if action == "alert" else ""))
                        if trade and action in ENTRY_PRECEDENCE:
                            current = entries.get(key)
                            if current is None or current[0] != trade or \
                                    ENTRY_PRECEDENCE[action] > ENTRY_PRECEDENCE[current[1]]:
                                entries[key] = (trade, action)
        # a pair gone flat on both sides ends its episodes and its leader trade's entry
        for key in [k for k in since if "|" in k and k not in live]:
            for rule in since.pop(key):
                self.fired.discard((rule, key))
        for key in [k for k in entries if k not in live]:
            del entries[key]
        return decided
