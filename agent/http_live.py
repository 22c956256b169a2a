"""The live view's routes: the status page (`GET /` and its files), active alerts, the WebSocket.

The page is static (HTML, JS and CSS shipped in the package under `agent/web`, nothing fetched from
elsewhere): it holds no data, and reads everything over `/api/v1/ws` with the caller's key. So with keys
configured the page itself is served to anyone and asks for a key; with none configured, as for every
read, only loopback callers get it.
"""

from __future__ import annotations

import asyncio
import contextlib
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web

from agent import openapi
from agent.http_auth import CALLER_KEY, Caller, authenticate, caller_of
from agent.http_errors import ApiError, json_response
from agent.live import LiveHub, SystemWatch, event_text
from agent.live_state import active_alerts
from agent.ws import WsEndpoint

if TYPE_CHECKING:
    from agent.http import HttpApi

PAGE_FILES = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}
# The page may talk to its own origin only: no CDN, no inline script.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def page_file(name: str) -> bytes:
    """One of the page's files from the package."""
    return resources.files("agent.web").joinpath(name).read_bytes()


class LiveRoutes:
    """The page, the alerts list and the WebSocket of one `HttpApi`."""

    def __init__(self, api: HttpApi, hub: LiveHub) -> None:
        self.api = api
        self.hub = hub
        self.ws = WsEndpoint(hub, self._check_key, self._snapshot)
        self.watch = SystemWatch(hub, api.deps.health)
        self._watch_task: asyncio.Task[None] | None = None

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self.page)
        app.router.add_get("/ui/{name}", self.page_part)
        app.router.add_get("/api/v1/alerts", self.alerts)
        app.router.add_get("/api/v1/ws", self.websocket)
        app.router.add_get("/api/v1/openapi.json", self.openapi)

    def start(self) -> None:
        if self._watch_task is None:
            self._watch_task = asyncio.get_running_loop().create_task(self.watch.run(), name="live[system]")

    async def stop(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        await self.ws.close_all()

    # -- routes

    async def page(self, request: web.Request) -> web.Response:
        """The status page."""
        return self._file(request, "index.html")

    async def page_part(self, request: web.Request) -> web.Response:
        """The page's script and style sheet."""
        name = request.match_info["name"]
        if name not in PAGE_FILES or name == "index.html":
            raise ApiError(404, "not_found", f"no page file {name[:60]!r}")
        return self._file(request, name)

    def _file(self, request: web.Request, name: str) -> web.Response:
        if not self.api._cfg.api_keys:
            authenticate(request, ())  # no keys: loopback only, as every read
        return web.Response(body=page_file(name), content_type=PAGE_FILES[name], headers=PAGE_HEADERS)

    async def alerts(self, request: web.Request) -> web.Response:
        """The active alerts, each with when it was raised and its tag's current value."""
        self.api.require(request, "viewer")
        return json_response({"alerts": active_alerts(self.api.deps.monitor)})

    async def openapi(self, request: web.Request) -> web.Response:
        """The API's OpenAPI description."""
        self.api.require(request, "viewer")
        return json_response(openapi.document())

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        """`/api/v1/ws` (see `agent.ws`). A key in the header authenticates at once; a wrong one is 401."""
        caller = request.get(CALLER_KEY)
        if caller is None and not self.api._cfg.api_keys:
            caller = authenticate(request, ())  # the anonymous loopback viewer, 401 from elsewhere
        if caller is not None:
            self.api.require(request, "viewer")
        return await self.ws.handle(request, caller)

    # -- for the WebSocket

    def _check_key(self, key: str, address: str) -> Caller:
        """A key from an auth message, throttled per address like the header's."""
        wait = self.api._throttled_for(address)
        if wait:
            raise ApiError(429, "auth_throttled", f"too many failed keys from {address}; retry in {wait} s", "auth")
        try:
            return caller_of(key, self.api._cfg.api_keys)
        except ApiError:
            self.api._failed(address)
            raise

    def _snapshot(self, channel: str) -> list[str]:
        """What a client newly subscribed to `channel` is sent first: the current state."""
        monitor = self.api.deps.monitor
        if channel == "equipment":
            return [event_text("equipmentStatus", monitor.snapshot(eid)) for eid in list(monitor.equipment)]
        if channel == "alerts":
            return [event_text("qualityAlert", {**a, "state": "active"}) for a in active_alerts(monitor)]
        if channel == "quality":
            return [event_text("qualityResult", q) for q in self.hub.recent_quality.items]
        report, healthy = self.api.deps.health()
        data: dict[str, Any] = {**report, "healthy": healthy}
        return [event_text("systemHealth", data)]
