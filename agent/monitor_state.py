"""What the monitor keeps per equipment, and where its messages go."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.config import AlertConfig, EquipmentConfig
from agent.model import EquipmentStatus, Reading, StatusFact
from agent.store_rows import Encoded


class Sink(Protocol):
    """Where the monitor's messages and bookkeeping go: the durable store, or memory for the Python API."""

    def append(
        self,
        kind: str,
        topic: str,
        payload: dict[str, Any],
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> int: ...

    def append_encoded(self, items: Iterable[Encoded]) -> None: ...

    def set_state(self, key: str, value: Any) -> None: ...

    def state_items(self, prefix: str) -> dict[str, Any]: ...


StatusListener = Callable[[str, EquipmentStatus, EquipmentStatus | None], None]


@dataclass
class EquipmentState:
    """Everything the monitor knows about one equipment."""

    cfg: EquipmentConfig
    status: EquipmentStatus
    stale_after_s: float
    connected: bool = False
    connection_error: str | None = None
    values: dict[str, Reading] = field(default_factory=dict)
    reported: dict[str, tuple[Any, str]] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)  # values as JSON text, encoded once on arrival
    fact: StatusFact | None = None
    status_value_at: float | None = None
    last_value_at: float | None = None
    published_at: float = 0.0
    active_alerts: dict[str, dict[str, Any]] = field(default_factory=dict)
    # tag -> what it feeds, precomputed so the hot path does one dict lookup per reading
    roles: dict[str, tuple[str, ...]] = field(default_factory=dict)
    alerts: dict[str, list[tuple[AlertConfig, str]]] = field(default_factory=dict)
    deadband: dict[str, float] = field(default_factory=dict)
    # tag -> its unit as JSON text, only for tags that have one (names are plain identifiers)
    units: dict[str, str] = field(default_factory=dict)
    status_tag: str | None = None  # the tag the status is read from, if any
    # One delivery, one derivation: status and alerts wait until the driver has handed over all it had.
    unsettled: bool = False
    touched: set[str] = field(default_factory=set)  # status tags given a value in the unsettled delivery
    alert_queue: list[Reading] = field(default_factory=list)
    # drivers' Checkpoints waiting for the telemetry now pending to be in the store
    checkpoints: list[asyncio.Future[bool]] = field(default_factory=list)


def hold_checkpoint(st: EquipmentState, done: asyncio.Future[bool]) -> None:
    """Resolve `done` once the telemetry waiting now is in the store: at once when none waits."""
    if st.pending:
        st.checkpoints.append(done)
    elif not done.done():
        done.set_result(True)


def release_checkpoints(states: Iterable[EquipmentState]) -> None:
    """Telemetry was flushed to the store: resolve every Checkpoint that waited for it."""
    for st in states:
        if st.checkpoints:
            done, st.checkpoints = st.checkpoints, []
            for fut in done:
                if not fut.done():
                    fut.set_result(True)


class MemorySink:
    """A sink that keeps the monitor's bookkeeping in memory and stores no message (the Python API, the dry run)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}
        self.seq = 0

    def append(
        self,
        kind: str,
        topic: str,
        payload: dict[str, Any],
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> int:
        self.seq += 1
        return self.seq

    def append_encoded(self, items: Iterable[Encoded]) -> None:
        for _ in items:
            self.seq += 1

    def set_state(self, key: str, value: Any) -> None:
        if value is None:
            self.state.pop(key, None)
        else:
            self.state[key] = value

    def state_items(self, prefix: str) -> dict[str, Any]:
        return {k: v for k, v in self.state.items() if k.startswith(prefix)}
