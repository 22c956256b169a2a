"""The MPM REST client: one pooled aiohttp session, auth, retries with backoff, a rate limit, metrics."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

import aiohttp
import structlog

from agent.errors import RejectedError, TransientError
from agent.jsonin import InputError, loads
from agent.metrics import MPM_CALLS, MPM_LATENCY
from agent.model import iso, json_bytes, json_safe, parse_iso, utcnow
from agent.reconnect import jittered

if TYPE_CHECKING:
    from agent.config import MpmSection

log = structlog.get_logger("edge_agent.mpm")

# The contract's transient answers; every other 4xx is final.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# Answers that refuse the agent's credentials: a configuration fault, never a verdict on one item.
AUTH_STATUSES = frozenset({401, 403})
AuthMode = Literal["none", "api_key", "bearer", "oauth2"]
# The largest MPM answer read as JSON; a bigger one is refused by agent.jsonin like any outside JSON.
MAX_ANSWER_BYTES = 16 * 1024 * 1024


class MPMStatus(StrEnum):
    """Process statuses MPM knows."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class CredentialsRefused(RejectedError):
    """MPM (or its token endpoint) answered 401 or 403: the configured credentials are refused.

    A RejectedError for callers that only know final answers; the outbox pauses on it instead of
    dead-lettering, since every item would be refused the same way until the key is fixed.
    """

    @property
    def reason(self) -> str:
        """The short reason health reports, e.g. `credentials refused (401)`."""
        return f"credentials refused ({self.status_code})"


