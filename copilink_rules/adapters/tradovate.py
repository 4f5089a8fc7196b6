"""The Tradovate adapter: state from the user WebSocket, quotes from the market-data socket,
commands over REST.

    login        POST auth/accesstokenrequest; renewed with GET auth/renewaccesstoken while
                 `renew_margin` seconds or less remain (one session, never a second login)
    state        user socket: authorize, user/syncrequest (body `{"users": [userId]}` or
                 `{"accounts": [ids]}`, setting `sync_body`), then `props` pushes
    quotes       md socket: authorize with the mdAccessToken, md/subscribeQuote per contract held
    commands     order/placeorder, order/liquidateposition, order/cancelorder, each with
                 isAutomated and the engine's tag in customTag50
    reconcile    GET order/list at connect and every `reconcile_interval` seconds: tags sent by an
                 earlier process are found again

Every REST request, from any thread, passes one gate: one at a time, at most `request_budget`
per `budget_window` seconds, and none at all for an hour after a 429 (Tradovate's lock-out cannot
be lifted by retrying). Secrets are read from the environment at login and kept nowhere else.

The default `device_id` is uuid5(NAMESPACE_DNS, "copilink-rules:<hostname>:<username>"): stable
on one machine, distinct across machines, as Tradovate's live checks require.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import WebSocketException

from copilink_rules.errors import (
    AuthFailed,
    BrokerError,
    BrokerUnavailable,
    InstrumentError,
    OrderRejected,
    RateLimited,
)
from copilink_rules.instruments import cme_name, default_catalog
from copilink_rules.model import Snapshot, finite_or_none

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

LOCKOUT = 3600.0  # a 429 or a captcha penalty: Tradovate says wait one hour
_WORKING = {"Working": "working", "PendingNew": "pending", "PendingReplace": "pending",
            "PendingCancel": "pending", "Suspended": "pending", "Unknown": "pending"}
_FINAL: dict[str, OrderState] = {"Filled": "filled", "Completed": "filled",
                                 "Canceled": "cancelled", "Cancelled": "cancelled",
                                 "Expired": "cancelled", "Rejected": "rejected"}
_TYPES = {"Market": "market", "Limit": "limit", "Stop": "stop", "StopLimit": "stop_limit",
          "TrailingStop": "stop", "TrailingStopLimit": "stop_limit", "MIT": "limit",
          "QTS": "market"}


class Settings(BaseModel):
    """`broker.settings` for Tradovate. Secrets are named by environment variable only."""

    model_config = ConfigDict(extra="forbid")

    rest_url: str = "https://demo.tradovateapi.com/v1"
    ws_url: str = "wss://demo.tradovateapi.com/v1/websocket"
    md_url: str = "wss://md.tradovateapi.com/v1/websocket"
    username: str = Field(min_length=1)
    password_env: str = "TRADOVATE_PASSWORD"  # noqa: S105 - a variable name, not a secret
    app_id: str = Field(min_length=1)
    app_version: str = "1.0"
    cid: int
    sec_env: str = "TRADOVATE_SEC"
    device_id: str | None = None  # None: uuid5 of hostname + username (module docstring)
    # trap 6: retail examples sync by user id, one client by account ids
    sync_body: Literal["users", "accounts"] = "users"
    # tuning; the defaults are for a real account
    request_timeout: float = Field(default=5.0, gt=0)
    request_budget: int = Field(default=80, ge=1)  # copier vendors' figure per window
    budget_window: float = Field(default=60.0, gt=0)
    renew_margin: float = Field(default=900.0, ge=0)
    reconcile_interval: float = Field(default=60.0, gt=0)
    heartbeat_interval: float = Field(default=2.5, gt=0)
    socket_timeout: float = Field(default=10.0, gt=0)  # silence after which a socket is dead
    reconnect_min: float = Field(default=1.0, gt=0)
    reconnect_max: float = Field(default=30.0, gt=0)
    penalty_wait_max: float = Field(default=30.0, ge=0)  # longer p-time: RateLimited instead

    def device(self) -> str:
        if self.device_id:
            return self.device_id
        seed = f"copilink-rules:{socket.gethostname()}:{self.username}"
        return str(uuid.uuid5(uuid.NAMESPACE_DNS, seed))


class _UnauthorizedError(Exception):
    """HTTP 401: the token expired or was revoked (a newer connection can revoke it)."""


class _TokenRejectedError(Exception):
    """The socket refused our token (s=401)."""


class _SocketError(Exception):
    """The socket broke the protocol or closed itself."""


def _scrub(text: str, secrets: Iterable[str | None]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _epoch(text: object) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _failure(data: object) -> str | None:
    """The refusal text of a Tradovate command result, None when it succeeded."""
    if not isinstance(data, dict):
        return "unexpected answer from Tradovate"
    reason = data.get("failureReason")
    text = data.get("failureText") or data.get("errorText")
    if (reason and reason != "Success") or text:
        return f"{text} ({reason})" if text and reason else str(text or reason)
    return None


class _Rest:
    """The one door to Tradovate's REST API: serialized, budgeted, and shut for an hour after a
    429. Budget timestamps are taken when an answer arrives, so the server never counts more
    than `request_budget` of our requests in any `budget_window` of its own clock."""

    def __init__(self, settings: Settings) -> None:
        self._s = settings
        self._client = httpx.Client(base_url=settings.rest_url.rstrip("/") + "/",
                                    timeout=settings.request_timeout)
        self._lock = threading.Lock()
        self._done: deque[float] = deque()
        self._blocked_until = 0.0
        self._blocked_why = ""
        self._closing = threading.Event()
        self.token: str | None = None
        self.secrets: tuple[str | None, ...] = ()

    def blocked_for(self) -> float:
        return max(0.0, self._blocked_until - time.monotonic())

    def _block(self, seconds: float, why: str) -> None:
        self._blocked_until = max(self._blocked_until, time.monotonic() + seconds)
        self._blocked_why = why
        log.error("Tradovate: %s; no request for %.0f s", why, seconds)

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            self._client.close()

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             params: dict[str, Any] | None = None, bearer: bool = True) -> Any:
        with self._lock:
            body = dict(body) if body is not None else None
            params = dict(params) if params is not None else None
            for _ in range(4):
                data = self._once(method, path, body, params, bearer)
                if not (isinstance(data, dict) and data.get("p-ticket")):
                    return data
                wait = finite_or_none(data.get("p-time")) or 0.0
                if data.get("p-captcha"):
                    why = f"penalty with captcha on {path}"
                    self._block(LOCKOUT, why)
                    raise RateLimited(f"Tradovate demands a captcha for {path} (penalty ticket):"
                                      " wait about one hour before the next request", LOCKOUT)
                if wait > self._s.penalty_wait_max:
                    raise RateLimited(f"Tradovate penalty on {path}: wait {wait:.0f} s", wait)
                log.warning("Tradovate penalty ticket on %s: resending in %.1f s", path, wait)
                if self._closing.wait(wait):
                    raise BrokerUnavailable("Tradovate adapter closed")
                ticket = str(data["p-ticket"])
                if body is not None or method == "POST":
                    body = {**(body or {}), "p-ticket": ticket}
                else:
                    params = {**(params or {}), "p-ticket": ticket}
            raise RateLimited(f"Tradovate kept issuing penalty tickets for {path}", 60.0)

    def _once(self, method: str, path: str, body: dict[str, Any] | None,
              params: dict[str, Any] | None, bearer: bool) -> Any:
        if self._closing.is_set():
            raise BrokerUnavailable("Tradovate adapter closed")
        if (left := self.blocked_for()) > 0:
            raise RateLimited(f"Tradovate requests paused: {self._blocked_why} "
                              f"({left:.0f} s left)", left)
        self._wait_budget()
        headers = {"Accept": "application/json"}
        if bearer and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            response = self._client.request(method, path, json=body, params=params,
                                            headers=headers)
        except httpx.TimeoutException:
            raise BrokerUnavailable(f"Tradovate {path}: no answer within "
                                    f"{self._s.request_timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise BrokerUnavailable(f"Tradovate {path}: {type(exc).__name__} "
                                    f"({self._s.rest_url})") from None
        finally:
            self._done.append(time.monotonic())
        status = response.status_code
        if status == 429:
            self._block(LOCKOUT, f"HTTP 429 on {path}")
            raise RateLimited(f"Tradovate rate limit (HTTP 429 on {path}): Tradovate requires "
                              "one hour without requests", LOCKOUT)
        if status == 423:  # "precedes a 429": back off before the lock-out
            self._block(60.0, f"HTTP 423 on {path}")
            raise RateLimited(f"Tradovate warns of a lock-out (HTTP 423 on {path})", 60.0)
        if status == 401:
            raise _UnauthorizedError(path)
        if status >= 500:
            raise BrokerUnavailable(f"Tradovate {path}: HTTP {status}")
        if status == 403:
            raise AuthFailed(f"Tradovate {path}: HTTP 403 (not permitted for this user/app)")
        if status >= 400:
            text = _scrub(response.text[:200], self.secrets)
            raise OrderRejected(f"Tradovate {path}: HTTP {status} {text}")
        try:
            return response.json()
        except ValueError:
            raise BrokerUnavailable(f"Tradovate {path}: answer is not JSON") from None

    def _wait_budget(self) -> None:
        limit, window = self._s.request_budget, self._s.budget_window
        while len(self._done) > limit:
            self._done.popleft()
        if len(self._done) == limit:
            wait = self._done[0] + window - time.monotonic()
            if wait > 0 and self._closing.wait(wait):
                raise BrokerUnavailable("Tradovate adapter closed")


@dataclass
class _Order:
    id: int
    account_id: int
    contract_id: int | None = None
    action: str = ""
    status: str = "PendingNew"
    qty: int | None = None
    type: str = "Market"
    stop_price: float | None = None
    price: float | None = None
    filled: int = 0
    text: str = ""


@dataclass
class _Tagged:
    """What one tag stands for: the orders it created, or a result without an order."""

    account: str
    instrument: str | None
    order_ids: list[int] = field(default_factory=list)
    cancels: list[int] = field(default_factory=list)
    result: OrderReport | None = None


class TradovateBroker:
    """A Tradovate connection for the configured accounts (see the module docstring)."""

    name = "tradovate"

    def __init__(self, settings: Settings, accounts: list[AccountSpec]) -> None:
        self.settings = settings
        self._specs = list(accounts)
        self._catalog = default_catalog()
        self._build = SnapshotBuilder(self._catalog)  # snapshot(): the fast reader, or pydantic
        self._rest = _Rest(settings)
        self._lock = threading.RLock()
        self._auth_lock = threading.Lock()
        self._md_token: str | None = None
        self._expires_at = 0.0
        self._user_id: int | None = None
        # broker state, all under _lock
        self._ids: dict[str, int] = {}  # account name -> id
        self._reported: set[int] = set()
        self._contracts: dict[int, str] = {}
        self._positions: dict[int, dict[str, Any]] = {}
        self._orders: dict[int, _Order] = {}
        self._cash: dict[int, tuple[float, float]] = {}
        self._tainted: dict[int, set[str]] = {}
        self._frozen: dict[int, datetime] = {}
        self._alive_at: datetime | None = None
        self._user_up = False  # synced and streaming: only then does data age stay at zero
        self._quotes: dict[str, dict[str, float | None]] = {}
        self._md_wanted: set[int] = set()
        self._looked_up: set[str] = set()
        self._tags: dict[str, _Tagged] = {}
        # lifecycle
        self._health = Health("disconnected", "not connected yet", datetime.now(UTC))
        self._last_error = ""
        self._synced = threading.Event()
        self._closed = False
        self._started = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._loop_ready = threading.Event()
        self._maint_stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __repr__(self) -> str:
        return f"TradovateBroker(user={self.settings.username!r}, accounts={len(self._specs)})"

    # --- lifecycle -------------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> None:
        if self._closed:
            raise BrokerUnavailable("Tradovate adapter is closed")
        if self._started:
            return
        deadline = time.monotonic() + timeout
        self._set_health("connecting", "logging in")
        try:
            self._login()
            if self.settings.sync_body == "accounts":
                self._load_account_ids()
            self._reconcile_orders()
        except AuthFailed as exc:
            self._set_health("auth_failed", str(exc))
            raise
        except BrokerError as exc:
            self._set_health("disconnected", str(exc))
            raise
        self._started = True
        loop_thread = threading.Thread(target=self._run_loop, name="tradovate-sockets",
                                       daemon=True)
        maint = threading.Thread(target=self._maintain, name="tradovate-maintenance",
                                 daemon=True)
        self._threads = [loop_thread, maint]
        loop_thread.start()
        self._loop_ready.wait(5.0)
        maint.start()
        if not self._synced.wait(max(0.0, deadline - time.monotonic())):
            state = self._health.state
            error = self._last_error or "no answer"
            self.close()
            if state == "auth_failed":
                raise AuthFailed(error)
            raise BrokerUnavailable(f"Tradovate user socket {self.settings.ws_url}: not synced "
                                    f"within {timeout:g} s ({error})")

    def health(self) -> Health:
        return self._health

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._maint_stop.set()
        self._rest._closing.set()
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
        for thread in self._threads:
            thread.join(timeout=15.0)
        self._rest.close()
        self._set_health("disconnected", "closed")

    def _set_health(self, state: HealthState, detail: str = "") -> None:
        if self._health.state != state or self._health.detail != detail:
            since = self._health.since if self._health.state == state else datetime.now(UTC)
            self._health = Health(state, detail, since)

    # --- REST with auth ----------------------------------------------------------------------

    def _secrets(self) -> tuple[str | None, ...]:
        return (os.environ.get(self.settings.password_env), os.environ.get(self.settings.sec_env),
                self._rest.token, self._md_token)

    def _login(self) -> None:
        s = self.settings
        password = os.environ.get(s.password_env)
        sec = os.environ.get(s.sec_env)
        if not password:
            raise AuthFailed(f"Tradovate login for user {s.username!r}: environment variable "
                             f"{s.password_env} (the password) is not set")
        if not sec:
            raise AuthFailed(f"Tradovate login for user {s.username!r}: environment variable "
                             f"{s.sec_env} (the API secret) is not set")
        self._rest.secrets = (password, sec)
        body = {"name": s.username, "password": password, "appId": s.app_id,
                "appVersion": s.app_version, "cid": s.cid, "sec": sec, "deviceId": s.device()}
        try:
            data = self._rest.call("POST", "auth/accesstokenrequest", body, bearer=False)
        except _UnauthorizedError:
            raise AuthFailed(f"Tradovate login refused for user {s.username!r} "
                             "(HTTP 401)") from None
        except OrderRejected as exc:
            raise AuthFailed(f"Tradovate login refused for user {s.username!r}: {exc}") from None
        self._take_token(data, login=True)

    def _take_token(self, data: object, login: bool) -> None:
        user = self.settings.username
        if not isinstance(data, dict):
            raise AuthFailed(f"Tradovate login for user {user!r}: unexpected answer")
        if data.get("errorText"):
            text = _scrub(str(data["errorText"]), self._secrets())
            raise AuthFailed(f"Tradovate login refused for user {user!r}: {text}")
        token = data.get("accessToken")
        if not isinstance(token, str) or not token:
            raise AuthFailed(f"Tradovate login for user {user!r}: no accessToken in the answer")
        self._rest.token = token
        if isinstance(data.get("mdAccessToken"), str):
            self._md_token = data["mdAccessToken"]
        elif login:
            self._md_token = token
        self._expires_at = _epoch(data.get("expirationTime")) or time.time() + 80 * 60
        if isinstance(data.get("userId"), int):
            self._user_id = data["userId"]

    def _relogin(self, stale: str | None) -> None:
        """Log in again unless another thread already replaced the `stale` token."""
        with self._auth_lock:
            if self._rest.token == stale:
                self._login()

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None,
                 params: dict[str, Any] | None = None) -> Any:
        token = self._rest.token
        try:
            return self._rest.call(method, path, body, params)
        except _UnauthorizedError:
            self._relogin(token)
        try:
            return self._rest.call(method, path, body, params)
        except _UnauthorizedError:
            raise AuthFailed(f"Tradovate {path}: session refused right after a new login "
                             f"for user {self.settings.username!r}") from None

    def _renew_if_due(self) -> None:
        if self._rest.token is None or self._expires_at - time.time() > self.settings.renew_margin:
            return
        token = self._rest.token
        with self._auth_lock:
            if self._rest.token != token:
                return
            try:
                data = self._rest.call("GET", "auth/renewaccesstoken")
                self._take_token(data, login=False)
                log.info("Tradovate: access token renewed")
            except (_UnauthorizedError, AuthFailed, OrderRejected):
                log.warning("Tradovate: renewal refused; logging in again")
                self._login()

    def _load_account_ids(self) -> None:
        data = self._request("GET", "account/list")
        with self._lock:
            for row in data if isinstance(data, list) else []:
                if isinstance(row, dict):
                    self._on_account(row)

    def _reconcile_orders(self) -> None:
        data = self._request("GET", "order/list")
        with self._lock:
            for row in data if isinstance(data, list) else []:
                if isinstance(row, dict):
                    self._on_order(row)

    def _maintain(self) -> None:
        s = self.settings
        next_poll = time.monotonic() + s.reconcile_interval
        while not self._maint_stop.wait(0.2):
            if self._rest.blocked_for() > 0:
                continue
            try:
                self._renew_if_due()
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + s.reconcile_interval
                    self._reconcile_orders()
                self._resolve_instruments()
            except BrokerError as exc:
                self._last_error = str(exc)
                if isinstance(exc, AuthFailed):
                    self._set_health("auth_failed", str(exc))
                log.warning("Tradovate maintenance: %s", exc)
                # a failing request repeated every tick would eat the budget commands need
                self._maint_stop.wait(s.reconnect_max)
            except Exception:
                log.exception("Tradovate maintenance failed")
                self._maint_stop.wait(s.reconnect_max)

    def _resolve_instruments(self) -> None:
        """Contract ids of the instruments named in the config, for their quotes (each name
        is looked up once: an unknown one is not asked for again)."""
        for spec in self._specs:
            if not spec.instrument or spec.instrument in self._looked_up:
                continue
            try:
                self._contract_id(cme_name(self._catalog.parse(spec.instrument)))
            except InstrumentError:
                pass
            except OrderRejected as exc:
                log.warning("Tradovate: no quotes for %s: %s", spec.instrument, exc)
            self._looked_up.add(spec.instrument)  # not after BrokerUnavailable: asked again

    def _contract_id(self, name: str) -> int:
        with self._lock:
            for cid, known in self._contracts.items():
                if known == name:
                    self._md_wanted.add(cid)
                    return cid
        data = self._request("GET", "contract/find", params={"name": name})
        if not isinstance(data, dict) or not isinstance(data.get("id"), int):
            raise OrderRejected(f"Tradovate knows no contract named {name!r}")
        with self._lock:
            self._contracts[data["id"]] = name
            self._md_wanted.add(data["id"])
        return int(data["id"])

    def _contract_name(self, cid: int) -> str | None:
        try:
            data = self._request("GET", "contract/item", params={"id": cid})
        except BrokerError as exc:
            log.warning("Tradovate contract/item %s: %s", cid, exc)
            return None
        if isinstance(data, dict) and isinstance(data.get("name"), str):
            with self._lock:
                self._contracts[cid] = data["name"]
            return str(data["name"])
        return None

    # --- entities ------------------------------------------------------------------------

    def _taint(self, account_id: int, key: str, bad: bool) -> None:
        """A non-finite number freezes the account's data age until a good value replaces it."""
        keys = self._tainted.setdefault(account_id, set())
        if bad:
            if not keys:
                self._frozen[account_id] = self._alive_at or datetime.now(UTC)
            keys.add(key)
        else:
            keys.discard(key)
            if not keys:
                self._frozen.pop(account_id, None)

    def _on_account(self, row: dict[str, Any]) -> None:
        if isinstance(row.get("id"), int) and isinstance(row.get("name"), str):
            self._ids[row["name"]] = row["id"]

    def _on_position(self, row: dict[str, Any], deleted: bool = False) -> None:
        pid, aid = row.get("id"), row.get("accountId")
        if not isinstance(pid, int) or not isinstance(aid, int):
            return
        key = f"position:{pid}"
        if deleted:
            self._positions.pop(pid, None)
            self._taint(aid, key, False)
            return
        qty_value = finite_or_none(row.get("netPos"))
        price = finite_or_none(row.get("netPrice"))
        if qty_value is None or qty_value != int(qty_value) or (qty_value and price is None):
            self._taint(aid, key, True)
            return
        self._taint(aid, key, False)
        self._positions[pid] = {"accountId": aid, "contractId": row.get("contractId"),
                                "qty": int(qty_value), "price": price or 0.0}

    def _on_cash(self, row: dict[str, Any]) -> None:
        aid = row.get("accountId")
        if not isinstance(aid, int):
            return
        amount = finite_or_none(row.get("amount"))
        realized = finite_or_none(row.get("realizedPnl", row.get("realizedPnL", 0.0)))
        bad = amount is None or realized is None
        self._taint(aid, "cash", bad)
        if amount is not None and realized is not None:
            self._cash[aid] = (amount, realized)

    def _on_order(self, row: dict[str, Any], deleted: bool = False) -> None:
        oid, aid = row.get("id"), row.get("accountId")
        if not isinstance(oid, int):
            return
        if deleted:
            self._orders.pop(oid, None)
            return
        order = self._orders.get(oid)
        if order is None:
            if not isinstance(aid, int):
                return
            order = self._orders[oid] = _Order(oid, aid)
        if isinstance(aid, int):
            order.account_id = aid
        if isinstance(row.get("contractId"), int):
            order.contract_id = row["contractId"]
        if isinstance(row.get("action"), str):
            order.action = row["action"]
        if isinstance(row.get("ordStatus"), str):
            order.status = row["ordStatus"]
        self._on_version(row, order)
        # tags: guessed to ride on the order entity (customTag50, or clOrdId) as well as on
        # the command entity; read both
        for key in ("customTag50", "clOrdId"):
            tag = row.get(key)
            if isinstance(tag, str) and tag:
                self._index_tag(tag, order)

    def _on_version(self, row: dict[str, Any], order: _Order | None = None) -> None:
        if order is None:
            oid = row.get("orderId")
            order = self._orders.get(oid) if isinstance(oid, int) else None
            if order is None:
                if not isinstance(oid, int):
                    return
                order = self._orders[oid] = _Order(oid, -1)  # its order entity follows
        qty = row.get("orderQty")
        if isinstance(qty, int) and not isinstance(qty, bool):
            order.qty = qty
        if isinstance(row.get("orderType"), str):
            order.type = row["orderType"]
        if "stopPrice" in row:
            order.stop_price = finite_or_none(row.get("stopPrice"))
        if "price" in row:
            order.price = finite_or_none(row.get("price"))

    def _on_command(self, row: dict[str, Any]) -> None:
        oid = row.get("orderId")
        order = self._orders.get(oid) if isinstance(oid, int) else None
        for key in ("customTag50", "clOrdId"):
            tag = row.get(key)
            if isinstance(tag, str) and tag and order is not None:
                self._index_tag(tag, order)

    def _on_execution(self, row: dict[str, Any]) -> None:
        oid = row.get("orderId")
        order = self._orders.get(oid) if isinstance(oid, int) else None
        if order is None:
            return
        cum = row.get("cumQty")
        if isinstance(cum, int) and not isinstance(cum, bool):
            order.filled = cum
        text = row.get("rejectReason") or row.get("text")
        if isinstance(text, str) and text:
            order.text = text

    def _index_tag(self, tag: str, order: _Order) -> None:
        entry = self._tags.get(tag)
        if entry is None:
            name = next((n for n, i in self._ids.items() if i == order.account_id), "")
            entry = self._tags[tag] = _Tagged(name, None)
        if order.id not in entry.order_ids:
            entry.order_ids.append(order.id)

    def _apply(self, entity_type: str, event: str, row: dict[str, Any]) -> None:
        deleted = event == "Deleted"
        if entity_type == "position":
            self._on_position(row, deleted)
        elif entity_type == "order":
            self._on_order(row, deleted)
        elif entity_type == "orderVersion":
            self._on_version(row)
        elif entity_type == "cashBalance":
            self._on_cash(row)
        elif entity_type == "account":
            self._on_account(row)
        elif entity_type == "contract":
            if isinstance(row.get("id"), int) and isinstance(row.get("name"), str):
                self._contracts[row["id"]] = row["name"]
        elif entity_type == "command":
            self._on_command(row)
        elif entity_type == "executionReport":
            self._on_execution(row)

    def _apply_sync(self, data: dict[str, Any]) -> None:
        with self._lock:
            for key in ("positions", "orders", "cash"):
                getattr(self, f"_{key}").clear()
            self._tainted.clear()
            self._frozen.clear()
            plural = {"contracts": "contract", "accounts": "account", "orders": "order",
                      "orderVersions": "orderVersion", "positions": "position",
                      "cashBalances": "cashBalance", "commands": "command",
                      "executionReports": "executionReport"}
            for key, entity_type in plural.items():
                for row in data.get(key) or []:
                    if isinstance(row, dict):
                        self._apply(entity_type, "Created", row)
            accounts = data.get("accounts")
            if isinstance(accounts, list):
                self._reported = {row["id"] for row in accounts
                                  if isinstance(row, dict) and isinstance(row.get("id"), int)}
            else:
                self._reported = set(self._ids.values())
            self._alive_at = datetime.now(UTC)
            self._refresh_md_wanted()

    def _refresh_md_wanted(self) -> None:
        watched = {self._ids[s.id] for s in self._specs if s.id in self._ids}
        for pos in self._positions.values():
            if pos["accountId"] in watched and pos["qty"] and isinstance(pos["contractId"], int):
                self._md_wanted.add(pos["contractId"])
        for order in self._orders.values():
            if order.account_id in watched and order.status in _WORKING and order.contract_id:
                self._md_wanted.add(order.contract_id)

    def _unknown_contracts(self, rows: Iterable[dict[str, Any]]) -> set[int]:
        with self._lock:
            return {cid for row in rows
                    if isinstance(cid := row.get("contractId"), int)
                    and cid not in self._contracts}

    # --- the socket loop -------------------------------------------------------------------

    def _run_loop(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception:
            log.exception("Tradovate socket loop ended")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._loop_ready.set()
        if self._closed:
            return
        tasks = [asyncio.create_task(self._user_forever()), asyncio.create_task(self._md_forever())]
        await self._stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _sleep(self, seconds: float) -> None:
        assert self._stop is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _user_forever(self) -> None:
        s = self.settings
        delay = s.reconnect_min
        while not self._closed:
            started = time.monotonic()
            try:
                await self._user_session()
            except _TokenRejectedError:
                self._last_error = "the user socket refused the access token"
                try:
                    await asyncio.to_thread(self._relogin, self._rest.token)
                    continue
                except AuthFailed as exc:
                    self._last_error = str(exc)
                    self._set_health("auth_failed", str(exc))
                    return  # a refused password stays refused: stop, never hammer the login
                except RateLimited as exc:
                    self._last_error = str(exc)
                    await self._sleep(exc.retry_after)
                except BrokerError as exc:
                    self._last_error = str(exc)
            except (OSError, WebSocketException, TimeoutError, _SocketError, ValueError) as exc:
                self._last_error = f"user socket: {type(exc).__name__}: {exc}"
            if self._closed:
                return
            self._set_health("connecting", f"reconnecting: {self._last_error}")
            log.warning("Tradovate user socket down (%s); reconnecting in %.1f s",
                        self._last_error, delay)
            if time.monotonic() - started > 4 * s.socket_timeout:
                delay = s.reconnect_min
            await self._sleep(delay)
            delay = min(delay * 2, s.reconnect_max)

    async def _user_session(self) -> None:
        s = self.settings
        token = self._rest.token
        if token is None:
            raise _TokenRejectedError
        async with ws_connect(s.ws_url, open_timeout=s.socket_timeout, close_timeout=1.0,
                              ping_interval=None, max_size=None) as ws:
            frames = _Frames(ws, s.socket_timeout, self._on_message, self._on_alive)
            await frames.opened()
            heartbeat = asyncio.create_task(frames.heartbeat(s.heartbeat_interval))
            try:
                answer = await frames.request("authorize", token, rid=0)
                if answer.get("s") == 401:
                    raise _TokenRejectedError
                if answer.get("s") != 200:
                    raise _SocketError(f"authorize answered s={answer.get('s')}")
                await self._sync(frames)
                self._user_up = True
                self._set_health("connected", "synced")
                self._synced.set()
                # not `while True`: 3.11's wait_for can swallow a cancellation
                while not self._closed:
                    await frames.pump()
            finally:
                self._user_up = False
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat

    async def _sync(self, frames: _Frames) -> None:
        if self.settings.sync_body == "users":
            if self._user_id is None:
                raise _SocketError("the login gave no userId to sync")
            body: dict[str, Any] = {"users": [self._user_id]}
        else:
            with self._lock:
                ids = sorted(self._ids[s.id] for s in self._specs if s.id in self._ids)
            body = {"accounts": ids}
        for _ in range(3):
            answer = await frames.request("user/syncrequest", json.dumps(body))
            data = answer.get("d")
            if isinstance(data, dict) and data.get("p-ticket") and not data.get("p-captcha"):
                await self._sleep(finite_or_none(data.get("p-time")) or 1.0)
                body = {**body, "p-ticket": data["p-ticket"]}
                continue
            break
        if answer.get("s") == 401:
            raise _TokenRejectedError
        if answer.get("s") != 200 or not isinstance(data, dict):
            raise _SocketError(f"user/syncrequest answered s={answer.get('s')}: "
                               f"{str(data)[:120]}")
        rows = [r for r in data.get("positions") or [] if isinstance(r, dict)]
        rows += [r for r in data.get("orders") or [] if isinstance(r, dict)]
        known = {r["id"] for r in data.get("contracts") or []
                 if isinstance(r, dict) and isinstance(r.get("id"), int)}
        for cid in self._unknown_contracts(rows) - known:
            await asyncio.to_thread(self._contract_name, cid)
        self._apply_sync(data)

    def _on_alive(self) -> None:
        if self._user_up:
            with self._lock:
                self._alive_at = datetime.now(UTC)

    async def _on_message(self, message: dict[str, Any]) -> None:
        event = message.get("e")
        data = message.get("d")
        if event == "props" and isinstance(data, dict):
            row = data.get("entity")
            if not isinstance(row, dict):
                return
            entity_type = str(data.get("entityType", ""))
            if entity_type in ("position", "order"):
                for cid in self._unknown_contracts([row]):
                    await asyncio.to_thread(self._contract_name, cid)
            with self._lock:
                self._apply(entity_type, str(data.get("eventType", "")), row)
                if entity_type in ("position", "order"):
                    self._refresh_md_wanted()
        elif event == "md" and isinstance(data, dict):
            self._on_quotes(data.get("quotes"))
        elif event == "shutdown":
            raise _SocketError(f"server shutdown: {str(data)[:120]}")

    def _on_quotes(self, quotes: object) -> None:
        if not isinstance(quotes, list):
            return
        with self._lock:
            for quote in quotes:
                if not isinstance(quote, dict) or not isinstance(quote.get("entries"), dict):
                    continue
                name = self._contracts.get(quote.get("contractId"))  # type: ignore[arg-type]
                if name is None:
                    continue
                book = self._quotes.setdefault(name, {"bid": None, "ask": None, "last": None})
                for entry, key in (("Bid", "bid"), ("Offer", "ask"), ("Trade", "last")):
                    value = quote["entries"].get(entry)
                    if isinstance(value, dict) and "price" in value:
                        book[key] = finite_or_none(value["price"])
                    elif entry in quote["entries"]:
                        book[key] = None

    async def _md_forever(self) -> None:
        s = self.settings
        delay = s.reconnect_min
        while not self._closed:
            try:
                await self._md_session()
            except _TokenRejectedError:
                await self._sleep(delay)  # the user socket's re-login brings a new md token
            except (OSError, WebSocketException, TimeoutError, _SocketError, ValueError) as exc:
                log.info("Tradovate md socket down: %s", exc)
            with self._lock:
                self._quotes.clear()  # an old quote is not a quote
            await self._sleep(delay)
            delay = min(delay * 2, s.reconnect_max)

    async def _md_session(self) -> None:
        s = self.settings
        token = self._md_token
        if token is None:
            raise _TokenRejectedError
        async with ws_connect(s.md_url, open_timeout=s.socket_timeout, close_timeout=1.0,
                              ping_interval=None, max_size=None) as ws:
            frames = _Frames(ws, s.socket_timeout, self._on_message, lambda: None)
            await frames.opened()
            heartbeat = asyncio.create_task(frames.heartbeat(s.heartbeat_interval))
            try:
                answer = await frames.request("authorize", token, rid=0)
                if answer.get("s") != 200:
                    raise _TokenRejectedError
                subscribed: set[int] = set()
                while not self._closed:
                    with self._lock:
                        todo = [(cid, self._contracts[cid]) for cid in self._md_wanted
                                if cid not in subscribed and cid in self._contracts]
                    for cid, name in todo:
                        await frames.request("md/subscribeQuote", json.dumps({"symbol": name}))
                        subscribed.add(cid)
                    await frames.pump(min(0.5, s.socket_timeout))
            finally:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat

    # --- the feed ----------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        with self._lock:
            # the clock read under the lock the feed sets `_alive_at` under: no account's data
            # time is after the snapshot's (which would send it to pydantic, the slow path)
            now = datetime.now(UTC)
            accounts = [self._account_data(spec) for spec in self._specs]
            quotes = {name: {k: v for k, v in book.items() if v is not None}
                      for name, book in self._quotes.items()}
        # open P&L is not polled (Tradovate asks not to): worked out from the md quotes
        return mark_to_market(self._build({"time": now.isoformat(), "quotes": quotes,
                                           "accounts": accounts}))

    def _account_data(self, spec: AccountSpec) -> dict[str, Any]:
        data: dict[str, Any] = {**spec.snapshot_fields(),
                                "connected": False}
        aid = self._ids.get(spec.id)
        if aid is None or aid not in self._reported:
            return data  # never reported: disconnected
        data["connected"] = True
        updated = self._frozen.get(aid) or self._alive_at
        # as text, which the fast reader takes (a datetime object sends it to pydantic)
        data["updated_at"] = updated.isoformat() if updated is not None else None
        if aid in self._cash:
            data["balance"], data["realized_pnl"] = self._cash[aid]
        positions = []
        for pos in self._positions.values():
            if pos["accountId"] != aid or not pos["qty"]:
                continue
            name = self._contracts.get(pos["contractId"])
            if name is None:  # a position we cannot name must not read as flat
                data["connected"] = False
                continue
            positions.append({"instrument": name, "qty": pos["qty"], "avg_price": pos["price"]})
        data["positions"] = positions
        orders = []
        for order in self._orders.values():
            name = self._contracts.get(order.contract_id or -1)
            if order.account_id != aid or order.status not in _WORKING or name is None or \
                    not order.qty or order.action not in ("Buy", "Sell"):
                continue
            entry: dict[str, Any] = {"id": str(order.id), "instrument": name,
                                     "side": order.action.lower(), "qty": order.qty,
                                     "type": _TYPES.get(order.type, "market"),
                                     "status": _WORKING[order.status]}
            if order.stop_price is not None:
                entry["stop_price"] = order.stop_price
            if order.price is not None:
                entry["limit_price"] = order.price
            orders.append(entry)
        data["orders"] = orders
        return data

    def contracts(self) -> dict[str, str]:
        return {a.id: a.instrument for a in self._specs
                if a.role == "follower" and a.instrument}

    # --- commands --------------------------------------------------------------------------

    def _account_id(self, account: str) -> int:
        if account not in {s.id for s in self._specs}:
            raise OrderRejected(f"account {account!r} is not watched by this adapter")
        with self._lock:
            aid = self._ids.get(account)
            synced = self._synced.is_set()
        if aid is None:
            if synced:
                raise OrderRejected(f"Tradovate did not report account {account!r} for user "
                                    f"{self.settings.username!r}")
            raise BrokerUnavailable(f"Tradovate has not reported account {account!r} yet")
        return aid

    def _family(self, cid: int | None) -> str | None:
        name = self._contracts.get(cid or -1)
        try:
            return self._catalog.parse(name).family if name else None
        except InstrumentError:
            return None

    def _parse(self, instrument: str) -> str:
        try:
            return cme_name(self._catalog.parse(instrument))
        except InstrumentError as exc:
            raise OrderRejected(str(exc)) from None

    def _remember(self, tag: str, account: str, instrument: str | None) -> _Tagged:
        with self._lock:
            entry = self._tags.get(tag)
            if entry is None:
                entry = self._tags[tag] = _Tagged(account, instrument)
            entry.account, entry.instrument = account, instrument or entry.instrument
            return entry

    def _refused(self, entry: _Tagged, tag: str, reason: str) -> BrokerAnswer:
        with self._lock:
            entry.result = OrderReport(tag, "rejected", entry.account, entry.instrument,
                                       reason=reason)
        return BrokerAnswer("rejected", reason)

    def place_order(self, account: str, instrument: str, side: Side, qty: int,
                    order_type: Literal["market", "stop"], tag: str,
                    stop_price: float | None = None) -> BrokerAnswer:
        aid = self._account_id(account)
        symbol = self._parse(instrument)
        if isinstance(qty, bool) or not isinstance(qty, int) or qty <= 0:
            raise OrderRejected(f"order quantity must be a positive integer, got {qty!r}")
        body: dict[str, Any] = {
            "accountSpec": account, "accountId": aid, "action": "Buy" if side == "buy" else "Sell",
            "symbol": symbol, "orderQty": qty,
            "orderType": "Market" if order_type == "market" else "Stop",
            # a protective stop must outlive the session; a market order fills or dies now
            "timeInForce": "Day" if order_type == "market" else "GTC",
            "isAutomated": True, "customTag50": tag}
        if order_type == "stop":
            price = finite_or_none(stop_price)
            if price is None:
                raise OrderRejected("a stop order needs a finite stop price")
            body["stopPrice"] = price
        entry = self._remember(tag, account, symbol)
        data = self._request("POST", "order/placeorder", body)
        failure = _failure(data)
        if failure is not None or not isinstance(data.get("orderId"), int):
            return self._refused(entry, tag, failure or "Tradovate gave no orderId")
        oid = int(data["orderId"])
        with self._lock:
            if oid not in entry.order_ids:
                entry.order_ids.append(oid)
        return BrokerAnswer("accepted", "", str(oid))

    def close_position(self, account: str, instrument: str | None, tag: str) -> BrokerAnswer:
        aid = self._account_id(account)
        symbol = self._parse(instrument) if instrument else None
        family = self._catalog.parse(instrument).family if instrument else None
        with self._lock:
            cids = {p["contractId"] for p in self._positions.values()
                    if p["accountId"] == aid and p["qty"] and isinstance(p["contractId"], int)}
            cids |= {o.contract_id for o in self._orders.values()
                     if o.account_id == aid and o.status in _WORKING and o.contract_id}
            targets: set[int] = {c for c in cids if c is not None and
                                 (family is None or self._family(c) == family)}
        entry = self._remember(tag, account, symbol)
        if symbol is not None:
            # our read may be stale: liquidate the named contract even when we think it flat
            targets.add(self._contract_id(symbol))
        failures: list[str] = []
        order_ids: list[int] = []
        for cid in sorted(targets):
            data = self._request("POST", "order/liquidateposition", {
                "accountId": aid, "contractId": cid, "admin": False, "customTag50": tag,
                "isAutomated": True})
            failure = _failure(data)
            if failure is not None:
                failures.append(failure)
            elif isinstance(data.get("orderId"), int):
                order_ids.append(int(data["orderId"]))
        with self._lock:
            entry.order_ids.extend(i for i in order_ids if i not in entry.order_ids)
        if failures and not order_ids:
            return self._refused(entry, tag, "; ".join(failures))
        if failures:
            return BrokerAnswer("rejected", "; ".join(failures), str(order_ids[0]))
        if not order_ids:  # nothing held: the liquidation only cancelled orders, if any
            with self._lock:
                entry.result = OrderReport(tag, "filled", account, symbol, reason="already flat")
            return BrokerAnswer("filled", "already flat")
        return BrokerAnswer("accepted", "", str(order_ids[0]))

    def cancel_order(self, account: str, order_id: str, tag: str) -> BrokerAnswer:
        aid = self._account_id(account)
        try:
            oid = int(order_id)
        except ValueError:
            raise OrderRejected(f"{order_id!r} is not a Tradovate order id") from None
        with self._lock:
            order = self._orders.get(oid)
            if order is not None and order.account_id not in (aid, -1):
                raise OrderRejected(f"order {order_id} does not belong to account {account!r}")
        entry = self._remember(tag, account, None)
        data = self._request("POST", "order/cancelorder",
                             {"orderId": oid, "isAutomated": True, "customTag50": tag})
        failure = _failure(data)
        if failure is not None:
            return self._refused(entry, tag, failure)
        with self._lock:
            if oid not in entry.cancels:
                entry.cancels.append(oid)
        return BrokerAnswer("accepted", "", str(oid))

    def cancel_orders(self, account: str, instrument: str | None, tag: str) -> BrokerAnswer:
        aid = self._account_id(account)
        family = self._catalog.parse(instrument).family if instrument else None
        with self._lock:
            ids = sorted(o.id for o in self._orders.values()
                         if o.account_id == aid and o.status in _WORKING
                         and (family is None or self._family(o.contract_id) == family))
        if not ids:
            entry = self._remember(tag, account, instrument)
            with self._lock:
                entry.result = OrderReport(tag, "filled", account, instrument,
                                           reason="no working orders")
            return BrokerAnswer("filled", "no working orders")
        refusals = [answer.reason for oid in ids  # one by one: never a broker-wide cancel-all
                    if not (answer := self.cancel_order(account, str(oid), tag)).ok]
        if refusals:
            return BrokerAnswer("rejected", "; ".join(refusals))
        return BrokerAnswer("accepted")

    def find_tag(self, tag: str) -> OrderReport | None:
        with self._lock:
            entry = self._tags.get(tag)
            if entry is None:
                return None
            orders = [self._orders[i] for i in entry.order_ids if i in self._orders]
            if entry.order_ids:
                return self._report(tag, entry, orders)
            if entry.cancels:
                working = any(self._orders[i].status in _WORKING
                              for i in entry.cancels if i in self._orders)
                return OrderReport(tag, "working" if working else "filled", entry.account,
                                   entry.instrument, str(entry.cancels[0]))
            return entry.result

    def _report(self, tag: str, entry: _Tagged, orders: list[_Order]) -> OrderReport:
        first = orders[0] if orders else None
        account = entry.account or next(
            (n for n, i in self._ids.items() if first and i == first.account_id), "")
        name = (self._contracts.get(first.contract_id or -1) if first else None) or \
            entry.instrument
        if len(orders) < len(entry.order_ids) or any(o.status in _WORKING for o in orders):
            return OrderReport(tag, "working", account, name, str(entry.order_ids[0]))
        states = [_FINAL.get(o.status, "working") for o in orders]
        state: OrderState = next((s for s in ("filled", "rejected", "cancelled")
                                  if s in states), "working")
        order = next(o for o, s in zip(orders, states, strict=True) if s == state)
        filled = (order.filled or order.qty or 0) if state == "filled" else order.filled
        return OrderReport(tag, state, account, name, str(order.id), filled, order.text)


class _Frames:
    """Tradovate's socket framing: `o`, `h`, `a[...]`, `c`; requests `url\\nid\\nquery\\nbody`."""

    def __init__(self, ws: ClientConnection, timeout: float,
                 on_message: Callable[[dict[str, Any]], Any],
                 on_alive: Callable[[], None]) -> None:
        self._ws = ws
        self._timeout = timeout
        self._on_message = on_message
        self._on_alive = on_alive
        self._next = 1
        self._last = time.monotonic()

    async def _frame(self, timeout: float) -> list[dict[str, Any]] | None:
        """The messages of one frame; None when `timeout` passed without one."""
        try:
            raw = await asyncio.wait_for(self._ws.recv(), timeout)
        except TimeoutError:
            if time.monotonic() - self._last > self._timeout:
                raise _SocketError(f"no frame for {self._timeout:g} s") from None
            return None
        self._last = time.monotonic()
        text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
        if text.startswith("c"):
            raise _SocketError(f"server closed the socket: {text[1:120]}")
        self._on_alive()
        if text.startswith("a"):
            messages = json.loads(text[1:])
            return [m for m in messages if isinstance(m, dict)] if isinstance(messages,
                                                                               list) else []
        return []

    async def opened(self) -> None:
        while True:
            raw = await asyncio.wait_for(self._ws.recv(), self._timeout)
            if raw == "o":
                self._last = time.monotonic()
                return

    async def request(self, url: str, body: str, rid: int | None = None) -> dict[str, Any]:
        if rid is None:
            rid, self._next = self._next, self._next + 1
        await self._ws.send(f"{url}\n{rid}\n\n{body}")
        while True:
            for message in await self._frame(self._timeout) or []:
                if message.get("i") == rid and "s" in message:
                    return message
                await self._dispatch(message)

    async def pump(self, timeout: float | None = None) -> None:
        for message in await self._frame(timeout or self._timeout) or []:
            await self._dispatch(message)

    async def _dispatch(self, message: dict[str, Any]) -> None:
        result = self._on_message(message)
        if asyncio.iscoroutine(result):
            await result

    async def heartbeat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self._ws.send("[]")


def create(settings: Settings, accounts: list[AccountSpec]) -> TradovateBroker:
    return TradovateBroker(settings, accounts)
