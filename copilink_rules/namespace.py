"""What a `when` expression can read: the documented namespace and its types.

`FIELDS` is the single source of truth for the compiler's static checks (an unknown name or
attribute is a load error) and for the README's namespace table; the view classes below carry
exactly those attributes (a test keeps them in lockstep). Views are plain slotted objects, kept
from tick to tick and stored into (an account's every field), so evaluating `follower.qty`
costs one attribute load; a position's `age` is worked out when read (`PositionView`).
"""

from __future__ import annotations

from dataclasses import make_dataclass
from datetime import UTC, datetime, time
from types import SimpleNamespace
from typing import Any

from .errors import EvaluationError

# Value types the static checker knows. A view type maps to its own FIELDS entry.
NUM, STR, BOOL, DATETIME, TIME, ANY = "number", "string", "bool", "datetime", "time", "any"

FIELDS: dict[str, dict[str, tuple[str, str]]] = {
    "account": {
        "id": (STR, "account id"),
        "role": (STR, '"leader" or "follower"'),
        "firm": (STR, 'firm name, "" when unknown'),
        "leader_id": (STR, 'the leader a follower copies ("" for a leader)'),
        "ratio": (NUM, "follower size ratio (1.0 for a leader)"),
        "connected": (BOOL, "the broker connection is up"),
        "stale": (BOOL, "data older than the `stale_after` param (default 5 s)"),
        "reachable": (BOOL, "connected and not stale: orders may be sent"),
        "data_age": (NUM, "seconds since the account's data was refreshed"),
        "copier": (STR, '"active" or "paused"'),
        "balance": (NUM, "account balance"),
        "realized_pnl": (NUM, "realized P&L today"),
        "unrealized_pnl": (NUM, "open P&L"),
        "pnl": (NUM, "realized + unrealized"),
        "flat": (BOOL, "no open position in any instrument"),
        "contracts": (NUM, "open contracts, all instruments, absolute"),
        "positions": (NUM, "number of instruments with an open position"),
        "working_orders": (NUM, "number of working orders"),
        "undeclared_positions": (NUM, "open positions not declared in `overnight`"),
        # metrics the engine keeps itself, per trading day of the account's firm
        "size": (NUM, "account size (starting balance; `size` in the snapshot)"),
        "equity": (NUM, "balance + unrealized P&L"),
        "day_pnl": (NUM, "P&L of the current trading day, realized + unrealized"),
        "peak": (NUM, "highest equity seen (what an intraday trailing drawdown follows)"),
        "peak_eod": (NUM, "highest end-of-day balance (what an end-of-day trailing drawdown "
                          "follows)"),
        "total_profit": (NUM, "equity - size"),
        "best_day": (NUM, "best trading day's P&L so far, today included"),
        "day_share": (NUM, "today's P&L / total profit (0 when there is no profit)"),
        "trading_day": (STR, "the current trading day of the account's firm, YYYY-MM-DD"),
        "minis": (NUM, "open full-size contracts (NQ, ES, ...), absolute"),
        "micros": (NUM, "open micro contracts (MNQ, MES, ...), absolute"),
        "hedged": (BOOL, "another account at the same firm holds the other side of a family "
                         "this account holds (micro vs mini included)"),
        "hedged_with": (STR, "those accounts, comma-separated"),
        "lock": (STR, '"", "halted" or "reducing": the account\'s lock'),
        "locked": (BOOL, "the account has a lock"),
        "firm_accounts": (NUM, "accounts in this snapshot at the account's firm, itself "
                               "included (0 when its firm is not given)"),
        "trades_today": (NUM, "trades closed this trading day (a position in a family gone "
                              "flat or reversed), as the engine saw them"),
        "losing_streak": (NUM, "losing trades in a row this trading day (realized P&L of the "
                               "trade below 0); 0 after a winner"),
    },
    "position": {
        "qty": (NUM, "signed contracts (+ long, - short) in this family"),
        "side": (STR, '"long", "short" or "flat"'),
        "flat": (BOOL, "qty == 0"),
        "equiv": (NUM, "signed size in full-size contracts (10 MNQ = 1.0 NQ)"),
        "avg_price": (NUM, "average entry price (0 when flat)"),
        "opened_at": (DATETIME, "when the position was opened (first seen, if not reported)"),
        "age": (NUM, "seconds since opened_at (0 when flat)"),
        "instrument": (STR, 'the contract held ("" when flat)'),
        "overnight": (BOOL, "declared as an intended overnight position"),
    },
    "pair": {
        "family": (STR, "instrument family (NQ for NQ and MNQ)"),
        "ratio": (NUM, "follower ratio"),
        "expected_equiv": (NUM, "leader equiv x ratio: what the follower should hold"),
        "entry_action": (
            STR,
            'what was done about the leader\'s current trade: "", "catch_up", "skip_entry" '
            'or "flatten"',
        ),
    },
    "instrument": {
        "symbol": (STR, "canonical symbol, e.g. NQH26"),
        "root": (STR, "root symbol, e.g. NQ"),
        "family": (STR, "family, e.g. NQ"),
        "tick_size": (NUM, "minimum price increment"),
        "tick_value": (NUM, "dollars per tick per contract"),
        "micro": (BOOL, "a micro contract"),
    },
    "quote": {
        "bid": (NUM, "best bid (error when the broker sent none)"),
        "ask": (NUM, "best ask"),
        "last": (NUM, "last trade price"),
        "mid": (NUM, "(bid + ask) / 2, or last"),
    },
    "accounts": {
        "total": (NUM, "accounts in the snapshot"),
        "leaders": (NUM, "leader accounts"),
        "followers": (NUM, "follower accounts"),
        "disconnected": (NUM, "accounts not connected"),
        "stale": (NUM, "accounts with stale data"),
        "paused": (NUM, "followers whose copier is paused"),
        "open_positions": (NUM, "open positions across all accounts"),
    },
    "datetime": {
        "year": (NUM, ""), "month": (NUM, ""), "day": (NUM, ""),
        "hour": (NUM, ""), "minute": (NUM, ""), "second": (NUM, ""),
    },
    "time": {"hour": (NUM, ""), "minute": (NUM, ""), "second": (NUM, "")},
}

