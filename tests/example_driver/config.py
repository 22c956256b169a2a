"""`[equipment.connection]` and tags of a file thermometer."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from drivers.sdk import Model, TagBase


class ThermometerConnection(Model):
    """`[equipment.connection]`: the sensor's folder and how often to read it."""

    directory: Path  # one file per value, each holding one integer (sysfs style: `temp` in millidegrees)
    poll_interval_ms: int = Field(1000, ge=10)


class ThermometerTag(TagBase):
    """A tag reads the integer in one file of the folder (scale it with `scale`, e.g. 0.001 for millidegrees)."""

    file: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=255)
