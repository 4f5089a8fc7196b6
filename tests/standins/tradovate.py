"""A Tradovate stand-in on 127.0.0.1: REST under /v1, the user socket at /v1/websocket and the
market-data socket at /v1/md/websocket, all on one aiohttp port in a thread with its own loop.

It holds a scripted world (accounts, contracts, positions, orders, cash, quotes), pushes `props`
and `md` frames when the world changes, and records every REST request (`records`) and socket
frame (`frames`) with the monotonic time it arrived. Faults: reject the next order, never fill,
answer 429, issue a p-ticket (or a captcha), expire or revoke tokens, drop or refuse sockets.

World changes from the test thread run on the server loop (`_call`), so the world is only ever
touched by one thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

USER = "test-user"
PASSWORD = "test-password-not-real"
SEC = "test-sec-not-real"


@dataclass
class Record:
    """One REST request as the stand-in received it."""

    at: float  # time.monotonic() on arrival
    method: str
    path: str  # lower case, without /v1/
    body: dict[str, Any] | None
    query: dict[str, str]


@dataclass(eq=False)
class _Conn:
    ws: web.WebSocketResponse
    kind: str  # user | md
    outbox: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    authorized: bool = False
    accounts: set[int] = field(default_factory=set)
    synced: bool = False
    quotes: set[int] = field(default_factory=set)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def send(self, messages: list[dict[str, Any]]) -> None:
        self.outbox.put_nowait("a" + json.dumps(messages))


class TradovateStandIn:
    """The stand-in server; `start()` / `stop()` from fixtures."""

    def __init__(self, accounts: dict[str, int] | None = None, *, token_lifetime: float = 4800.0,
                 heartbeat: float = 0.3, sync_bodies: tuple[str, ...] = ("users", "accounts"),
                 tags_in_sync: bool = True) -> None:
        self.accounts = dict(accounts or {"LEAD": 101, "F1": 102})
        self.user_id = 7
        self.contracts = {3001: "NQH6", 3002: "MNQH6", 3003: "ESH6"}
        self.price = 18000.0
        self.token_lifetime = token_lifetime
        self.heartbeat = heartbeat
        self.sync_bodies = sync_bodies
        self.tags_in_sync = tags_in_sync  # False: tags only in order/list (a variant)
        self.positions: dict[tuple[int, int], dict[str, Any]] = {}
        self.orders: dict[int, dict[str, Any]] = {}
        self.versions: dict[int, dict[str, Any]] = {}
        self.cash = {aid: {"id": 9000 + aid, "accountId": aid, "amount": 50000.0,
                           "realizedPnl": 0.0} for aid in self.accounts.values()}
        self.quotes: dict[int, dict[str, Any]] = {}
        self.tokens: dict[str, float] = {}  # token -> expiry (epoch seconds)
        self.md_tokens: set[str] = set()
        self.records: list[Record] = []
        self.frames: list[tuple[float, str, str]] = []  # (at, user|md, text)
        self.fills = "now"
        self.rejects: list[str] = []
        self.rate_limited = False
        self.penalties: dict[str, dict[str, Any]] = {}
        self.refuse_sockets = False
        self._seq = 10_000
        self._conns: set[_Conn] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.port = 0

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> TradovateStandIn:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self._thread.start()
        assert self._ready.wait(5.0), "stand-in did not start"
        return self

    def stop(self) -> None:
        if self._loop is None or self._stopped is None or self._thread is None:
            return
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(10.0)
        self._loop = None

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/v1/{tail:.*}", self._dispatch)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self._ready.set()
        await self._stopped.wait()
        await self._drop(None)
        await runner.cleanup()

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/websocket"

    @property
    def md_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/md/websocket"

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the server loop (where the world lives) and return its result."""
        assert self._loop is not None, "stand-in is stopped"

        async def run() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(5.0)

    # --- scripting the world -----------------------------------------------------------------

    def contract_id(self, symbol: str) -> int:
        return next(cid for cid, name in self.contracts.items() if name == symbol)

    def set_position(self, account: str, symbol: str, qty: int, price: float) -> None:
        aid, cid = self.accounts[account], self.contract_id(symbol)
        self._call(lambda: self._set_position(aid, cid, qty, price))

    def set_cash(self, account: str, amount: float, realized: float = 0.0) -> None:
        aid = self.accounts[account]

        def change() -> None:
            self.cash[aid].update(amount=amount, realizedPnl=realized)
            self._push("cashBalance", "Updated", self.cash[aid])

        self._call(change)

    def push_quote(self, symbol: str, bid: float, ask: float, last: float) -> None:
        cid = self.contract_id(symbol)

        def change() -> None:
            self.quotes[cid] = {"timestamp": _now(), "contractId": cid, "entries": {
                "Bid": {"price": bid, "size": 5}, "Offer": {"price": ask, "size": 5},
                "Trade": {"price": last, "size": 1}}}
            for conn in self._conns:
                if conn.kind == "md" and cid in conn.quotes:
                    conn.send([{"e": "md", "d": {"quotes": [self.quotes[cid]]}}])

        self._call(change)

    def place_manual_order(self, account: str, symbol: str, action: str, qty: int,
                           stop: float) -> int:
        """A stop order the trader places by hand in Tradovate's own platform (no tag of
        ours), pushed as any order is; returns its id."""
        aid, cid = self.accounts[account], self.contract_id(symbol)
        return int(self._call(
            lambda: self._new_order(aid, cid, action, qty, "Stop", None, stop)["id"]))

    def cancel_manual_order(self, order_id: int) -> None:
        """The trader cancels an order by hand."""
        self._call(lambda: self._finish(self.orders[order_id], "Canceled"))

    def reject_next(self, reason: str) -> None:
        self._call(lambda: self.rejects.append(reason))

    def hold_fills(self) -> None:
        self._call(lambda: setattr(self, "fills", "never"))

    def set_rate_limited(self, value: bool = True) -> None:
        self._call(lambda: setattr(self, "rate_limited", value))

    def penalize(self, path: str, p_time: float, captcha: bool = False) -> None:
        """The next request to `path` gets a p-ticket; it must come back with the ticket no
        sooner than `p_time` seconds later (a captcha penalty never lifts)."""
        self._call(lambda: self.penalties.__setitem__(path.lower(), {
            "ticket": f"ticket-{path}", "p_time": p_time, "captcha": captcha, "issued": None}))

    def drop_sockets(self, refuse: bool | None = None) -> None:
        """Close every user socket; `refuse` True keeps refusing new ones until set False."""
        async def change() -> None:
            if refuse is not None:
                self.refuse_sockets = refuse
            await self._drop("user")

        self._call(change)

    def revoke_tokens(self) -> None:
        """Every token stops working and the user sockets close (a newer login evicted us)."""
        async def change() -> None:
            self.tokens.clear()
            self.md_tokens.clear()
            await self._drop("user")

        self._call(change)

    # --- what it received --------------------------------------------------------------------

    def requests(self, path: str | None = None) -> list[Record]:
        return [r for r in list(self.records) if path is None or r.path == path.lower()]

    def commands(self) -> list[dict[str, Any]]:
        """Order commands in the contract suite's format."""
        names: dict[Any, str] = {aid: name for name, aid in self.accounts.items()}
        out: list[dict[str, Any]] = []
        for record in self.requests():
            body = record.body or {}
            if record.path == "order/placeorder":
                out.append({"kind": "place", "account": names.get(body.get("accountId"), ""),
                            "tag": body.get("customTag50"), "qty": body.get("orderQty"),
                            "side": str(body.get("action", "")).lower(),
                            "type": str(body.get("orderType", "")).lower(), "body": body})
            elif record.path == "order/liquidateposition":
                out.append({"kind": "close", "account": names.get(body.get("accountId"), ""),
                            "tag": body.get("customTag50"), "body": body})
            elif record.path == "order/cancelorder":
                order: dict[str, Any] = self.orders.get(body.get("orderId", -1), {})
                out.append({"kind": "cancel", "account": names.get(order.get("accountId"), ""),
                            "tag": body.get("customTag50"), "order_id": str(body.get("orderId")),
                            "body": body})
        return out

    # --- the world's mechanics (server loop only) ----------------------------------------

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _push(self, entity_type: str, event: str, entity: dict[str, Any]) -> None:
        if entity_type == "order" and not self.tags_in_sync:
            entity = {k: v for k, v in entity.items() if k != "customTag50"}
        for conn in self._conns:
            if conn.kind == "user" and conn.synced and entity.get("accountId", -1) in (
                    conn.accounts | {-1}):
                conn.send([{"e": "props", "d": {"entityType": entity_type, "eventType": event,
                                                "entity": entity}}])

    def _set_position(self, aid: int, cid: int, qty: int, price: float) -> None:
        key = (aid, cid)
        event = "Updated" if key in self.positions else "Created"
        pos = self.positions.setdefault(key, {"id": self._next(), "accountId": aid,
                                              "contractId": cid})
        pos.update(netPos=qty, netPrice=price if qty else None, timestamp=_now())
        self._push("position", event, pos)

    def _new_order(self, aid: int, cid: int, action: str, qty: int, order_type: str,
                   tag: str | None, stop: float | None) -> dict[str, Any]:
        oid = self._next()
        version = {"id": self._next(), "orderId": oid, "orderQty": qty, "orderType": order_type}
        if stop is not None:
            version["stopPrice"] = stop
        order = {"id": oid, "accountId": aid, "contractId": cid, "timestamp": _now(),
                 "action": action, "ordStatus": "Working", "admin": False, "customTag50": tag}
        self.versions[oid], self.orders[oid] = version, order
        self._push("orderVersion", "Created", {**version, "accountId": aid})
        self._push("order", "Created", order)
        if order_type == "Market" and self.fills == "now":
            self._fill(order, qty)
        return order

    def _fill(self, order: dict[str, Any], qty: int) -> None:
        key = (order["accountId"], order["contractId"])
        held = self.positions.get(key, {}).get("netPos", 0)
        new = held + (qty if order["action"] == "Buy" else -qty)
        self._set_position(*key, new, self.price)
        if new == 0:  # brackets go with the position
            for other in self.orders.values():
                if (other["accountId"], other["contractId"]) == key and \
                        other["ordStatus"] == "Working" and other is not order:
                    self._finish(other, "Canceled")
        self._finish(order, "Filled")

    def _finish(self, order: dict[str, Any], status: str) -> None:
        order["ordStatus"] = status
        self._push("order", "Updated", order)

    # --- REST ------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["tail"].lower().strip("/")
        if path == "websocket":
            return await self._socket(request, "user")
        if path == "md/websocket":
            return await self._socket(request, "md")
        body: dict[str, Any] | None = None
        if request.can_read_body:
            body = await request.json()
        self.records.append(Record(time.monotonic(), request.method, path, body,
                                   dict(request.query)))
        if self.rate_limited:
            return web.Response(status=429, text="Too Many Requests")
        penalty = self.penalties.get(path)
        if penalty is not None:
            ticket = (body or {}).get("p-ticket") or request.query.get("p-ticket")
            issued = penalty["issued"]
            if penalty["captcha"] or ticket != penalty["ticket"] or issued is None or \
                    time.monotonic() - issued < penalty["p_time"]:
                penalty["issued"] = time.monotonic()
                return web.json_response({"p-ticket": penalty["ticket"],
                                          "p-time": penalty["p_time"],
                                          "p-captcha": penalty["captcha"]})
            del self.penalties[path]
        if path == "auth/accesstokenrequest":
            return web.json_response(self._login(body or {}))
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ")
        if not self._valid(token):
            return web.Response(status=401, text="Unauthorized")
        return web.json_response(self._route(path, body or {}, request.query, token))

    def _valid(self, token: str) -> bool:
        return self.tokens.get(token, 0.0) > time.time()

    def _issue(self) -> dict[str, Any]:
        n = self._next()
        token, md = f"access-{n}-not-real", f"md-{n}-not-real"
        expires = time.time() + self.token_lifetime
        self.tokens[token] = expires
        self.md_tokens.add(md)
        stamp = datetime.fromtimestamp(expires, UTC).isoformat(timespec="milliseconds")
        return {"accessToken": token, "mdAccessToken": md, "userId": self.user_id,
                "expirationTime": stamp.replace("+00:00", "Z"), "name": USER,
                "userStatus": "Active", "hasLive": False}

    def _login(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("name") != USER or body.get("password") != PASSWORD:
            return {"errorText": "Incorrect username or password. Please try again."}
        if body.get("sec") != SEC or not body.get("cid") or not body.get("appId") or \
                not body.get("deviceId"):
            return {"errorText": "Invalid app credentials"}
        return self._issue()

    def _route(self, path: str, body: dict[str, Any], query: Any, token: str) -> Any:
        if path == "auth/renewaccesstoken":
            return self._issue()
        if path == "account/list":
            return [{"id": aid, "name": name, "userId": self.user_id, "active": True}
                    for name, aid in self.accounts.items()]
        if path == "position/list":
            return list(self.positions.values())
        if path == "order/list":
            return list(self.orders.values())
        if path == "contract/item":
            cid = int(query.get("id", "0"))
            return {"id": cid, "name": self.contracts[cid]} if cid in self.contracts else None
        if path == "contract/find":
            name = query.get("name", "")
            return next(({"id": c, "name": n} for c, n in self.contracts.items() if n == name),
                        None)
        if path == "cashbalance/getcashbalancesnapshot":
            cash = self.cash.get(int(body.get("accountId") or query.get("accountId", 0)), {})
            return {"totalCashValue": cash.get("amount"), "realizedPnL": cash.get("realizedPnl")}
        if path in ("order/placeorder", "order/liquidateposition", "order/cancelorder"):
            if self.rejects:
                return {"failureReason": "MaxPosLimitReached", "failureText": self.rejects.pop(0)}
            return getattr(self, "_" + path.split("/")[1])(body)
        return {"errorText": f"unknown endpoint {path}"}

    def _placeorder(self, body: dict[str, Any]) -> dict[str, Any]:
        aid = body.get("accountId")
        if not isinstance(aid, int) or aid not in self.accounts.values() or \
                self.accounts.get(str(body.get("accountSpec"))) != aid:
            return {"failureReason": "UnknownReason", "failureText": "Access is denied"}
        cid = next((c for c, n in self.contracts.items() if n == body.get("symbol")), None)
        if cid is None:
            return {"failureReason": "InvalidContract", "failureText": "Unknown symbol"}
        order = self._new_order(aid, cid, body["action"], body["orderQty"], body["orderType"],
                                body.get("customTag50"), body.get("stopPrice"))
        return {"orderId": order["id"]}

    def _liquidateposition(self, body: dict[str, Any]) -> dict[str, Any]:
        key: tuple[int, int] = (body.get("accountId", -1), body.get("contractId", -1))
        for order in list(self.orders.values()):
            if (order["accountId"], order["contractId"]) == key and \
                    order["ordStatus"] == "Working":
                self._finish(order, "Canceled")
        held = self.positions.get(key, {}).get("netPos", 0)
        if not held:
            return {}
        order = self._new_order(key[0], key[1], "Sell" if held > 0 else "Buy",
                                abs(held), "Market", body.get("customTag50"), None)
        return {"orderId": order["id"]}

    def _cancelorder(self, body: dict[str, Any]) -> dict[str, Any]:
        order = self.orders.get(body.get("orderId", -1))
        if order is None or order["ordStatus"] != "Working":
            return {"failureReason": "UnknownReason", "failureText": "Order is not working"}
        self._finish(order, "Canceled")
        return {"commandId": self._next()}

    # --- sockets ---------------------------------------------------------------------------

    async def _socket(self, request: web.Request, kind: str) -> web.StreamResponse:
        if kind == "user" and self.refuse_sockets:
            return web.Response(status=503, text="unavailable")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        conn = _Conn(ws, kind)
        self._conns.add(conn)
        conn.tasks = [asyncio.create_task(self._writer(conn)),
                      asyncio.create_task(self._beat(conn))]
        conn.outbox.put_nowait("o")
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    self.frames.append((time.monotonic(), kind, message.data))
                    self._handle(conn, message.data)
        finally:
            self._conns.discard(conn)
            for task in conn.tasks:
                task.cancel()
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        return ws

    async def _writer(self, conn: _Conn) -> None:
        while (text := await conn.outbox.get()) is not None:
            if conn.ws.closed:
                return
            with contextlib.suppress(ConnectionError):
                await conn.ws.send_str(text)

    async def _beat(self, conn: _Conn) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            conn.outbox.put_nowait("h")

    async def _drop(self, kind: str | None) -> None:
        for conn in list(self._conns):
            if kind is None or conn.kind == kind:
                await conn.ws.close()

    def _handle(self, conn: _Conn, text: str) -> None:
        if text == "[]":
            return
        url, rid_text, _query, body = ([*text.split("\n", 3), "", "", ""])[:4]
        rid = int(rid_text) if rid_text.isdigit() else -1
        url = url.lower()
        if url == "authorize":
            ok = body in (self.md_tokens if conn.kind == "md" else
                          {t for t in self.tokens if self._valid(t)})
            conn.authorized = ok
            conn.send([{"s": 200, "i": rid}] if ok else
                      [{"s": 401, "i": rid, "d": "Access is denied"}])
            return
        if not conn.authorized:
            conn.send([{"s": 401, "i": rid, "d": "Access is denied"}])
            return
        data = json.loads(body) if body else {}
        if url == "user/syncrequest":
            conn.send([self._sync(conn, rid, data)])
        elif url == "md/subscribequote":
            cid = next((c for c, n in self.contracts.items() if n == data.get("symbol")), None)
            if cid is None:
                conn.send([{"s": 404, "i": rid, "d": "Unknown symbol"}])
                return
            conn.quotes.add(cid)
            conn.send([{"s": 200, "i": rid, "d": {"contractId": cid}}])
            if cid in self.quotes:
                conn.send([{"e": "md", "d": {"quotes": [self.quotes[cid]]}}])
        else:
            conn.send([{"s": 404, "i": rid, "d": f"unknown {url}"}])

    def _sync(self, conn: _Conn, rid: int, data: dict[str, Any]) -> dict[str, Any]:
        if "users" in data and "users" in self.sync_bodies and data["users"] == [self.user_id]:
            ids = set(self.accounts.values())
        elif "accounts" in data and "accounts" in self.sync_bodies:
            ids = {a for a in data["accounts"] if a in self.accounts.values()}
        else:
            return {"s": 400, "i": rid, "d": "Invalid syncrequest body"}
        conn.accounts, conn.synced = ids, True
        orders = [o for o in self.orders.values() if o["accountId"] in ids]
        positions = [p for p in self.positions.values() if p["accountId"] in ids]
        if not self.tags_in_sync:
            orders = [{k: v for k, v in o.items() if k != "customTag50"} for o in orders]
        return {"s": 200, "i": rid, "d": {
            "users": [{"id": self.user_id, "name": USER}],
            "accounts": [{"id": aid, "name": n, "userId": self.user_id, "active": True}
                         for n, aid in self.accounts.items() if aid in ids],
            # as Tradovate does: only the contracts the synced entities refer to
            "contracts": [{"id": c, "name": n} for c, n in self.contracts.items()
                          if any(e["contractId"] == c for e in [*orders, *positions])],
            "positions": positions,
            "orders": orders,
            "orderVersions": [v for o, v in self.versions.items() if o in
                              {order["id"] for order in orders}],
            "cashBalances": [c for c in self.cash.values() if c["accountId"] in ids],
            "executionReports": [], "commands": []}}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def max_in_window(times: list[float], window: float) -> int:
    """The most requests among `times` that fall within any span of `window` seconds."""
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best

