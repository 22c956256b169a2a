"""The MPM emulator's state: its processes, results, idempotency memory, tokens, and the injected faults
and delays, with the methods tests and the control routes use to drive it."""

from __future__ import annotations

import hmac
import json
import secrets
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from agent.model import iso, utcnow

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


def error_answer(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


class MPMState:
    """An in-memory MPM: what it holds and how tests drive it (`MPMEmulator` serves it)."""

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

    # ---- answering ----------------------------------------------------------------------------

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

    def _replay(self, kind: str, key: str | None, pid: str, body: Any) -> web.Response | None:
        """The answer for a key seen before: its first answer (as 200) or 422; None for a new key."""
        if not key:
            return None
        seen = self._idem.get((kind, key))
        if seen is None:
            return None
        if seen["process_id"] != pid or seen["body"] != _canonical(body):
            return error_answer(422, "idempotency_conflict", "Idempotency-Key reused with another request")
        return web.json_response({**seen["answer"], "duplicate": True}, status=200)

    def _apply_status(self, pid: str, body: dict[str, Any], key: str | None) -> dict[str, Any] | None:
        """Apply a validated status update; the process object answered, or None for an unknown process."""
        proc = self._process_for_write(pid)
        if proc is None:
            return None
        status = body["status"]
        now = iso(utcnow())
        proc["status"] = status
        if status == "running" and not proc.get("start_time"):
            proc["start_time"] = now
        if status in ("completed", "failed", "cancelled"):
            proc["end_time"] = now
        self._history.setdefault(pid, []).append(
            {"status": status, "metadata": body.get("metadata") or {}, "idempotency_key": key, "at": now}
        )
        answer = dict(proc)
        if key:
            self._idem[("status", key)] = {"process_id": pid, "body": _canonical(body), "answer": answer}
        return answer

    def _store_result(self, pid: str, body: dict[str, Any], key: str | None) -> dict[str, Any] | None:
        """Store a quality result; the answer, or None for an unknown process."""
        if self._process_for_write(pid) is None:
            return None
        result_id = f"QR-{len(self._results) + 1:06d}"
        stored = {"result_id": result_id, "process_id": pid, "idempotency_key": key, "body": body}
        self._results.append({**stored, "received_at": iso(utcnow())})
        answer = {"result_id": result_id, "process_id": pid}
        if key:
            self._idem[("quality", key)] = {"process_id": pid, "body": _canonical(body), "answer": answer}
        return answer

    def _issue_token(self, client_id: str, client_secret: str) -> str | None:
        """A new OAuth2 token for the configured client, or None for other credentials."""
        ok = bool(self.client_id) and hmac.compare_digest(client_id.encode(), (self.client_id or "").encode())
        if self.client_secret is not None:
            ok = ok and hmac.compare_digest(client_secret.encode(), self.client_secret.encode())
        if not ok:
            return None
        token = secrets.token_urlsafe(24)
        now = time.monotonic()
        # Forget expired tokens so a long simulation does not grow without bound.
        for t, exp in list(self._tokens.items()):
            if exp <= now:
                del self._tokens[t]
        self._tokens[token] = now + self.token_lifetime_s
        self.tokens_issued += 1
        return token
