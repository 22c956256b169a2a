"""Typed events that drivers produce and the status object the daemon publishes."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any

STATUSES = ("offline", "idle", "running", "paused", "error", "maintenance", "unknown")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def iso(ts: datetime) -> str:
    """ISO 8601 UTC with milliseconds and a `Z`, as every payload carries timestamps."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    else:
        ts = ts.astimezone(UTC)
    # The year padded by hand: strftime leaves years before 1000 short, which no ISO parser reads back.
    return f"{ts.year:04d}" + ts.strftime("-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def parse_iso(text: str) -> datetime:
    """Parse an ISO 8601 timestamp (a trailing `Z` allowed); naive values are taken as UTC."""
    ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def json_bytes(obj: Any) -> bytes:
    """Strict compact JSON bytes: what the MPM outbox stores and the MPM client sends, byte for byte."""
    return json.dumps(json_safe(obj), separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def json_safe(value: Any) -> Any:
    """Make a value strict-JSON: NaN and infinities become strings, containers are walked."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        if math.isnan(value):
            return "NaN"
        return "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Enum):
        return value.value
    return value


# ---- events drivers produce -------------------------------------------------------------------


@dataclass(slots=True)
class Reading:
    """One value of one tag, with its source timestamp and quality."""

    tag: str
    value: Any
    ts: datetime
    quality: str = "good"


@dataclass(slots=True)
class ConnectionState:
    """The driver's link to the device went up or down; `error` says why it is down."""

    connected: bool
    error: str | None = None


@dataclass(slots=True)
class StatusFact:
    """Status a driver knows directly (printers, file drops), rather than derived from tags.

    Each fact is the whole status: a field left as None is empty in the published status.
    """

    status: str
    current_operation: str | None = None
    progress: float | None = None
    error_message: str | None = None
    process_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class QualityResult:
    """A quality result to publish and forward to MPM.

    `idempotency_key` is derived from the source content. `committed` is resolved by the pipeline once
    the result is durable (in the MQTT store and the MPM outbox) with True when it was new and False when
    it was a duplicate of a key already pending or delivered; the driver may only then discard its source.
    """

    result: dict[str, Any]
    idempotency_key: str
    committed: asyncio.Future[bool] | None = None


@dataclass(slots=True)
class Unchanged:
    """A poll read every tag again at `ts`: those not given a new Reading in it still hold their last value.

    Polled drivers report by exception: a block of registers that reads the same bytes as last time
    yields no readings, only this, so the monitor still knows the values (and the status) are fresh.
    """

    ts: datetime


Event = Reading | ConnectionState | StatusFact | QualityResult | Unchanged


@dataclass(slots=True)
class CommandResult:
    """What a driver answers to a command."""

    success: bool
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)


# ---- the published status object ---------------------------------------------------------------


@dataclass(slots=True)
class EquipmentStatus:
    """The status object of the contract."""

    equipment_id: str
    type: str
    status: str = "offline"
    current_operation: str | None = None
    progress: float | None = None
    error_message: str | None = None
    process_id: str | None = None
    timestamp: datetime = field(default_factory=utcnow)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The contract's JSON shape (timestamps as ISO strings)."""
        return {
            "equipment_id": self.equipment_id,
            "type": self.type,
            "status": self.status,
            "current_operation": self.current_operation,
            "progress": self.progress,
            "error_message": self.error_message,
            "process_id": self.process_id,
            "timestamp": iso(self.timestamp),
            "metadata": json_safe(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EquipmentStatus:
        """Inverse of `to_dict`; unknown keys (such as `seq`) are ignored."""
        ts = data.get("timestamp")
        return cls(
            equipment_id=str(data["equipment_id"]),
            type=str(data.get("type", "other")),
            status=str(data.get("status", "unknown")),
            current_operation=data.get("current_operation"),
            progress=data.get("progress"),
            error_message=data.get("error_message"),
            process_id=data.get("process_id"),
            timestamp=parse_iso(ts) if isinstance(ts, str) else utcnow(),
            metadata=dict(data.get("metadata") or {}),
        )

    def differs(self, other: EquipmentStatus | None) -> bool:
        """The contract's notion of a status change."""
        if other is None:
            return True
        if (
            self.status != other.status
            or self.current_operation != other.current_operation
            or self.process_id != other.process_id
            or self.error_message != other.error_message
        ):
            return True
        if (self.progress is None) != (other.progress is None):
            return True
        if self.progress is not None and other.progress is not None:
            return abs(self.progress - other.progress) >= 0.01
        return False
