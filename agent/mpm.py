"""The MPM REST client: one pooled aiohttp session, auth, retries with backoff, a rate limit, metrics.

Its parts live beside it: the wire shapes and errors in `agent.mpm_models`, the credentials in
`agent.mpm_auth`, the retry policy and the pace in `agent.mpm_retry`; every name stays importable here.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
import structlog

from agent.errors import RejectedError, TransientError
from agent.jsonin import InputError, loads
from agent.linkstats import link
from agent.metrics import MPM_CALLS, MPM_LATENCY
from agent.model import json_bytes
from agent.mpm_auth import AuthMode, MpmAuth
from agent.mpm_models import (
    MAX_ANSWER_BYTES,
    CredentialsRefused,
    MPMProcessData,
    MPMProcessList,
    MPMStatus,
    MPMTransientError,
    answer_reason,
    expect_object,
    network_error,
    read_answer,
)
from agent.mpm_retry import AUTH_STATUSES, RETRY_STATUSES, _TokenBucket, retry_after, retry_delay

if TYPE_CHECKING:
    from agent.config import MpmSection

__all__ = [
    "AUTH_STATUSES",
    "MAX_ANSWER_BYTES",
    "RETRY_STATUSES",
    "AuthMode",
    "CredentialsRefused",
    "MPMClient",
    "MPMProcessData",
    "MPMProcessList",
    "MPMStatus",
    "MPMTransientError",
    "_TokenBucket",
]

log = structlog.get_logger("edge_agent.mpm")
_LINK = link("mpm")  # health of the MPM link: durations, errors, uptime (agent.linkstats)


class MPMClient:
    """Async client of the MPM REST API (see the contract's table); one pooled session per client."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: float = 30.0,
        verify_ssl: bool = True,
        retry_on_failure: bool = True,
        max_retries: int = 3,
        *,
        auth: AuthMode = "api_key",
        bearer_token: str | None = None,
        token_url: str | None = None,
        client_id: str | None = None,
        client_secret: str | None = None,
        scope: str | None = None,
        ca_file: str | None = None,
        rate_limit_per_minute: int | None = None,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 10.0,
        max_retry_after_s: float = 60.0,
        connection_limit: int = 32,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.auth = auth
        self.timeout = timeout
        self.verify_ssl = verify_ssl
        self.retry_on_failure = retry_on_failure
        self.max_retries = max(0, max_retries)
        self.ca_file = ca_file
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_retry_after_s = max_retry_after_s
        self._credentials = MpmAuth(
            auth,
            self._get_session,
            api_key=api_key,
            bearer_token=bearer_token,
            token_url=token_url,
            client_id=client_id,
            client_secret=client_secret,
            scope=scope,
        )
        self._connection_limit = connection_limit
        self._bucket = _TokenBucket(rate_limit_per_minute) if rate_limit_per_minute else None
        self._session: aiohttp.ClientSession | None = None
        self._healthy: bool | None = None

    @classmethod
    def from_config(cls, section: MpmSection, **kwargs: Any) -> MPMClient:
        """A client for an `[mpm]` section, secrets resolved by the config loader."""
        return cls(
            section.base_url,
            api_key=section.secret("api_key"),
            timeout=section.timeout_s,
            verify_ssl=section.verify_ssl,
            retry_on_failure=section.retry_on_failure,
            max_retries=section.max_retries,
            auth=section.auth,
            bearer_token=section.secret("token"),
            token_url=section.token_url,
            client_id=section.client_id,
            client_secret=section.secret("client_secret"),
            scope=section.scope,
            ca_file=str(section.ca_file) if section.ca_file else None,
            rate_limit_per_minute=section.rate_limit_per_minute,
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"MPMClient(base_url={self.base_url!r}, auth={self.auth!r})"

    # ---- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> MPMClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the pooled session; the client opens a new one if used again."""
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.verify_ssl:
            return False
        if self.ca_file:
            return ssl.create_default_context(cafile=self.ca_file)
        return True

    def _get_session(self) -> aiohttp.ClientSession:
        # Created lazily so that it belongs to the running loop.
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._connection_limit, ssl=self._ssl())
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"Accept": "application/json", "User-Agent": "edge-agent"},
            )
        return self._session

    # ---- the request loop ---------------------------------------------------------------------

    async def _request(
        self,
        call: str,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: bytes | None = None,
        idempotency_key: str | None = None,
        retries: bool = True,
    ) -> tuple[int, Any]:
        """One logical call: attempts with backoff; returns (status, parsed JSON) for a 2xx."""
        url = self.base_url + path
        attempts = 1 + (self.max_retries if (retries and self.retry_on_failure) else 0)
        refreshed = False
        attempt = 0
        last: MPMTransientError | None = None
        while attempt < attempts:
            headers = {}
            if body is not None:
                headers["Content-Type"] = "application/json"
            if idempotency_key:
                headers["Idempotency-Key"] = idempotency_key
            try:
                headers.update(await self._credentials.headers())
            except MPMTransientError as err:
                last = err
                attempt += 1
                if attempt < attempts:
                    await asyncio.sleep(self._retry_delay(attempt - 1, err.retry_after))
                continue
            if self._bucket is not None:
                await self._bucket.acquire()
            session = self._get_session()
            started = time.monotonic()
            try:
                async with session.request(method, url, params=params, data=body, headers=headers) as resp:
                    status = resp.status
                    text = await resp.text()
                    server_wait = retry_after(resp.headers.get("Retry-After"))
            except (aiohttp.ClientError, TimeoutError) as err:
                MPM_LATENCY.labels(call=call).observe(time.monotonic() - started)
                MPM_CALLS.labels(call=call, outcome="network").inc()
                last = MPMTransientError(f"MPM {call} {method} {path}: {network_error(err)}")
                _LINK.down(str(last))
                last.__cause__ = err
                attempt += 1
                if attempt < attempts:
                    await asyncio.sleep(self._retry_delay(attempt - 1, None))
                continue
            MPM_LATENCY.labels(call=call).observe(time.monotonic() - started)
            _LINK.observe(time.monotonic() - started)
            if 200 <= status < 300:
                MPM_CALLS.labels(call=call, outcome="ok").inc()
                _LINK.up()
                try:
                    return status, loads(text, max_bytes=MAX_ANSWER_BYTES, what=f"MPM {call} answer") if text else None
                except InputError as err:
                    # The call was accepted; its answer is unusable. Callers that need it say so.
                    log.warning("mpm_answer_refused", call=call, reason=err.reason, error=str(err))
                    return status, err
            parsed = read_answer(text, f"MPM {call} answer")
            if status == 401 and self.auth == "oauth2" and not refreshed:
                # The token may have been revoked or expired early: refresh once, not counted as a retry.
                MPM_CALLS.labels(call=call, outcome="unauthorized").inc()
                refreshed = True
                self._credentials.forget_token()
                continue
            reason = self._credentials.redact(answer_reason(parsed, text)) or f"HTTP {status}"
            if status in RETRY_STATUSES:
                MPM_CALLS.labels(call=call, outcome="transient").inc()
                last = MPMTransientError(f"MPM {call} {method} {path} answered {status}: {reason}", status, server_wait)
                _LINK.down(str(last))
                attempt += 1
                if attempt < attempts:
                    if server_wait is not None and server_wait > self.max_retry_after_s:
                        break  # too long to wait inside one call; the caller (the outbox) schedules it
                    await asyncio.sleep(self._retry_delay(attempt - 1, server_wait))
                continue
            if status in AUTH_STATUSES:
                MPM_CALLS.labels(call=call, outcome="credentials_refused").inc()
                message = f"MPM {call} {method} {path} refused the credentials ({status}): {reason}"
                _LINK.down(message)
                raise CredentialsRefused(message, status)
            MPM_CALLS.labels(call=call, outcome="rejected").inc()
            _LINK.up()  # MPM answered: the link works, the request was refused
            if status == 404 and call in ("get_process_data", "get_process_parameters"):
                raise ValueError(f"MPM has no process at {path} (404)")
            raise RejectedError(f"MPM {call} {method} {path} refused ({status}): {reason}", status)
        assert last is not None
        raise last

    def _retry_delay(self, attempt: int, server_s: float | None) -> float:
        return retry_delay(self.backoff_base_s, self.backoff_max_s, attempt, server_s, self.max_retry_after_s)

    @staticmethod
    def _pid(process_id: str) -> str:
        if not process_id:
            raise ValueError("process_id must not be empty")
        return quote(str(process_id), safe="")

    # ---- the contract's calls -----------------------------------------------------------------

    async def get_process_data(self, process_id: str) -> MPMProcessData:
        """GET /processes/{id}; an unknown process is a ValueError."""
        _, body = await self._request("get_process_data", "GET", f"/processes/{self._pid(process_id)}")
        return MPMProcessData.from_dict(expect_object("get_process_data", process_id, body))

    async def list_processes(
        self, build_id: str | None = None, status: str | MPMStatus | None = None, limit: int = 100, offset: int = 0
    ) -> MPMProcessList:
        """GET /processes with optional filters, one page."""
        params = {"limit": str(limit), "offset": str(offset)}
        if build_id is not None:
            params["build_id"] = build_id
        if status is not None:
            params["status"] = MPMStatus(status).value
        _, answer = await self._request("list_processes", "GET", "/processes", params=params)
        body = expect_object("list_processes", None, answer)
        if not isinstance(body.get("processes"), list):
            raise TransientError("MPM list_processes: answer has no processes list")
        items = [MPMProcessData.from_dict(p) for p in body["processes"]]
        return MPMProcessList(items, int(body.get("total", len(items))))

    async def update_process_status(
        self,
        process_id: str,
        status: str | MPMStatus,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        *,
        body: bytes | None = None,
    ) -> dict[str, Any]:
        """PUT /processes/{id}/status; `body`, when given, is sent verbatim (the outbox's stored bytes)."""
        value = status.value if isinstance(status, MPMStatus) else str(status)
        if body is None:
            body = json_bytes({"status": value, "metadata": metadata or {}})
        _, answer = await self._request(
            "update_process_status",
            "PUT",
            f"/processes/{self._pid(process_id)}/status",
            body=body,
            idempotency_key=idempotency_key,
        )
        return answer if isinstance(answer, dict) else {}

    async def submit_quality_results(
        self, process_id: str, results: dict[str, Any] | bytes, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """POST /processes/{id}/quality-results with the bare result object (bytes are sent verbatim)."""
        body = results if isinstance(results, bytes) else json_bytes(results)
        status, answer = await self._request(
            "submit_quality_results",
            "POST",
            f"/processes/{self._pid(process_id)}/quality-results",
            body=body,
            idempotency_key=idempotency_key,
        )
        out = dict(answer) if isinstance(answer, dict) else {}
        out.setdefault("http_status", status)
        return out

    async def get_process_parameters(self, process_id: str) -> dict[str, Any]:
        """GET /processes/{id}/parameters; an unknown process is a ValueError."""
        _, body = await self._request("get_process_parameters", "GET", f"/processes/{self._pid(process_id)}/parameters")
        return expect_object("get_process_parameters", process_id, body)

    async def health_check(self) -> bool:
        """GET /health, one attempt: True when MPM answers 200 {status: "ok"}; never raises for a failure."""
        try:
            _, body = await self._request("health_check", "GET", "/health", retries=False)
        except (TransientError, RejectedError, ValueError) as err:
            self._health(False, str(err))
            return False
        ok = isinstance(body, dict) and body.get("status") == "ok"
        self._health(ok, None if ok else "unexpected answer")
        return ok

    def _health(self, ok: bool, error: str | None) -> None:
        # Log transitions only.
        if ok != self._healthy:
            if ok:
                log.info("mpm_up", base_url=self.base_url)
            elif self._healthy is not None:
                log.warning("mpm_down", base_url=self.base_url, error=error)
            self._healthy = ok
