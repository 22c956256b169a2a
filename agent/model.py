"""The status object the daemon publishes; the events drivers produce come from the driver SDK."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from drivers.sdk.events import (
    STATUSES,
    CommandResult,
    ConnectionState,
    Event,
    QualityResult,
    Reading,
    StatusFact,
    Unchanged,
    iso,
    parse_iso,
    utcnow,
)
from drivers.sdk.jsonio import json_bytes, json_safe

__all__ = [
    "STATUSES",
    "CommandResult",
    "ConnectionState",
    "EquipmentStatus",
    "Event",
    "QualityResult",
    "Reading",
    "StatusFact",
    "Unchanged",
    "iso",
    "json_bytes",
    "json_safe",
    "parse_iso",
    "utcnow",
]


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
