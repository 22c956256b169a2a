"""The local HTTP API: health, Prometheus metrics, equipment status, commands and dead letters.

Keys come from `[[http.api_keys]]` and are compared in constant time; roles are viewer < operator <
admin, and a command's `role` is the least role that may run it; dead letters are admin only. With no
keys configured, reads are open to loopback callers and commands answer 403. Errors have one shape:
`{error: {code, message, category, details, timestamp, request_id}}`.

Every door refuses bad input with a 4xx and stays open: wrong keys are throttled per client address,
command bodies pass the outside-JSON gate (`agent.jsonin`), and connections are accepted here, not by
asyncio, within a cap, a header timeout, an idle timeout and a reserve of descriptors for the rest of
the daemon.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import resource
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent import jsonin, metrics
from agent.model import iso, json_safe, utcnow

if TYPE_CHECKING:
    from agent.config import HttpSection
    from agent.supervisor import Supervisor

log = structlog.get_logger("edge_agent.http")

ROLE_RANK = {"viewer": 0, "operator": 1, "admin": 2}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

AUTH_WINDOW_S = 60.0  # failed keys are counted per address over this window
TABLE_SIZE = 10_000  # addresses and callers remembered by the throttles; the least recently seen go first
KEY_TEXT = re.compile(r"[\x21-\x7e]{1,512}")  # a key is visible ASCII, as RFC 6750 tokens are
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
ACCEPT_BATCH = 64  # connections taken per wake-up of a listening socket
ACCEPT_RETRY_S = 1.0  # how long accepting pauses while descriptors are short
BACKLOG = 128


class _PeerFaults(logging.Filter):
    """aiohttp logs a traceback for every malformed request it answers with 400 itself. That is the peer's
    fault, not the daemon's: it becomes one debug line, so a stream of garbage cannot flood the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            log.debug("http_bad_request", error=str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
            return False
        return True


# The logger handed to aiohttp's request handlers in place of its own "aiohttp.server".
_server_log = logging.getLogger("edge_agent.http.server")
_server_log.addFilter(_PeerFaults())


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the key's name and role (or the anonymous loopback reader)."""

    name: str
    role: str


class ApiError(Exception):
    """An error answered in the contract's error format."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        category: str = "client",
        details: Any = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.category = category
        self.details = details
        self.retry_after = retry_after


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


def _digest(key: str | bytes) -> bytes:
    """Keys are compared as fixed-length digests, so the comparison says nothing about length or content."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


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


class _Bucket:
    """A token bucket per caller for the request rate limit."""

    __slots__ = ("at", "tokens")

    def __init__(self, tokens: float) -> None:
        self.tokens = tokens
        self.at = time.monotonic()


class _Failures:
    """Failed keys from one address in the window that began with the first of them."""

    __slots__ = ("count", "since")

    def __init__(self, now: float) -> None:
        self.count = 0
        self.since = now


