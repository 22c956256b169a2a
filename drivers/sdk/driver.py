"""The driver interface: an async context manager that streams typed events and runs commands.

A driver imports the SDK only (`drivers.sdk`); the core gives it a context with its state folder,
backoff cap, logger and metrics handle."""

from __future__ import annotations

import abc
import asyncio
import math
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import structlog
from pydantic import BaseModel

from drivers.sdk.config import CommandBase, EquipmentConfig, TagBase
from drivers.sdk.errors import CommandError
from drivers.sdk.events import CommandResult, Event
from drivers.sdk.handle import DriverMetrics, metrics_for


@dataclass
class DriverContext:
    """What the daemon gives every driver."""

    state_dir: Path
    reconnect_max_s: float = 30.0
    # The largest quality-result body MPM accepts ([mpm] max_body_bytes): a larger one is failed at its source.
    max_result_bytes: int | None = None
    # The equipment's metrics handle; made by the core's factory when not given.
    metrics: DriverMetrics | None = None


class Driver(abc.ABC):
    """A connection to one piece of equipment.

    `async with driver:` connects (raising on failure; the supervisor backs off and retries) and
    closes on exit. `events()` yields Reading, ConnectionState, StatusFact and QualityResult events
    until the link breaks, when it raises (ConnectionError or OSError for a lost link). `send_command`
    runs a declared command whose parameters `validate_command` has already checked.
    """

    name: ClassVar[str]
    connection_model: ClassVar[type[BaseModel]]
    tag_model: ClassVar[type[TagBase]] = TagBase
    command_model: ClassVar[type[CommandBase]] = CommandBase
    command_kinds: ClassVar[frozenset[str]] = frozenset({"write"})
    builtin_tags: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, equipment: EquipmentConfig, context: DriverContext) -> None:
        self.equipment = equipment
        self.context = context
        self.log = structlog.get_logger("edge_agent.driver").bind(equipment_id=equipment.id, driver=self.name)
        self.metrics: DriverMetrics = context.metrics or metrics_for(equipment.id)

    # -- config hooks (class level: used by check-config without a live driver)

    @classmethod
    def has_builtin_tag(cls, name: str) -> bool:
        """Whether the driver reports a tag by itself (a printer's temperatures)."""
        return name in cls.builtin_tags

    @classmethod
    def check_equipment(cls, equipment: EquipmentConfig) -> list[tuple[tuple[str | int, ...], str]]:
        """Driver-specific cross-field checks: (path below the equipment, message) pairs."""
        return []

    @classmethod
    def default_stale_after_s(cls, equipment: EquipmentConfig) -> float:
        """Seconds without a status-tag value before status is `unknown`; 0 means never."""
        return 0.0

    @classmethod
    def validate_command(
        cls, equipment: EquipmentConfig, command: CommandBase, params: dict[str, Any]
    ) -> dict[str, Any]:
        """Check a command's parameters against the schema of its kind; raise CommandError."""
        if command.kind == "write":
            return validate_write(equipment, command, params)
        if params:
            raise CommandError(
                f"command {command.name!r} takes no parameters (got {', '.join(sorted(params))})", "bad_parameters"
            )
        return {}

    # -- lifecycle

    async def __aenter__(self) -> Driver:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the link; raise on failure."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release everything; never raise."""

    @abc.abstractmethod
    def events(self) -> AsyncIterator[Event]:
        """Stream events until the link breaks (then raise) or the driver is closed."""

    @abc.abstractmethod
    async def send_command(self, command: CommandBase, params: dict[str, Any]) -> CommandResult:
        """Run a validated command; a device refusal is `success: false`, a lost link raises."""


def refuse_unknown(name: str, params: dict[str, Any], allowed: set[str]) -> None:
    """Raise CommandError naming the parameters of command `name` that are not in `allowed`."""
    extra = set(params) - allowed
    if extra:
        raise CommandError(f"command {name!r}: unknown parameter(s) {', '.join(sorted(extra))}", "bad_parameters")


def validate_write(equipment: EquipmentConfig, command: CommandBase, params: dict[str, Any]) -> dict[str, Any]:
    """The `write` kind's schema: `{value}`, numeric (bools allowed), within the command's min/max."""
    refuse_unknown(command.name, params, {"value"})
    if "value" not in params:
        raise CommandError(f"command {command.name!r}: parameter 'value' is required", "bad_parameters")
    value = params["value"]
    if isinstance(value, bool):
        return {"value": value}
    if isinstance(value, str):
        try:
            value = (
                float(value)
                if any(c in value for c in ".eE") or value.strip().lower() in ("nan", "inf", "-inf")
                else int(value)
            )
        except ValueError:
            raise CommandError(
                f"command {command.name!r}: parameter 'value' must be a number, got {params['value']!r}",
                "bad_parameters",
            ) from None
    if not isinstance(value, (int, float)):
        raise CommandError(f"command {command.name!r}: parameter 'value' must be a number", "bad_parameters")
    if isinstance(value, float) and not math.isfinite(value):
        raise CommandError(f"command {command.name!r}: parameter 'value' must be finite", "bad_parameters")
    if command.min is not None and value < command.min:
        raise CommandError(
            f"command {command.name!r}: value {value} is below the minimum {command.min:g}", "out_of_range"
        )
    if command.max is not None and value > command.max:
        raise CommandError(
            f"command {command.name!r}: value {value} is above the maximum {command.max:g}", "out_of_range"
        )
    return {"value": value}


class PollingDriver(Driver):
    """A driver for polled devices: implement `read_once()`, get a paced event stream.

    Ticks keep a fixed period from a jittered start; a poll that overruns its period skips the ticks it
    missed (counted in `skipped_ticks`) rather than queueing them, and warns once until polls keep up.
    """

    skipped_ticks: int = 0

    @property
    @abc.abstractmethod
    def poll_interval_s(self) -> float:
        """Seconds between polls."""

    @abc.abstractmethod
    async def read_once(self) -> list[Event]:
        """One poll: the current values; raise ConnectionError/OSError when the link is lost.

        A driver may give only what changed since its last poll and end the list with `Unchanged`,
        which tells the monitor that every value not given is still current.
        """

    async def events(self) -> AsyncIterator[Event]:
        interval = self.poll_interval_s
        # Jitter the first poll so that many devices on one box do not poll in lockstep.
        await asyncio.sleep(random.uniform(0, min(interval, 1.0) * 0.1))
        next_tick = time.monotonic()
        slow = False
        me = asyncio.current_task()
        while True:
            if me is not None and me.cancelling():
                raise asyncio.CancelledError  # a cancel swallowed by a library call (see drive_equipment)
            started = time.monotonic()
            for event in await self.read_once():
                yield event
            now = time.monotonic()
            next_tick += interval
            if now > next_tick:
                missed = math.floor((now - next_tick) / interval) + 1
                self.skipped_ticks += missed
                self.metrics.skipped_ticks(missed)
                next_tick += missed * interval
                if not slow:
                    slow = True
                    self.log.warning(
                        "poll_overrun", poll_s=round(now - started, 3), interval_s=interval, skipped=missed
                    )
            elif slow:
                slow = False
                self.log.info("poll_caught_up", skipped_total=self.skipped_ticks)
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
