"""NinjaTrader 8 through its Automated Trading Interface: order instruction files (OIF) in,
update files out, and optionally the ATI TCP socket for account cash and quotes.

    incoming/   we drop one `oif_<seq>_<uuid>.txt` per command (staged outside, then
                `os.replace`d in, so NinjaTrader never sees a half-written file)
    outgoing/   NinjaTrader writes `<Account>_<OrderId>.txt` (STATE;FILLED;AVG),
                `<Instrument> <Exchange>_<Account>_Position.txt` (LONG|SHORT|FLAT;QTY;AVG) and
                `<Connection>.txt` (CONNECTED|DISCONNECTED), overwriting them in place
    36973/tcp   the socket NtDirect.dll speaks: `CashValue|<acct>`, `RealizedPnL|<acct>` values
                and quotes (optional: `ati_port: 0` runs on files alone)

What the adapter cannot know: the files carry no cash and no P&L. Without the ATI socket the
balance is `AccountSpec.size` (else 0) and realized P&L is 0, so money limits cannot be evaluated
from this broker; unrealized P&L exists nowhere in the ATI: it is worked out from the positions
and the ATI socket's quotes (`base.mark_to_market`), and is 0 without them. NinjaTrader writes
files only on change, so a file's age says nothing: an account is fresh while our poll of
outgoing/ succeeds and the connection file says CONNECTED. Orders NinjaTrader placed for someone
else (the copier, a click) have order files without instrument, side or quantity: they are not in
snapshots, and only `cancel_orders(account, None)` cancels them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from copilink_rules.errors import BrokerUnavailable, InstrumentError, OrderRejected
from copilink_rules.instruments import Instrument, cme_name, default_catalog, ninjatrader_name
from copilink_rules.model import MAX_AMOUNT, MAX_QTY, Snapshot, finite_or_none

from .base import (
    AccountSpec,
    BrokerAnswer,
    Health,
    HealthState,
    OrderReport,
    OrderState,
    Side,
    SnapshotBuilder,
    mark_to_market,
)

log = logging.getLogger(__name__)

STAGING = "copilink"  # our own subfolder of the NinjaTrader folder: temp OIFs and the ledger
LEDGER = "sent.jsonl"
FINAL: dict[str, OrderState] = {"FILLED": "filled", "CANCELLED": "cancelled",
                                "CANCELED": "cancelled", "REJECTED": "rejected"}
# NT8 OrderState names as the files spell them; miasmos expects PARTIALLYFILLED, the enum
# says PartFilled: both are read.
WORKING = {"ACCEPTED", "WORKING", "PARTFILLED", "PARTIALLYFILLED", "TRIGGERPENDING", "SUSPENDED"}
PENDING = {"SUBMITTED", "INITIALIZED", "ACCEPTEDBYRISK", "CHANGESUBMITTED", "CHANGEPENDING",
           "CANCELSUBMITTED", "CANCELPENDING", "UNKNOWN"}
# Characters that cannot go into an OIF field or a Windows file name
_UNSAFE = re.compile(r'[;\r\n\x00<>:"/\\|?*]')


class Settings(BaseModel):
    """`broker.settings` for `ninjatrader`."""

    model_config = ConfigDict(extra="forbid")

    folder: Path | None = None  # None: Documents/NinjaTrader 8 (OneDrive too, on Windows)
    ati_host: str = "127.0.0.1"
    ati_port: int = Field(default=36973, ge=0, le=65535)  # 0: files only
    connection: str | None = None  # name of the connection file in outgoing/; None: any
    order_file_timeout: float = Field(default=10.0, gt=0, le=600)
    poll_interval: float = Field(default=0.2, gt=0, le=5)
    # how long a command waits for NinjaTrader's first word before answering "accepted"
    confirm_wait: float = Field(default=1.0, ge=0, le=30)
    ati_retry: float = Field(default=10.0, gt=0, le=300)  # the DLL retries every 10 s too
    # read NinjaTrader's log/ folder for the text of a rejection (the order file has none)
    log_reasons: bool = True


# --- the NinjaTrader folder ---------------------------------------------------------------------


def default_folders(platform: str | None = None,
                    environ: Mapping[str, str] | None = None) -> list[Path]:
    """Where NinjaTrader 8 keeps its user folder, most likely first."""
    platform = sys.platform if platform is None else platform
    env = os.environ if environ is None else environ
    if not platform.startswith("win"):
        return [Path.home() / "Documents" / "NinjaTrader 8"]
    profile = Path(env["USERPROFILE"]) if env.get("USERPROFILE") else Path.home()
    found = [profile / "Documents" / "NinjaTrader 8",
             profile / "OneDrive" / "Documents" / "NinjaTrader 8"]
    if env.get("OneDrive"):  # a business OneDrive is not always under the profile
        found.append(Path(env["OneDrive"]) / "Documents" / "NinjaTrader 8")
    return list(dict.fromkeys(found))


def find_folder(configured: Path | None, platform: str | None = None,
                environ: Mapping[str, str] | None = None) -> Path:
    """The NinjaTrader folder to use; BrokerUnavailable naming every path tried."""
    tried = [configured] if configured is not None else default_folders(platform, environ)
    for path in tried:
        if path.is_dir():
            return path
    names = ", ".join(str(p) for p in tried)
    raise BrokerUnavailable(f"no NinjaTrader 8 folder found (tried {names}); set "
                            "broker.settings.folder to the folder holding incoming/ and outgoing/")


# --- what the outgoing files say ---------------------------------------------------------------


@dataclass(frozen=True)
class _PosFile:
    account: str
    symbol: str
    qty: int  # signed
    avg: float
    mtime: float


@dataclass(frozen=True)
class _OrderFile:
    account: str
    order_id: str
    state: str  # the UPPERCASE word
    filled: int
    avg: float | None
    mtime: float


@dataclass(frozen=True)
class _ConnFile:
    name: str
    up: bool


@dataclass(frozen=True)
class _BadFile:
    """A file we could not read; `last` is its previous good content, still in use."""

    account: str | None
    last: _PosFile | _OrderFile | _ConnFile | None


@dataclass(frozen=True)
class _Ignored:
    """Another account's file, or none of the three kinds: cached so it is read once."""


