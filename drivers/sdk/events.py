"""The events drivers produce, what they answer to commands, and the timestamps every payload carries."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
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


@dataclass(slots=True)
class DeviceAlerts:
    """The alerts a device raises by itself on one source (a condition it reports), given whole each time.

    `active` maps each native code to its (severity, message), severity one of info, warning, critical.
    An alert stays active, keeping its id, until a later DeviceAlerts for the same source leaves its
    code out: it is then cleared with the same id. Giving the whole set makes a resync idempotent.
    """

    source: str
    active: dict[str, tuple[str, str]]
    ts: datetime


@dataclass(slots=True)
class Checkpoint:
    """Asks to be told when everything the driver handed over before it is in the durable store.

    The pipeline resolves `done` with True once it is (at once when nothing waits). A driver that keeps a
    position in its source (a sequence number) saves it only then: after a crash it reads again nothing
    already stored and leaves out nothing that was not. A driver never waits for it: it checks `done`.
    """

    done: asyncio.Future[bool]


Event = Reading | ConnectionState | StatusFact | QualityResult | Unchanged | DeviceAlerts | Checkpoint


@dataclass(slots=True)
class CommandResult:
    """What a driver answers to a command."""

    success: bool
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)
