"""A built-in MPM: the contract's REST API over aiohttp, with a control API to inject failures.

Used as the MPM peer in tests and by `edge-agent simulate`. Control from the same process through the
methods of `MPMEmulator` (its state and faults live in `agent.simulate.mpm_state`), or from another
process through the routes under `/_emulator/`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from agent.simulate.mpm_state import CALLS, MPM_STATUSES, Fault, MPMState, default_processes
from agent.simulate.mpm_state import error_answer as _error

if TYPE_CHECKING:
    from agent.config import MpmSection

__all__ = ["CALLS", "MPM_STATUSES", "Fault", "MPMEmulator", "default_processes", "emulator_for", "simulate_mpm"]

log = structlog.get_logger("edge_agent.simulate.mpm")

Handler = Callable[[web.Request, str | None], Awaitable[web.Response]]
# Applies a new write to the state: its answer, or None for an unknown process.
Apply = Callable[[str, dict[str, Any], str | None], dict[str, Any] | None]


class MPMEmulator(MPMState):
    """An in-memory MPM with the contract's REST API below `base_path` and a token endpoint."""

    _runner: web.AppRunner | None = None
    base_url: str | None = None

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

    async def _json_body(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            return json.loads(raw)
        except ValueError:
            return None

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
        return self._write(request, "status", pid, body, self._apply_status, 200)

    async def _quality(self, request: web.Request, pid: str | None) -> web.Response:
        assert pid is not None
        body = await self._json_body(request)
        if not isinstance(body, dict):
            return _error(400, "invalid_body", "body must be a JSON quality result object")
        return self._write(request, "quality", pid, body, self._store_result, 201)

    def _write(
        self, request: web.Request, kind: str, pid: str, body: dict[str, Any], apply: Apply, ok: int
    ) -> web.Response:
        """A write's answer: the first answer to a key seen before, else `apply`'s (404 for no process)."""
        key = request.headers.get("Idempotency-Key")
        replay = self._replay(kind, key, pid, body)
        if replay is not None:
            return replay
        answer = apply(pid, body, key)
        if answer is None:
            return _error(404, "not_found", f"no process {pid!r}")
        return web.json_response(answer, status=ok)

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
        token = self._issue_token(client_id, client_secret)
        if token is None:
            return web.json_response({"error": "invalid_client"}, status=401)
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
