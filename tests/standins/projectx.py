"""A ProjectX Gateway stand-in on 127.0.0.1: the REST API on one port and the two SignalR hubs
(JSON hub protocol, negotiate or direct WebSocket) on another, as the real hubs live on another
host. It holds a scriptable world and records every request it received.

    server = ProjectXStandIn({"LEAD": 101, "F1": 102}).start()
    server.set_position("F1", "CON.F.US.ENQ.H26", 2, 18000.0)   # pushed to subscribers
    server.reject_next("max position size reached")
    server.commands   # [{"kind": "place", "account": "F1", "tag": "CLR-1", ...}]
    server.stop()
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

SEP = "\x1e"
API_KEY = "test-key-not-real"
USERNAME = "trader-test"
_WORKING = (1, 6)


@dataclass
class _Conn:
    hub: str
    ws: web.WebSocketResponse
    subs: set[tuple[str, Any]] = field(default_factory=set)


class ProjectXStandIn:
    """The ProjectX REST API and hubs, with a world set by hand."""

    def __init__(self, accounts: dict[str, int], *, wrap_events: bool = False,
                 search_open_tags: bool = False, ping_interval: float = 0.5,
                 rate_limit: int = 200, rate_window: float = 60.0, price: float = 18000.0
                 ) -> None:
        self.accounts = {name: {"id": number, "name": name, "balance": 50000.0,
                                "canTrade": True, "isVisible": True, "simulated": True}
                         for name, number in accounts.items()}
        self.wrap_events = wrap_events
        self.search_open_tags = search_open_tags  # the real searchOpen may omit customTag
        self.ping_interval = ping_interval
        self.rate_limit, self.rate_window = rate_limit, rate_window
        self.price = price
        # the world
        self.positions: dict[tuple[int, str], tuple[int, float]] = {}
        self.orders: dict[int, dict[str, Any]] = {}
        self.tags: dict[int, set[str]] = {}
        # faults
        self.hold_fills = False
        self.refuse_hubs = False
        self.refuse_tokens = False  # even fresh logins get tokens the API refuses
        self.login_error: tuple[int, str] | None = None
        self._reject: list[tuple[int, str]] = []
        self._limit_next: list[float] = []
        # records
        self.rest: list[dict[str, Any]] = []
        self.commands: list[dict[str, Any]] = []
        self.invocations: list[dict[str, Any]] = []
        self.connections: list[dict[str, Any]] = []
        self._tokens: set[str] = set()
        self._negotiated: dict[str, str] = {}
        self._conns: list[_Conn] = []
        self._next_id = 9000
        self._lock = threading.RLock()
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._runners: list[web.AppRunner] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.api_port = self.hub_port = 0
        self.running = False

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def hub_url(self, hub: str) -> str:
        return f"http://127.0.0.1:{self.hub_port}/rtc/hubs/{hub}"

    def start(self) -> ProjectXStandIn:
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="projectx-standin")
        self._thread.start()
        self._call(self._start())
        self.running = True
        return self

    async def _start(self) -> None:
        api = web.Application()
        api.router.add_post("/api/{name:.*}", self._api)
        hubs = web.Application()
        hubs.router.add_post("/rtc/hubs/{hub}/negotiate", self._negotiate)
        hubs.router.add_get("/rtc/hubs/{hub}", self._hub)
        for app, attr in ((api, "api_port"), (hubs, "hub_port")):
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self._runners.append(runner)
            setattr(self, attr, runner.addresses[0][1])

    def stop(self) -> None:
        """Stop both servers (the broker becomes unreachable); safe to call twice."""
        if not self.running:
            return
        self.running = False
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._loop.close()

    async def _stop(self) -> None:
        for conn in list(self._conns):
            await conn.ws.close()
        for runner in self._runners:
            await runner.cleanup()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    # --- scripting the world -------------------------------------------------------------------

    def account_id(self, name: str) -> int:
        return int(self.accounts[name]["id"])

    def set_position(self, account: str, contract: str, qty: int, avg_price: float) -> None:
        """Change a position as if a fill happened, and push it."""
        key = (self.account_id(account), contract)
        with self._lock:
            if qty:
                self.positions[key] = (qty, avg_price)
            else:
                self.positions.pop(key, None)
            event = self._position_model(key)
        self.push_user("GatewayUserPosition", event, key[0])

    def place_manual_order(self, account: str, contract: str, side: str, size: int,
                           stop_price: float) -> int:
        """A stop order the trader places by hand in the firm's platform (no tag of ours),
        pushed to the user hub as any order is; returns its id."""
        with self._lock:
            order = self._new_order(self.account_id(account), contract,
                                    {"type": 4, "side": 0 if side == "buy" else 1,
                                     "size": size, "stopPrice": stop_price}, None)
            order["status"] = 1
            event = self._event("GatewayUserOrder", order)
        self._send_user([event])
        return int(order["id"])

    def cancel_manual_order(self, order_id: int) -> None:
        """The trader cancels an order by hand."""
        with self._lock:
            order = self.orders[order_id]
            order.update(status=3, updateTimestamp=_now())
            event = self._event("GatewayUserOrder", order)
        self._send_user([event])

    def reject_next(self, reason: str, code: int = 2) -> None:
        self._reject.append((code, reason))

    def rate_limit_next(self, count: int = 1, retry_after: float = 7.0) -> None:
        self._limit_next.extend([retry_after] * count)

    def expire_tokens(self) -> None:
        """Every session token issued so far stops working (401), as after 24 h."""
        with self._lock:
            self._tokens.clear()

    def drop_hubs(self) -> None:
        """Close every hub WebSocket, as a network drop would."""
        async def drop() -> None:
            for conn in list(self._conns):
                await conn.ws.close(code=1011, message=b"dropped")
        self._call(drop())

    def logout(self) -> None:
        """Push GatewayLogout to the user hub and end the sessions."""
        self.expire_tokens()
        self._send_user([("GatewayLogout", [], None)])

    def push_user(self, target: str, payload: dict[str, Any], account_id: int | None, *,
                  wrap: bool | None = None, action: int = 1) -> None:
        """Push one user-hub event to the connections subscribed to it."""
        wrapped = self.wrap_events if wrap is None else wrap
        argument = {"action": action, "data": payload} if wrapped else payload
        self._send_user([(target, [argument], account_id)])

    def push_quote(self, contract: str, data: dict[str, Any]) -> None:
        message = {"type": 1, "target": "GatewayQuote", "arguments": [contract, data]}

        async def send() -> None:
            for conn in list(self._conns):
                if conn.hub == "market" and ("SubscribeContractQuotes", contract) in conn.subs:
                    await conn.ws.send_str(json.dumps(message) + SEP)
        self._call(send())

    def _send_user(self, events: list[tuple[str, list[Any], int | None]]) -> None:
        """Send events in ONE frame per connection (several records per frame)."""
        subscription = {"GatewayUserOrder": "SubscribeOrders",
                        "GatewayUserPosition": "SubscribePositions",
                        "GatewayUserTrade": "SubscribeTrades",
                        "GatewayUserAccount": "SubscribeAccounts"}

        async def send() -> None:
            for conn in list(self._conns):
                if conn.hub != "user":
                    continue
                frame = ""
                for target, arguments, account_id in events:
                    needed = subscription.get(target)
                    key = None if target == "GatewayUserAccount" else account_id
                    if needed is None or (needed, key) in conn.subs:
                        frame += json.dumps({"type": 1, "target": target,
                                             "arguments": arguments}) + SEP
                if frame and not conn.ws.closed:
                    await conn.ws.send_str(frame)
        if self.running:
            self._call(send())

    # --- records --------------------------------------------------------------------------------

    def calls(self, name: str) -> list[dict[str, Any]]:
        """REST requests to `name` (e.g. "Order/search"), oldest first."""
        with self._lock:
            return [r for r in self.rest if r["path"] == name]

    def subscribed(self, target: str) -> list[dict[str, Any]]:
        with self._lock:
            return [i for i in self.invocations if i["target"] == target]

    def max_in_window(self, window: float = 60.0) -> int:
        """The most REST requests received within any `window` seconds."""
        with self._lock:
            stamps = [r["at"] for r in self.rest]
        best, first = 0, 0
        for last, stamp in enumerate(stamps):
            while stamp - stamps[first] >= window:
                first += 1
            best = max(best, last - first + 1)
        return best

    # --- REST ------------------------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ") if header.startswith("Bearer ") else \
            request.query.get("access_token", "")
        with self._lock:
            return token in self._tokens

    async def _api(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await request.json() if request.can_read_body else None
        with self._lock:
            now = time.monotonic()
            record: dict[str, Any] = {"path": name, "body": body, "at": now, "status": 200}
            self.rest.append(record)
            recent = sum(1 for r in self.rest if r["at"] > now - self.rate_window)
            if self._limit_next or recent > self.rate_limit:
                wait = self._limit_next.pop(0) if self._limit_next else self.rate_window
                record["status"] = 429
                return web.Response(status=429, headers={"Retry-After": f"{wait:g}"})
            if name == "Auth/loginKey":
                return web.json_response(self._login(body or {}))
            if not self._authorized(request):
                record["status"] = 401
                return web.Response(status=401)
            handler = getattr(self, "_" + name.replace("/", "_").lower(), None)
            if handler is None:
                record["status"] = 404
                return web.Response(status=404)
            answer, events = handler(body or {})
        if events:
            self._queue(events)
        return web.json_response(answer)

    def _queue(self, events: list[tuple[str, list[Any], int | None]]) -> None:
        async def send() -> None:
            await asyncio.sleep(0)
            await self._send_events(events)
        task = self._loop.create_task(send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_events(self, events: list[tuple[str, list[Any], int | None]]) -> None:
        # reuse the frame builder on the loop without re-entering _call
        subscription = {"GatewayUserOrder": "SubscribeOrders",
                        "GatewayUserPosition": "SubscribePositions"}
        for conn in list(self._conns):
            if conn.hub != "user":
                continue
            frame = "".join(json.dumps({"type": 1, "target": t, "arguments": a}) + SEP
                            for t, a, acct in events if (subscription[t], acct) in conn.subs)
            if frame and not conn.ws.closed:
                await conn.ws.send_str(frame)

    def _login(self, body: dict[str, Any]) -> dict[str, Any]:
        def refused(code: int, message: str) -> dict[str, Any]:
            return {"token": None, "success": False, "errorCode": code,
                    "errorMessage": message}
        if self.login_error is not None:
            return refused(*self.login_error)
        if body.get("userName") != USERNAME:
            return refused(1, "User not found")
        if body.get("apiKey") != API_KEY:
            return refused(3, "Invalid credentials")
        token = f"session-{uuid.uuid4().hex[:12]}"
        if not self.refuse_tokens:
            self._tokens.add(token)
        return {"token": token, "success": True, "errorCode": 0, "errorMessage": None}

    def _auth_validate(self, body: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        token = f"session-{uuid.uuid4().hex[:12]}"
        self._tokens.add(token)
        return {"success": True, "errorCode": 0, "errorMessage": None, "newToken": token}, []

    def _account_search(self, body: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        return _ok(accounts=list(self.accounts.values())), []

    def _position_searchopen(self, body: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        account = body.get("accountId")
        return _ok(positions=[self._position_model(key) for key in self.positions
                              if key[0] == account]), []

    def _order_searchopen(self, body: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        orders = [dict(o) for o in self.orders.values()
                  if o["accountId"] == body.get("accountId") and o["status"] in _WORKING]
        if not self.search_open_tags:
            for order in orders:
                order.pop("customTag", None)
        return _ok(orders=orders), []

    def _order_search(self, body: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        start = datetime.fromisoformat(str(body.get("startTimestamp")))
        return _ok(orders=[dict(o) for o in self.orders.values()
                           if o["accountId"] == body.get("accountId") and
                           datetime.fromisoformat(o["creationTimestamp"]) >= start]), []

    def _account_name(self, account_id: object) -> str:
        return next((n for n, a in self.accounts.items() if a["id"] == account_id), "?")

    def _order_place(self, body: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        account, contract = body.get("accountId"), str(body.get("contractId"))
        tag = body.get("customTag")
        self.commands.append({
            "kind": "place", "account": self._account_name(account), "tag": tag,
            "qty": body.get("size"), "side": "buy" if body.get("side") == 0 else "sell",
            "type": {2: "market", 4: "stop"}.get(body.get("type"), str(body.get("type"))),
            "stop_price": body.get("stopPrice"), "contract": contract})
        if account not in {a["id"] for a in self.accounts.values()}:
            return _refused(1, "Account not found"), []
        used = self.tags.setdefault(int(account), set())
        if tag in used:
            return _refused(2, "custom tag already in use"), []
        if tag:
            used.add(tag)
        order = self._new_order(int(account), contract, body, tag)
        if self._reject:
            code, reason = self._reject.pop(0)
            order["status"] = 5
            return _refused(code, reason) | {"orderId": None}, []
        events: list[tuple[str, list[Any], int | None]] = []
        if order["type"] == 2 and not self.hold_fills:
            events += self._fill(order)
        else:
            order["status"] = 1
            events.append(self._event("GatewayUserOrder", order))
        return _ok(orderId=order["id"]), events

    def _position_closecontract(self, body: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        account, contract = body.get("accountId"), str(body.get("contractId"))
        self.commands.append({"kind": "close", "account": self._account_name(account),
                              "contract": contract})
        if self._reject:
            _, reason = self._reject.pop(0)
            return _refused(5, reason), []
        held = self.positions.get((int(str(account)), contract))
        if not held:
            return _refused(2, "Position not found"), []
        qty = held[0]
        order = self._new_order(int(str(account)), contract,
                                {"type": 2, "side": 1 if qty > 0 else 0, "size": abs(qty)}, None)
        if self.hold_fills:
            order["status"] = 1
            return _ok(), [self._event("GatewayUserOrder", order)]
        return _ok(), self._fill(order)

    def _order_cancel(self, body: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        account, order_id = body.get("accountId"), body.get("orderId")
        self.commands.append({"kind": "cancel", "account": self._account_name(account),
                              "order_id": str(order_id)})
        if self._reject:
            _, reason = self._reject.pop(0)
            return _refused(3, reason), []
        order = self.orders.get(order_id) if isinstance(order_id, int) else None
        if order is None or order["accountId"] != account or order["status"] not in _WORKING:
            return _refused(2, "Order not found"), []
        order["status"] = 3
        order["updateTimestamp"] = _now()
        return _ok(), [self._event("GatewayUserOrder", order)]

    def _contract_search(self, body: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        return _ok(contracts=[{"id": "CON.F.US.ENQ.H26", "name": "NQH6",
                               "description": "E-mini Nasdaq-100", "tickSize": 0.25,
                               "tickValue": 5.0, "activeContract": True,
                               "symbolId": "F.US.ENQ"}]), []

    # --- order mechanics (under _lock) -------------------------------------------------------

    def _new_order(self, account: int, contract: str, body: dict[str, Any],
                   tag: str | None) -> dict[str, Any]:
        self._next_id += 1
        order = {"id": self._next_id, "accountId": account, "contractId": contract,
                 "symbolId": ".".join(contract.split(".")[:4]), "creationTimestamp": _now(),
                 "updateTimestamp": _now(), "status": 6, "type": body.get("type"),
                 "side": body.get("side"), "size": body.get("size"), "limitPrice": None,
                 "stopPrice": body.get("stopPrice"), "fillVolume": 0, "filledPrice": None,
                 "customTag": tag}
        self.orders[order["id"]] = order
        return order

    def _fill(self, order: dict[str, Any]) -> list[tuple[str, list[Any], int | None]]:
        key = (order["accountId"], order["contractId"])
        held, avg = self.positions.get(key, (0, self.price))
        delta = order["size"] if order["side"] == 0 else -order["size"]
        new = held + delta
        if new == 0:
            self.positions.pop(key, None)
        else:
            self.positions[key] = (new, avg if held * new > 0 else self.price)
        order.update(status=2, fillVolume=order["size"], filledPrice=self.price,
                     updateTimestamp=_now())
        return [self._event("GatewayUserOrder", order),
                self._event("GatewayUserPosition", self._position_model(key))]

    def _position_model(self, key: tuple[int, str]) -> dict[str, Any]:
        qty, avg = self.positions.get(key, (0, 0.0))
        return {"id": hash(key) % 100000, "accountId": key[0], "contractId": key[1],
                "creationTimestamp": _now(), "type": 1 if qty >= 0 else 2, "size": abs(qty),
                "averagePrice": avg}

    def _event(self, target: str, payload: dict[str, Any]
               ) -> tuple[str, list[Any], int | None]:
        data = dict(payload)
        argument = {"action": 1, "data": data} if self.wrap_events else data
        return target, [argument], int(payload["accountId"])

    # --- hubs --------------------------------------------------------------------------------

    async def _negotiate(self, request: web.Request) -> web.Response:
        hub = request.match_info["hub"]
        if self.refuse_hubs:
            return web.Response(status=503)
        if not self._authorized(request):
            return web.Response(status=401)
        connection_id = uuid.uuid4().hex
        answer: dict[str, Any] = {"connectionId": connection_id, "availableTransports": [
            {"transport": "WebSockets", "transferFormats": ["Text", "Binary"]}]}
        if request.query.get("negotiateVersion") == "1":
            token = uuid.uuid4().hex
            answer |= {"connectionToken": token, "negotiateVersion": 1}
            self._negotiated[token] = hub
        else:  # version 0: the client connects with the connectionId
            self._negotiated[connection_id] = hub
        return web.json_response(answer)

    async def _hub(self, request: web.Request) -> web.StreamResponse:
        hub = request.match_info["hub"]
        if self.refuse_hubs:
            return web.Response(status=503)
        given = request.query.get("id")
        if given is not None and self._negotiated.pop(given, None) != hub:
            return web.Response(status=404)  # connection ids are single use
        if not self._authorized(request):
            return web.Response(status=401)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        first = await ws.receive(timeout=5)
        records = [r for r in str(first.data).split(SEP) if r] if first.type == WSMsgType.TEXT \
            else []
        if not records or json.loads(records[0]) != {"protocol": "json", "version": 1}:
            await ws.send_str(json.dumps({"error": "unsupported protocol"}) + SEP)
            await ws.close()
            return ws
        await ws.send_str("{}" + SEP)
        conn = _Conn(hub, ws)
        with self._lock:
            self.connections.append({"hub": hub, "mode": "negotiated" if given else "direct"})
            self._conns.append(conn)
        pinger = asyncio.create_task(self._ping(ws))
        try:
            for record in records[1:]:
                await self._on_record(conn, record)
            async for message in ws:
                if message.type != WSMsgType.TEXT:
                    break
                for record in str(message.data).split(SEP):
                    if record:
                        await self._on_record(conn, record)
        finally:
            pinger.cancel()
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)
        return ws

    async def _ping(self, ws: web.WebSocketResponse) -> None:
        while not ws.closed:
            await asyncio.sleep(self.ping_interval)
            if not ws.closed:
                await ws.send_str(json.dumps({"type": 6}) + SEP)

    async def _on_record(self, conn: _Conn, record: str) -> None:
        message = json.loads(record)
        kind = message.get("type")
        if kind == 7:
            await conn.ws.close()
            return
        if kind != 1:
            return
        target, arguments = message.get("target"), message.get("arguments", [])
        invocation_id = message.get("invocationId")
        with self._lock:
            self.invocations.append({"hub": conn.hub, "target": target, "arguments": arguments,
                                     "fields": sorted(message)})
        known = {"user": {"SubscribeAccounts", "SubscribeOrders", "SubscribePositions",
                          "SubscribeTrades"},
                 "market": {"SubscribeContractQuotes", "SubscribeContractTrades"}}[conn.hub]
        reply: dict[str, Any] = {"type": 3, "invocationId": invocation_id}
        if target in known:
            conn.subs.add((target, arguments[0] if arguments else None))
        else:
            reply["error"] = f"Unknown hub method '{target}'"
        if invocation_id is not None:
            await conn.ws.send_str(json.dumps(reply) + SEP)


def _ok(**fields: Any) -> dict[str, Any]:
    return {"success": True, "errorCode": 0, "errorMessage": None, **fields}


def _refused(code: int, message: str) -> dict[str, Any]:
    return {"success": False, "errorCode": code, "errorMessage": message}


def _now() -> str:
    return datetime.now(UTC).isoformat()
