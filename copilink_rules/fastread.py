"""The fast path of reading a timeline line: msgspec Structs that mirror the snapshot models.

`FastReader.read(line)` decodes one JSON line with msgspec into Structs that carry the same
constraints as the pydantic models in `model.py` (unknown fields forbidden, strict numbers and
their bounds, literals), checks what msgspec cannot (times, the account-level rules and the
cross-field checks of `snapshots.check_snapshot`) with the same functions and conditions, and
builds the pydantic objects without validating them again: the result equals (==, and field by
field) what `Snapshot.model_validate_json` gives for the line, including `model_fields_set`.

It never reports a problem. On any doubt (a line msgspec refuses, a time the standard library
cannot read, a bound, an unknown instrument, a duplicate id ...) `read` returns None and the
caller reads the line again with the strict path, whose messages (file:line: field: what is
wrong) are the ones a user sees. So the fast path may refuse more than the strict one (which
costs only time) but must never accept a line the strict path refuses, nor read one differently:
tests/test_fast_reader.py checks both, on every example timeline and on generated lines.

What the previous line had unchanged at the same place is reused, not built again: an account
whose data did not change is the same `Account` object as on the previous line, a position held
for an hour one `Position` while its account's P&L moves (equal field for field, the sign of a
zero included). An account whose time, balance or P&L alone moved (most accounts on most lines)
is the previous account's values with those replaced (`_moved`). An account's positions and
orders are kept as the line's text (msgspec.Raw) and decoded only when that text changed: the
same text is the same records, their zeros' signs included. The models are frozen, so sharing
is invisible except to `is`; the engine may use that to keep what it derived from an account.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

import msgspec
from msgspec import UNSET, Meta, Raw, Struct, UnsetType
from msgspec.structs import replace as _replace
from pydantic import BaseModel

from .errors import InstrumentError
from .instruments import Catalog
from .model import (
    _SET_DICT,
    _SET_EXTRA,
    _SET_FIELDS_SET,
    _SET_PRIVATE,
    MAX_AMOUNT,
    MAX_QTY,
    MAX_RATIO,
    Account,
    Order,
    Position,
    Quote,
    Snapshot,
    _utc_from_text,
    build_model,
    signed_zeros_differ,
)

_build = build_model
_new = object.__new__
log = logging.getLogger(__name__)

# The constraints of model.py's Amount, Quantity and FiniteFloat. msgspec's float accepts a JSON
# integer (as pydantic's strict float does) and refuses a bool, a string and NaN/Infinity
# tokens; its int refuses a bool and 2.0 (as pydantic's strict int does). An infinity (1e400)
# fails the bounds.
_Amount = Annotated[float, Meta(ge=-MAX_AMOUNT, le=MAX_AMOUNT)]
_Quantity = Annotated[int, Meta(ge=-MAX_QTY, le=MAX_QTY)]
_OrderQuantity = Annotated[int, Meta(gt=0, le=MAX_QTY)]
_Ratio = Annotated[float, Meta(gt=0, le=MAX_RATIO)]
_Size = Annotated[float, Meta(gt=0, le=MAX_AMOUNT)]
_Id = Annotated[str, Meta(min_length=1)]

# Every field a model gives a default is UNSET here when the line leaves it out, so that the
# built model's `model_fields_set` is what pydantic's would be. Times stay text: they are read
# by model.py's own function, which is what the strict path uses.


class _Quote(Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    bid: _Amount | UnsetType | None = UNSET
    ask: _Amount | UnsetType | None = UNSET
    last: _Amount | UnsetType | None = UNSET


class _Position(Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    instrument: str
    qty: _Quantity
    avg_price: _Amount | UnsetType = UNSET
    opened_at: str | UnsetType | None = UNSET


class _Order(Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    id: str
    instrument: str
    side: Literal["buy", "sell"]
    qty: _OrderQuantity
    type: Literal["market", "limit", "stop", "stop_limit"] | UnsetType = UNSET
    limit_price: _Amount | UnsetType | None = UNSET
    stop_price: _Amount | UnsetType | None = UNSET
    status: Literal["working", "pending", "filled", "cancelled", "rejected"] | UnsetType = UNSET


class _Account(Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    id: _Id
    role: Literal["leader", "follower"]
    leader: str | UnsetType | None = UNSET
    ratio: _Ratio | UnsetType = UNSET
    firm: str | UnsetType | None = UNSET
    size: _Size | UnsetType | None = UNSET
    connected: bool | UnsetType = UNSET
    copier: Literal["active", "paused"] | UnsetType = UNSET
    updated_at: str | UnsetType | None = UNSET
    balance: _Amount | UnsetType = UNSET
    realized_pnl: _Amount | UnsetType = UNSET
    unrealized_pnl: _Amount | UnsetType = UNSET
    positions: tuple[_Position, ...] | UnsetType = UNSET
    orders: tuple[_Order, ...] | UnsetType = UNSET
    overnight: tuple[str, ...] | UnsetType = UNSET


class _Snapshot(Struct, forbid_unknown_fields=True, gc=False):
    time: str
    quotes: dict[str, _Quote] | UnsetType = UNSET
    accounts: tuple[_Account, ...] | UnsetType = UNSET


def _unparsed(struct: type[Struct], names: tuple[str, ...], name: str,
              **types: Any) -> type[Struct]:
    """`struct` with the fields `names` left unparsed (msgspec.Raw: the line's own text of
    them) and those of `types` of another type, for reading lines: what a line repeats from the
    previous one (an account's positions and orders) is then compared as text and decoded only
    when it changed (FastReader._records). The same fields in the same order, the same
    constraints on the rest; `FastReader.convert` (Python data, where msgspec has no text to
    keep) uses `struct` itself."""
    specs: list[Any] = []
    for field in msgspec.structs.fields(struct):
        kind = (Raw | UnsetType) if field.name in names else types.get(field.name, field.type)
        specs.append((field.name, kind) if field.required else
                     (field.name, kind, field.default))
    config = struct.__struct_config__
    return msgspec.defstruct(name, specs, forbid_unknown_fields=config.forbid_unknown_fields,
                             frozen=config.frozen, gc=config.gc)


_LineAccount = _unparsed(_Account, ("positions", "orders"), "_LineAccount")
_LineSnapshot = _unparsed(_Snapshot, (), "_LineSnapshot",
                          accounts=tuple[_LineAccount, ...] | UnsetType)  # type: ignore[valid-type]


class _Fallback(Exception):  # noqa: N818 - a signal, not an error: read the line strictly
    pass


def _plain_text(*values: object) -> None:
    """_Fallback unless each value is a str itself (or absent): from Python data (`convert`),
    msgspec keeps a str subclass (an enum's member, say) where pydantic gives a plain str.
    Fields with literal values (role, side) come out plain either way."""
    for value in values:
        if type(value) is not str and value is not None and value is not UNSET:
            raise _Fallback


def _time(text: str) -> datetime:
    """`text` as the strict path reads it (the same cached function); _Fallback otherwise."""
    try:
        moment = _utc_from_text(text)
    except ValueError:  # outside 2000-2100: the strict path says so
        raise _Fallback from None
    if isinstance(moment, str):  # not an ISO time with an offset: pydantic decides
        raise _Fallback
    return moment


# --- from a struct to its model's __dict__ and fields set ---------------------------------------


def _defaults(model: type[BaseModel]) -> dict[str, Any]:
    """The model's __dict__ for a line that gives only its required fields (None here until
    set), in field order: the start of each model's values, copied (cheaper than building)."""
    return {name: None if field.is_required() else field.get_default(call_default_factory=True)
            for name, field in model.model_fields.items()}


class _FieldsSets(dict[int, set[str]]):
    """A model's fields set by which of its optional fields a line gave (bit i: the i-th, in
    field order), made once for each combination.

    Models built with the same fields given share one set: pydantic never changes a frozen
    model's fields set in place (model_copy copies it first)."""

    def __init__(self, model: type[BaseModel]) -> None:
        super().__init__()
        self.required = [n for n, f in model.model_fields.items() if f.is_required()]
        self.optional = [n for n, f in model.model_fields.items() if not f.is_required()]

    def __missing__(self, given: int) -> set[str]:
        fields = self[given] = {*self.required, *(
            name for i, name in enumerate(self.optional) if given >> i & 1)}
        return fields


_QUOTE_DEFAULTS, _QUOTE_SETS = _defaults(Quote), _FieldsSets(Quote)
_POSITION_DEFAULTS, _POSITION_SETS = _defaults(Position), _FieldsSets(Position)
_ORDER_DEFAULTS, _ORDER_SETS = _defaults(Order), _FieldsSets(Order)
_ACCOUNT_DEFAULTS, _ACCOUNT_SETS = _defaults(Account), _FieldsSets(Account)
_SNAPSHOT_DEFAULTS, _SNAPSHOT_SETS = _defaults(Snapshot), _FieldsSets(Snapshot)

# Each struct's values as model_validate leaves them in the model's __dict__ (the model's
# default where the line left a field out: UNSET), and the model's fields set. Written out
# field by field, the bits in the order of the model's optional fields: msgspec's asdict and a
# generic loop cost more than the rest of building the object. tests/test_fast_reader.py
# checks each against the model's fields and defaults.


def _quote_values(s: _Quote) -> tuple[dict[str, Any], set[str]]:
    values = _QUOTE_DEFAULTS.copy()
    given = 0
    if (bid := s.bid) is not UNSET:
        values["bid"] = bid
        given |= 1
    if (ask := s.ask) is not UNSET:
        values["ask"] = ask
        given |= 2
    if (last := s.last) is not UNSET:
        values["last"] = last
        given |= 4
    return values, _QUOTE_SETS[given]


def _position_values(s: _Position) -> tuple[dict[str, Any], set[str]]:
    values = _POSITION_DEFAULTS.copy()
    values["instrument"] = s.instrument
    values["qty"] = s.qty
    given = 0
    if (avg_price := s.avg_price) is not UNSET:
        values["avg_price"] = avg_price
        given |= 1
    if (opened_at := s.opened_at) is not UNSET:
        values["opened_at"] = opened_at
        given |= 2
    return values, _POSITION_SETS[given]


def _order_values(s: _Order) -> tuple[dict[str, Any], set[str]]:
    values = _ORDER_DEFAULTS.copy()
    values["id"] = s.id
    values["instrument"] = s.instrument
    values["side"] = s.side
    values["qty"] = s.qty
    given = 0
    if (type_ := s.type) is not UNSET:
        values["type"] = type_
        given |= 1
    if (limit_price := s.limit_price) is not UNSET:
        values["limit_price"] = limit_price
        given |= 2
    if (stop_price := s.stop_price) is not UNSET:
        values["stop_price"] = stop_price
        given |= 4
    if (status := s.status) is not UNSET:
        values["status"] = status
        given |= 8
    return values, _ORDER_SETS[given]


def _account_values(s: _Account) -> tuple[dict[str, Any], set[str]]:
    values = _ACCOUNT_DEFAULTS.copy()
    values["id"] = s.id
    values["role"] = s.role
    given = 0
    if (leader := s.leader) is not UNSET:
        values["leader"] = leader
        given |= 1
    if (ratio := s.ratio) is not UNSET:
        values["ratio"] = ratio
        given |= 2
    if (firm := s.firm) is not UNSET:
        values["firm"] = firm
        given |= 4
    if (size := s.size) is not UNSET:
        values["size"] = size
        given |= 8
    if (connected := s.connected) is not UNSET:
        values["connected"] = connected
        given |= 16
    if (copier := s.copier) is not UNSET:
        values["copier"] = copier
        given |= 32
    if (updated_at := s.updated_at) is not UNSET:
        values["updated_at"] = updated_at
        given |= 64
    if (balance := s.balance) is not UNSET:
        values["balance"] = balance
        given |= 128
    if (realized_pnl := s.realized_pnl) is not UNSET:
        values["realized_pnl"] = realized_pnl
        given |= 256
    if (unrealized_pnl := s.unrealized_pnl) is not UNSET:
        values["unrealized_pnl"] = unrealized_pnl
        given |= 512
    if (positions := s.positions) is not UNSET:
        values["positions"] = positions
        given |= 1024
    if (orders := s.orders) is not UNSET:
        values["orders"] = orders
        given |= 2048
    if (overnight := s.overnight) is not UNSET:
        values["overnight"] = overnight
        given |= 4096
    return values, _ACCOUNT_SETS[given]


def _snapshot_values(s: _Snapshot) -> tuple[dict[str, Any], set[str]]:
    values = _SNAPSHOT_DEFAULTS.copy()
    values["time"] = s.time
    given = 0
    if (quotes := s.quotes) is not UNSET:
        values["quotes"] = quotes
        given |= 1
    else:
        values["quotes"] = {}  # a dict of its own, as the model's default_factory gives
    if (accounts := s.accounts) is not UNSET:
        values["accounts"] = accounts
        given |= 2
    return values, _SNAPSHOT_SETS[given]


S = TypeVar("S", bound=Struct)


class _Maker(Generic[S]):
    """A mirror struct and its model: the same fields in the same order (checked here), and
    the function that gives the model's __dict__ and fields set for a struct."""

    def __init__(self, model: type[BaseModel], mirror: type[S],
                 values: Callable[[S], tuple[dict[str, Any], set[str]]]) -> None:
        self.model = model
        self.names = tuple(model.model_fields)
        self.optional = tuple(n for n, f in model.model_fields.items() if not f.is_required())
        assert mirror.__struct_fields__ == self.names, (model, mirror)
        self.values = values

    def left_out(self, struct: S) -> tuple[bool, ...]:
        """Which of the model's optional fields the line left out, in field order."""
        given = self.values(struct)[1]
        return tuple(name not in given for name in self.optional)


_QUOTE = _Maker(Quote, _Quote, _quote_values)
_POSITION = _Maker(Position, _Position, _position_values)
_ORDER = _Maker(Order, _Order, _order_values)
_ACCOUNT = _Maker(Account, _Account, _account_values)
_SNAPSHOT = _Maker(Snapshot, _Snapshot, _snapshot_values)

# --- reusing the previous line's objects --------------------------------------------------------
# Two structs that are == hold equal values and leave out the same fields (UNSET equals only
# itself), so the model built from one equals the other's, except that -0.0 == 0.0: a reused
# object must keep the sign the strict path reads. Zeros are rare, so each check first asks
# whether a value is zero at all (None and UNSET are not) and only then compares signs.

_QUOTE_FLOATS = ("bid", "ask", "last")
_POSITION_FLOATS = ("avg_price",)
_ORDER_FLOATS = ("limit_price", "stop_price")
_MONEY_FLOATS = ("balance", "realized_pnl", "unrealized_pnl")  # an account's (ratio, size > 0)


def _zeros_agree(new: Struct, old: Struct, names: tuple[str, ...]) -> bool:
    """Whether two equal structs also agree on the sign of each zero among these fields."""
    for name in names:
        value = getattr(new, name)
        if value is not None and signed_zeros_differ(value, getattr(old, name)):
            return False
    return True


def _quote_alike(new: _Quote, old: _Quote) -> bool:
    return not (new.bid == 0.0 or new.ask == 0.0 or new.last == 0.0) or \
        _zeros_agree(new, old, _QUOTE_FLOATS)


def _position_alike(new: _Position, old: _Position) -> bool:
    return new.avg_price != 0.0 or _zeros_agree(new, old, _POSITION_FLOATS)


def _order_alike(new: _Order, old: _Order) -> bool:
    return not (new.limit_price == 0.0 or new.stop_price == 0.0) or \
        _zeros_agree(new, old, _ORDER_FLOATS)


def _positions_alike(new: tuple[_Position, ...], old: tuple[_Position, ...]) -> bool:
    """_position_alike for each of two equal tuples' items."""
    for one in new:  # mostly no zero at all: the other tuple is read only when there is one
        if one.avg_price == 0.0:
            return all(_position_alike(a, b) for a, b in zip(new, old, strict=True))
    return True


def _orders_alike(new: tuple[_Order, ...], old: tuple[_Order, ...]) -> bool:
    """_order_alike for each of two equal tuples' items."""
    for one in new:
        if one.limit_price == 0.0 or one.stop_price == 0.0:
            return all(_order_alike(a, b) for a, b in zip(new, old, strict=True))
    return True


def _moved(new: _Account, previous: _Account, old: Account) -> Account | None:
    """The account of `new` if it differs from the previous line's account at its place at
    most in what moves from line to line (its time, balance and P&L), each of them given on
    both lines or left out on both; else None (`_account` builds it). Everything else is the
    previous account's: its values (checked here: the same text, not a str subclass from
    Python data), its positions and orders (the same objects, their zeros' signs checked) and
    its fields set, which the same fields given make the same. When the moving values are the
    same too (and their zeros agree in sign, which == cannot tell), it is the previous account
    itself."""
    updated_at, balance = new.updated_at, new.balance
    realized, unrealized = new.realized_pnl, new.unrealized_pnl
    was_updated, was_balance = previous.updated_at, previous.balance
    was_realized, was_unrealized = previous.realized_pnl, previous.unrealized_pnl
    if (updated_at is UNSET) is not (was_updated is UNSET) or \
            (balance is UNSET) is not (was_balance is UNSET) or \
            (realized is UNSET) is not (was_realized is UNSET) or \
            (unrealized is UNSET) is not (was_unrealized is UNSET):
        return None
    if _replace(new, updated_at=was_updated, balance=was_balance, realized_pnl=was_realized,
                unrealized_pnl=was_unrealized) != previous:
        return None
    # the zeros' signs of what is kept (the money is this line's own, taken as it is); the
    # previous line's positions and orders equal these (above), so they are given too. A
    # line's are its text (msgspec.Raw): the same text, the same signs.
    if type(positions := new.positions) is tuple and positions and \
            not _positions_alike(positions, previous.positions):  # type: ignore[arg-type]
        return None
    if type(orders := new.orders) is tuple and orders and \
            not _orders_alike(orders, previous.orders):  # type: ignore[arg-type]
        return None
    if balance == was_balance and realized == was_realized and \
            unrealized == was_unrealized and updated_at == was_updated and \
            ((balance != 0.0 and realized != 0.0 and unrealized != 0.0) or
             _zeros_agree(new, previous, _MONEY_FLOATS)):
        return old
    values = old.__dict__.copy()
    if updated_at is not UNSET:
        values["updated_at"] = None if updated_at is None else _time(updated_at)
    if balance is not UNSET:
        values["balance"] = balance
    if realized is not UNSET:
        values["realized_pnl"] = realized
    if unrealized is not UNSET:
        values["unrealized_pnl"] = unrealized
    # build_model(Account, values, old's fields set), inlined: most accounts of most lines
    built = _new(Account)
    _SET_DICT(built, values)
    _SET_FIELDS_SET(built, old.__pydantic_fields_set__)
    _SET_EXTRA(built, None)
    _SET_PRIVATE(built, None)
    return built


class FastReader:
    """Reads timeline lines fast, or says to read them strictly (`read` returns None).

    One reader per timeline: it remembers the instrument symbols the catalog parsed and the
    previous line it read, whose objects it reuses where a line repeats them unchanged (the
    same account, position, order or quote at the same place, equal field for field)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        # the line's structs: _Snapshot's, its accounts' positions and orders left as text
        self._decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(_LineSnapshot)
        # a line's positions and orders, decoded when their text changed (_records)
        self._decode_positions = msgspec.json.Decoder(tuple[_Position, ...]).decode
        self._decode_orders = msgspec.json.Decoder(tuple[_Order, ...]).decode
        self._symbols: set[str] = set()
        self._last: tuple[_Snapshot, Snapshot] | None = None  # the structs and the snapshot
        # for each account of the snapshot last read, the previous line's account it equals
        # but for its time and money, or None (`origins`)
        self._origins: list[Account | None] | None = None
        self._warned = False  # convert() said once that it failed unexpectedly

    def read(self, line: str | bytes) -> Snapshot | None:
        """The snapshot of one timeline line (its text, or its UTF-8 bytes), equal to what the
        strict path reads from its text; None when the line must be read by the strict path
        (which then accepts it or says why not)."""
        self._origins = None
        try:
            raw = self._decoder.decode(line)
        except (msgspec.MsgspecError, ValueError, RecursionError):
            return None
        try:
            snapshot = self._snapshot(raw, self._last)
        except _Fallback:
            return None
        self._last = (raw, snapshot)
        return snapshot

    def convert(self, data: Any) -> Snapshot | None:
        """The snapshot of a broker adapter's data (what `Snapshot.model_validate` takes: plain
        Python values as decoded JSON gives them, lists or tuples, times as ISO text), equal
        to what model_validate gives for it; None when the data must be validated by
        model_validate (which then accepts it or says why not). The same checks as `read`, so
        it refuses more than model_validate (a symbol the catalog does not know, a data time
        after the snapshot's, a datetime object rather than its text): that only costs time.
        Objects of the previous snapshot it converted are reused where unchanged, as `read`
        reuses the previous line's."""
        self._origins = None
        try:
            raw = msgspec.convert(data, _Snapshot)
        except (msgspec.MsgspecError, ValueError, TypeError, RecursionError):
            return None
        try:
            snapshot = self._snapshot(raw, self._last)
        except _Fallback:
            return None
        except Exception:  # a live tick must go on: pydantic reads the data instead
            if not self._warned:
                self._warned = True
                log.warning("the fast snapshot reader failed on a broker's data; pydantic "
                            "reads it instead", exc_info=True)
            return None
        self._last = (raw, snapshot)
        return snapshot

    @property
    def origins(self) -> list[Account | None] | None:
        """For each account of the snapshot `read` (`convert`) returned last, in order: the
        account at its place in the snapshot before, when it differs from that one at most in
        its time (`updated_at`) and money (`balance`, `realized_pnl`, `unrealized_pnl`),
        each given on both or left out on both, the zeros' signs of all else alike (the very
        account, when nothing differs); else None. None when the last line was declined, or
        gave no accounts. What `Engine.evaluate` takes as `origins`."""
        return self._origins

    def _snapshot(self, raw: _Snapshot, last: tuple[_Snapshot, Snapshot] | None) -> Snapshot:
        values, given = _snapshot_values(raw)
        moment = values["time"] = _time(raw.time)
        if raw.quotes is not UNSET:
            values["quotes"] = self._quotes(raw.quotes, last)
        if raw.accounts:
            values["accounts"] = self._accounts(raw.accounts, last, moment)
        return _build(Snapshot, values, given)

    def _quotes(self, raw: dict[str, _Quote],
                last: tuple[_Snapshot, Snapshot] | None) -> dict[str, Quote]:
        """The quotes, each one unchanged since the previous line reused."""
        old_raw: dict[str, _Quote] = {}
        old: dict[str, Quote] = {}
        if last is not None and last[0].quotes:
            old_raw, old = last[0].quotes, last[1].quotes
        symbols = self._symbols
        quotes: dict[str, Quote] = {}
        for name, quote in raw.items():
            if type(name) is not str:  # _plain_text, inlined
                raise _Fallback
            previous = old_raw.get(name)
            if previous is not None and previous == quote and _quote_alike(quote, previous):
                quotes[name] = old[name]
                continue
            if name not in symbols:
                self._symbol(name)
            quotes[name] = _build(Quote, *_quote_values(quote))
        return quotes

    def _accounts(self, raw: tuple[_Account, ...], last: tuple[_Snapshot, Snapshot] | None,
                  moment: datetime) -> tuple[Account, ...]:
        """The accounts, each one unchanged at its place reused, and check_snapshot's checks
        of them."""
        old_raw: tuple[_Account, ...] = ()
        old: tuple[Account, ...] = ()
        if last is not None and last[0].accounts:
            old_raw, old = last[0].accounts, last[1].accounts
        # Ids, roles and leaders as on the previous line (which passed the checks): the
        # duplicate-id and leader checks would pass again.
        same_ids = len(raw) == len(old_raw)
        reusable = min(len(raw), len(old_raw))
        accounts = []
        origins: list[Account | None] = []
        for i, struct in enumerate(raw):
            if i < reusable:
                previous = old_raw[i]
                # the same account, or the same with its time or money moved: most of them
                account = _moved(struct, previous, old[i])
                if account is not None:
                    origins.append(old[i])
                else:
                    origins.append(None)
                    account = self._account(struct, previous, old[i])
                    if same_ids and (struct.id != previous.id or struct.role != previous.role
                                     or struct.leader != previous.leader):
                        same_ids = False
            else:
                account = self._account(struct, None, None)
                origins.append(None)
            # a reused account's time too: this line's may be earlier than the previous one's
            if struct.updated_at and account.updated_at is not None and \
                    account.updated_at > moment:
                raise _Fallback
            accounts.append(account)
        if not same_ids:
            self._check_ids(raw)
        self._origins = origins
        return tuple(accounts)

    def _account(self, raw: _Account, old_raw: _Account | None, old: Account | None) -> Account:
        """A changed (or new) account; its positions and orders reused where unchanged."""
        _plain_text(raw.id, raw.leader, raw.firm)
        if not raw.id.isascii():
            try:
                raw.id.encode()
            except UnicodeEncodeError:  # a lone surrogate (only from Python data): the
                raise _Fallback from None  # model refuses it in a field with a length bound
        values, given = _account_values(raw)
        if raw.role == "leader" and values["leader"] is not None:
            raise _Fallback  # the model's own validator refuses it
        if (updated_at := values["updated_at"]) is not None:
            values["updated_at"] = _time(updated_at)
        if (positions := raw.positions) is not UNSET:
            values["positions"] = self._records(
                positions, UNSET if old_raw is None else old_raw.positions,
                None if old is None else old.positions, self._decode_positions,
                _positions_alike, self._positions)
        if (orders := raw.orders) is not UNSET:
            values["orders"] = self._records(
                orders, UNSET if old_raw is None else old_raw.orders,
                None if old is None else old.orders, self._decode_orders, _orders_alike,
                self._orders)
        if raw.overnight:
            for text in raw.overnight:
                _plain_text(text)
                if text not in self._symbols:
                    self._symbol(text)
        return _build(Account, values, given)

    def _records(self, given: Any, old_given: Any, old: tuple[Any, ...] | None,
                 decode: Callable[[Any], tuple[Any, ...]], alike: Callable[[Any, Any], bool],
                 build: Callable[[Any, Any, Any], tuple[Any, ...]]) -> tuple[Any, ...]:
        """A changed account's positions (orders): `given` as the line has them (its text,
        msgspec.Raw, or from `convert` structs), the previous line's account's at its place
        (`old_given`, `old`: its models; None for a new account). The previous ones when the
        same (the same text, or equal structs whose zeros agree in sign); else decoded and
        built (`build`: _positions, _orders), each one unchanged at its place reused."""
        if old is not None and old_given == given and \
                (type(given) is not tuple or alike(given, old_given)):
            return old
        try:
            structs = decode(given) if type(given) is not tuple else given
            old_structs = decode(old_given) if type(old_given) is Raw else old_given
        except (msgspec.MsgspecError, ValueError, RecursionError):
            raise _Fallback from None  # the strict path says what is wrong with them
        if not structs:
            return structs  # (), as the model holds it
        if old is None or old_structs is UNSET:
            old, old_structs = (), ()
        return build(structs, old_structs, old)

    def _positions(self, raw: tuple[_Position, ...], old_raw: tuple[_Position, ...],
                   old: tuple[Position, ...]) -> tuple[Position, ...]:
        """The positions of a changed account, each one unchanged at its place reused."""
        positions = []
        for i, struct in enumerate(raw):
            if i < len(old_raw) and old_raw[i] == struct and _position_alike(struct, old_raw[i]):
                positions.append(old[i])
                continue
            _plain_text(struct.instrument)
            if struct.instrument not in self._symbols:
                self._symbol(struct.instrument)
            values, given = _position_values(struct)
            if (opened_at := values["opened_at"]) is not None:
                values["opened_at"] = _time(opened_at)
            positions.append(_build(Position, values, given))
        return tuple(positions)

    def _orders(self, raw: tuple[_Order, ...], old_raw: tuple[_Order, ...],
                old: tuple[Order, ...]) -> tuple[Order, ...]:
        """The orders of a changed account, each one unchanged at its place reused."""
        orders = []
        for i, struct in enumerate(raw):
            if i < len(old_raw) and old_raw[i] == struct and _order_alike(struct, old_raw[i]):
                orders.append(old[i])
                continue
            _plain_text(struct.id, struct.instrument)
            if struct.instrument not in self._symbols:
                self._symbol(struct.instrument)
            orders.append(_build(Order, *_order_values(struct)))
        return tuple(orders)

    # --- snapshots.check_snapshot's conditions, without the messages -----------------------

    def _symbol(self, text: str) -> None:
        try:
            self.catalog.parse(text)
        except InstrumentError:
            raise _Fallback from None
        self._symbols.add(text)

    @staticmethod
    def _check_ids(raw: tuple[_Account, ...]) -> None:
        """No duplicate id; each follower's leader is a leader account (or, unnamed, the only
        one). The updated_at check is `_accounts`' own, on every line."""
        if len({a.id for a in raw}) != len(raw):
            raise _Fallback  # a duplicate id
        leaders = [a.id for a in raw if a.role == "leader"]
        for struct in raw:
            if struct.role == "follower":
                if struct.leader is UNSET or struct.leader is None:
                    if len(leaders) != 1:
                        raise _Fallback
                elif struct.leader not in leaders:
                    raise _Fallback