_Parsed = _PosFile | _OrderFile | _ConnFile | _BadFile | _Ignored


@dataclass
class _Cached:
    key: tuple[int, int]  # (mtime_ns, size): unchanged files are not read again
    parsed: _Parsed


@dataclass
class _Sent:
    """A command we sent, as written to the ledger (so a restarted process knows its tags)."""

    tag: str
    kind: Literal["place", "close", "cancel"]
    account: str
    sent: float  # epoch seconds
    symbols: list[str] = field(default_factory=list)
    side: str = ""
    qty: int = 0
    type: str = ""
    stop: float | None = None
    targets: list[str] = field(default_factory=list)


def _number(text: str) -> float | None:
    text = text.strip()
    if "," in text and "." not in text:  # a comma-decimal locale
        text = text.replace(",", ".")
    return finite_or_none(text)


def _count(text: str) -> int | None:
    value = _number(text)
    if value is None or not value.is_integer() or not 0 <= value <= MAX_QTY:
        return None
    return int(value)


# --- the adapter -------------------------------------------------------------------------------


class NinjaTraderBroker:
    """NinjaTrader 8 over ATI files (and the ATI socket when `ati_port` is set)."""

    name = "ninjatrader"

    def __init__(self, settings: Settings, accounts: list[AccountSpec],
                 folder: Path | None = None) -> None:
        for spec in accounts:
            if not spec.id or _UNSAFE.search(spec.id):
                raise ValueError(f"account {spec.id!r} cannot be written into an OIF line")
        self.settings = settings
        self.specs = {a.id: a for a in accounts}
        # longest first: `Sim_VWAP_Pullback_v2` must win over `Pullback_v2` in a file name
        self._by_length = sorted(self.specs, key=len, reverse=True)
        self._lower = {a.lower(): a for a in self.specs}
        self._catalog = default_catalog()
        self._build = SnapshotBuilder(self._catalog)  # snapshot(): the fast reader, or pydantic
        self._folder = folder
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._cache: dict[str, _Cached] = {}
        self._positions: dict[str, dict[str, tuple[int, float]]] = {a: {} for a in self.specs}
        self._orders: dict[tuple[str, str], _OrderFile] = {}
        self._conn: dict[str, bool] = {}
        self._updated: dict[str, datetime] = {}
        self._connected: dict[str, bool] = dict.fromkeys(self.specs, False)
        self._balance: dict[str, float] = {}
        self._realized: dict[str, float] = {}
        self._quotes: dict[str, dict[str, float | None]] = {}
        self._sent: dict[str, _Sent] = {}
        self._final: dict[str, OrderReport] = {}
        self._reasons: dict[str, str] = {}
        self._logged: set[str] = set()
        self._health = Health("disconnected", "not connected yet")
        self._seq = 0
        self._poll_lock = threading.Lock()  # the feed thread and a command may both poll
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ati: _AtiClient | None = None

    # --- paths and lifecycle ---------------------------------------------------------------

    @property
    def folder(self) -> Path:
        if self._folder is None:
            raise BrokerUnavailable("NinjaTrader adapter is not connected")
        return self._folder

    def connect(self, timeout: float = 10.0) -> None:
        if self._folder is None:
            self._folder = find_folder(self.settings.folder)
        for sub in ("incoming", "outgoing"):
            if not (self.folder / sub).is_dir():
                raise BrokerUnavailable(f"{self.folder / sub} does not exist: is ATI enabled in "
                                        "NinjaTrader (Tools > Options > Automated Trading "
                                        "Interface)?")
        try:
            (self.folder / STAGING).mkdir(exist_ok=True)
        except OSError as exc:
            raise BrokerUnavailable(f"cannot create {self.folder / STAGING}: "
                                    f"{exc.strerror}") from None
        self._load_ledger()
        self._poll()
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._poll_loop, daemon=True,
                                            name="ninjatrader-files")
            self._thread.start()
        if self.settings.ati_port and self._ati is None:
            self._ati = _AtiClient(self.settings.ati_host, self.settings.ati_port,
                                   self.settings.ati_retry, self._on_value, self._on_data)
            self._ati.start()
            if not self._ati.up.wait(min(timeout, 3.0)):
                log.warning("NinjaTrader ATI socket %s:%d not reachable yet (%s): balance "
                            "stays unknown until it is", self.settings.ati_host,
                            self.settings.ati_port, self._ati.detail)

    def health(self) -> Health:
        with self._lock:
            health = self._health
        if health.ok and self._ati is not None and not self._ati.up.is_set():
            return Health(health.state, f"files ok; ATI socket down ({self._ati.detail})",
                          health.since)
        return health

    def close(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5)
        ati, self._ati = self._ati, None
        if ati is not None:
            ati.stop()
        with self._lock:
            self._set_health("disconnected", "closed")

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.settings.poll_interval):
            try:
                self._poll()
            except Exception:  # the feed thread must outlive one bad poll
                log.exception("NinjaTrader: poll of outgoing/ failed")

    def _set_health(self, state: HealthState, detail: str) -> None:
        if (state, detail) != (self._health.state, self._health.detail):
            since = self._health.since if state == self._health.state else datetime.now(UTC)
            self._health = Health(state, detail, since)

    def _once(self, key: str, message: str, *args: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(message, *args)

    # --- reading outgoing/ -------------------------------------------------------------------

    def _poll(self) -> None:
        with self._poll_lock:
            self._poll_once()

    def _poll_once(self) -> None:
        outgoing = self.folder / "outgoing"
        now = datetime.now(UTC)
        try:
            entries = list(os.scandir(outgoing))
        except OSError as exc:
            with self._cond:
                self._connected = dict.fromkeys(self.specs, False)
                self._set_health("disconnected", f"cannot read {outgoing}: {exc.strerror}")
                self._cond.notify_all()
            return
        fresh: dict[str, _Cached] = {}
        for entry in entries:
            if not entry.name.lower().endswith(".txt"):
                continue
            try:
                stat = entry.stat()
            except OSError:  # removed between the listing and now
                continue
            key = (stat.st_mtime_ns, stat.st_size)
            cached = self._cache.get(entry.name)
            if cached is not None and cached.key == key:
                fresh[entry.name] = cached
                continue
            previous = cached.parsed if cached is not None else None
            parsed = self._read(entry.name, Path(entry.path), stat.st_mtime, previous)
            if parsed is None:  # empty or locked: no news, keep what it said before
                if cached is not None:
                    fresh[entry.name] = cached
                continue
            fresh[entry.name] = _Cached(key, parsed)
        with self._cond:
            self._cache = fresh
            self._rebuild(now)
            self._cond.notify_all()

    def _read(self, name: str, path: Path, mtime: float,
              previous: _Parsed | None) -> _Parsed | None:
        try:
            text = path.read_bytes().decode("utf-8-sig").strip()
        except (OSError, UnicodeDecodeError):
            return None
        if not text:
            return None
        last = previous.last if isinstance(previous, _BadFile) else previous
        if isinstance(last, _Ignored):
            last = None
        stem = name[:-4]
        lower = name.lower()
        if lower.endswith("_position.txt"):
            account = self._position_account(lower)
            instrument = None if account is None else self._instrument_of(
                stem[: -len("_position") - len(account) - 1])
            if account is None or instrument is None:
                return _Ignored()  # another account's, or a contract not in the catalog
            parsed = self._parse_position(instrument, account, text, mtime)
            if parsed is None:
                self._once(f"bad:{name}", "NinjaTrader: cannot read position file "
                           "%r (%r); keeping its previous content", name, text[:60])
                return _BadFile(account, last)
            return parsed
        word = text.upper()
        if word in ("CONNECTED", "DISCONNECTED"):
            return _ConnFile(stem, word == "CONNECTED")
        account = self._order_account(lower)
        if account is None:
            return _Ignored()
        parts = text.split(";")
        filled = _count(parts[1]) if len(parts) == 3 else None
        state = parts[0].strip().upper()
        if filled is None or (state not in FINAL and state not in WORKING | PENDING):
            self._once(f"bad:{name}", "NinjaTrader: cannot read order file %r (%r)",
                       name, text[:60])
            return _BadFile(account, last)
        return _OrderFile(account, stem[len(account) + 1:], state, filled, _number(parts[2]),
                          mtime)

    def _position_account(self, lower_name: str) -> str | None:
        for account in self._by_length:
            suffix = f"_{account.lower()}_position.txt"
            if lower_name.endswith(suffix) and len(lower_name) > len(suffix):
                return account
        return None

    def _order_account(self, lower_name: str) -> str | None:
        for account in self._by_length:
            prefix = f"{account.lower()}_"
            if lower_name.startswith(prefix) and len(lower_name) > len(prefix) + 4:
                return account
        return None

    def _parse_position(self, instrument: Instrument, account: str, text: str,
                        mtime: float) -> _PosFile | None:
        parts = text.split(";")
        if len(parts) != 3:
            return None
        side, qty, avg = parts[0].strip().upper(), _count(parts[1]), _number(parts[2])
        if side == "FLAT":
            return _PosFile(account, cme_name(instrument), 0, 0.0, mtime)
        if side not in ("LONG", "SHORT") or qty is None or avg is None or \
                abs(avg) > MAX_AMOUNT:
            return None  # a NaN price is missing data, never a number in the snapshot
        return _PosFile(account, cme_name(instrument), qty if side == "LONG" else -qty, avg,
                        mtime)

    def _instrument_of(self, prefix: str) -> Instrument | None:
        """`NQ 06-24 Globex`, `MNQ SEP26 Default`, `MNQM6 Globex` -> the contract."""
        head = prefix.rsplit(" ", 1)[0] if " " in prefix else prefix
        for candidate in (head, prefix):
            try:
                instrument = self._catalog.parse(candidate)
            except InstrumentError:
                continue
            if instrument.month is not None:
                return instrument
        self._once(f"instr:{prefix}", "NinjaTrader: position file for unknown instrument %r "
                   "ignored (add it to the instrument catalog)", prefix)
        return None

    def _rebuild(self, now: datetime) -> None:
        positions: dict[str, dict[str, tuple[int, float, float]]] = {a: {} for a in self.specs}
        orders: dict[tuple[str, str], _OrderFile] = {}
        conn: dict[str, bool] = {}
        blocked: set[str] = set()
        for cached in self._cache.values():
            parsed: _Parsed | None = cached.parsed
            if isinstance(parsed, _BadFile):
                if parsed.account is not None:
                    blocked.add(parsed.account)
                parsed = parsed.last
            if isinstance(parsed, _PosFile):
                book = positions[parsed.account]
                held = book.get(parsed.symbol)
                if held is None or held[2] <= parsed.mtime:  # two names, one contract
                    book[parsed.symbol] = (parsed.qty, parsed.avg, parsed.mtime)
            elif isinstance(parsed, _OrderFile):
                orders[(parsed.account.lower(), parsed.order_id.lower())] = parsed
            elif isinstance(parsed, _ConnFile):
                conn[parsed.name.lower()] = parsed.up
        self._positions = {a: {s: (q, p) for s, (q, p, _) in book.items() if q}
                           for a, book in positions.items()}
        self._orders = orders
        self._conn = conn
        up, why = self._connection_up()
        for account in self.specs:
            self._connected[account] = up
            if up and account not in blocked:
                self._updated[account] = now
        self._set_health("connected" if up else "disconnected", why)
        if self._ati is not None:
            self._ati.subscribe({ninjatrader_name(self._catalog.parse(s))
                                 for book in self._positions.values() for s in book})

    def _connection_up(self) -> tuple[bool, str]:
        wanted = self.settings.connection
        if wanted is not None:
            state = self._conn.get(wanted.lower())
            if state is None:
                return False, f"no connection file {wanted}.txt in outgoing/"
            return state, f"connection {wanted!r} is {'CONNECTED' if state else 'DISCONNECTED'}"
        if not self._conn:
            return False, "no connection file in outgoing/ (is NinjaTrader connected?)"
        if any(self._conn.values()):
            return True, "connected"
        return False, f"every connection is DISCONNECTED ({', '.join(sorted(self._conn))})"

    # --- the ATI socket ----------------------------------------------------------------------

    def _watched(self, name: str) -> str | None:
        return self._lower.get(name.strip().lower())

    def _on_value(self, key: str, value: str) -> None:
        kind, _, rest = key.partition("|")
        if kind not in ("CashValue", "RealizedPnL"):
            return
        with self._lock:
            account = self._watched(rest)
            if account is None:
                return
            number = _number(value)
            target = self._balance if kind == "CashValue" else self._realized
            if number is None or abs(number) > MAX_AMOUNT:
                target.pop(account, None)  # a NaN is unknown, never a number
            else:
                target[account] = number

    def _on_data(self, kind: int, instrument: str, price: float | None) -> None:
        field_name = {0: "ask", 1: "bid", 2: "last"}.get(kind)
        if field_name is None:
            return
        try:
            symbol = cme_name(self._catalog.parse(instrument))
        except InstrumentError:
            return
        with self._lock:
            self._quotes.setdefault(symbol, {})[field_name] = (
                price if price is not None and abs(price) <= MAX_AMOUNT else None)

    # --- AccountFeed -------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        with self._lock:
            now = time.time()
            accounts = []
            for spec in self.specs.values():
                updated = self._updated.get(spec.id)
                data: dict[str, Any] = {
                    **spec.snapshot_fields(),
                    "connected": self._connected[spec.id] and updated is not None,
                    "updated_at": updated.isoformat() if updated else None,
                    "balance": self._balance.get(spec.id, spec.size or 0.0),
                    "realized_pnl": self._realized.get(spec.id, 0.0),
                    "positions": [{"instrument": s, "qty": q, "avg_price": p}
                                  for s, (q, p) in sorted(self._positions[spec.id].items())],
                    "orders": self._working_orders(spec.id, now),
                }
                accounts.append(data)
            quotes = {s: q for s, q in self._quotes.items() if any(v is not None
                                                                     for v in q.values())}
            return mark_to_market(self._build({
                "time": datetime.now(UTC).isoformat(), "quotes": quotes,
                "accounts": accounts}))

    def _working_orders(self, account: str, now: float) -> list[dict[str, Any]]:
        out = []
        for sent in self._sent.values():
            if sent.kind != "place" or sent.account != account:
                continue
            found = self._orders.get((account.lower(), sent.tag.lower()))
            if found is None:
                if now - sent.sent > self.settings.order_file_timeout:
                    continue
                status, remaining = "pending", sent.qty
            elif found.state in FINAL:
                continue
            else:
                status = "working" if found.state in WORKING else "pending"
                remaining = sent.qty - found.filled
            if remaining <= 0:
                continue
            out.append({"id": sent.tag, "instrument": sent.symbols[0], "side": sent.side,
                        "qty": remaining, "type": sent.type, "stop_price": sent.stop,
                        "status": status})
        return out

    def contracts(self) -> dict[str, str]:
        return {a.id: a.instrument for a in self.specs.values()
                if a.role == "follower" and a.instrument}

    # --- OrderPort ---------------------------------------------------------------------------

    def close_position(self, account: str, instrument: str | None, tag: str) -> BrokerAnswer:
        account = self._ready(account, tag)
        with self._lock:
            if instrument is not None:
                targets = [self._parse(instrument)]
            else:
                symbols = set(self._positions[account]) | {
                    s.symbols[0] for s in self._sent.values()
                    if s.kind == "place" and s.account == account and self._is_working(s)}
                targets = [self._catalog.parse(s) for s in sorted(symbols)]
        lines = [f"CLOSEPOSITION;{account};{ninjatrader_name(i)};;;;;;;;;;" for i in targets]
        self._send(lines, _Sent(tag, "close", account, time.time(),
                                symbols=[cme_name(i) for i in targets]))
        return self._await(tag, lambda report: report.final)

    def cancel_order(self, account: str, order_id: str, tag: str) -> BrokerAnswer:
        account = self._ready(account, tag)
        with self._lock:
            found = self._orders.get((account.lower(), order_id.lower()))
            sent = self._sent.get(order_id)
            ours = sent is not None and sent.kind == "place" and sent.account == account
            # CANCEL names no account: an id we never saw on this account could be anyone's
            if found is None and not ours:
                raise OrderRejected(f"no order {order_id!r} on account {account} in "
                                    "NinjaTrader's order files")
            if found is not None and found.state in FINAL:
                raise OrderRejected(f"order {order_id!r} is already "
                                    f"{FINAL[found.state]}")
        self._send([_cancel_line(order_id)],
                   _Sent(tag, "cancel", account, time.time(), targets=[order_id]))
        return self._await(tag, lambda report: report.final)

    def cancel_orders(self, account: str, instrument: str | None, tag: str) -> BrokerAnswer:
        account = self._ready(account, tag)
        with self._lock:
            family = self._parse(instrument).family if instrument is not None else None
            targets = []
            for sent in self._sent.values():
                if sent.kind == "place" and sent.account == account and \
                        self._is_working(sent) and (
                        family is None or
                        self._catalog.parse(sent.symbols[0]).family == family):
                    targets.append(sent.tag)
            if family is None:  # someone else's orders: their instrument is unknown
                ours = {t.lower() for t in targets}
                targets += [o.order_id for (a, i), o in sorted(self._orders.items())
                            if a == account.lower() and i not in ours and
                            o.state not in FINAL and o.order_id not in self._sent]
        self._send([_cancel_line(t) for t in targets],
                   _Sent(tag, "cancel", account, time.time(), targets=targets))
        return self._await(tag, lambda report: report.final)

    def place_order(self, account: str, instrument: str, side: Side, qty: int,
                    order_type: Literal["market", "stop"], tag: str,
                    stop_price: float | None = None) -> BrokerAnswer:
        account = self._ready(account, tag)
        target = self._parse(instrument)
        if side not in ("buy", "sell") or isinstance(qty, bool) or not isinstance(qty, int) \
                or not 0 < qty <= MAX_QTY:
            raise OrderRejected(f"invalid order: {side} {qty!r}")
        stop = finite_or_none(stop_price) if order_type == "stop" else None
        if order_type not in ("market", "stop") or (order_type == "stop" and (
                stop is None or stop <= 0)):
            raise OrderRejected(f"invalid {order_type} order: stop price {stop_price!r}")
        with self._lock:
            if tag in self._sent or any(i == tag.lower() for _, i in self._orders):
                raise OrderRejected(f"tag {tag!r} already used: NinjaTrader order ids must be "
                                    "unique")
        # NT8 drops `STOP` without a trace; STOPMARKET is the order type it accepts
        kind, tif = ("STOPMARKET", "GTC") if order_type == "stop" else ("MARKET", "DAY")
        line = (f"PLACE;{account};{ninjatrader_name(target)};{side.upper()};{qty};{kind};0;"
                f"{_price(stop) if stop is not None else 0};{tif};;{tag};;")
        self._send([line], _Sent(tag, "place", account, time.time(), [cme_name(target)],
                                 side, qty, order_type, stop))

        def answered(report: OrderReport) -> bool:
            state = self._order_state(account, tag)
            return report.final or (order_type == "stop" and state in WORKING)

        return self._await(tag, answered)

    def find_tag(self, tag: str) -> OrderReport | None:
        with self._lock:
            return self._report(tag)

    # --- commands: checks, sending, answers --------------------------------------------------

    def _ready(self, account: str, tag: str) -> str:
        """The watched account's name; raises unless a command can go to NinjaTrader now."""
        if _UNSAFE.search(tag) or not tag:
            raise OrderRejected(f"tag {tag!r} cannot be a NinjaTrader order id")
        known = self._watched(account)
        if known is None:
            raise OrderRejected(f"account {account!r} is not watched by this adapter")
        folder = self.folder
        if not (folder / "incoming").is_dir():
            raise BrokerUnavailable(f"{folder / 'incoming'} is gone")
        self._poll()  # the connection file as it is now, not as of the last poll
        with self._lock:
            up, why = self._connection_up()
        if not up:
            raise BrokerUnavailable(f"NinjaTrader is not connected: {why}")
        return known

    def _parse(self, instrument: str) -> Instrument:
        try:
            parsed = self._catalog.parse(instrument)
        except InstrumentError as exc:
            raise OrderRejected(str(exc)) from None
        if parsed.month is None:
            raise OrderRejected(f"instrument {instrument!r} has no expiry month")
        return parsed

    def _send(self, lines: list[str], sent: _Sent) -> None:
        """Record the command in the ledger, then move one OIF per line into incoming/."""
        staging = self.folder / STAGING
        with self._lock:
            self._sent[sent.tag] = sent
            try:
                with (staging / LEDGER).open("a", encoding="utf-8") as ledger:
                    ledger.write(json.dumps(asdict(sent)) + "\n")
            except OSError as exc:
                self._once("ledger", "NinjaTrader: cannot write %s (%s): a restart will not "
                           "know this process's closes and cancels", staging / LEDGER,
                           exc.strerror)
        for line in lines:
            with self._lock:
                self._seq += 1
                name = f"oif_{self._seq:06d}_{uuid.uuid4().hex}.txt"
            temp = staging / f"{name}.part"
            try:
                temp.write_text(line + "\r\n", encoding="ascii", newline="")
                os.replace(temp, self.folder / "incoming" / name)
            except (OSError, UnicodeEncodeError) as exc:
                with contextlib.suppress(OSError):
                    temp.unlink()
                raise BrokerUnavailable(f"cannot write an OIF into {self.folder / 'incoming'}: "
                                        f"{getattr(exc, 'strerror', None) or exc}") from None
            log.info("NinjaTrader <- %s", line)

    def _await(self, tag: str, done: Callable[[OrderReport], bool]) -> BrokerAnswer:
        deadline = time.monotonic() + self.settings.confirm_wait
        with self._cond:
            while True:
                report = self._report(tag)
                assert report is not None  # we just sent it
                left = deadline - time.monotonic()
                if done(report) or left <= 0:
                    break
                self._cond.wait(left)
        if report.state == "working":
            return BrokerAnswer("accepted", report.reason, report.order_id)
        if report.state == "cancelled":
            return BrokerAnswer("filled", report.reason, report.order_id)
        return report.answer()

    def _order_state(self, account: str, order_id: str) -> str | None:
        found = self._orders.get((account.lower(), order_id.lower()))
        return found.state if found is not None else None

    def _is_working(self, sent: _Sent) -> bool:
        state = self._order_state(sent.account, sent.tag)
        if state is None:
            return time.time() - sent.sent <= self.settings.order_file_timeout
        return state not in FINAL

    def _report(self, tag: str) -> OrderReport | None:
        if tag in self._final:
            return self._final[tag]
        sent = self._sent.get(tag)
        if sent is None:  # not ours, or sent before the ledger: its order file may say
            for (_, order_id), known in self._orders.items():
                if order_id == tag.lower():
                    return self._order_report(tag, known.account, None, known)
            return None
        late = time.time() - sent.sent > self.settings.order_file_timeout
        wait = f"{self.settings.order_file_timeout:g}s"
        if sent.kind == "place":
            found = self._orders.get((sent.account.lower(), tag.lower()))
            if found is None:
                if late:
                    return OrderReport(tag, "rejected", sent.account, sent.symbols[0], tag,
                                       reason=f"no order file from NinjaTrader within {wait} "
                                              "— is ATI enabled and the line valid?")
                return OrderReport(tag, "working", sent.account, sent.symbols[0], tag,
                                   reason="sent; no order file from NinjaTrader yet")
            report = self._order_report(tag, sent.account, sent.symbols[0], found, sent)
        elif sent.kind == "close":
            book = self._positions[sent.account]
            still = [s for s in sent.symbols if book.get(s, (0, 0.0))[0]]
            where = ", ".join(sent.symbols) or "no instrument"
            if not sent.symbols:
                report = OrderReport(tag, "filled", sent.account, reason="already flat")
            elif not still:
                report = OrderReport(tag, "filled", sent.account, where)
            elif late:
                report = OrderReport(tag, "rejected", sent.account, where,
                                     reason=f"{', '.join(still)} still held {wait} after "
                                            "CLOSEPOSITION — is ATI enabled and the line valid?")
            else:
                report = OrderReport(tag, "working", sent.account, where)
        else:
            states = {t: self._order_state(sent.account, t) for t in sent.targets}
            open_ = [t for t, s in states.items() if s not in FINAL]
            filled = [t for t, s in states.items() if s == "FILLED"]
            if not open_:
                reason = f"filled before the cancel: {', '.join(filled)}" if filled else \
                    ("" if sent.targets else "no working orders")
                report = OrderReport(tag, "filled", sent.account, reason=reason)
            elif late:
                report = OrderReport(tag, "rejected", sent.account,
                                     reason=f"NinjaTrader did not confirm the cancel of "
                                            f"{', '.join(open_)} within {wait}")
            else:
                report = OrderReport(tag, "working", sent.account)
        if report.final:
            self._final[tag] = report
        return report

    def _order_report(self, tag: str, account: str, symbol: str | None,
                      found: _OrderFile, sent: _Sent | None = None) -> OrderReport:
        state = FINAL.get(found.state, "working")
        reason = ""
        if state == "rejected":
            reason = self._reject_reason(found, sent)
        elif state == "working":
            reason = found.state.lower()
        return OrderReport(tag, state, account, symbol, found.order_id, found.filled, reason)

    def _reject_reason(self, found: _OrderFile, sent: _Sent | None) -> str:
        key = found.order_id.lower()
        if key not in self._reasons:
            text = _log_reason(self.folder / "log", found.order_id,
                               sent.sent if sent else found.mtime - 60) \
                if self.settings.log_reasons else None
            self._reasons[key] = f"NinjaTrader rejected the order: {text}" if text else (
                "NinjaTrader rejected the order and its order file gives no reason "
                "(see the Log tab in NinjaTrader's Control Center)")
        return self._reasons[key]

    def _load_ledger(self) -> None:
        path = self.folder / STAGING / LEDGER
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("NinjaTrader: cannot read %s (%s)", path, exc)
            return
        with self._lock:
            for line in lines:
                try:
                    sent = _Sent(**json.loads(line))
                except (ValueError, TypeError):
                    continue  # a line cut short by a crash
                if sent.account in self.specs:
                    self._sent.setdefault(sent.tag, sent)


def _cancel_line(order_id: str) -> str:
    return f"CANCEL;;;;;;;;;;{order_id};;"


def _price(value: float) -> str:
    """US decimal point, no exponent: `17900`, `17900.25`."""
    return f"{value:.8f}".rstrip("0").rstrip(".")


# the broker's own words first; NT's generic `Error='Order rejected'` only without them
_LOG_ERRORS = (re.compile(r"Native error='([^']+)'"), re.compile(r"Error='([^']+)'"))


def _log_reason(folder: Path, order_id: str, since: float) -> str | None:
    """The text of a rejection in NinjaTrader's log files (`log/log.<date>.<n>.txt`, lines
    `time|level|category|message`), for the line naming `order_id`; None when not found."""
    try:
        files = sorted((p for p in folder.glob("*.txt") if p.stat().st_mtime >= since - 5),
                       key=lambda p: p.stat().st_mtime, reverse=True)[:3]
    except OSError:
        return None
    token = re.compile(r"(?<![\w~-])" + re.escape(order_id) + r"(?![\w~-])", re.IGNORECASE)
    for path in files:
        try:
            with path.open("rb") as handle:
                handle.seek(max(0, path.stat().st_size - 256_000))
                lines = handle.read().decode("utf-8", "replace").splitlines()
        except OSError:
            continue
        for line in reversed(lines):
            if token.search(line) and "reject" in line.lower():
                found = [m[1] for m in (r.search(line) for r in _LOG_ERRORS) if m]
                text = found[0] if found else line.rsplit("|", 1)[-1]
                return text.strip()[:300] or None
    return None


# --- the ATI TCP socket ------------------------------------------------------------------------


class _ProtocolError(Exception):
    pass


class _AtiClient:
    """A client of NinjaTrader's ATI socket (the protocol NtDirect.dll speaks: tokens ended by
    0x00; `2 key value` Value and `1 type instrument price size time` Data messages), on its own
    asyncio loop in a daemon thread; reconnects every `retry` seconds."""

    FIELDS: ClassVar[dict[str, int]] = {"0": 1, "1": 5, "2": 2, "3": 1, "4": 2}

    def __init__(self, host: str, port: int, retry: float,
                 on_value: Callable[[str, str], None],
                 on_data: Callable[[int, str, float | None], None]) -> None:
        self.host, self.port, self.retry = host, port, retry
        self.on_value, self.on_data = on_value, on_data
        self.up = threading.Event()  # ATI=True received on the current connection
        self.detail = "not connected yet"
        self._want: set[str] = set()
        self._want_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="ninjatrader-ati")

    def start(self) -> None:
        self._thread.start()

    def subscribe(self, instruments: set[str]) -> None:
        with self._want_lock:
            self._want = set(instruments)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._ready.wait(5)
            loop, task = self._loop, self._task
            if loop is not None and task is not None:
                with contextlib.suppress(RuntimeError):  # the loop already ended
                    loop.call_soon_threadsafe(task.cancel)
            self._thread.join(timeout=5)
        self.up.clear()

    def _run(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._ready.set()
        where = f"ATI socket {self.host}:{self.port}"
        while True:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), timeout=5)
            except (OSError, TimeoutError) as exc:
                self.detail = f"{where}: {exc.strerror if isinstance(exc, OSError) else exc}"
                await asyncio.sleep(self.retry)
                continue
            try:
                await self._session(reader, writer)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    _ProtocolError) as exc:
                self.detail = f"{where}: {type(exc).__name__}: {exc}"
                log.warning("NinjaTrader %s lost (%s); retrying in %gs", where, exc, self.retry)
            finally:
                self.up.clear()
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            await asyncio.sleep(self.retry)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        subscribed: set[str] = set()
        while True:
            with self._want_lock:
                new = self._want - subscribed
            for name in sorted(new):
                writer.write(b"4\0" + name.encode("ascii", "replace") + b"\x001\0")
                subscribed.add(name)
            if new:
                await writer.drain()
            try:
                kind = await asyncio.wait_for(reader.readuntil(b"\0"), timeout=0.5)
            except TimeoutError:  # nothing to read: look for new subscriptions
                continue
            text = kind[:-1].decode("ascii", "replace")
            if text not in self.FIELDS:
                raise _ProtocolError(f"unknown message type {text[:20]!r}")
            fields = [(await reader.readuntil(b"\0"))[:-1].decode("utf-8", "replace")
                      for _ in range(self.FIELDS[text])]
            if text == "2":
                key, value = fields
                if key == "ATI":
                    if value.strip().lower() == "true":
                        self.detail = "connected"
                        self.up.set()
                    else:
                        self.up.clear()
                else:
                    self.on_value(key, value)
            elif text == "1":
                with contextlib.suppress(ValueError):
                    self.on_data(int(fields[0]), fields[1], finite_or_none(fields[2]))


def create(settings: Settings, accounts: list[AccountSpec]) -> NinjaTraderBroker:
    return NinjaTraderBroker(settings, accounts)
