"""MPM's wire shapes: process statuses and objects, the client's errors, and reading MPM's answers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import aiohttp

from agent.errors import RejectedError, TransientError
from agent.jsonin import InputError, loads
from agent.model import iso, json_safe, parse_iso

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


def network_error(err: BaseException) -> str:
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


def read_answer(text: str, what: str) -> Any:
    """An error answer's JSON through the outside-JSON gate, or None when it is unreadable (its text still
    gives the reason)."""
    if not text:
        return None
    try:
        return loads(text, max_bytes=MAX_ANSWER_BYTES, what=what)
    except InputError:
        return None


def expect_object(call: str, process_id: str | None, body: Any) -> dict[str, Any]:
    """A 2xx answer that must be a JSON object; a refused or misshapen one is a clear TransientError."""
    where = f"MPM {call}" + (f" {process_id!r}" if process_id is not None else "")
    if isinstance(body, InputError):
        raise TransientError(f"{where}: {body}") from body
    if not isinstance(body, dict):
        raise TransientError(f"{where}: answer is not a JSON object")
    return body


def answer_reason(body: Any, text: str) -> str:
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