# Top-level names: name -> (type, scopes it exists in, description)
ALL_SCOPES = ("account", "pair", "global")
NAMES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "params": ("params", ALL_SCOPES, "the rule set's params (durations in seconds)"),
    "now": ("datetime", ALL_SCOPES, "the snapshot's time (UTC)"),
    "now_local": ("time", ALL_SCOPES, "time of day in the rule set's timezone"),
    "weekday": (NUM, ALL_SCOPES, "local day of week, 0 = Monday .. 6 = Sunday"),
    "account": ("account", ("account", "pair"), "the account (in pair scope: the follower's)"),
    "leader_account": ("account", ("pair",), "the leader's account"),
    "leader": ("position", ("pair",), "the leader's position in this family"),
    "follower": ("position", ("pair",), "the follower's position in this family"),
    "pair": ("pair", ("pair",), "the leader x follower x family pair"),
    "instrument": ("instrument", ("pair",), "the contract traded (the leader's, else follower's)"),
    "quote": ("quote", ("pair",), "the quote of `instrument`"),
    "accounts": ("accounts", ("global",), "counts over all accounts"),
}


def _view(kind: str) -> Any:
    """A record class with exactly the FIELDS of `kind`, as slots, compared by identity like
    any object: a slotted dataclass. A tick stores into the views it keeps (an account's
    fields, a pair's entry action): a slot takes a store at about half the cost of a msgspec
    Struct's checked store, and an account's view updated in place costs less than one built
    anew every tick."""
    return make_dataclass(f"{kind.title()}View", list(FIELDS[kind]), slots=True, eq=False)


