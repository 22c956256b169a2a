"""The thermometer driver: every poll reads each tag's file and yields its scaled value."""

from __future__ import annotations

import time
from typing import Any, ClassVar

from drivers.sdk import (
    CommandBase,
    CommandError,
    CommandResult,
    DriverContext,
    EquipmentConfig,
    Event,
    PollingDriver,
    Reading,
    utcnow,
)
from example_driver.config import ThermometerConnection, ThermometerTag


class ThermometerDriver(PollingDriver):
    """A folder of integer files; the folder missing is the device being gone."""

    name: ClassVar[str] = "thermometer"
    connection_model = ThermometerConnection
    tag_model = ThermometerTag
    command_kinds: ClassVar[frozenset[str]] = frozenset()  # a sensor takes no commands

    def __init__(self, equipment: EquipmentConfig, context: DriverContext) -> None:
        super().__init__(equipment, context)
        self.conn: ThermometerConnection = equipment.connection
        self.tags: list[ThermometerTag] = list(equipment.tags)

    @property
    def poll_interval_s(self) -> float:
        return self.conn.poll_interval_ms / 1000

    async def connect(self) -> None:
        if not self.conn.directory.is_dir():
            raise ConnectionError(f"sensor folder {self.conn.directory} is missing")

    async def close(self) -> None:
        return None

    async def read_once(self) -> list[Event]:
        started = time.monotonic()
        ts = utcnow()
        events: list[Event] = []
        for tag in self.tags:
            raw = self._read(tag)
            quality = "good" if raw is not None else "bad"
            events.append(Reading(tag.name, tag.scaled(raw) if raw is not None else None, ts, quality))
        self.metrics.read(values=len(events), seconds=time.monotonic() - started)
        return events

    def _read(self, tag: ThermometerTag) -> int | None:
        """The integer in the tag's file; None (and an error counted) when it is missing or not a number."""
        try:
            text = (self.conn.directory / tag.file).read_text(encoding="ascii")
        except OSError as err:
            if not self.conn.directory.is_dir():
                raise ConnectionError(f"sensor folder {self.conn.directory} is gone") from err
            self.metrics.error("unreadable")
            return None
        except UnicodeDecodeError:
            text = ""
        try:
            return int(text.strip())
        except ValueError:
            self.metrics.error("bad_value")
            return None

    async def send_command(self, command: CommandBase, params: dict[str, Any]) -> CommandResult:
        raise CommandError(f"command {command.name!r}: a thermometer takes no commands", "unsupported")
