"""A NinjaTrader 8 stand-in: a folder emulator (incoming/, outgoing/, log/) played by a thread,
and an optional ATI TCP socket server.

The folder thread does what NT8 does with order instruction files: it picks up `oif*.txt` from
incoming/, deletes them, and writes outgoing order, position and connection files with short
delays (SUBMITTED -> ACCEPTED -> WORKING -> FILLED; CANCEL -> CANCELPENDING -> CANCELLED). It
drops what NT8 drops (a line without 13 fields, order type STOP: no file at all) and records as
a violation anything a careful client must never do (STOP, CANCELALLORDERS, FLATTENEVERYTHING,
a file in incoming/ not named `oif*.txt`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from copilink_rules.instruments import MONTH_NAMES, cme_name, default_catalog, ninjatrader_name

CATALOG = default_catalog()
PRICE = 18000.0
FINAL = ("FILLED", "CANCELLED", "REJECTED")


@dataclass
class Naming:
    """How NinjaTrader names position files (every variant seen in the wild)."""

    word: Literal["Position", "position"] = "Position"
    exchange: Literal["Globex", "Default"] = "Globex"
    style: Literal["dash", "month", "cme"] = "dash"  # NQ 03-26 | NQ MAR26 | NQH6

    def position_file(self, symbol: str, account: str) -> str:
        instrument = CATALOG.parse(symbol)
        if self.style == "dash":
            name = ninjatrader_name(instrument)
        elif self.style == "month":
            assert instrument.month is not None
            assert instrument.year is not None
            name = f"{instrument.root} {MONTH_NAMES[instrument.month - 1]}{instrument.year % 100}"
        else:
            name = cme_name(instrument)
        return f"{name} {self.exchange}_{account}_{self.word}.txt"


@dataclass
class _Order:
    id: str
    account: str
    symbol: str
    side: str
    qty: int
    type: str
    state: str = "SUBMITTED"
    filled: int = 0


@dataclass
class NinjaTraderStandIn:
    """The NinjaTrader user folder and what NT8 would do with it."""

    root: Path
    accounts: list[str]
    connection: str = "Live"
    naming: Naming = field(default_factory=Naming)
    step: float = 0.02  # seconds between two states of an order
    partial_word: str = "PARTFILLED"  # NT8's enum; miasmos expects PARTIALLYFILLED
    write_log: bool = True  # put a rejection's reason in log/ as NT8 does
    received: list[dict[str, Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    names_seen: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for sub in ("incoming", "outgoing", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.positions: dict[tuple[str, str], tuple[int, float]] = {}
        self.orders: dict[str, _Order] = {}
        self._rejects: list[str] = []
        self._drops = 0
        self._hold = False
        self._processing = True
        self._partial = False
        self._lock = threading.RLock()
        self._timers: list[tuple[float, int, Any]] = []
        self._seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="nt-standin")

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def outgoing(self) -> Path:
        return self.root / "outgoing"

    # --- lifecycle and the world ----------------------------------------------------------

    def start(self) -> NinjaTraderStandIn:
        self.set_connected(True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def set_connected(self, up: bool) -> None:
        self._write(f"{self.connection}.txt", "CONNECTED" if up else "DISCONNECTED")

    def go_offline(self) -> None:
        """The connection drops and NinjaTrader stops processing instruction files."""
        with self._lock:
            self._processing = False
        self.set_connected(False)

    def set_position(self, account: str, symbol: str, qty: int, avg: float = PRICE) -> None:
        with self._lock:
            self.positions[(account, symbol)] = (qty, avg)
            self._write_position(account, symbol)

    def reject_next(self, reason: str) -> None:
        with self._lock:
            self._rejects.append(reason)

    def drop_next(self) -> None:
        """The next command is swallowed: no outgoing file at all (a line NT8 found invalid,
        or ATI switched off)."""
        with self._lock:
            self._drops += 1

    def hold_fills(self) -> None:
        with self._lock:
            self._hold = True

    def fill_in_parts(self) -> None:
        """Market orders fill one contract at a time, passing through the partial state."""
        with self._lock:
            self._partial = True

    def write_order_file(self, account: str, order_id: str, content: str) -> None:
        self._write(f"{account}_{order_id}.txt", content)

    # --- the folder thread -----------------------------------------------------------------

    def _write(self, name: str, content: str) -> None:
        # NT8 overwrites its files in place: a reader may see them empty for a moment
        with (self.outgoing / name).open("w", encoding="utf-8") as handle:
            handle.write(content)

    def _write_position(self, account: str, symbol: str) -> None:
        qty, avg = self.positions.get((account, symbol), (0, 0.0))
        side = "LONG" if qty > 0 else "SHORT" if qty < 0 else "FLAT"
        text = f"{side};{abs(qty)};{avg if qty else 0}"
        self._write(self.naming.position_file(symbol, account), text)

    def _later(self, delay: float, action: Any) -> None:
        self._seq += 1
        self._timers.append((time.monotonic() + delay, self._seq, action))

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            with self._lock:
                self._scan()
                now = time.monotonic()
                due = sorted(t for t in self._timers if t[0] <= now)
                self._timers = [t for t in self._timers if t[0] > now]
                for _, _, action in due:
                    action()

    def _scan(self) -> None:
        for entry in sorted(self.incoming.iterdir()):
            name = entry.name
            if name not in self.names_seen:
                self.names_seen.append(name)
                if not re.fullmatch(r"oif[^/\\]*\.txt", name, re.IGNORECASE):
                    self.violations.append(f"file {name!r} in incoming/ is not an oif*.txt")
            if not self._processing or not name.lower().startswith("oif"):
                continue  # NT8 logs `Unknown OIF file type` and leaves it
            try:
                text = entry.read_text(encoding="utf-8")
                entry.unlink()
            except OSError:
                continue
            for line in text.splitlines():
                if line.strip():
                    self._command(line.strip())

    def _command(self, line: str) -> None:
        self.lines.append(line)
        fields = line.split(";")
        command = fields[0].upper()
        if command in ("CANCELALLORDERS", "FLATTENEVERYTHING"):
            self.violations.append(f"{command} hits every account: {line!r}")
            return
        if len(fields) != 13:
            self.violations.append(f"{len(fields)} fields, NT8 wants 13: {line!r}")
            return
        if self._drops:
            self._drops -= 1
            if command == "PLACE":
                self._record_place(fields)
            return
        if command == "PLACE":
            self._place(fields)
        elif command == "CLOSEPOSITION":
            self._close(fields[1], fields[2])
        elif command == "CANCEL":
            self._cancel(fields[10])
        else:
            self.violations.append(f"unexpected command {line!r}")

    def _record_place(self, fields: list[str]) -> dict[str, Any]:
        kind = fields[5].upper()
        entry = {"kind": "place", "account": fields[1], "instrument": fields[2],
                 "side": fields[3].lower(), "qty": int(fields[4]),
                 "type": {"MARKET": "market", "STOPMARKET": "stop"}.get(kind, kind.lower()),
                 "stop_price": float(fields[7] or 0), "tif": fields[8],
                 "tag": fields[10], "order_id": fields[10]}
        self.received.append(entry)
        return entry

    def _place(self, fields: list[str]) -> None:
        entry = self._record_place(fields)
        if fields[5].upper() == "STOP":
            self.violations.append("order type STOP (NT8 drops it): " + ";".join(fields))
            return
        symbol = cme_name(CATALOG.parse(fields[2]))
        order_id = fields[10] or uuid.uuid4().hex
        order = _Order(order_id, fields[1], symbol, entry["side"], entry["qty"], entry["type"])
        self.orders[order_id] = order
        self._state(order, "SUBMITTED", 0)
        if self._rejects:
            reason = self._rejects.pop(0)
            self._later(self.step, lambda: self._reject(order, reason))
            return
        self._later(self.step, lambda: self._state(order, "ACCEPTED"))
        self._later(2 * self.step, lambda: self._state(order, "WORKING"))
        if order.type == "market" and not self._hold:
            if self._partial and order.qty > 1:
                for n in range(1, order.qty):
                    self._later((2 + n) * self.step, lambda n=n: self._fill(order, n))
            self._later((2 + order.qty) * self.step, lambda: self._fill(order, order.qty))

    def _state(self, order: _Order, state: str, filled: int | None = None) -> None:
        if order.state in FINAL:
            return
        order.state = state
        if filled is not None:
            order.filled = filled
        avg = PRICE if order.filled else 0
        self.write_order_file(order.account, order.id, f"{state};{order.filled};{avg}")

    def _reject(self, order: _Order, reason: str) -> None:
        if self.write_log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S:000")
            path = self.root / "log" / f"log.{time.strftime('%Y%m%d')}.00001.txt"
            with path.open("a", encoding="utf-8") as handle:
                handle.write(f"{stamp}|3|4|Order='{order.id}/{order.account}' Name='' New "
                             f"state='Rejected' Instrument='{order.symbol}' Action='"
                             f"{order.side.title()}' Error='Order rejected' Native error="
                             f"'{reason}'\n")
        self._state(order, "REJECTED", 0)

    def _fill(self, order: _Order, filled: int) -> None:
        if order.state in FINAL:
            return
        delta = filled - order.filled
        key = (order.account, order.symbol)
        held, avg = self.positions.get(key, (0, PRICE))
        signed = delta if order.side == "buy" else -delta
        self.positions[key] = (held + signed, avg if held * (held + signed) > 0 else PRICE)
        self._write_position(*key)
        self._state(order, "FILLED" if filled >= order.qty else self.partial_word, filled)

    def _close(self, account: str, instrument: str) -> None:
        symbol = cme_name(CATALOG.parse(instrument))
        self.received.append({"kind": "close", "account": account, "instrument": instrument,
                              "tag": "", "order_id": None})
        for order in list(self.orders.values()):
            if order.account == account and order.symbol == symbol and \
                    order.state not in FINAL:
                self._cancel_order(order)
        held, _ = self.positions.get((account, symbol), (0, PRICE))
        if not held:
            return
        # NT8 closes with an order of its own, in a file named by a GUID
        closing = _Order(uuid.uuid4().hex, account, symbol, "sell" if held > 0 else "buy",
                         abs(held), "market")
        self.orders[closing.id] = closing
        self._state(closing, "SUBMITTED", 0)
        self._later(self.step, lambda: self._state(closing, "WORKING"))
        if not self._hold:
            self._later(2 * self.step, lambda: self._fill(closing, closing.qty))

    def _cancel(self, order_id: str) -> None:
        order = self.orders.get(order_id)
        self.received.append({"kind": "cancel", "order_id": order_id, "tag": "",
                              "account": order.account if order else None})
        if order is not None and order.state not in FINAL:
            self._cancel_order(order)

    def _cancel_order(self, order: _Order) -> None:
        self._state(order, "CANCELPENDING")
        self._later(2 * self.step, lambda: self._state(order, "CANCELLED"))


# --- the ATI TCP socket ---------------------------------------------------------------------


class AtiStandIn:
    """NinjaTrader's ATI socket on 127.0.0.1: greets with `ATI=True`, then sends the Value
    messages it is given; records every message a client sends."""

    def __init__(self) -> None:
        self.port = 0
        self.received: list[list[str]] = []
        self.connections = 0
        self._values: list[tuple[str, str]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="nt-ati-standin")

    def start(self) -> AtiStandIn:
        self._thread.start()
        self._ready.wait(5)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # already stopped
                self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(timeout=5)

    def set_value(self, key: str, value: str) -> None:
        """Send `2 key value` to every client now and to every client that connects later."""
        self._values.append((key, value))
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._broadcast, key, value)

    def send_data(self, kind: int, instrument: str, price: str) -> None:
        if self._loop is not None:
            message = _tokens("1", str(kind), instrument, price, "1", "")
            self._loop.call_soon_threadsafe(self._send_all, message)

    def drop_clients(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._close_all)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._stopped = asyncio.Event()
        server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        async with server:
            await self._stopped.wait()
            self._close_all()
        await asyncio.sleep(0.05)  # let the handlers see their sockets close

    def _broadcast(self, key: str, value: str) -> None:
        self._send_all(_tokens("2", key, value))

    def _send_all(self, message: bytes) -> None:
        for writer in list(self._writers):
            writer.write(message)

    def _close_all(self) -> None:
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        writer.write(_tokens("2", "ATI", "True"))
        for key, value in self._values:
            writer.write(_tokens("2", key, value))
        fields = {"0": 1, "4": 2, "5": 2}
        try:
            while True:
                kind = (await reader.readuntil(b"\0"))[:-1].decode()
                message = [kind] + [(await reader.readuntil(b"\0"))[:-1].decode()
                                    for _ in range(fields.get(kind, 0))]
                self.received.append(message)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def _tokens(*parts: str) -> bytes:
    return b"".join(p.encode() + b"\0" for p in parts)