class Clock:
    """An engine's current time (`now`), shared by the position views it builds: a view's
    `age` follows it without being stored into every tick."""

    __slots__ = ("now",)

    def __init__(self, now: datetime = datetime.min.replace(tzinfo=UTC)) -> None:  # noqa: B008
        self.now = now  # the engine sets it each tick, before it builds or reuses pair targets


class PositionView:
    """A position's view: FIELDS["position"], with `age` worked out when it is read. A view
    the engine builds follows its clock (`age` is the seconds from `opened_at` to the clock's
    `now`), so a position held for an hour is one view with nothing stored into it from tick
    to tick; a view given no clock keeps the `age` it was made with."""

    __slots__ = (
        "_age",
        "_clock",
        "avg_price",
        "equiv",
        "flat",
        "instrument",
        "opened_at",
        "overnight",
        "qty",
        "side",
    )

    def __init__(self, qty: int, side: str, flat: bool, equiv: float, avg_price: float,
                 opened_at: datetime | None, age: float, instrument: str, overnight: bool,
                 clock: Clock | None = None) -> None:
        self.qty, self.side, self.flat, self.equiv = qty, side, flat, equiv
        self.avg_price, self.opened_at, self.instrument = avg_price, opened_at, instrument
        self.overnight, self._age, self._clock = overnight, age, clock

    def __repr__(self) -> str:  # as a dataclass's, `age` as read now
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in FIELDS["position"])
        return f"PositionView({fields})"

    @property
    def age(self) -> float:
        clock = self._clock
        if clock is None:
            return self._age
        opened = self.opened_at
        return (clock.now - opened).total_seconds() if opened else 0.0


AccountView = _view("account")
PairView = _view("pair")
InstrumentView = _view("instrument")
AccountsView = _view("accounts")

FLAT_FIELDS: dict[str, Any] = {
    "qty": 0, "side": "flat", "flat": True, "equiv": 0.0, "avg_price": 0.0,
    "opened_at": None, "age": 0.0, "instrument": "", "overnight": False,
}


class QuoteView:
    """A quote whose missing prices are an evaluation error, never a silent None."""

    __slots__ = ("_ask", "_bid", "_last", "_symbol")

    def __init__(self, symbol: str, bid: float | None, ask: float | None, last: float | None):
        self._symbol, self._bid, self._ask, self._last = symbol, bid, ask, last

    def _need(self, value: float | None, what: str) -> float:
        if value is None:
            raise EvaluationError(f"the quote for {self._symbol} has no {what} price")
        return value

    @property
    def bid(self) -> float:
        return self._need(self._bid, "bid")

    @property
    def ask(self) -> float:
        return self._need(self._ask, "ask")

    @property
    def last(self) -> float:
        return self._need(self._last, "last")

    @property
    def mid(self) -> float:
        if self._bid is not None and self._ask is not None:
            return (self._bid + self._ask) / 2
        return self._need(self._last, "bid/ask or last")


class MissingQuote:
    """Stands in for the quote of an instrument the snapshot has no quote for."""

    __slots__ = ("_symbol",)

    def __init__(self, symbol: str) -> None:
        self._symbol = symbol

    def __getattr__(self, name: str) -> Any:
        raise EvaluationError(f"no quote for {self._symbol} in this snapshot")


class Env:
    """Everything one evaluation can see. Unused slots stay unset for the scope."""

    __slots__ = (*NAMES, "calendar", "families")

    params: SimpleNamespace
    now: datetime
    now_local: time
    weekday: int
    account: Any  # AccountView
    leader_account: Any  # AccountView
    leader: Any  # PositionView
    follower: Any  # PositionView
    pair: Any  # PairView
    instrument: Any  # InstrumentView
    quote: QuoteView | MissingQuote
    accounts: Any  # AccountsView
    calendar: Any  # calendar.Calendar | None
    families: Any  # the instrument families this target is about (None: all)
