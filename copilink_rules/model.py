"""The world as the engine sees it: snapshots of accounts, and the decisions the engine makes.

No I/O here: loading files lives in `snapshots.py`. Every model forbids unknown fields, so a typo
in a snapshot is an error, never a silently ignored value.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)


@lru_cache(maxsize=4096)
def _utc_from_text(text: str) -> datetime | str:
    """An ISO 8601 time with an offset, in UTC; the text unchanged for pydantic to report."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return text
    if moment.tzinfo is None:
        return text
    return moment if moment.tzinfo is UTC else moment.astimezone(UTC)


def _before_utc(value: object) -> object:
    # A timeline repeats the same `opened_at` on thousands of lines: parse each text once.
    return _utc_from_text(value) if isinstance(value, str) else value


def _after_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is UTC else moment.astimezone(UTC)


# Any UTC offset is accepted; times are kept in UTC with the standard library's tzinfo, which
# the engine subtracts several times faster than pydantic's own.
UtcDatetime = Annotated[AwareDatetime, BeforeValidator(_before_utc), AfterValidator(_after_utc)]

Role = Literal["leader", "follower"]
CopierState = Literal["active", "paused"]
Severity = Literal["info", "warning", "critical", "error"]

ACTIONS = (
    "flatten",
    "cancel_orders",
    "catch_up",
    "skip_entry",
    "pause_copier",
    "resume_copier",
    "lock_account",
    "block_order",
    "reduce_order",
    "alert",
)
# Actions that put an order (or a cancel) on an account: never sent to an unreachable account.
ORDER_ACTIONS = frozenset({"flatten", "cancel_orders", "catch_up"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Quote(_Strict):
    """Best bid/ask and last trade of one instrument."""

    bid: float | None = None
    ask: float | None = None
    last: float | None = None


class Position(_Strict):
    """A net position. `qty` is signed: + long, - short."""

    instrument: str
    qty: int
    avg_price: float = 0.0
    opened_at: UtcDatetime | None = None


class Order(_Strict):
    """A working (or recently finished) order on an account."""

    id: str
    instrument: str
    side: Literal["buy", "sell"]
    qty: int = Field(gt=0)
    type: Literal["market", "limit", "stop", "stop_limit"] = "market"
    limit_price: float | None = None
    stop_price: float | None = None
    status: Literal["working", "pending", "filled", "cancelled", "rejected"] = "working"


class Account(_Strict):
    """One trading account: the leader, or a follower copying a leader at `ratio`."""

    id: str = Field(min_length=1)
    role: Role
    leader: str | None = None
    ratio: float = Field(default=1.0, gt=0)
    firm: str | None = None
    size: float | None = Field(default=None, gt=0)
    connected: bool = True
    copier: CopierState = "active"
    updated_at: UtcDatetime | None = None
    balance: float = 0.0
    realized_pnl: float = 0.0
    unrealized_pnl: float = 0.0
    positions: tuple[Position, ...] = ()
    orders: tuple[Order, ...] = ()
    overnight: tuple[str, ...] = ()

    def data_age(self, now: datetime) -> float:
        """Seconds since the broker last refreshed this account (0 when it did not say)."""
        return (now - self.updated_at).total_seconds() if self.updated_at else 0.0

    @model_validator(mode="after")
    def _leader_only_on_followers(self) -> Account:
        if self.role == "leader" and self.leader is not None:
            raise ValueError("a leader account cannot have a 'leader' field")
        return self


class Snapshot(_Strict):
    """Every account's state at one instant. The engine's only clock is `time`."""

    time: UtcDatetime
    quotes: dict[str, Quote] = Field(default_factory=dict)
    accounts: tuple[Account, ...] = ()


class Decision(BaseModel):
    """One thing the engine decided (or would have, when `suppressed` says why not)."""

    model_config = ConfigDict(extra="forbid")

    time: datetime
    ruleset: str
    rule: str
    action: str
    account: str | None
    instrument: str | None
    severity: Severity
    reason: str
    suppressed: Literal[False] | str = False
    args: dict[str, object] = Field(default_factory=dict)
    scope: str = "account"
    mode: Literal["enforce", "warn", "dryrun"] = "enforce"
    version: str = ""
    as_if_held: bool = False

    def to_json_dict(self) -> dict[str, object]:
        data = self.model_dump(mode="json")
        data["time"] = _iso_z(self.time)
        return data


def _iso_z(moment: datetime) -> str:
    text = moment.isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")
