"""The world as the engine sees it: snapshots of accounts, and the decisions the engine makes.

No I/O here: loading files lives in `snapshots.py`. Every model forbids unknown fields, so a typo
in a snapshot is an error, never a silently ignored value.

Numbers are numbers: money, prices and ratios are finite floats within bounds (NaN compares
false with everything, so a NaN balance would silently disarm every loss limit), quantities are
integers within bounds (`true` is not 1, `2.0` is not 2), and times lie between the years 2000
and 2100 (a year-9999 time overflows as soon as the engine adds a duration to it).
"""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

# Bounds of every number and time a snapshot (or an order to the gate) may carry.
MAX_QTY = 100_000  # contracts in one position or order
MAX_AMOUNT = 1e12  # money and prices, either sign
MAX_RATIO = 1_000.0  # a follower's copy ratio
MIN_YEAR, MAX_YEAR = 2000, 2100
_OUT_OF_RANGE = f"times must lie in the years {MIN_YEAR} to {MAX_YEAR} (UTC)"

# A finite float (no NaN, no infinity) that is a number, not a bool or a numeric string.
FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
# Money and prices: finite and bounded, so sums and products stay finite too.
Amount = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-MAX_AMOUNT,
                                le=MAX_AMOUNT)]
# A signed quantity of contracts: an integer (strict: `true` and `2.0` are refused), bounded.
Quantity = Annotated[int, Field(strict=True, ge=-MAX_QTY, le=MAX_QTY)]


M = TypeVar("M", bound=BaseModel)
_new = object.__new__
# pydantic's own slots of a model instance, set as model_construct sets them (through their
# descriptors: cheaper than object.__setattr__, which looks each one up)
_SET_DICT = BaseModel.__dict__["__dict__"].__set__
_SET_FIELDS_SET = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_SET_EXTRA = BaseModel.__dict__["__pydantic_extra__"].__set__
_SET_PRIVATE = BaseModel.__dict__["__pydantic_private__"].__set__


def build_model(model: type[M], values: dict[str, Any], fields_set: set[str]) -> M:
    """An instance of `model` with these values (every field, in field order) and this
    `model_fields_set`, as `model_construct` would make it but several times cheaper. No
    validation: for values the caller validated or made itself (the fast reader, the engine's
    decisions); tests hold both to what pydantic builds."""
    built: M = _new(model)
    _SET_DICT(built, values)
    _SET_FIELDS_SET(built, fields_set)
    _SET_EXTRA(built, None)
    _SET_PRIVATE(built, None)
    return built


def signed_zeros_differ(a: float, b: float) -> bool:
    """-0.0 == 0.0, yet a message shows them differently: equal zeros of opposite sign."""
    return a == 0 and b == 0 and math.copysign(1.0, a) != math.copysign(1.0, b)


def finite_or_none(value: object) -> float | None:
    """A number from a broker feed as a float, or None when it is not a usable number.

    For adapters: brokers send NaN (or infinity, or null, or an empty string) for a quote or a
    P&L they do not have right now. That is stale data, never zero: map it to None (a missing
    quote, an unknown value) and let the rules treat it as missing. Bools are not numbers;
    numeric strings are read. `finite_or_none(float("nan"))` is None, `finite_or_none(0)` 0.0.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            return None
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


@lru_cache(maxsize=4096)
def _utc_from_text(text: str) -> datetime | str:
    """An ISO 8601 time with an offset, in UTC; the text unchanged for pydantic to report."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return text
    if moment.tzinfo is None:
        return text
    return _in_range(moment)


_START = datetime(MIN_YEAR, 1, 1, tzinfo=UTC)
_END = datetime(MAX_YEAR + 1, 1, 1, tzinfo=UTC)


def _in_range(moment: datetime) -> datetime:
    """`moment` in UTC, if it lies in the years MIN_YEAR to MAX_YEAR (UTC); else ValueError."""
    # the year first: 9999-12-31T23:30-05:00 overflows when converted to UTC
    if not MIN_YEAR - 1 <= moment.year <= MAX_YEAR + 1:
        raise ValueError(_OUT_OF_RANGE)
    utc = moment if moment.tzinfo is UTC else moment.astimezone(UTC)
    if not _START <= utc < _END:
        raise ValueError(_OUT_OF_RANGE)
    return utc


def _before_utc(value: object) -> object:
    # A timeline repeats the same `opened_at` on thousands of lines: parse each text once.
    return _utc_from_text(value) if isinstance(value, str) else value


def _after_utc(moment: datetime) -> datetime:
    return _in_range(moment)


# Any UTC offset is accepted; times are kept in UTC with the standard library's tzinfo, which
# the engine subtracts several times faster than pydantic's own. Years 2000 to 2100 only.
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
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Quote(_Strict):
    """Best bid/ask and last trade of one instrument."""

    bid: Amount | None = None
    ask: Amount | None = None
    last: Amount | None = None


class Position(_Strict):
    """A net position. `qty` is signed: + long, - short."""

    instrument: str
    qty: Quantity
    avg_price: Amount = 0.0
    opened_at: UtcDatetime | None = None


class Order(_Strict):
    """A working (or recently finished) order on an account."""

    id: str
    instrument: str
    side: Literal["buy", "sell"]
    qty: Quantity = Field(gt=0)
    type: Literal["market", "limit", "stop", "stop_limit"] = "market"
    limit_price: Amount | None = None
    stop_price: Amount | None = None
    status: Literal["working", "pending", "filled", "cancelled", "rejected"] = "working"


class Account(_Strict):
    """One trading account: the leader, or a follower copying a leader at `ratio`."""

    id: str = Field(min_length=1)
    role: Role
    leader: str | None = None
    ratio: FiniteFloat = Field(default=1.0, gt=0, le=MAX_RATIO)
    firm: str | None = None
    size: Amount | None = Field(default=None, gt=0)
    connected: bool = True
    copier: CopierState = "active"
    updated_at: UtcDatetime | None = None
    balance: Amount = 0.0
    realized_pnl: Amount = 0.0
    unrealized_pnl: Amount = 0.0
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


def _fields_of(value: object) -> dict[str, Any]:
    if isinstance(value, BaseModel):
        return value.__dict__  # every field, in field order
    raise TypeError(f"cannot write {type(value).__name__} in a snapshot's digest")


_DIGEST_ENCODER = msgspec.json.Encoder(enc_hook=_fields_of)


def snapshot_digest(snapshot: Snapshot) -> str:
    """What the journal records of each tick's snapshot: the first 16 hex digits of the
    SHA-256 of its JSON, every field of every account, position, order and quote. msgspec
    writes it, each model as its fields, in about 60% of the time pydantic's model_dump_json
    takes (this runs every tick). Equal snapshots give equal digests; a changed value, a
    different one."""
    return hashlib.sha256(_DIGEST_ENCODER.encode(snapshot)).hexdigest()[:16]


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
