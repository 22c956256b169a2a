"""The local HTTP API: health, Prometheus metrics, equipment status, commands and dead letters.

Keys come from `[[http.api_keys]]` and are compared in constant time; roles are viewer < operator <
admin, and a command's `role` is the least role that may run it. With no keys configured, reads are
open to loopback callers and commands answer 403. Errors have one shape:
`{error: {code, message, category, details, timestamp, request_id}}`.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent import metrics
from agent.model import iso, json_safe, utcnow

if TYPE_CHECKING:
    from agent.supervisor import Supervisor

log = structlog.get_logger("edge_agent.http")

ROLE_RANK = {"viewer": 0, "operator": 1, "admin": 2}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the key's name and role (or the anonymous loopback reader)."""

    name: str
    role: str


class ApiError(Exception):
    """An error answered in the contract's error format."""

    def __init__(self, status: int, code: str, message: str, category: str = "client", details: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.category = category
        self.details = details


def _dumps(obj: Any) -> str:
    return json.dumps(json_safe(obj), allow_nan=False, separators=(",", ":"))


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=_dumps(data), status=status, content_type="application/json", headers=headers)


def _is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%")[0]).is_loopback
    except ValueError:
        return False


class _Bucket:
    """A token bucket per caller for the simple rate limit."""

    __slots__ = ("at", "tokens")

    def __init__(self, tokens: float) -> None:
        self.tokens = tokens
        self.at = time.monotonic()