def descriptor_budget(max_connections: int) -> tuple[int, int]:
    """(connection cap, descriptor ceiling) under the process's open-file limit.

    A quarter of the descriptors (at least 16) is kept for everything else the daemon opens (broker,
    MPM, equipment links, the store), so the cap is at most the other three quarters; an accepted
    connection whose descriptor number reaches the ceiling shows that descriptors are short, however
    they were spent (the kernel hands out the lowest free number).
    """
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft > 1 << 20:
        soft = 1 << 20
    ceiling = soft - max(16, soft // 4)
    return max(1, min(max_connections, ceiling)), ceiling


def _descriptors_in_use() -> int:
    """How many descriptors the process has open (0 where /proc does not tell)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


class _Conn(asyncio.Protocol):
    """One accepted connection: aiohttp's request handler inside, the header deadline around it.

    The deadline runs from the connection's start, and again from the first byte after an answer, until
    a request's headers are complete (the API middleware then calls `request_started`); a connection
    that is too slow is closed without an answer. Idle time between requests is aiohttp's keep-alive.
    """

    def __init__(self, listener: Listener, inner: asyncio.Protocol) -> None:
        self.listener = listener
        self.inner = inner
        self.transport: asyncio.BaseTransport | None = None
        self.busy = False
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if not self.busy and self._deadline is None:
            self._arm()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.listener.conns.discard(self)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def request_started(self) -> None:
        """A request's headers are complete: no deadline while it is served."""
        self.busy = True
        self._disarm()

    def request_done(self) -> None:
        """Answered: the next request's headers get a new deadline from their first byte."""
        self.busy = False

    def _arm(self) -> None:
        self._disarm()
        self._deadline = asyncio.get_running_loop().call_later(self.listener.cfg.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self.busy and self.transport is not None:
            log.debug("http_header_timeout", peer=self.transport.get_extra_info("peername"))
            self.transport.close()


class Listener:
    """Accepts connections for aiohttp's server on its own sockets, within the `[http]` limits.

    asyncio's own accept loop has no connection cap, and out of descriptors it reports every failed
    accept, with a traceback, to the loop's exception handler. Here a connection beyond the cap is
    closed at once (not queued), a share of the descriptors is kept for the daemon's other links,
    accepting pauses while descriptors are short, and each limited state is logged once when it
    begins (`http_accept_limited`) and once when it ends (`http_accept_restored`).
    """

    def __init__(self, server: Callable[[], asyncio.Protocol], cfg: HttpSection) -> None:
        self.server = server
        self.cfg = cfg
        self.socks: list[socket.socket] = []
        self.conns: set[_Conn] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.limited: str | None = None  # why connections are refused or not accepted now
        self.refused = 0
        self._resume: asyncio.TimerHandle | None = None

    async def start(self) -> int:
        """Bind and listen on `[http] listen`; the port bound (the first socket's)."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.cfg.host, self.cfg.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        try:
            for family, kind, proto, _, addr in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                self.socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
                sock.listen(BACKLOG)
                sock.setblocking(False)
        except OSError:
            self.close()
            raise
        self._watch()
        return int(self.socks[0].getsockname()[1])

    def close(self) -> None:
        """Stop accepting; the connections already open are aiohttp's to finish (AppRunner.cleanup)."""
        self._unwatch()
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        for sock in self.socks:
            sock.close()
        self.socks = []
        for task in self.tasks:
            task.cancel()

    def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.socks:
            loop.add_reader(sock.fileno(), self._accept, sock)

    def _unwatch(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.socks:
            loop.remove_reader(sock.fileno())

    def _accept(self, listening: socket.socket) -> None:
        cap, ceiling = descriptor_budget(self.cfg.max_connections)
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as err:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: wait for descriptors to come back
                self._pause(errno.errorcode.get(err.errno or 0, "accept_failed"))
                return
            if conn.fileno() >= ceiling:
                self._refuse(conn)
                self._pause("descriptors_low")
                return
            if len(self.conns) >= cap:
                self._refuse(conn)
                self._limit("max_connections", cap=cap)
                continue
            # A full house ends when a quarter of it has left, so a flood that takes every freed slot at
            # once does not log an end and a new beginning per connection.
            if self.limited is not None and (self.limited != "max_connections" or len(self.conns) < cap * 3 // 4):
                log.info("http_accept_restored", after=self.limited, refused=self.refused, open=len(self.conns))
                self.limited = None
                self.refused = 0
            self._admit(conn)

    def _refuse(self, conn: socket.socket) -> None:
        conn.close()
        self.refused += 1

    def _admit(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        guard = _Conn(self, self.server())
        self.conns.add(guard)
        task = asyncio.get_running_loop().create_task(self._serve(conn, guard))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, conn: socket.socket, guard: _Conn) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: guard, conn)
        except Exception as err:  # the peer went away before its transport was set up
            log.debug("http_connection_setup_failed", error=str(err))
            self.conns.discard(guard)
            conn.close()

    def _limit(self, reason: str, **fields: Any) -> None:
        if self.limited != reason:
            self.limited = reason
            log.warning("http_accept_limited", reason=reason, open=len(self.conns), **fields)

    def _pause(self, reason: str) -> None:
        """Stop accepting for a while; the backlog waits in the kernel meanwhile."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._limit(reason, nofile=soft)
        self._unwatch()
        if self._resume is None:
            self._resume = asyncio.get_running_loop().call_later(ACCEPT_RETRY_S, self._resume_accepting)

    def _resume_accepting(self) -> None:
        """Accept again once descriptors are back below the ceiling; look again later otherwise."""
        self._resume = None
        if not self.socks:
            return
        if _descriptors_in_use() >= descriptor_budget(self.cfg.max_connections)[1]:
            self._resume = asyncio.get_running_loop().call_later(ACCEPT_RETRY_S, self._resume_accepting)
            return
        self._watch()


class HttpApi:
    """aiohttp application bound to `[http] listen`, started and stopped with the daemon."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.runner: web.AppRunner | None = None
        self.listener: Listener | None = None
        self.port: int | None = None
        self._buckets: _Lru[_Bucket] = _Lru()
        self._failures: _Lru[_Failures] = _Lru()
        self._crashed: set[type[BaseException]] = set()

    # -- lifecycle

    def app(self) -> web.Application:
        """The application with its routes and middlewares."""
        app = web.Application(middlewares=[self._errors, self._guard], client_max_size=self.sup.cfg.http.max_body_bytes)
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
        self.runner = web.AppRunner(
            self.app(),
            access_log=None,
            handle_signals=False,
            keepalive_timeout=cfg.idle_timeout_s,
            logger=_server_log,
        )
        await self.runner.setup()
        assert self.runner.server is not None
        self.listener = Listener(self.runner.server, cfg)
        try:
            self.port = await self.listener.start()
        except OSError:
            await self.stop()
            raise
        cap, _ = descriptor_budget(cfg.max_connections)
        log.info(
            "http_listening",
            host=cfg.host,
            port=self.port,
            max_connections=cap,
            header_timeout_s=cfg.header_timeout_s,
            idle_timeout_s=cfg.idle_timeout_s,
        )

    async def stop(self) -> None:
        """Stop listening and close the connections."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
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
        given = request.headers.get("X-Request-Id", "")
        request_id = given if REQUEST_ID.fullmatch(given) else str(uuid.uuid4())  # only what can be echoed
        request["request_id"] = request_id
        conn = request.transport.get_protocol() if request.transport is not None else None
        if isinstance(conn, _Conn):
            conn.request_started()
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
        except Exception as err:
            # A traceback for the first failure of each kind; one line for the ones after it.
            first = type(err) not in self._crashed
            self._crashed.add(type(err))
            log.error(
                "http_handler_failed", path=request.path, error=f"{type(err).__name__}: {err}"[:300], exc_info=first
            )
            resp = self._error(ApiError(500, "internal", "internal error", "server"), request_id)
        finally:
            if isinstance(conn, _Conn):
                conn.request_done()
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
        headers = None
        if err.status == 429:
            headers = {"Retry-After": str(err.retry_after or 1)}
        elif err.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return _json(body, err.status, headers)

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
        caller = self._identify(request, address)
        request["caller"] = caller
        self._spend(f"key:{caller.name}" if caller else f"ip:{address}")
        return await handler(request)

    def _throttled_for(self, address: str) -> int:
        """Whole seconds until `address` may present keys again; 0 when it may now."""
        failures = self._failures.get(address)
        if failures is None or failures.count < self.sup.cfg.http.auth_failures_per_minute:
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
        if failures.count == self.sup.cfg.http.auth_failures_per_minute:
            log.warning("http_auth_throttled", address=address, failures=failures.count, window_s=AUTH_WINDOW_S)

    def _spend(self, who: str) -> None:
        """Take one request from `who`'s bucket; 429 when it is empty."""
        rate = self.sup.cfg.http.rate_limit_per_minute
        bucket = self._buckets.touch(who, lambda: _Bucket(rate))
        now = time.monotonic()
        bucket.tokens = min(rate, bucket.tokens + (now - bucket.at) * rate / 60.0)
        bucket.at = now
        if bucket.tokens < 1:
            retry = max(1, math.ceil((1 - bucket.tokens) * 60.0 / rate))
            raise ApiError(429, "rate_limited", f"more than {rate} requests per minute", retry_after=retry)
        bucket.tokens -= 1

    # -- auth

    @staticmethod
    def _presented_key(request: web.Request) -> str | None:
        """The key the request carries, None without one; ValueError names what is malformed."""
        auth = request.headers.get("Authorization")
        api_key = request.headers.get("X-API-Key")
        if auth is not None:
            scheme, _, key = auth.partition(" ")
            if scheme.lower() != "bearer":
                raise ValueError("the Authorization header must be 'Bearer <key>'")
            what = "the Authorization header's key"
        elif api_key is not None:
            key, what = api_key, "the X-API-Key header"
        else:
            return None
        key = key.strip(" \t")
        if not KEY_TEXT.fullmatch(key):
            raise ValueError(f"{what} must be 1 to 512 visible ASCII characters")
        return key

    def _identify(self, request: web.Request, address: str) -> Caller | None:
        """The caller the presented key belongs to, None without a key; 401 (and a failure counted
        against the address) for a wrong or malformed key."""
        try:
            presented = self._presented_key(request)
        except ValueError as err:
            self._failed(address)
            raise ApiError(401, "unauthorized", str(err), "auth") from None
        if presented is None:
            return None
        given = _digest(presented)
        match: Caller | None = None
        for k in self.sup.cfg.http.api_keys:
            secret = k.secret("key")
            # Every key is compared, each in constant time, so timing says nothing about which matched.
            if secret and hmac.compare_digest(_digest(secret), given) and match is None:
                match = Caller(k.name, k.role)
        if match is None:
            self._failed(address)
            raise ApiError(401, "unauthorized", "unknown API key", "auth")
        return match

    def authenticate(self, request: web.Request) -> Caller | None:
        """The caller identified by the middleware, or None for an anonymous loopback reader (no keys
        configured); 401 when a key is needed and none was given."""
        caller: Caller | None = request.get("caller")
        if caller is None and (self.sup.cfg.http.api_keys or not _is_loopback(request.remote)):
            raise ApiError(401, "unauthorized", "an API key is required (Authorization: Bearer or X-API-Key)", "auth")
        return caller

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

    async def _body(self, request: web.Request) -> dict[str, Any]:
        """A command's JSON body through the outside-JSON gate: 415, 408, 413 or 400 naming the reason."""
        cfg = self.sup.cfg.http
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
        body = await self._body(request)
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
        """Dead letters kept by the MPM outbox; their bodies carry process data, so admin only."""
        self.require(request, "admin")
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
