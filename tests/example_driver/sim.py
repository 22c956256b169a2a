"""A simulated file thermometer: the files a sysfs sensor would show, written atomically.

It serves a fixed device, as real hardware does: `temp` (millidegrees Celsius, a slow random walk around
21.5 degC) and `mode` (1 while the machine it watches runs, 0 while idle; it alternates every few
readings). It knows the files only from this description, never from the driver's code.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import structlog

from drivers.sdk import EquipmentConfig

log = structlog.get_logger("edge_agent.simulate")


class Thermometer:
    """The sensor's folder; `set` writes one value, `step` advances the model by one reading."""

    def __init__(self, directory: Path, seed: int | None = None) -> None:
        self.directory = directory
        self.random = random.Random(seed)
        self.millidegrees = 21500
        self.steps = 0

    def set(self, name: str, value: int) -> None:
        """Write `value` into file `name`: a reader sees the old number or the new one, never half of one."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{name}.tmp"
        tmp.write_text(f"{value}\n", encoding="ascii")
        os.replace(tmp, self.directory / name)

    def step(self) -> None:
        self.millidegrees = max(15000, min(30000, self.millidegrees + self.random.randint(-250, 250)))
        self.set("temp", self.millidegrees)
        self.set("mode", (self.steps // 5) % 2)
        self.steps += 1


async def simulate(
    equipment: EquipmentConfig, state_dir: Path, *, interval_s: float = 1.0, seed: int | None = None
) -> None:
    """Keep the equipment's folder updated until cancelled."""
    sensor = Thermometer(Path(equipment.connection.directory), seed)
    log.info("thermometer_simulating", equipment_id=equipment.id, directory=str(sensor.directory))
    while True:
        sensor.step()
        await asyncio.sleep(interval_s)