class MPMTransientError(TransientError):
    """MPM could not be reached or answered with a transient status, after the call's retries."""

    def __init__(self, message: str, status_code: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.retry_after = retry_after


def _opt_time(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value
    return parse_iso(str(value))


@dataclass(slots=True)
class MPMProcessData:
    """A process object of MPM."""

    process_id: str
    build_id: str | None = None
    material: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    status: MPMStatus = MPMStatus.PENDING
    start_time: datetime | None = None
    end_time: datetime | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The contract's JSON shape (timestamps as ISO strings)."""
        return {
            "process_id": self.process_id,
            "build_id": self.build_id,
            "material": self.material,
            "parameters": json_safe(self.parameters),
            "status": self.status.value,
            "start_time": iso(self.start_time) if self.start_time else None,
            "end_time": iso(self.end_time) if self.end_time else None,
            "metadata": json_safe(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MPMProcessData:
        """Inverse of `to_dict`; unknown keys are ignored, an unknown status is a ValueError."""
        if "process_id" not in data:
            raise ValueError("process object has no process_id")
        return cls(
            process_id=str(data["process_id"]),
            build_id=data.get("build_id"),
            material=data.get("material"),
            parameters=dict(data.get("parameters") or {}),
            status=MPMStatus(data.get("status") or "pending"),
            start_time=_opt_time(data.get("start_time")),
            end_time=_opt_time(data.get("end_time")),
            metadata=dict(data.get("metadata") or {}),
        )


@dataclass(slots=True)
class MPMProcessList:
    """One page of `list_processes`."""

    processes: list[MPMProcessData]
    total: int


class _TokenBucket:
    """Allows `rate_per_minute` requests a minute with a burst of one second's worth."""

    def __init__(self, rate_per_minute: int) -> None:
        self.rate = rate_per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self.lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= 1.0:
                    self.tokens -= 1.0
                    return
                await asyncio.sleep((1.0 - self.tokens) / self.rate)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - utcnow()).total_seconds())


def _network_error(err: BaseException) -> str:
    """What went wrong on the way to MPM, in words an operator can act on (never a credential)."""
    if isinstance(err, TimeoutError):
        return "timeout"
    if isinstance(err, aiohttp.ClientConnectorCertificateError):
        cert_err = err.certificate_error
        detail = getattr(cert_err, "verify_message", None) or getattr(cert_err, "reason", None) or str(cert_err)
        return f"TLS certificate verification failed: {detail}"
    if isinstance(err, aiohttp.ClientConnectorSSLError):
        return f"TLS error: {getattr(err.os_error, 'reason', None) or err.os_error}"
    if isinstance(err, aiohttp.ClientConnectorError):
        return f"cannot connect: {err.os_error.strerror or type(err.os_error).__name__}"
    return type(err).__name__


def _answer(text: str, what: str) -> Any:
    """An error answer's JSON through the outside-JSON gate, or None when it is unreadable (its text still
    gives the reason)."""
    if not text:
        return None
    try:
        return loads(text, max_bytes=MAX_ANSWER_BYTES, what=what)
    except InputError:
        return None


def _object(call: str, process_id: str | None, body: Any) -> dict[str, Any]:
    """A 2xx answer that must be a JSON object; a refused or misshapen one is a clear TransientError."""
    where = f"MPM {call}" + (f" {process_id!r}" if process_id is not None else "")
    if isinstance(body, InputError):
        raise TransientError(f"{where}: {body}") from body
    if not isinstance(body, dict):
        raise TransientError(f"{where}: answer is not a JSON object")
    return body


def _reason(body: Any, text: str) -> str:
    """A short human reason from an error answer: its message field, else the start of its text."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            msg = err.get("message") or err.get("code")
            if msg:
                return str(msg)[:300]
        for key in ("message", "detail", "error_description", "error"):
            if isinstance(body.get(key), str):
                return str(body[key])[:300]
    return text.strip()[:300]


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
        if auth not in ("none", "api_key", "bearer", "oauth2"):
            raise ValueError(f"unknown MPM auth mode {auth!r} (none, api_key, bearer or oauth2)")
        if auth == "oauth2" and not (token_url and client_id):
            raise ValueError("MPM auth oauth2 needs token_url and client_id")
        if auth == "bearer" and not bearer_token:
            raise ValueError("MPM auth bearer needs a token")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.verify_ssl = verify_ssl
        self.retry_on_failure = retry_on_failure
        self.max_retries = max(0, max_retries)
        self.auth = auth
        self.token_url = token_url
        self.client_id = client_id
        self.scope = scope
        self.ca_file = ca_file
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_retry_after_s = max_retry_after_s
        self._bearer_token = bearer_token
        self._client_secret = client_secret
        self._connection_limit = connection_limit
        self._bucket = _TokenBucket(rate_limit_per_minute) if rate_limit_per_minute else None
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_lock: asyncio.Lock | None = None
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

    def _redact(self, text: str) -> str:
        """Remove every configured secret from a text that may end up in a log or an exception."""
        for secret in (self.api_key, self._bearer_token, self._client_secret, self._token):
            if secret and secret in text:
                text = text.replace(secret, "***")
        return text

    # ---- auth ---------------------------------------------------------------------------------

    async def _auth_headers(self) -> dict[str, str]:
        if self.auth == "none":
            return {}
        if self.auth == "api_key":
            return {"X-API-Key": self.api_key} if self.api_key else {}
        if self.auth == "bearer":
            return {"Authorization": f"Bearer {self._bearer_token}"}
        token = await self._oauth_token()
        return {"Authorization": f"Bearer {token}"}

    async def _oauth_token(self, *, force: bool = False) -> str:
        if self._token_lock is None:
            self._token_lock = asyncio.Lock()
        async with self._token_lock:
            if not force and self._token and time.monotonic() < self._token_expires:
                return self._token
            await self._fetch_token()
            assert self._token is not None
            return self._token

    async def _fetch_token(self) -> None:
        """Client credentials grant; the token is refreshed ahead of its expiry."""
        assert self.token_url is not None
        form = {"grant_type": "client_credentials", "client_id": self.client_id or ""}
        if self._client_secret:
            form["client_secret"] = self._client_secret
        if self.scope:
            form["scope"] = self.scope
        session = self._get_session()
        try:
            async with session.post(self.token_url, data=form) as resp:
                text = await resp.text()
                status = resp.status
                retry_after = _retry_after(resp.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError) as err:
            MPM_CALLS.labels(call="oauth_token", outcome="network").inc()
            raise MPMTransientError(f"MPM token endpoint unreachable: {type(err).__name__}") from err
        body = _answer(text, "MPM token endpoint answer")
        if status in RETRY_STATUSES or status >= 500:
            MPM_CALLS.labels(call="oauth_token", outcome="transient").inc()
            raise MPMTransientError(f"MPM token endpoint answered {status}", status, retry_after)
        if status != 200:
            # Whatever the token endpoint refuses is the configuration's fault, never one item's.
            MPM_CALLS.labels(call="oauth_token", outcome="credentials_refused").inc()
            reason = self._redact(_reason(body, text))
            raise CredentialsRefused(f"MPM token endpoint refused the client credentials ({status}): {reason}", status)
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            MPM_CALLS.labels(call="oauth_token", outcome="malformed").inc()
            raise MPMTransientError("MPM token endpoint answer has no access_token", status)
        MPM_CALLS.labels(call="oauth_token", outcome="ok").inc()
        self._token = body["access_token"]
        try:
            lifetime = float(body.get("expires_in") or 3600)
        except (TypeError, ValueError):
            lifetime = 3600.0
        # Refresh ahead of expiry by a tenth of the lifetime, at most 60 s.
        self._token_expires = time.monotonic() + max(0.0, lifetime - min(60.0, lifetime * 0.1))

    # ---- the request loop ---------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        return jittered(self.backoff_base_s, self.backoff_max_s, attempt)

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
                headers.update(await self._auth_headers())
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
                    retry_after = _retry_after(resp.headers.get("Retry-After"))
            except (aiohttp.ClientError, TimeoutError) as err:
                MPM_LATENCY.labels(call=call).observe(time.monotonic() - started)
                MPM_CALLS.labels(call=call, outcome="network").inc()
                last = MPMTransientError(f"MPM {call} {method} {path}: {_network_error(err)}")
                last.__cause__ = err
                attempt += 1
                if attempt < attempts:
                    await asyncio.sleep(self._retry_delay(attempt - 1, None))
                continue
            MPM_LATENCY.labels(call=call).observe(time.monotonic() - started)
            if 200 <= status < 300:
                MPM_CALLS.labels(call=call, outcome="ok").inc()
                try:
                    return status, loads(text, max_bytes=MAX_ANSWER_BYTES, what=f"MPM {call} answer") if text else None
                except InputError as err:
                    # The call was accepted; its answer is unusable. Callers that need it say so.
                    log.warning("mpm_answer_refused", call=call, reason=err.reason, error=str(err))
                    return status, err
            parsed = _answer(text, f"MPM {call} answer")
            if status == 401 and self.auth == "oauth2" and not refreshed:
                # The token may have been revoked or expired early: refresh once, not counted as a retry.
                MPM_CALLS.labels(call=call, outcome="unauthorized").inc()
                refreshed = True
                self._token = None
                continue
            reason = self._redact(_reason(parsed, text)) or f"HTTP {status}"
            if status in RETRY_STATUSES:
                MPM_CALLS.labels(call=call, outcome="transient").inc()
                last = MPMTransientError(f"MPM {call} {method} {path} answered {status}: {reason}", status, retry_after)
                attempt += 1
                if attempt < attempts:
                    if retry_after is not None and retry_after > self.max_retry_after_s:
                        break  # too long to wait inside one call; the caller (the outbox) schedules it
                    await asyncio.sleep(self._retry_delay(attempt - 1, retry_after))
                continue
            if status in AUTH_STATUSES:
                MPM_CALLS.labels(call=call, outcome="credentials_refused").inc()
                message = f"MPM {call} {method} {path} refused the credentials ({status}): {reason}"
                raise CredentialsRefused(message, status)
            MPM_CALLS.labels(call=call, outcome="rejected").inc()
            if status == 404 and call in ("get_process_data", "get_process_parameters"):
                raise ValueError(f"MPM has no process at {path} (404)")
            raise RejectedError(f"MPM {call} {method} {path} refused ({status}): {reason}", status)
        assert last is not None
        raise last

    def _retry_delay(self, attempt: int, retry_after: float | None) -> float:
        delay = self._backoff(attempt)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_retry_after_s))
        return delay

    @staticmethod
    def _pid(process_id: str) -> str:
        if not process_id:
            raise ValueError("process_id must not be empty")
        return quote(str(process_id), safe="")

    # ---- the contract's calls -----------------------------------------------------------------

    async def get_process_data(self, process_id: str) -> MPMProcessData:
        """GET /processes/{id}; an unknown process is a ValueError."""
        _, body = await self._request("get_process_data", "GET", f"/processes/{self._pid(process_id)}")
        return MPMProcessData.from_dict(_object("get_process_data", process_id, body))

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
        body = _object("list_processes", None, answer)
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
        return _object("get_process_parameters", process_id, body)

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
