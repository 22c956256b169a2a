"""A built-in MPM: the contract's REST API over aiohttp, with a control API to inject failures.

Used as the MPM peer in tests and by `edge-agent simulate`. Control from the same process through the
methods of `MPMEmulator`, or from another process through the routes under `/_emulator/`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import secrets
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from agent.model import iso, utcnow

if TYPE_CHECKING:
    from agent.config import MpmSection

log = structlog.get_logger("edge_agent.simulate.mpm")

MPM_STATUSES = ("pending", "running", "paused", "completed", "failed", "cancelled")
CALLS = (
    "health_check",
    "list_processes",
    "get_process_data",
    "get_process_parameters",
    "update_process_status",
    "submit_quality_results",
    "oauth_token",
)
Handler = Callable[[web.Request, str | None], Awaitable[web.Response]]


def default_processes() -> list[dict[str, Any]]:
    """The processes the emulator starts with: two builds, three materials, printable parameters."""
    materials = ("Ti-6Al-4V", "AlSi10Mg", "316L")
    out = []
    for i in range(1, 7):
        out.append(
            {
                "process_id": f"PROC-{i:03d}",
                "build_id": "BUILD-01" if i <= 3 else "BUILD-02",
                "material": materials[(i - 1) % 3],
                "parameters": {
                    "laser_power": 200.0 + 20.0 * i,
                    "scan_speed": 800.0 + 100.0 * i,
                    "layer_thickness": 0.03 if i % 2 else 0.06,
                },
                "status": "pending",
                "start_time": None,
                "end_time": None,
                "metadata": {},
            }
        )
    return out


@dataclass(slots=True)
class Fault:
    """An injected answer: `status` for the next `remaining` matching calls (None: until cleared); `body`,
    when given, is sent verbatim as the answer (a hostile or broken MPM)."""

    status: int
    remaining: int | None = 1
    retry_after: float | None = None
    process_id: str | None = None
    call: str | None = None
    reason: str = "injected by the emulator"
    body: bytes | None = None

    def matches(self, call: str, process_id: str | None) -> bool:
        # Faults without a call name leave the token endpoint alone; it is targeted explicitly.
        if self.call is None and call == "oauth_token":
            return False
        if self.call is not None and self.call != call:
            return False
        return self.process_id is None or self.process_id == process_id


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


class MPMEmulator:
    """An in-memory MPM with the contract's REST API below `base_path` and a token endpoint."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        bearer_tokens: Iterable[str] = (),
        client_id: str | None = None,
        client_secret: str | None = None,
        token_lifetime_s: float = 3600.0,
        base_path: str = "/api/v1",
        token_path: str = "/oauth/token",
        processes: Iterable[dict[str, Any]] | None = None,
        auto_create: bool = True,
        call_log_size: int = 100_000,
    ) -> None:
        self.api_key = api_key
        self.bearer_tokens = list(bearer_tokens)
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_lifetime_s = token_lifetime_s
        self.base_path = "/" + base_path.strip("/") if base_path.strip("/") else ""
        self.token_path = token_path
        self.auto_create = auto_create
        self._initial = [dict(p) for p in (processes if processes is not None else default_processes())]
        self.processes: dict[str, dict[str, Any]] = {}
        self._results: list[dict[str, Any]] = []
        self._history: dict[str, list[dict[str, Any]]] = {}
        self._idem: dict[tuple[str, str], dict[str, Any]] = {}
        self._tokens: dict[str, float] = {}
        self._faults: list[Fault] = []
        self._delay = 0.0
        self._delays: dict[str, float] = {}
        self.calls: deque[dict[str, Any]] = deque(maxlen=call_log_size)
        self.tokens_issued = 0
        self._runner: web.AppRunner | None = None
        self.base_url: str | None = None
        self.reset()

    # ---- control ------------------------------------------------------------------------------

    def reset(self) -> None:
        """Back to the preloaded processes; no results, history, faults, delays or tokens."""
        self.processes = {p["process_id"]: json.loads(json.dumps(p)) for p in self._initial}
        self._results.clear()
        self._history.clear()
        self._idem.clear()
        self._tokens.clear()
        self._faults.clear()
        self._delay = 0.0
        self._delays.clear()
        self.calls.clear()

    def fail(
        self,
        status: int = 503,
        count: int | None = 1,
        *,
        retry_after: float | None = None,
        process_id: str | None = None,
        call: str | None = None,
        reason: str = "injected by the emulator",
        body: bytes | None = None,
    ) -> Fault:
        """Answer `status` to the next `count` matching calls (None: until `clear_faults`)."""
        if call is not None and call not in CALLS:
            raise ValueError(f"unknown call {call!r} (one of {', '.join(CALLS)})")
        fault = Fault(status, count, retry_after, process_id, call, reason, body)
        self._faults.append(fault)
        return fault

    def set_api_key(self, api_key: str | None) -> None:
        """Accept another API key from now on (a key rotated on MPM's side); the old one gets 401."""
        self.api_key = api_key

    def fail_next(self, n: int, status: int = 503, retry_after: float | None = None) -> Fault:
        """Answer `status` to the next `n` API calls."""
        return self.fail(status, n, retry_after=retry_after)

    def reject_next(
        self, count: int = 1, status: int = 400, *, process_id: str | None = None, call: str | None = None
    ) -> Fault:
        """Refuse the next matching calls for good (a final 4xx)."""
        return self.fail(status, count, process_id=process_id, call=call, reason="rejected by the emulator")

    def clear_faults(self) -> None:
        """Drop every injected fault."""
        self._faults.clear()

    def set_delay(self, seconds: float, process_id: str | None = None) -> None:
        """Delay every API call (or those of one process) by `seconds` before answering."""
        if process_id is None:
            self._delay = max(0.0, seconds)
        else:
            self._delays[process_id] = max(0.0, seconds)

    def expire_tokens(self) -> None:
        """Revoke every issued OAuth2 token (the next call with one gets 401)."""
        self._tokens.clear()

    def results(self, process_id: str | None = None) -> list[dict[str, Any]]:
        """Stored quality results in arrival order: {result_id, process_id, idempotency_key, body, received_at}."""
        return [dict(r) for r in self._results if process_id is None or r["process_id"] == process_id]

    def status_history(self, process_id: str) -> list[str]:
        """The statuses applied to a process, in order."""
        return [h["status"] for h in self._history.get(process_id, [])]

    def status_updates(self, process_id: str) -> list[dict[str, Any]]:
        """The applied status updates of a process: {status, metadata, idempotency_key, at}."""
        return [dict(h) for h in self._history.get(process_id, [])]

    # ---- serving ------------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """The aiohttp application: the API, the token endpoint and the control routes."""
        app = web.Application(client_max_size=16 * 1024 * 1024)
        b = self.base_path
        app.router.add_get(f"{b}/health", self._api("health_check", self._health))
        app.router.add_get(f"{b}/processes", self._api("list_processes", self._list))
        app.router.add_get(f"{b}/processes/{{process_id}}", self._api("get_process_data", self._get))
        app.router.add_get(
            f"{b}/processes/{{process_id}}/parameters", self._api("get_process_parameters", self._params)
        )
        app.router.add_put(f"{b}/processes/{{process_id}}/status", self._api("update_process_status", self._status))
        app.router.add_post(
            f"{b}/processes/{{process_id}}/quality-results", self._api("submit_quality_results", self._quality)
        )
        app.router.add_get(f"{b}/processes/{{process_id}}/quality-results", self._api("list_results", self._stored))
        app.router.add_post(self.token_path, self._api("oauth_token", self._token, auth=False))
        app.router.add_post("/_emulator/faults", self._c_fail)
        app.router.add_delete("/_emulator/faults", self._c_clear)
        app.router.add_post("/_emulator/delay", self._c_delay)
        app.router.add_post("/_emulator/expire-tokens", self._c_expire)
        app.router.add_post("/_emulator/api-key", self._c_api_key)
        app.router.add_post("/_emulator/reset", self._c_reset)
        app.router.add_get("/_emulator/results", self._c_results)
        app.router.add_get("/_emulator/status-history/{process_id}", self._c_history)
        app.router.add_get("/_emulator/calls", self._c_calls)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0, *, ssl_context: ssl.SSLContext | None = None) -> str:
        """Serve on host:port (0 picks a free port), over TLS with `ssl_context`; returns the API's base URL."""
        if self._runner is not None:
            raise RuntimeError("MPM emulator already started")
        runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname()[1] if sockets else port
        shown = f"[{host}]" if ":" in host else host
        scheme = "https" if ssl_context is not None else "http"
        self.base_url = f"{scheme}://{shown}:{bound}{self.base_path}"
        log.info("mpm_emulator_started", base_url=self.base_url)
        return self.base_url

    @property
    def root_url(self) -> str:
        """The server's root (the token endpoint and the control routes live there)."""
        assert self.base_url is not None, "MPM emulator not started"
        return self.base_url[: len(self.base_url) - len(self.base_path)] if self.base_path else self.base_url

    @property
    def token_url(self) -> str:
        """The OAuth2 token endpoint's URL."""
        return self.root_url + self.token_path

    async def stop(self) -> None:
        """Stop serving."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> MPMEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- the request wrapper ------------------------------------------------------------------

    def _api(self, call: str, fn: Handler, *, auth: bool = True) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            pid = request.match_info.get("process_id")
            raw = await request.read() if request.can_read_body else b""
            entry: dict[str, Any] = {
                "call": call,
                "method": request.method,
                "path": request.path,
                "process_id": pid,
                "idempotency_key": request.headers.get("Idempotency-Key"),
                "auth": self._credential_kind(request),
                "body_sha256": hashlib.sha256(raw).hexdigest() if raw and call != "oauth_token" else None,
                "at": time.time(),
                "status": None,
            }
            self.calls.append(entry)
            delay = self._delays.get(pid, self._delay) if pid is not None else self._delay
            if delay:
                await asyncio.sleep(delay)
            fault = self._take_fault(call, pid)
            if fault is not None:
                headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
                if fault.body is not None:
                    resp = web.Response(
                        status=fault.status, body=fault.body, content_type="application/json", headers=headers
                    )
                else:
                    resp = _error(fault.status, "injected", fault.reason, headers)
            elif auth and not self._authorized(request):
                resp = _error(401, "unauthorized", "missing or invalid credentials")
            else:
                resp = await fn(request, pid)
            entry["status"] = resp.status
            return resp

        return handler

    def _take_fault(self, call: str, pid: str | None) -> Fault | None:
        for fault in self._faults:
            if fault.matches(call, pid):
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                return fault
        return None

    @staticmethod
    def _credential_kind(request: web.Request) -> str | None:
        if request.headers.get("X-API-Key"):
            return "api_key"
        if request.headers.get("Authorization", "").startswith("Bearer "):
            return "bearer"
        return None

    @property
    def open_access(self) -> bool:
        """True when no credential is configured: every call is allowed."""
        return not (self.api_key or self.bearer_tokens or self.client_id)

    def _authorized(self, request: web.Request) -> bool:
        if self.open_access:
            return True
        key = request.headers.get("X-API-Key")
        if key and self.api_key and hmac.compare_digest(key.encode(), self.api_key.encode()):
            return True
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            token = header[7:].strip()
            if any(hmac.compare_digest(token.encode(), t.encode()) for t in self.bearer_tokens):
                return True
            expires = self._tokens.get(token)
            if expires is not None:
                if time.monotonic() < expires:
                    return True
                del self._tokens[token]
        return False

    # ---- API handlers -------------------------------------------------------------------------

    async def _health(self, request: web.Request, pid: str | None) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _list(self, request: web.Request, pid: str | None) -> web.Response:
        q = request.query
        try:
            limit = int(q.get("limit", "100"))
            offset = int(q.get("offset", "0"))
        except ValueError:
            return _error(400, "invalid_parameter", "limit and offset must be integers")
        if not 1 <= limit <= 1000 or offset < 0:
            return _error(400, "invalid_parameter", "limit must be 1..1000 and offset >= 0")
        status = q.get("status")
        if status is not None and status not in MPM_STATUSES:
            return _error(400, "invalid_status", f"unknown status {status!r}")
        build = q.get("build_id")
        items = [
            p
            for p in self.processes.values()
            if (build is None or p.get("build_id") == build) and (status is None or p.get("status") == status)
        ]
        return web.json_response({"processes": items[offset : offset + limit], "total": len(items)})

    async def _get(self, request: web.Request, pid: str | None) -> web.Response:
        proc = self.processes.get(pid or "")
        if proc is None:
            return _error(404, "not_found", f"no process {pid!r}")
        return web.json_response(proc)

    async def _params(self, request: web.Request, pid: str | None) -> web.Response:
        proc = self.processes.get(pid or "")
        if proc is None:
            return _error(404, "not_found", f"no process {pid!r}")
        return web.json_response(proc.get("parameters") or {})

    def _process_for_write(self, pid: str) -> dict[str, Any] | None:
        proc = self.processes.get(pid)
        if proc is None and self.auto_create:
            proc = {
                "process_id": pid,
                "build_id": None,
                "material": None,
                "parameters": {},
                "status": "pending",
                "start_time": None,
                "end_time": None,
                "metadata": {"auto_created": True},
            }
            self.processes[pid] = proc
        return proc

    async def _json_body(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            return json.loads(raw)
        except ValueError:
            return None

    def _replay(self, kind: str, key: str | None, pid: str, body: Any) -> web.Response | None:
        """The answer for a key seen before: its first answer (as 200) or 422; None for a new key."""
        if not key:
            return None
        seen = self._idem.get((kind, key))
        if seen is None:
            return None
        if seen["process_id"] != pid or seen["body"] != _canonical(body):
            return _error(422, "idempotency_conflict", "Idempotency-Key reused with another request")
        return web.json_response({**seen["answer"], "duplicate": True}, status=200)

    async def _status(self, request: web.Request, pid: str | None) -> web.Response:
        assert pid is not None
        body = await self._json_body(request)
        if not isinstance(body, dict):
            return _error(400, "invalid_body", "body must be a JSON object {status, metadata}")
        status = body.get("status")
        if status not in MPM_STATUSES:
            return _error(400, "invalid_status", f"unknown status {status!r} (one of {', '.join(MPM_STATUSES)})")
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            return _error(400, "invalid_body", "metadata must be an object")
        key = request.headers.get("Idempotency-Key")
        replay = self._replay("status", key, pid, body)
        if replay is not None:
            return replay
        proc = self._process_for_write(pid)
        if proc is None:
            return _error(404, "not_found", f"no process {pid!r}")
        now = iso(utcnow())
        proc["status"] = status
        if status == "running" and not proc.get("start_time"):
            proc["start_time"] = now
        if status in ("completed", "failed", "cancelled"):
            proc["end_time"] = now
        self._history.setdefault(pid, []).append(
            {"status": status, "metadata": metadata or {}, "idempotency_key": key, "at": now}
        )
        answer = dict(proc)
        if key:
            self._idem[("status", key)] = {"process_id": pid, "body": _canonical(body), "answer": answer}
        return web.json_response(answer, status=200)

    async def _quality(self, request: web.Request, pid: str | None) -> web.Response:
        assert pid is not None
        body = await self._json_body(request)
        if not isinstance(body, dict):
            return _error(400, "invalid_body", "body must be a JSON quality result object")
        key = request.headers.get("Idempotency-Key")
        replay = self._replay("quality", key, pid, body)
        if replay is not None:
            return replay
        if self._process_for_write(pid) is None:
            return _error(404, "not_found", f"no process {pid!r}")
        result_id = f"QR-{len(self._results) + 1:06d}"
        stored = {"result_id": result_id, "process_id": pid, "idempotency_key": key, "body": body}
        self._results.append({**stored, "received_at": iso(utcnow())})
        answer = {"result_id": result_id, "process_id": pid}
        if key:
            self._idem[("quality", key)] = {"process_id": pid, "body": _canonical(body), "answer": answer}
        return web.json_response(answer, status=201)

    async def _stored(self, request: web.Request, pid: str | None) -> web.Response:
        if pid not in self.processes:
            return _error(404, "not_found", f"no process {pid!r}")
        return web.json_response({"results": [r["body"] for r in self._results if r["process_id"] == pid]})

    async def _token(self, request: web.Request, pid: str | None) -> web.Response:
        form = await request.post()
        client_id = str(form.get("client_id") or "")
        client_secret = str(form.get("client_secret") or "")
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            try:
                client_id, _, client_secret = base64.b64decode(header[6:]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return web.json_response({"error": "invalid_client"}, status=401)
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        ok = bool(self.client_id) and hmac.compare_digest(client_id.encode(), (self.client_id or "").encode())
        if self.client_secret is not None:
            ok = ok and hmac.compare_digest(client_secret.encode(), self.client_secret.encode())
        if not ok:
            return web.json_response({"error": "invalid_client"}, status=401)
        token = secrets.token_urlsafe(24)
        now = time.monotonic()
        # Forget expired tokens so a long simulation does not grow without bound.
        for t, exp in list(self._tokens.items()):
            if exp <= now:
                del self._tokens[t]
        self._tokens[token] = now + self.token_lifetime_s
        self.tokens_issued += 1
        return web.json_response({"access_token": token, "token_type": "Bearer", "expires_in": self.token_lifetime_s})

    # ---- control routes -----------------------------------------------------------------------

    async def _c_fail(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
            fault = self.fail(
                int(data.get("status", 503)),
                None if data.get("count", 1) is None else int(data.get("count", 1)),
                retry_after=None if data.get("retry_after") is None else float(data["retry_after"]),
                process_id=data.get("process_id"),
                call=data.get("call"),
                reason=str(data.get("reason") or "injected by the emulator"),
            )
        except (ValueError, TypeError, AttributeError) as err:
            return _error(400, "invalid_body", str(err))
        return web.json_response({"status": fault.status, "count": fault.remaining}, status=201)

    async def _c_clear(self, request: web.Request) -> web.Response:
        self.clear_faults()
        return web.json_response({"ok": True})

    async def _c_delay(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
            self.set_delay(float(data.get("seconds", 0)), data.get("process_id"))
        except (ValueError, TypeError, AttributeError) as err:
            return _error(400, "invalid_body", str(err))
        return web.json_response({"ok": True})

    async def _c_api_key(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
            key = data.get("api_key")
            if key is not None and not isinstance(key, str):
                raise ValueError("api_key must be a string or null")
        except (ValueError, TypeError, AttributeError) as err:
            return _error(400, "invalid_body", str(err))
        self.set_api_key(key)
        return web.json_response({"ok": True})

    async def _c_expire(self, request: web.Request) -> web.Response:
        self.expire_tokens()
        return web.json_response({"ok": True})

    async def _c_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def _c_results(self, request: web.Request) -> web.Response:
        return web.json_response({"results": self.results(request.query.get("process_id"))})

    async def _c_history(self, request: web.Request) -> web.Response:
        return web.json_response({"updates": self.status_updates(request.match_info["process_id"])})

    async def _c_calls(self, request: web.Request) -> web.Response:
        return web.json_response({"calls": list(self.calls)})


def emulator_for(section: MpmSection, **kwargs: Any) -> tuple[MPMEmulator, str, int]:
    """An emulator with the credentials of an `[mpm]` section, and the host and port to serve it on."""
    parts = urlsplit(section.base_url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    token_path = "/oauth/token"
    if section.token_url:
        tparts = urlsplit(section.token_url)
        if (tparts.hostname, tparts.port) == (parts.hostname, parts.port) and tparts.path:
            token_path = tparts.path
        else:
            log.warning("mpm_emulator_token_url_elsewhere", token_url=section.token_url)
    bearer = [section.secret("token")] if section.auth == "bearer" and section.secret("token") else []
    emulator = MPMEmulator(
        api_key=section.secret("api_key") if section.auth == "api_key" else None,
        bearer_tokens=[t for t in bearer if t],
        client_id=section.client_id if section.auth == "oauth2" else None,
        client_secret=section.secret("client_secret") if section.auth == "oauth2" else None,
        base_path=parts.path or "/",
        token_path=token_path,
        **kwargs,
    )
    return emulator, host, port


async def simulate_mpm(section: MpmSection) -> None:
    """Serve the MPM emulator where `section.base_url` points, with its credentials, until cancelled."""
    emulator, host, port = emulator_for(section)
    await emulator.start(host, port)
    try:
        await asyncio.Event().wait()
    finally:
        await emulator.stop()
