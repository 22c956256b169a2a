"""WebSocket `/api/v1/ws`: authenticate, subscribe to channels, receive `{event, data}` events.

Authentication comes first: a key in the upgrade request's header (`Authorization: Bearer` or
`X-API-Key`), or `{"type": "auth", "key": "..."}` as the first message (a browser cannot set headers);
with no keys configured a loopback client is the anonymous viewer, as on the rest of the API. Then
`{"type": "subscribe" | "unsubscribe", "channels": [...]}` (`agent.live.CHANNELS`); the answer is
`{"event": "subscribed", "data": {"channels": [...]}}`, followed by the current state of each newly
subscribed channel. `{"type": "ping"}` is answered `{"event": "pong"}`.

The server pings every `PING_INTERVAL_S`; a client that leaves `MISSED_PINGS` pings unanswered (and sends
nothing else) is closed. A client whose queue fills is dropped (`agent.live`). Every close says why,
with a code in the 4000 range and a reason: 4400 bad message, 4401 authentication refused or missing,
4408 heartbeat missed, 4429 too fast or too slow; 1001 when the daemon stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import WSMsgType, web

from agent import jsonin
from agent.http_auth import Caller
from agent.http_errors import ApiError
from agent.live import CHANNELS, Client, LiveHub, event_text
from agent.ratelimit import TokenBucket

log = structlog.get_logger("edge_agent.ws")

PING_INTERVAL_S = 30.0
MISSED_PINGS = 2  # unanswered pings in a row that close a client
AUTH_TIMEOUT_S = 10.0  # the auth message must arrive within this
MAX_MESSAGE_BYTES = 4096  # a client's message; the protocol's are tiny
MESSAGES_PER_S = 20.0  # a client's messages, with a burst of `MESSAGES_BURST`
MESSAGES_BURST = 100
SEND_BUFFER_BYTES = 128 << 10  # the kernel's send buffer per client: fixed, so a stalled client costs little
CLOSE_TIMEOUT_S = 2.0  # a close that cannot be sent (a client that does not read) aborts the connection

BAD_MESSAGE, UNAUTHORIZED, HEARTBEAT, TOO_FAST_OR_SLOW, GOING_AWAY = 4400, 4401, 4408, 4429, 1001


class Closing(Exception):
    """Close the connection with `code` and `reason`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _parse(text: str) -> dict[str, Any]:
    """A client message through the outside-JSON gate; Closing(4400) naming what is wrong."""
    try:
        msg = jsonin.loads(text, max_bytes=MAX_MESSAGE_BYTES, what="WebSocket message")
    except jsonin.InputError as err:
        raise Closing(BAD_MESSAGE, str(err)[:120]) from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise Closing(BAD_MESSAGE, 'a message is a JSON object with a "type"')
    return msg


def _channels(msg: dict[str, Any]) -> list[str]:
    channels = msg.get("channels")
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise Closing(BAD_MESSAGE, '"channels" must be a list of channel names')
    for c in channels:
        if c not in CHANNELS:
            raise Closing(BAD_MESSAGE, f"unknown channel {c[:40]!r}; channels: {', '.join(CHANNELS)}")
    return channels


