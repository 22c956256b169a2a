"""The local HTTP API: health, Prometheus metrics, equipment status, commands and dead letters.

Roles are viewer < operator < admin: reads need a viewer, dead letters an admin, and a command the
`role` it declares, which the command router checks (`CommandRouter.authorize`). Every door refuses
bad input with a 4xx and stays open: wrong keys are throttled per client address, each caller's
request rate is limited, and command bodies pass the outside-JSON gate (`agent.jsonin`).

The API is given exactly what it uses (`HttpDeps`). Its parts: `agent.http_auth` (keys, roles),
`agent.http_errors` (the contract's error object, strict-JSON answers), `agent.http_server` (the
listening sockets and their limits).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent import jsonin, metrics
from agent.command_rules import Forbidden
from agent.config_holder import ConfigHolder
from agent.errors import CommandError
from agent.http_auth import CALLER_KEY, Caller, authenticate, grant, identify, refused
from agent.http_errors import REQUEST_ID_KEY, ApiError, ErrorAnswers, Handler, json_response
from agent.http_live import LiveRoutes
from agent.http_server import HttpServer
from agent.live import LiveHub
from agent.ratelimit import TokenBucket

if TYPE_CHECKING:
    from agent.commands import CommandRouter
    from agent.config import HttpSection, Role
    from agent.monitor import Monitor

log = structlog.get_logger("edge_agent.http")

AUTH_WINDOW_S = 60.0  # failed keys are counted per address over this window
TABLE_SIZE = 10_000  # addresses and callers remembered by the throttles; the least recently seen go first

_V = TypeVar("_V")


class _Lru(OrderedDict[str, _V], Generic[_V]):
    """A bounded table: past `TABLE_SIZE` entries the least recently used one is dropped, never all at once."""

    def touch(self, key: str, make: Callable[[], _V]) -> _V:
        """The entry for `key`, created by `make` when absent, marked as the most recently used."""
        value = self.get(key)
        if value is None:
            value = self[key] = make()
            if len(self) > TABLE_SIZE:
                self.popitem(last=False)
        else:
            self.move_to_end(key)
        return value


class _Failures:
    """Failed keys from one address in the window that began with the first of them."""

    __slots__ = ("count", "since")

    def __init__(self, now: float) -> None:
        self.count = 0
        self.since = now


@dataclass(frozen=True, slots=True)
class HttpDeps:
    """What the API uses of the daemon, and nothing more."""

    config: ConfigHolder  # `config.cfg` is the current config; a reload replaces it
    router: CommandRouter
    monitor: Monitor
    health: Callable[[], tuple[dict[str, Any], bool]]  # (report, healthy)
    refresh_metrics: Callable[[], None]  # brings gauges up to date before /metrics is answered
    dead_letters: Callable[[], Any | None]  # the MPM outbox, None without [mpm]
    hub: LiveHub = field(default_factory=LiveHub)  # the live view's fan-out (fed by `agent.live.LiveTap`)


class HttpApi:
    """aiohttp application bound to `[http] listen`, started and stopped with the daemon."""

    def __init__(self, deps: HttpDeps) -> None:
        self.deps = deps
        self.server = HttpServer()
        self._answers = ErrorAnswers(lambda: self._cfg.max_body_bytes)
        self._buckets: _Lru[TokenBucket] = _Lru()
        self._failures: _Lru[_Failures] = _Lru()
        self.live = LiveRoutes(self, deps.hub)

    @property
    def _cfg(self) -> HttpSection:
        return self.deps.config.cfg.http

    @property
    def port(self) -> int | None:
        """The port listened on while started."""
        return self.server.port

    # -- lifecycle

    def app(self) -> web.Application:
        """The application with its routes and middlewares."""
        app = web.Application(
            middlewares=[self._answers.middleware, self._guard], client_max_size=self._cfg.max_body_bytes
        )
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/api/v1/equipment", self.equipment_list)
        app.router.add_get("/api/v1/equipment/{eid}", self.equipment_one)
        app.router.add_post("/api/v1/equipment/{eid}/commands/{command}", self.command)
        app.router.add_get("/api/v1/dead-letters", self.dead_letters)
        app.router.add_post("/api/v1/dead-letters/{id}/retry", self.dead_letter_retry)
        app.router.add_delete("/api/v1/dead-letters/{id}", self.dead_letter_delete)
        self.live.add_routes(app)
        return app

    async def start(self) -> None:
        """Listen on the configured address."""
        await self.server.start(self.app(), self._cfg)
        self.live.start()

    async def stop(self) -> None:
        """Close the WebSocket clients, stop listening and close the connections."""
        await self.live.stop()
        await self.server.stop()

    async def reload(self, old: Any, new: Any) -> None:
        """A changed `[http]` section restarts the listener; keys are read from the new config anyway."""
        if old.http.model_dump(mode="json") != new.http.model_dump(mode="json"):
            await self.stop()
            await self.start()

    # -- the front door: key throttling per address, then the caller's rate limit

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Throttle key guessing per address, identify the caller, then limit its request rate.

        A throttled address is refused whatever it presents, the right key included, until its window has
        passed: otherwise the answer to a guess would still tell a right key from a wrong one, and the
        throttle would only slow guessing down instead of stopping it. A legitimate client sharing the
        address waits at most one window; /healthz stays open to all.
        """
        if request.path == "/healthz":
            return await handler(request)
        address = request.remote or "unknown"
        wait = self._throttled_for(address)
        if wait:
            raise ApiError(
                429,
                "auth_throttled",
                f"too many failed keys from {address}; retry in {wait} s",
                "auth",
                retry_after=wait,
            )
        try:
            caller = identify(request, self._cfg.api_keys)
        except ApiError:
            self._failed(address)
            raise
        if caller is not None:
            request[CALLER_KEY] = caller
        self._spend(f"key:{caller.name}" if caller else f"ip:{address}")
        return await handler(request)

    def _throttled_for(self, address: str) -> int:
        """Whole seconds until `address` may present keys again; 0 when it may now."""
        failures = self._failures.get(address)
        if failures is None or failures.count < self._cfg.auth_failures_per_minute:
            return 0
        left = failures.since + AUTH_WINDOW_S - time.monotonic()
        if left <= 0:
            del self._failures[address]
            return 0
        return max(1, math.ceil(left))

    def _failed(self, address: str) -> None:
        """Count a failed key from `address`; reaching the limit throttles it until its window passes."""
        now = time.monotonic()
        failures = self._failures.touch(address, lambda: _Failures(now))
        if now - failures.since >= AUTH_WINDOW_S:
            failures.count, failures.since = 0, now
        failures.count += 1
        if failures.count == self._cfg.auth_failures_per_minute:
            log.warning("http_auth_throttled", address=address, failures=failures.count, window_s=AUTH_WINDOW_S)

    def _spend(self, who: str) -> None:
        """Take one request from `who`'s bucket; 429 when it is empty."""
        rate = self._cfg.rate_limit_per_minute
        bucket = self._buckets.touch(who, lambda: TokenBucket(rate / 60.0, burst=rate))
        if not bucket.take():
            retry = max(1, math.ceil(bucket.wait_s()))
            raise ApiError(429, "rate_limited", f"more than {rate} requests per minute", retry_after=retry)

    def require(self, request: web.Request, role: Role) -> Caller:
        """The caller, if it has at least `role`: 401 without a (right) key, 403 below the role."""
        return grant(authenticate(request, self._cfg.api_keys), role)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        """A command's JSON body through the outside-JSON gate: 415, 408, 413 or 400 naming the reason."""
        cfg = self._cfg
        if request.content_type != "application/json":
            raise ApiError(
                415,
                "unsupported_media_type",
                f"commands take Content-Type: application/json, not {request.content_type!r}",
            )
        try:
            async with asyncio.timeout(cfg.idle_timeout_s):
                raw = await request.read()
        except TimeoutError:
            raise ApiError(408, "request_timeout", f"the body did not arrive within {cfg.idle_timeout_s} s") from None
        if not raw.strip():
            return {}
        try:
            body = jsonin.loads(raw, max_bytes=cfg.max_body_bytes, what="request body")
        except jsonin.InputError as err:
            status, code = (413, "payload_too_large") if err.reason == "too_large" else (400, "bad_request")
            raise ApiError(status, code, str(err), details={"reason": err.reason}) from None
        if not isinstance(body, dict):
            raise ApiError(
                400,
                "bad_request",
                "the body must be a JSON object {parameters: {...}}",
                details={"reason": "malformed"},
            )
        if not isinstance(body.get("parameters", {}), dict):
            raise ApiError(400, "bad_request", "parameters must be a JSON object", details={"reason": "malformed"})
        return body

    # -- routes

    async def healthz(self, request: web.Request) -> web.Response:
        """Per-component health; 503 when a needed component has been down longer than allowed."""
        report, healthy = self.deps.health()
        return json_response(report, 200 if healthy else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text format."""
        if self._cfg.metrics_auth:
            self.require(request, "viewer")
        self.deps.refresh_metrics()
        return web.Response(body=generate_latest(metrics.REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def equipment_list(self, request: web.Request) -> web.Response:
        """Every equipment's status object with its current values."""
        self.require(request, "viewer")
        monitor = self.deps.monitor
        return json_response({"equipment": [monitor.snapshot(eid) for eid in monitor.equipment]})

    async def equipment_one(self, request: web.Request) -> web.Response:
        """One equipment's status object with its current values."""
        self.require(request, "viewer")
        eid = request.match_info["eid"]
        snap = self.deps.monitor.snapshot(eid)
        if snap is None:
            raise ApiError(404, "not_found", f"unknown equipment {eid!r}")
        return json_response(snap)

    async def command(self, request: web.Request) -> web.Response:
        """Run a declared command through the command router, which checks the caller's role."""
        eid = request.match_info["eid"]
        name = request.match_info["command"]
        caller = authenticate(request, self._cfg.api_keys)  # a missing or wrong key is 401 before anything else
        router = self.deps.router
        try:
            router.authorize(eid, name, caller.role)  # unknown names and too low a role before the body is read
            params = (await self._body(request)).get("parameters", {})
            result, status = await router.execute(
                eid, name, params, source="http", caller=caller.name, role=caller.role
            )
        except Forbidden as err:
            raise refused(caller, err) from None
        except CommandError as err:  # the router raises only its refusals of unknown names: others are results
            raise ApiError(err.http_status, "not_found", str(err)) from None
        return json_response({"request_id": request[REQUEST_ID_KEY], **result}, status)

    def _outbox(self) -> Any:
        outbox = self.deps.dead_letters()
        if outbox is None:
            raise ApiError(404, "not_found", "no MPM outbox: [mpm] is not configured")
        return outbox

    async def dead_letters(self, request: web.Request) -> web.Response:
        """Dead letters kept by the MPM outbox; their bodies carry process data, so admin only."""
        self.require(request, "admin")
        outbox = self.deps.dead_letters()
        items = outbox.dead_letters() if outbox is not None else []
        return json_response({"dead_letters": [i.to_dict() for i in items]})

    def _item_id(self, request: web.Request) -> int:
        try:
            return int(request.match_info["id"])
        except ValueError:
            raise ApiError(404, "not_found", f"unknown dead letter {request.match_info['id']!r}") from None

    async def dead_letter_retry(self, request: web.Request) -> web.Response:
        """Move a dead letter back into the outbox."""
        caller = self.require(request, "admin")
        item_id = self._item_id(request)
        if not self._outbox().retry_dead_letter(item_id):
            raise ApiError(404, "not_found", f"unknown dead letter {item_id}")
        log.info("dead_letter_retry", id=item_id, caller=caller.name)
        return json_response({"id": item_id, "state": "pending"})

    async def dead_letter_delete(self, request: web.Request) -> web.Response:
        """Delete a dead letter."""
        caller = self.require(request, "admin")
        item_id = self._item_id(request)
        if not self._outbox().delete_dead_letter(item_id):
            raise ApiError(404, "not_found", f"unknown dead letter {item_id}")
        log.info("dead_letter_delete", id=item_id, caller=caller.name)
        return json_response({"id": item_id, "deleted": True})