class HttpApi:
    """aiohttp application bound to `[http] listen`, started and stopped with the daemon."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.runner: web.AppRunner | None = None
        self.port: int | None = None
        self._buckets: dict[str, _Bucket] = {}

    # -- lifecycle

    def app(self) -> web.Application:
        """The application with its routes and middlewares."""
        app = web.Application(
            middlewares=[self._errors, self._ratelimit], client_max_size=self.sup.cfg.http.max_body_bytes
        )
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/api/v1/equipment", self.equipment_list)
        app.router.add_get("/api/v1/equipment/{eid}", self.equipment_one)
        app.router.add_post("/api/v1/equipment/{eid}/commands/{command}", self.command)
        app.router.add_get("/api/v1/dead-letters", self.dead_letters)
        app.router.add_post("/api/v1/dead-letters/{id}/retry", self.dead_letter_retry)
        app.router.add_delete("/api/v1/dead-letters/{id}", self.dead_letter_delete)
        return app

    async def start(self) -> None:
        """Listen on the configured address."""
        cfg = self.sup.cfg.http
        self.runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, cfg.host, cfg.port, reuse_address=True)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else cfg.port
        log.info("http_listening", host=cfg.host, port=self.port)

    async def stop(self) -> None:
        """Stop listening."""
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def reload(self, old: Any, new: Any) -> None:
        """A changed `[http]` section restarts the listener; keys are read from the new config anyway."""
        if old.http.model_dump(mode="json") != new.http.model_dump(mode="json"):
            await self.stop()
            await self.start()

    # -- middlewares

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = request.headers.get("X-Request-Id") or str(uuid.uuid4())
        request["request_id"] = request_id
        try:
            resp = await handler(request)
        except ApiError as err:
            resp = self._error(err, request_id)
        except web.HTTPRequestEntityTooLarge:
            limit = self.sup.cfg.http.max_body_bytes
            resp = self._error(ApiError(413, "payload_too_large", f"request body over {limit} bytes"), request_id)
        except web.HTTPNotFound:
            resp = self._error(ApiError(404, "not_found", f"no route {request.method} {request.path}"), request_id)
        except web.HTTPMethodNotAllowed:
            resp = self._error(
                ApiError(405, "method_not_allowed", f"{request.method} is not allowed on {request.path}"), request_id
            )
        except web.HTTPException as err:
            resp = self._error(ApiError(err.status, "http_error", err.reason), request_id)
        except Exception:
            log.exception("http_handler_failed", path=request.path)
            resp = self._error(ApiError(500, "internal", "internal error", "server"), request_id)
        resp.headers["X-Request-Id"] = request_id
        return resp

    def _error(self, err: ApiError, request_id: str) -> web.Response:
        body = {
            "error": {
                "code": err.code,
                "message": str(err),
                "category": err.category,
                "details": err.details or {},
                "timestamp": iso(utcnow()),
                "request_id": request_id,
            }
        }
        headers = {"Retry-After": "1"} if err.status == 429 else None
        if err.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return _json(body, err.status, headers)

    @web.middleware
    async def _ratelimit(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/healthz":
            return await handler(request)
        who = self._presented_key(request) or f"ip:{request.remote}"
        who = hmac.new(b"edge-agent-rate", who.encode(), "sha256").hexdigest()  # keys never kept in clear
        rate = self.sup.cfg.http.rate_limit_per_minute
        bucket = self._buckets.get(who)
        now = time.monotonic()
        if bucket is None:
            if len(self._buckets) > 10_000:
                self._buckets.clear()
            bucket = self._buckets[who] = _Bucket(rate)
        bucket.tokens = min(rate, bucket.tokens + (now - bucket.at) * rate / 60.0)
        bucket.at = now
        if bucket.tokens < 1:
            raise ApiError(429, "rate_limited", f"more than {rate} requests per minute")
        bucket.tokens -= 1
        return await handler(request)

    # -- auth

    @staticmethod
    def _presented_key(request: web.Request) -> str | None:
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip() or None
        return request.headers.get("X-API-Key") or None

    def authenticate(self, request: web.Request) -> Caller | None:
        """The caller, or None without a key; raises 401 for a wrong key."""
        keys = self.sup.cfg.http.api_keys
        presented = self._presented_key(request)
        if presented is None:
            if not keys and _is_loopback(request.remote):
                return None
            raise ApiError(401, "unauthorized", "an API key is required (Authorization: Bearer or X-API-Key)", "auth")
        match: Caller | None = None
        given = presented.encode()
        for k in keys:
            secret = (k.secret("key") or "").encode()
            # Every key is compared, each in constant time, so timing says nothing about which matched.
            if secret and hmac.compare_digest(secret, given) and match is None:
                match = Caller(k.name, k.role)
        if match is None:
            raise ApiError(401, "unauthorized", "unknown API key", "auth")
        return match

    def require(self, request: web.Request, role: str) -> Caller:
        """Check that the caller has at least `role`."""
        return self._grant(self.authenticate(request), role)

    @staticmethod
    def _grant(caller: Caller | None, role: str) -> Caller:
        """`caller` (None: an anonymous loopback caller) if it has at least `role`; 403 otherwise."""
        if caller is None:
            if role == "viewer":
                return Caller("anonymous-loopback", "viewer")
            raise ApiError(403, "forbidden", "commands need an API key; none is configured", "auth")
        if ROLE_RANK[caller.role] < ROLE_RANK[role]:
            raise ApiError(403, "forbidden", f"role {caller.role!r} may not do this (needs {role!r})", "auth")
        return caller

    # -- routes

    async def healthz(self, request: web.Request) -> web.Response:
        """Per-component health; 503 when a needed component has been down longer than allowed."""
        report, healthy = self.sup.health()
        return _json(report, 200 if healthy else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text format."""
        if self.sup.cfg.http.metrics_auth:
            self.require(request, "viewer")
        self.sup.refresh_metrics()
        return web.Response(body=generate_latest(metrics.REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def equipment_list(self, request: web.Request) -> web.Response:
        """Every equipment's status object with its current values."""
        self.require(request, "viewer")
        monitor = self.sup.monitor
        out = [monitor.snapshot(eid) for eid in monitor.equipment] if monitor else []
        return _json({"equipment": out})

    async def equipment_one(self, request: web.Request) -> web.Response:
        """One equipment's status object with its current values."""
        self.require(request, "viewer")
        eid = request.match_info["eid"]
        snap = self.sup.monitor.snapshot(eid) if self.sup.monitor else None
        if snap is None:
            raise ApiError(404, "not_found", f"unknown equipment {eid!r}")
        return _json(snap)

    async def command(self, request: web.Request) -> web.Response:
        """Run a declared command through the command router."""
        eid = request.match_info["eid"]
        name = request.match_info["command"]
        who = self.authenticate(request)  # a missing or wrong key is 401 before anything else is said
        eq = next((e for e in self.sup.cfg.equipment if e.id == eid), None)
        if eq is None:
            raise ApiError(404, "not_found", f"unknown equipment {eid!r}")
        cmd = eq.command(name)
        if cmd is None:
            raise ApiError(404, "not_found", f"command {name!r} is not declared for equipment {eid!r}")
        caller = self._grant(who, cmd.role)
        raw = await request.read()
        try:
            body = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, "bad_request", f"malformed JSON body: {err}") from err
        if not isinstance(body, dict):
            raise ApiError(400, "bad_request", "the body must be a JSON object {parameters: {...}}")
        params = body.get("parameters", {})
        assert self.sup.router is not None
        result, status = await self.sup.router.execute(eid, name, params, source="http", caller=caller.name)
        return _json({"request_id": request["request_id"], **result}, status)

    def _outbox(self) -> Any:
        outbox = self.sup.outbox
        if outbox is None:
            raise ApiError(404, "not_found", "no MPM outbox: [mpm] is not configured")
        return outbox

    async def dead_letters(self, request: web.Request) -> web.Response:
        """Dead letters kept by the MPM outbox."""
        self.require(request, "viewer")
        items = self._outbox().dead_letters() if self.sup.outbox is not None else []
        return _json({"dead_letters": [i.to_dict() for i in items]})

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
        return _json({"id": item_id, "state": "pending"})

    async def dead_letter_delete(self, request: web.Request) -> web.Response:
        """Delete a dead letter."""
        caller = self.require(request, "admin")
        item_id = self._item_id(request)
        if not self._outbox().delete_dead_letter(item_id):
            raise ApiError(404, "not_found", f"unknown dead letter {item_id}")
        log.info("dead_letter_delete", id=item_id, caller=caller.name)
        return _json({"id": item_id, "deleted": True})