class WsEndpoint:
    """The WebSocket route. `check_key(key, address)` is the API's key check (throttled per address):
    it returns the caller or raises ApiError. `snapshot(channel)` gives the current state as texts."""

    def __init__(
        self,
        hub: LiveHub,
        check_key: Callable[[str, str], Caller],
        snapshot: Callable[[str], list[str]],
    ) -> None:
        self.hub = hub
        self.check_key = check_key
        self.snapshot = snapshot
        self.sockets: set[web.WebSocketResponse] = set()

    async def handle(self, request: web.Request, caller: Caller | None) -> web.WebSocketResponse:
        """Serve one WebSocket client until it leaves, is dropped, or the daemon stops."""
        # No per-message deflate: it would compress every event once per client, on the daemon's loop.
        ws = web.WebSocketResponse(autoping=False, max_msg_size=MAX_MESSAGE_BYTES, compress=False)
        await ws.prepare(request)
        sock = request.transport.get_extra_info("socket") if request.transport is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        self.sockets.add(ws)
        address = request.remote or "unknown"
        client: Client | None = None
        try:
            if caller is None:
                caller = await self._authenticate(ws, address)
            client = Client(f"{caller.name}@{address}")
            self.hub.add(client)
            await ws.send_str(
                event_text("welcome", {"caller": caller.name, "role": caller.role, "channels": list(CHANNELS)})
            )
            await self._serve(ws, client)
        except Closing as err:
            log.info("ws_closed", client=client.name if client else address, code=err.code, reason=err.reason)
            await self._close(request, ws, err.code, err.reason)
        except ConnectionError as err:
            # The client went away mid-send: nothing to close, only its place in the hub to free.
            log.debug("ws_gone", client=client.name if client else address, error=str(err))
        finally:
            if client is not None:
                self.hub.remove(client)
            self.sockets.discard(ws)
            if not ws.closed:
                await self._close(request, ws, GOING_AWAY, "the daemon is stopping")
        return ws

    async def _authenticate(self, ws: web.WebSocketResponse, address: str) -> Caller:
        try:
            async with asyncio.timeout(AUTH_TIMEOUT_S):
                msg = await ws.receive()
        except TimeoutError:
            raise Closing(UNAUTHORIZED, f"no auth message within {AUTH_TIMEOUT_S:g} s") from None
        if msg.type != WSMsgType.TEXT:
            raise Closing(UNAUTHORIZED, 'authenticate first: {"type": "auth", "key": "..."}')
        body = _parse(msg.data)
        key = body.get("key")
        if body["type"] != "auth" or not isinstance(key, str):
            raise Closing(UNAUTHORIZED, 'authenticate first: {"type": "auth", "key": "..."}')
        try:
            return self.check_key(key, address)
        except ApiError as err:
            raise Closing(UNAUTHORIZED, str(err)[:120]) from None

    async def _serve(self, ws: web.WebSocketResponse, client: Client) -> None:
        pongs = _Heartbeat()
        tasks = [
            asyncio.create_task(self._read(ws, client, pongs)),
            asyncio.create_task(self._write(ws, client)),
            asyncio.create_task(pongs.run(ws)),
            asyncio.create_task(_dropped(client)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()  # a Closing from any of them closes with its reason

    async def _read(self, ws: web.WebSocketResponse, client: Client, beat: _Heartbeat) -> None:
        bucket = TokenBucket(MESSAGES_PER_S, burst=MESSAGES_BURST)
        while True:
            msg = await ws.receive()
            beat.heard()
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return
            if msg.type == WSMsgType.PING:
                await ws.pong(msg.data)
                continue
            if msg.type == WSMsgType.PONG:
                continue
            if not bucket.take():
                raise Closing(TOO_FAST_OR_SLOW, f"more than {MESSAGES_PER_S:g} messages per second")
            if msg.type != WSMsgType.TEXT:
                raise Closing(BAD_MESSAGE, "messages are JSON text")
            self._command(client, _parse(msg.data))

    def _command(self, client: Client, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "ping":
            client.offer(event_text("pong", None))
        elif kind == "auth":
            return  # already authenticated (by header or an earlier message): a repeat changes nothing
        elif kind in ("subscribe", "unsubscribe"):
            channels = _channels(msg)
            added = [c for c in channels if c not in client.channels] if kind == "subscribe" else []
            if kind == "subscribe":
                client.channels.update(channels)
            else:
                client.channels.difference_update(channels)
            client.offer(event_text("subscribed", {"channels": sorted(client.channels)}))
            for channel in added:
                for text in self.snapshot(channel):
                    if not client.offer(text):
                        client.drop("too slow for the current state")
                        return
        else:
            raise Closing(BAD_MESSAGE, f"unknown message type {kind[:40]!r}")

    async def _write(self, ws: web.WebSocketResponse, client: Client) -> None:
        while True:
            await client.wake.wait()
            client.wake.clear()
            while client.queue:
                if client.dropped is not None:
                    break
                await ws.send_str(client.take())
            if client.dropped is not None:
                raise Closing(TOO_FAST_OR_SLOW, client.dropped)

    async def _close(self, request: web.Request, ws: web.WebSocketResponse, code: int, reason: str) -> None:
        """Close with a reason; a client that does not read cannot take the close frame: abort it."""
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await ws.close(code=code, message=reason.encode()[:120])
        except (TimeoutError, ConnectionError, RuntimeError):
            if request.transport is not None:
                request.transport.abort()

    async def close_all(self) -> None:
        """Close every client (the daemon stops)."""
        self.hub.close_all("the daemon is stopping")
        for ws in list(self.sockets):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await ws.close(code=GOING_AWAY, message=b"the daemon is stopping")


async def _dropped(client: Client) -> None:
    """Ends with Closing once the hub drops the client (its writer may be stuck on a full socket)."""
    await client.gone.wait()
    raise Closing(TOO_FAST_OR_SLOW, client.dropped or "dropped")


class _Heartbeat:
    """Pings every `PING_INTERVAL_S`; anything heard from the client (a pong or a message) answers them."""

    def __init__(self) -> None:
        self.unanswered = 0

    def heard(self) -> None:
        self.unanswered = 0

    async def run(self, ws: web.WebSocketResponse) -> None:
        while True:
            await asyncio.sleep(PING_INTERVAL_S)
            if self.unanswered >= MISSED_PINGS:
                raise Closing(HEARTBEAT, f"{MISSED_PINGS} pings unanswered")
            self.unanswered += 1
            started = time.monotonic()
            try:
                async with asyncio.timeout(PING_INTERVAL_S):
                    await ws.ping()
            except TimeoutError:
                raise Closing(HEARTBEAT, f"a ping could not be sent in {time.monotonic() - started:.0f} s") from None
