"""ProjectX Gateway (TopstepX and other firms): REST for commands and reads, the SignalR user
hub for accounts, orders and positions, the market hub for quotes.

    broker = create(Settings(username="trader"), [AccountSpec("50KTC-V2-1", "leader")])
    broker.connect()      # login, Account/search, hubs, first resync
    broker.snapshot()     # from memory; never waits on the network

The hubs push changes; a background thread (an asyncio loop) keeps them connected, re-subscribes
and resyncs over REST after every reconnect, because events sent while a hub was down are lost.
Accounts count as fresh only while the user hub is up and resynced. Commands are synchronous
REST calls from the engine's thread: the broker's refusals come back as `rejected` answers with
its reason; transport trouble raises BrokerUnavailable / RateLimited / AuthFailed. A client-side
budget stays below ProjectX's 200 requests per 60 s: a command over budget is refused locally
(RateLimited), never queued into a burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, cast

import httpx
from pydantic import BaseModel, ConfigDict, Field
from pysignalr.client import SignalRClient
from pysignalr.messages import CompletionMessage, InvocationMessage, Message
from pysignalr.utils import replace_scheme

from copilink_rules.errors import (
    AuthFailed,
    BrokerError,
    BrokerUnavailable,
    InstrumentError,
    OrderRejected,
    RateLimited,
)
from copilink_rules.instruments import default_catalog, projectx_id
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

LOGOUT_MESSAGE = "ProjectX logged this session out (another session logged in?)"

_LOGIN_ERRORS = {
    1: "user not found (errorCode 1 UserNotFound): check the username — it is not always "
       "your e-mail",
    2: "password verification failed (errorCode 2): check the API key and the username",
    3: "invalid credentials (errorCode 3): check the API key and the username",
    7: "agreements not signed (errorCode 7): accept them on the firm's platform first",
    9: "no API subscription for this user (errorCode 9 ApiSubscriptionNotFound): subscribe to "
       "the ProjectX API on the firm's platform",
    10: "API key authentication is disabled for this user (errorCode 10 "
        "ApiKeyAuthenticationDisabled)",
}
_PLACE_CODES = {1: "AccountNotFound", 2: "OrderRejected", 3: "InsufficientFunds",
                4: "AccountViolation", 5: "OutsideTradingHours", 6: "OrderPending",
                7: "UnknownError", 8: "ContractNotFound", 9: "ContractNotActive",
                10: "AccountRejected"}
_CLOSE_CODES = {1: "AccountNotFound", 2: "PositionNotFound", 3: "ContractNotFound",
                4: "ContractNotActive", 5: "OrderRejected", 6: "OrderPending",
                7: "UnknownError", 8: "AccountRejected"}
_CANCEL_CODES = {1: "AccountNotFound", 2: "OrderNotFound", 3: "Rejected", 4: "Pending",
                 5: "UnknownError", 6: "AccountRejected"}
_POSITION_NOT_FOUND = 2
_ORDER_NOT_FOUND = 2

# OrderStatus: 0 None, 1 Open, 2 Filled, 3 Cancelled, 4 Expired, 5 Rejected, 6 Pending,
# 7 PendingCancellation, 8 Suspended
_WORKING_STATUS: dict[int, Literal["working", "pending"]] = {1: "working", 6: "pending",
                                                              7: "working", 8: "working"}
_FINAL_STATUS: dict[int, OrderState] = {2: "filled", 3: "cancelled", 4: "cancelled",
                                        5: "rejected"}
# OrderType: 1 Limit, 2 Market, 3 StopLimit, 4 Stop, 5 TrailingStop, 6 JoinBid, 7 JoinAsk
_ORDER_TYPES = {1: "limit", 2: "market", 3: "stop_limit", 4: "stop", 5: "stop", 6: "limit",
                7: "limit"}
_MARKET, _STOP = 2, 4
_BID, _ASK = 0, 1
_LONG, _SHORT = 1, 2
_REMOVE = 2  # the `{action, data}` wrapper's "remove/close"


class Settings(BaseModel):
    """`broker.settings` for ProjectX. The API key is read from the environment variable named
    by `api_key_env`, never from the settings."""

    model_config = ConfigDict(extra="forbid")

    api_url: str = "https://api.topstepx.com"
    user_hub_url: str = "https://rtc.topstepx.com/hubs/user"
    market_hub_url: str = "https://rtc.topstepx.com/hubs/market"
    username: str = Field(min_length=1)
    api_key_env: str = "PROJECTX_API_KEY"
    # The official JS client skips negotiate; pysignalr (and project-x-py) negotiates.
    skip_negotiation: bool = False
    request_timeout: float = Field(default=5.0, gt=0)
    # Our budget stays below ProjectX's 200 requests / 60 s so we never meet its 429.
    rate_limit: int = Field(default=180, ge=1, le=200)
    rate_window: float = Field(default=60.0, gt=0)
    reconnect_min: float = Field(default=1.0, gt=0)
    reconnect_max: float = Field(default=30.0, gt=0)
    # Sessions last 24 h; validating hourly renews the token long before that.
    validate_every: float = Field(default=3600.0, gt=0)
    hub_ping_interval: int = Field(default=15, ge=1)
    # How far back Order/search looks for our tags after a restart.
    reconcile_hours: float = Field(default=24.0, gt=0)


@dataclass
class _Tag:
    """What we sent under one engine tag."""

    tag: str
    account: str
    kind: Literal["place", "close", "cancel"]
    instrument: str | None = None
    order_id: str | None = None
    state: OrderState = "working"
    reason: str = ""
    contracts: tuple[str, ...] = ()
    uncertain: bool = False  # the request timed out: the broker may or may not have it


@dataclass
class _Account:
    spec: AccountSpec
    broker_id: int | None = None
    reported: bool = False
    balance: float = 0.0
    # contractId -> (signed qty, average price, opened at)
    positions: dict[str, tuple[int, float, datetime | None]] = field(default_factory=dict)
    poisoned_at: datetime | None = None  # a non-number arrived: data is stale from then


class _HubClient(SignalRClient):
    """pysignalr's client, except that invocations do not copy the HTTP headers (our bearer
    token) into every hub message."""

    async def send(self, method: str, arguments: list[dict[str, Any]],
                   on_invocation: Callable[[Message], Awaitable[Any | None]] | None = None
                   ) -> None:
        invocation_id: str | None = None
        if on_invocation is not None:
            invocation_id = str(uuid.uuid4())
            self._invocation_handlers[invocation_id] = on_invocation
        await self._transport.send(InvocationMessage(invocation_id, method, arguments, None))


class ProjectXBroker:
    """The ProjectX Gateway as a `Broker`."""

    name = "projectx"

    def __init__(self, settings: Settings, accounts: list[AccountSpec]) -> None:
        self.settings = settings
        self.catalog = default_catalog()
        self._build = SnapshotBuilder(self.catalog)  # snapshot(): the fast reader, or pydantic
        self._accounts = {a.id: _Account(a) for a in accounts}
        self._lock = threading.RLock()
        self._orders: dict[int, dict[str, Any]] = {}
        self._tags: dict[str, _Tag] = {}
        self._quotes: dict[str, dict[str, float | None]] = {}
        self._quote_contracts: set[str] = {self._contract(a.instrument) for a in accounts
                                           if a.instrument and self._parses(a.instrument)}
        self._token: str | None = None
        self._login_lock = threading.Lock()
        self._http_lock = threading.Lock()
        self._http = httpx.Client(base_url=settings.api_url.rstrip("/"),
                                  timeout=settings.request_timeout)
        self._budget_lock = threading.Lock()
        self._sent: deque[float] = deque()
        self._blocked_until = 0.0
        self._stopping = threading.Event()
        self._first_sync = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_async: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        # connection state, under _lock
        self._user_live = False
        self._market_live = False
        self._market_client: _HubClient | None = None
        self._subscribed_quotes: set[str] = set()
        self._last_live: datetime | None = None
        self._ever_live = False
        self._logged_out = False
        self._auth_error: str | None = None
        self._hub_error = ""
        self._since = datetime.now(UTC)

    def __repr__(self) -> str:
        return f"ProjectXBroker(api_url={self.settings.api_url!r}, " \
               f"username={self.settings.username!r})"

    # --- REST --------------------------------------------------------------------------------

    def _api_key(self) -> str:
        key = os.environ.get(self.settings.api_key_env, "")
        if not key:
            raise AuthFailed(f"ProjectX login: environment variable "
                             f"{self.settings.api_key_env} is not set (it must hold the API key)")
        return key

    def _clean(self, text: object) -> str:
        """Server text made safe to show: one line, short, never the API key."""
        line = " ".join(str(text).split())[:300]
        key = os.environ.get(self.settings.api_key_env, "")
        return line.replace(key, "***") if key else line

    def _take_budget(self, wait: bool) -> None:
        """Count one request against the budget; over it, refuse (commands) or wait
        (background work, which must not starve nor burst)."""
        limit, window = self.settings.rate_limit, self.settings.rate_window
        while True:
            with self._budget_lock:
                now = time.monotonic()
                while self._sent and self._sent[0] <= now - window:
                    self._sent.popleft()
                if self._blocked_until > now:
                    delay = self._blocked_until - now
                    why = "ProjectX answered 429 (rate limit)"
                elif len(self._sent) >= limit:
                    delay = self._sent[0] + window - now
                    why = f"client-side budget of {limit} requests per {window:g}s used up"
                else:
                    self._sent.append(now)
                    return
            if not wait:
                raise RateLimited(f"ProjectX: {why}; wait {delay:.1f}s", retry_after=delay)
            if self._stopping.wait(min(delay, 1.0)):
                raise BrokerUnavailable("ProjectX adapter is closing")

    def _send(self, path: str, body: dict[str, Any] | None, token: str | None,
              wait: bool) -> httpx.Response:
        if self._closed:
            raise BrokerUnavailable("ProjectX adapter is closed")
        self._take_budget(wait)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            with self._http_lock:
                response = self._http.post(path, json=body, headers=headers)
        except httpx.TimeoutException:
            raise BrokerUnavailable(f"ProjectX {path}: no answer within "
                                    f"{self.settings.request_timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise BrokerUnavailable(f"ProjectX {path}: {type(exc).__name__}: "
                                    f"{self._clean(exc)}") from None
        if response.status_code == 429:
            retry = finite_or_none(response.headers.get("Retry-After"))
            delay = retry if retry is not None and retry > 0 else self.settings.rate_window
            with self._budget_lock:
                self._blocked_until = max(self._blocked_until, time.monotonic() + delay)
            raise RateLimited(f"ProjectX {path}: rate limited (HTTP 429); wait {delay:g}s",
                              retry_after=delay)
        if response.status_code >= 500:
            raise BrokerUnavailable(f"ProjectX {path}: HTTP {response.status_code}")
        return response

    def _json(self, path: str, response: httpx.Response) -> dict[str, Any]:
        if response.status_code != 200:
            raise OrderRejected(f"ProjectX {path}: HTTP {response.status_code}: "
                                f"{self._clean(response.text)}")
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise BrokerUnavailable(f"ProjectX {path}: unreadable answer (not a JSON object)")
        return data

    def _login(self, wait: bool = False) -> None:
        body = {"userName": self.settings.username, "apiKey": self._api_key()}
        response = self._send("/api/Auth/loginKey", body, None, wait)
        data = self._json("/api/Auth/loginKey", response) if response.status_code == 200 \
            else {"success": False, "errorCode": -response.status_code}
        code = data.get("errorCode")
        token = data.get("token")
        if data.get("success") is True and code in (0, None) and isinstance(token, str) and token:
            self._token = token
            with self._lock:
                self._auth_error = None
            return
        what = _LOGIN_ERRORS.get(code) if isinstance(code, int) else None
        if what is None:
            detail = self._clean(data.get("errorMessage") or "")
            what = f"errorCode {code}" + (f": {detail}" if detail else "")
        message = f"ProjectX login as {self.settings.username!r} refused: {what}"
        with self._lock:
            self._auth_error = message
        raise AuthFailed(message)

    def _post(self, path: str, body: dict[str, Any] | None = None, *,
              wait: bool = False) -> dict[str, Any]:
        """One authenticated call; a 401 gets one fresh login and one retry."""
        if self._logged_out:
            raise AuthFailed(LOGOUT_MESSAGE)
        for attempt in range(2):
            token = self._token
            if token is None:
                with self._login_lock:
                    if self._token is None:
                        self._login(wait)
                token = self._token
            response = self._send(path, body, token, wait)
            if response.status_code != 401:
                return self._json(path, response)
            if attempt == 0:
                with self._login_lock:
                    if self._token == token:  # another thread may have renewed it already
                        self._login(wait)
        message = f"ProjectX {path}: session refused (HTTP 401) right after a fresh login"
        with self._lock:
            self._auth_error = message
        raise AuthFailed(message)

    @staticmethod
    def _refusal(path: str, data: dict[str, Any], codes: dict[int, str]) -> str:
        code = data.get("errorCode")
        name = codes.get(code, "") if isinstance(code, int) else ""
        message = str(data.get("errorMessage") or "").strip()
        label = f"errorCode {code}" + (f" {name}" if name else "")
        return f"{message} ({label})" if message else f"ProjectX {path} refused: {label}"

    # --- names --------------------------------------------------------------------------------

    def _parses(self, symbol: str) -> bool:
        try:
            self.catalog.parse(symbol)
        except InstrumentError:
            return False
        return True

    def _contract(self, symbol: str) -> str:
        """The ProjectX contract id for a catalog symbol (ids pass through)."""
        if symbol.upper().startswith("CON."):
            return symbol
        return projectx_id(self.catalog.parse(symbol))

    def to_broker(self, symbol: str) -> str:
        return self._contract(symbol)

    def from_broker(self, name: str) -> str:
        return self.catalog.parse(name).symbol

    def _symbol(self, contract_id: str) -> str:
        try:
            return self.catalog.parse(contract_id).symbol
        except InstrumentError:
            return contract_id  # shown as is: dropping an unknown position would hide it

    def _family(self, symbol: str) -> str | None:
        try:
            return self.catalog.parse(symbol).family
        except InstrumentError:
            return None

    def _in_family(self, contract_id: str, family: str | None) -> bool:
        return family is None or self._family(contract_id) == family

    def _target(self, account: str) -> int:
        acct = self._accounts.get(account)
        if acct is None:
            raise OrderRejected(f"account {account!r} is not watched by the ProjectX adapter")
        if acct.broker_id is None:
            raise OrderRejected(f"ProjectX does not list account {account!r} (Account/search): "
                                "check the account name")
        return acct.broker_id

    def _name_of(self, broker_id: object) -> str | None:
        for acct in self._accounts.values():
            if acct.broker_id is not None and acct.broker_id == broker_id:
                return acct.spec.id
        return None

    # --- applying broker data (under _lock) ---------------------------------------------------

    def _apply_account(self, data: dict[str, Any]) -> None:
        acct = next((a for a in self._accounts.values()
                     if a.broker_id is not None and a.broker_id == data.get("id")), None)
        if acct is None:
            return
        acct.reported = True
        balance = finite_or_none(data.get("balance"))
        if balance is None:
            acct.poisoned_at = acct.poisoned_at or datetime.now(UTC)
        else:
            acct.balance = balance
            acct.poisoned_at = None

    def _apply_position(self, data: dict[str, Any], action: object = None) -> None:
        name = self._name_of(data.get("accountId"))
        contract = data.get("contractId")
        if name is None or not isinstance(contract, str):
            return
        acct = self._accounts[name]
        size = data.get("size")
        if action == _REMOVE or size == 0:
            acct.positions.pop(contract, None)
            return
        if isinstance(size, bool) or not isinstance(size, int | float) or size != int(size) \
                or data.get("type") not in (_LONG, _SHORT):
            acct.poisoned_at = acct.poisoned_at or datetime.now(UTC)
            return
        qty = abs(int(size)) * (1 if data.get("type") == _LONG else -1)
        previous = acct.positions.get(contract)
        avg = finite_or_none(data.get("averagePrice"))
        if avg is None:
            acct.poisoned_at = acct.poisoned_at or datetime.now(UTC)
            avg = previous[1] if previous else 0.0
        acct.positions[contract] = (qty, avg, _time(data.get("creationTimestamp")))
        self._want_quotes(contract)

    def _apply_order(self, data: dict[str, Any]) -> None:
        order_id = data.get("id")
        if not isinstance(order_id, int) or isinstance(order_id, bool):
            return
        known = self._orders.setdefault(order_id, {})
        tag = data.get("customTag") or known.get("customTag")
        known.update({k: v for k, v in data.items() if v is not None})
        if isinstance(tag, str) and tag:
            known["customTag"] = tag
            name = self._name_of(data.get("accountId"))
            record = self._tags.get(tag)
            if record is None and name is not None:
                contract = data.get("contractId")
                self._tags[tag] = _Tag(tag, name, "place",
                                       self._symbol(contract) if isinstance(contract, str)
                                       else None, str(order_id))
            elif record is not None and record.kind == "place":
                record.order_id = str(order_id)
                record.uncertain = False
        contract = data.get("contractId")
        if isinstance(contract, str) and data.get("status") in _WORKING_STATUS:
            self._want_quotes(contract)

    def _want_quotes(self, contract: str) -> None:
        self._quote_contracts.add(contract)
        loop, client = self._loop, self._market_client
        if client is not None and loop is not None and contract not in self._subscribed_quotes:
            self._subscribed_quotes.add(contract)
            loop.call_soon_threadsafe(
                self._spawn, self._invoke(client, "SubscribeContractQuotes", [contract]))

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        # asyncio keeps only weak references to tasks: an unreferenced one can be collected
        # mid-send, leaving the WebSocket's send lock held
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _resync(self) -> None:
        """Replace positions and refresh orders and balances from REST (after a (re)connect
        nothing tells us what the hubs pushed while we were away)."""
        start = (datetime.now(UTC) - timedelta(hours=self.settings.reconcile_hours))
        listed = self._post("/api/Account/search", {"onlyActiveAccounts": True}, wait=True)
        fetched: dict[str, tuple[list[Any], list[Any], list[Any]]] = {}
        for acct in list(self._accounts.values()):
            if acct.broker_id is None:
                continue
            body = {"accountId": acct.broker_id}
            positions = self._post("/api/Position/searchOpen", body, wait=True)
            history = self._post("/api/Order/search",
                                 {**body, "startTimestamp": start.isoformat()}, wait=True)
            working = self._post("/api/Order/searchOpen", body, wait=True)
            fetched[acct.spec.id] = (_items(positions, "positions"), _items(history, "orders"),
                                     _items(working, "orders"))
        with self._lock:
            for item in _items(listed, "accounts"):
                self._apply_account(item)
            for name, (positions_, history_, working_) in fetched.items():
                self._accounts[name].positions.clear()
                for item in positions_:
                    self._apply_position(item)
                for item in history_ + working_:
                    self._apply_order(item)
                open_ids = {o.get("id") for o in working_}
                broker_id = self._accounts[name].broker_id
                for order_id, order in self._orders.items():
                    # still "working" here but no longer open there: finished while we were
                    # away, and Order/search did not say how
                    if order.get("accountId") == broker_id and order_id not in open_ids and \
                            order.get("status") in _WORKING_STATUS and \
                            order_id not in {o.get("id") for o in history_}:
                        order["status"] = 3

    # --- hubs (on the loop thread) ------------------------------------------------------------

    def _hub_loop_main(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_async = asyncio.Event()
        tasks = [asyncio.create_task(self._run_hub("user")),
                 asyncio.create_task(self._run_hub("market")),
                 asyncio.create_task(self._validate_loop())]
        if self._stopping.is_set():
            self._stop_async.set()
        await self._stop_async.wait()
        # the hub loops end on their own (one cancel of their client each); a second cancel
        # arriving while websockets closes a socket would leave its send lock suspended
        hubs, others = tasks[:2], [tasks[2], *self._tasks]
        for task in others:
            task.cancel()
        await asyncio.wait(hubs, timeout=self.settings.request_timeout + 5)
        for task in hubs:
            task.cancel()
        await asyncio.gather(*tasks, *others, return_exceptions=True)
        # pysignalr leaves websockets' connect() generator to the garbage collector, whose
        # hook schedules its aclose() (closing the socket) as a task: let those finish, or
        # asyncio.run cancels them mid-close and the sockets leak
        current = asyncio.current_task()
        closing = [t for t in asyncio.all_tasks() if t is not current]
        if closing:
            await asyncio.wait(closing, timeout=self.settings.request_timeout + 1)

    async def _invoke(self, client: _HubClient, target: str, arguments: list[Any]) -> None:
        async def completed(message: Message) -> None:
            error = getattr(message, "error", None)
            if error:
                log.warning("ProjectX hub refused %s: %s", target, self._clean(error))

        try:
            await client.send(target, cast(list[dict[str, Any]], arguments), completed)
        except Exception as exc:  # noqa: BLE001 - a lost subscription shows up as a drop
            log.warning("ProjectX hub: %s failed: %s", target, type(exc).__name__)

    async def _run_hub(self, kind: Literal["user", "market"]) -> None:
        """Keep one hub connected: a fresh client (fresh negotiation, current token) per
        attempt, exponential backoff between attempts, subscriptions re-sent on every open."""
        settings = self.settings
        assert self._stop_async is not None
        stop = self._stop_async
        url = replace_scheme(settings.user_hub_url if kind == "user"
                             else settings.market_hub_url, ws=True)
        delay = settings.reconnect_min
        while not stop.is_set():
            if self._logged_out:
                await stop.wait()
                return
            dropped = asyncio.Event()
            opened = [False]
            client = _HubClient(
                url, headers={"Authorization": f"Bearer {self._token or ''}"},
                access_token_factory=lambda: self._token or "",
                signalr_ping_interval=settings.hub_ping_interval,
                connection_timeout=max(1, int(settings.request_timeout)))
            client._transport._skip_negotiation = settings.skip_negotiation

            async def on_open(client: _HubClient = client, dropped: asyncio.Event = dropped,
                              opened: list[bool] = opened) -> None:
                opened[0] = True
                await self._opened(kind, client, dropped)

            async def on_close(dropped: asyncio.Event = dropped) -> None:
                dropped.set()

            async def on_error(message: CompletionMessage) -> None:
                log.warning("ProjectX %s hub error: %s", kind, self._clean(message.error))

            client.on_open(on_open)
            client.on_close(on_close)
            client.on_error(on_error)
            self._register(kind, client)
            runner = asyncio.create_task(client.run())
            waits = [asyncio.create_task(stop.wait()), asyncio.create_task(dropped.wait())]
            await asyncio.wait([runner, *waits], return_when=asyncio.FIRST_COMPLETED)
            for task in (runner, *waits):
                task.cancel()
            results = await asyncio.gather(runner, *waits, return_exceptions=True)
            error = results[0]
            self._down(kind, "connection closed" if dropped.is_set() or
                       not isinstance(error, BaseException) or
                       isinstance(error, asyncio.CancelledError) else _describe(error))
            if stop.is_set():
                return
            if opened[0]:
                delay = settings.reconnect_min
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, settings.reconnect_max)

    def _register(self, kind: str, client: _HubClient) -> None:
        def each(apply: Callable[[dict[str, Any], object], None]
                 ) -> Callable[[Any], Awaitable[None]]:
            async def handler(arguments: Any) -> None:
                try:
                    with self._lock:
                        for action, data in _payloads(arguments):
                            apply(data, action)
                except Exception:  # a bad event must not kill the connection
                    log.exception("ProjectX: could not apply a hub event")
            return handler

        if kind == "user":
            client.on("GatewayUserAccount", each(lambda d, a: self._apply_account(d)))
            client.on("GatewayUserOrder", each(lambda d, a: self._apply_order(d)))
            client.on("GatewayUserPosition", each(self._apply_position))
            client.on("GatewayUserTrade", each(lambda d, a: None))
            client.on("GatewayLogout", self._on_logout)
        else:
            client.on("GatewayQuote", self._on_quote)

    async def _opened(self, kind: str, client: _HubClient, dropped: asyncio.Event) -> None:
        try:
            if kind == "user":
                await self._invoke(client, "SubscribeAccounts", [])
                for acct in self._accounts.values():
                    if acct.broker_id is not None:
                        for target in ("SubscribeOrders", "SubscribePositions",
                                       "SubscribeTrades"):
                            await self._invoke(client, target, [acct.broker_id])
                await asyncio.to_thread(self._resync)
                with self._lock:
                    self._user_live = self._ever_live = True
                    self._last_live = datetime.now(UTC)
                    self._hub_error = ""
                self._first_sync.set()
                log.info("ProjectX user hub connected and resynced")
            else:
                with self._lock:
                    self._subscribed_quotes = set(self._quote_contracts)
                    self._market_client = client
                    self._market_live = True
                for contract in sorted(self._subscribed_quotes):
                    await self._invoke(client, "SubscribeContractQuotes", [contract])
        except Exception as exc:  # noqa: BLE001 - retried by the reconnect loop
            with self._lock:
                self._hub_error = f"{kind} hub resync failed: {_describe(exc)}"
            log.warning("ProjectX %s", self._hub_error)
            dropped.set()

    def _down(self, kind: str, why: str) -> None:
        with self._lock:
            if kind == "user":
                if self._user_live:
                    self._last_live = datetime.now(UTC)
                    log.warning("ProjectX user hub down (%s): accounts go stale until it is "
                                "back", why)
                self._user_live = False
            else:
                self._market_live = False
                self._market_client = None
            if why:
                self._hub_error = f"{kind} hub: {why}"

    async def _on_logout(self, arguments: Any) -> None:
        with self._lock:
            self._logged_out = True
            if self._user_live:
                self._last_live = datetime.now(UTC)
            self._user_live = False
        # no reconnect from here on (see _run_hub): logging in again would log out the
        # session that replaced us, and the two would take turns
        log.critical(LOGOUT_MESSAGE)

    async def _on_quote(self, arguments: Any) -> None:
        try:
            if not isinstance(arguments, list) or len(arguments) < 2:
                return
            contract, data = arguments[0], arguments[1]
            if isinstance(data, dict) and "data" in data and "action" in data:
                data = data["data"]
            if not isinstance(contract, str) or not isinstance(data, dict):
                return
            with self._lock:
                quote = self._quotes.setdefault(contract, {})
                for ours, theirs in (("bid", "bestBid"), ("ask", "bestAsk"),
                                     ("last", "lastPrice")):
                    if theirs in data:  # quotes arrive as partial updates
                        quote[ours] = finite_or_none(data[theirs])
        except Exception:  # a bad quote must not kill the connection
            log.exception("ProjectX: could not apply a quote")

    async def _validate_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.validate_every)
            try:
                await asyncio.to_thread(self._validate)
            except Exception as exc:  # noqa: BLE001 - the next 401 logs in again anyway
                log.warning("ProjectX session renewal failed: %s", _describe(exc))

    def _validate(self) -> None:
        if self._logged_out:
            return
        data = self._post("/api/Auth/validate", None, wait=True)
        token = data.get("newToken")
        if data.get("success") is True and isinstance(token, str) and token:
            self._token = token
        else:
            with self._login_lock:
                self._login(wait=True)

    # --- AccountFeed ----------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        with self._lock:
            # the clock read under the lock the hub sets `_last_live` under: no account's data
            # time is after the snapshot's (which would send it to pydantic, the slow path)
            now = datetime.now(UTC)
            live = self._user_live and not self._logged_out
            accounts = []
            for acct in self._accounts.values():
                spec = acct.spec
                data: dict[str, Any] = {
                    **spec.snapshot_fields(),
                    "connected": acct.reported, "balance": acct.balance,
                    "positions": [
                        {"instrument": self._symbol(c), "qty": q, "avg_price": p,
                         **({"opened_at": t.isoformat()} if t else {})}
                        for c, (q, p, t) in acct.positions.items() if q],
                    "orders": [self._order_view(o) for o in self._orders.values()
                               if acct.broker_id is not None and
                               o.get("accountId") == acct.broker_id and
                               o.get("status") in _WORKING_STATUS and self._order_view(o)],
                }
                if acct.reported:
                    updated = now if live else self._last_live
                    if acct.poisoned_at and (updated is None or acct.poisoned_at < updated):
                        updated = acct.poisoned_at
                    if updated is not None:
                        data["updated_at"] = updated.isoformat()
                accounts.append(data)
            quotes = {self._symbol(c): dict(q) for c, q in self._quotes.items()}
        # ProjectX reports no open P&L: worked out from the positions and the hub's quotes
        return mark_to_market(self._build({"time": now.isoformat(),
                                                       "quotes": quotes,
                                                       "accounts": accounts}))

    def _order_view(self, order: dict[str, Any]) -> dict[str, Any]:
        size = order.get("size")
        filled = order.get("fillVolume") or 0
        contract = order.get("contractId")
        if not isinstance(size, int) or not isinstance(filled, int) or size - filled <= 0 or \
                not isinstance(contract, str):
            return {}
        view: dict[str, Any] = {
            "id": str(order["id"]), "instrument": self._symbol(contract),
            "side": "buy" if order.get("side") == _BID else "sell", "qty": size - filled,
            "type": _ORDER_TYPES.get(order.get("type", 2), "market"),
            "status": _WORKING_STATUS[order["status"]]}
        for ours, theirs in (("limit_price", "limitPrice"), ("stop_price", "stopPrice")):
            price = finite_or_none(order.get(theirs))
            if price is not None:
                view[ours] = price
        return view

    def contracts(self) -> dict[str, str]:
        return {a.spec.id: a.spec.instrument for a in self._accounts.values()
                if a.spec.role == "follower" and a.spec.instrument}

    # --- OrderPort ------------------------------------------------------------------------------

    def place_order(self, account: str, instrument: str, side: Side, qty: int,
                    order_type: Literal["market", "stop"], tag: str,
                    stop_price: float | None = None) -> BrokerAnswer:
        broker_id = self._target(account)
        try:
            contract = self._contract(instrument)
        except InstrumentError as exc:
            raise OrderRejected(str(exc)) from None
        if order_type == "stop" and finite_or_none(stop_price) is None:
            raise OrderRejected(f"a stop order needs a stop price, got {stop_price!r}")
        body: dict[str, Any] = {"accountId": broker_id, "contractId": contract,
                                "type": _STOP if order_type == "stop" else _MARKET,
                                "side": _BID if side == "buy" else _ASK, "size": qty,
                                "customTag": tag}
        if order_type == "stop":
            body["stopPrice"] = stop_price
        record = _Tag(tag, account, "place", self._symbol(contract))
        try:
            data = self._post("/api/Order/place", body)
        except BrokerUnavailable:
            record.uncertain = True  # it may have reached the broker: find_tag asks
            with self._lock:
                self._tags.setdefault(tag, record)
            raise
        with self._lock:
            self._want_quotes(contract)
            if data.get("success") is not True:
                reason = self._refusal("Order/place", data, _PLACE_CODES)
                record.state, record.reason = "rejected", reason
                self._tags.setdefault(tag, record)
                return BrokerAnswer("rejected", reason)
            order_id = str(data.get("orderId"))
            record = self._tags.setdefault(tag, record)
            record.order_id = order_id
        return BrokerAnswer("accepted", "", order_id)

    def close_position(self, account: str, instrument: str | None, tag: str) -> BrokerAnswer:
        broker_id = self._target(account)
        family = self._family(instrument) if instrument else None
        if instrument and family is None:
            raise OrderRejected(f"unknown instrument {instrument!r}")
        # the broker's own list, not our possibly stale one: close what is held now
        held = _items(self._post("/api/Position/searchOpen", {"accountId": broker_id}),
                      "positions")
        targets = sorted({p["contractId"] for p in held if isinstance(p.get("contractId"), str)
                          and p.get("size") and self._in_family(p["contractId"], family)})
        record = _Tag(tag, account, "close", instrument)
        with self._lock:
            self._tags[tag] = record
        closed: list[str] = []
        refusals: list[str] = []
        try:
            for contract in targets:
                data = self._post("/api/Position/closeContract",
                                  {"accountId": broker_id, "contractId": contract})
                if data.get("success") is True:
                    closed.append(contract)
                elif data.get("errorCode") != _POSITION_NOT_FOUND:  # already flat is fine
                    refusals.append(self._refusal("Position/closeContract", data, _CLOSE_CODES))
        finally:
            record.contracts = tuple(closed)
        cancel_problems = self._cancel_working(broker_id, family)
        if cancel_problems:
            log.warning("ProjectX %s: close %s left orders working: %s", account, tag,
                        "; ".join(cancel_problems))
        if refusals:
            record.state, record.reason = "rejected", "; ".join(refusals)
            return BrokerAnswer("rejected", record.reason)
        if not closed:
            record.state, record.reason = "filled", "already flat"
            return BrokerAnswer("filled", "already flat")
        return BrokerAnswer("accepted", "; ".join(cancel_problems))

    def _cancel_working(self, broker_id: int, family: str | None,
                        only: set[str] | None = None) -> list[str]:
        """Cancel the broker's working orders in `family`, one by one; the refusals."""
        working = _items(self._post("/api/Order/searchOpen", {"accountId": broker_id}),
                         "orders")
        problems = []
        for order in working:
            contract, order_id = order.get("contractId"), order.get("id")
            if not isinstance(contract, str) or not isinstance(order_id, int) or \
                    not self._in_family(contract, family):
                continue
            data = self._post("/api/Order/cancel", {"accountId": broker_id, "orderId": order_id})
            if data.get("success") is not True and data.get("errorCode") != _ORDER_NOT_FOUND:
                problems.append(f"order {order_id}: "
                                f"{self._refusal('Order/cancel', data, _CANCEL_CODES)}")
        return problems

    def cancel_order(self, account: str, order_id: str, tag: str) -> BrokerAnswer:
        broker_id = self._target(account)
        try:
            number = int(order_id)
        except ValueError:
            raise OrderRejected(f"ProjectX order ids are numbers, got {order_id!r}") from None
        record = _Tag(tag, account, "cancel", order_id=order_id)
        with self._lock:
            self._tags[tag] = record
        data = self._post("/api/Order/cancel", {"accountId": broker_id, "orderId": number})
        if data.get("success") is not True:
            record.state = "rejected"
            record.reason = self._refusal("Order/cancel", data, _CANCEL_CODES)
            return BrokerAnswer("rejected", record.reason, order_id)
        return BrokerAnswer("accepted", "", order_id)

    def cancel_orders(self, account: str, instrument: str | None, tag: str) -> BrokerAnswer:
        broker_id = self._target(account)
        family = self._family(instrument) if instrument else None
        if instrument and family is None:
            raise OrderRejected(f"unknown instrument {instrument!r}")
        record = _Tag(tag, account, "cancel", instrument, state="filled")
        with self._lock:
            self._tags[tag] = record
        problems = self._cancel_working(broker_id, family)
        if problems:
            record.state, record.reason = "rejected", "; ".join(problems)
            return BrokerAnswer("rejected", record.reason)
        return BrokerAnswer("accepted")

    def find_tag(self, tag: str) -> OrderReport | None:
        with self._lock:
            record = self._tags.get(tag)
        if record is None:
            return None
        if record.uncertain:
            self._search_tag(record)
            with self._lock:
                record = self._tags.get(tag, record)
            if record.uncertain:
                return None if record.reason == "not found" else OrderReport(
                    tag, "working", record.account, record.instrument,
                    reason="unverified: the request timed out")
        with self._lock:
            return self._report(record)

    def _search_tag(self, record: _Tag) -> None:
        """Ask Order/search whether a timed-out place reached the broker."""
        try:
            start = datetime.now(UTC) - timedelta(hours=self.settings.reconcile_hours)
            data = self._post("/api/Order/search",
                              {"accountId": self._target(record.account),
                               "startTimestamp": start.isoformat()})
        except BrokerError:
            return
        with self._lock:
            for order in _items(data, "orders"):
                self._apply_order(order)
            if record.uncertain:
                record.reason = "not found"

    def _report(self, record: _Tag) -> OrderReport:
        state, reason, filled = record.state, record.reason, 0
        order = self._orders.get(int(record.order_id)) \
            if record.order_id and record.order_id.isdigit() else None
        status = order.get("status") if order else None
        if record.kind == "place" and order is not None:
            if isinstance(status, int) and status in _FINAL_STATUS:
                state = _FINAL_STATUS[status]
                volume = order.get("fillVolume") or (order.get("size") if state == "filled"
                                                     else 0)
                filled = volume if isinstance(volume, int) else 0
            elif status in _WORKING_STATUS:
                state = "working"
        elif record.kind == "close" and record.state == "working":
            acct = self._accounts[record.account]
            if not any(c in acct.positions for c in record.contracts):
                state = "filled"
        elif record.kind == "cancel" and record.state == "working":
            if status in (3, 4):
                state = "filled"
            elif status in _FINAL_STATUS:
                state, reason = "rejected", f"the order was already {_FINAL_STATUS[status]}"
        return OrderReport(record.tag, state, record.account, record.instrument,
                           record.order_id, filled, reason)

    # --- lifecycle ----------------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> None:
        if self._closed:
            raise BrokerUnavailable("ProjectX adapter is closed")
        deadline = time.monotonic() + timeout
        with self._login_lock:
            self._login()
        listed = _items(self._post("/api/Account/search", {"onlyActiveAccounts": True}),
                        "accounts")
        with self._lock:
            for acct in self._accounts.values():
                match = next((a for a in listed if a.get("name") == acct.spec.id), None) or \
                    next((a for a in listed if str(a.get("id")) == acct.spec.id), None)
                if match is None:
                    log.warning("ProjectX does not list account %r among the active accounts",
                                acct.spec.id)
                    continue
                acct.broker_id = match.get("id")
                self._apply_account(match)
        if self._thread is None:
            self._thread = threading.Thread(target=self._hub_loop_main, daemon=True,
                                            name="projectx-hubs")
            self._thread.start()
        if not self._first_sync.wait(max(0.0, deadline - time.monotonic())):
            with self._lock:
                why = self._auth_error or self._hub_error or "no answer"
            self.close()
            if self._auth_error:
                raise AuthFailed(why)
            raise BrokerUnavailable(f"ProjectX user hub {self.settings.user_hub_url} not ready "
                                    f"within {timeout:g}s: {why}")

    def health(self) -> Health:
        with self._lock:
            state: HealthState
            if self._logged_out:
                state, detail = "auth_failed", LOGOUT_MESSAGE
            elif self._auth_error:
                state, detail = "auth_failed", self._auth_error
            elif self._user_live:
                state = "connected"
                detail = "" if self._market_live else "market hub down: quotes may be stale"
            elif not self._ever_live:
                state, detail = "connecting", self._hub_error
            else:
                state, detail = "disconnected", f"reconnecting; {self._hub_error}"
            return Health(state, detail, self._last_live or self._since)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        loop, stop = self._loop, self._stop_async
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10.0)
        with self._http_lock:
            self._http.close()


def _items(data: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items = data.get(key)
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _payloads(arguments: Any) -> list[tuple[object, dict[str, Any]]]:
    """Event arguments as (action, data): bare objects, `{action, data}` wrappers, lists."""
    out: list[tuple[object, dict[str, Any]]] = []
    for argument in arguments if isinstance(arguments, list) else [arguments]:
        if isinstance(argument, list):
            out.extend(_payloads(argument))
        elif isinstance(argument, dict):
            if "data" in argument and "action" in argument:
                inner = argument["data"]
                for data in inner if isinstance(inner, list) else [inner]:
                    if isinstance(data, dict):
                        out.append((argument["action"], data))
            else:
                out.append((None, argument))
    return out


def _time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None or not 2000 <= moment.year <= 2100:
        return None
    return moment.astimezone(UTC)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def create(settings: Settings, accounts: list[AccountSpec]) -> ProjectXBroker:
    return ProjectXBroker(settings, accounts)
