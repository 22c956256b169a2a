"""A simulated lathe behind a simulated MTConnect agent (`sim_agent`), for `edge-agent simulate` and tests.

The machine runs a part cycle of 16 steps: READY (3 steps), ACTIVE (6: the X axis moves, the block counter
`line` counts up, the spindle turns), FEED_HOLD (2), ACTIVE (4), PROGRAM_COMPLETED (1: the part is
counted); the next part's id is set when it is READY again. Conditions come
and go: a spindle temperature Warning (code TW1) in every third cycle, a system Fault (code E100) during
the feed hold of every fourth. Values are added only when they change, as an agent does. `extra_samples`
adds that many temperature samples changing on every step (the benchmark's load).
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from urllib.parse import urlsplit

import structlog

from drivers.mtconnect.sim_agent import Item, SimAgent
from drivers.sdk import EquipmentConfig

log = structlog.get_logger("edge_agent.simulate")

COMPONENTS = {"ctl": "Controller", "path": "Path", "x": "Linear", "sp": "Rotary", "dev": "Systems"}
# step of the cycle -> execution state entered at that step
CYCLE = {0: "READY", 3: "ACTIVE", 9: "FEED_HOLD", 11: "ACTIVE", 15: "PROGRAM_COMPLETED"}
CYCLE_STEPS = 16


def lathe_items(extra_samples: int = 0) -> list[Item]:
    """The lathe's data items (ids are what a config's tags name)."""
    items = [
        Item("avail", "avail", "EVENT", "AVAILABILITY", "ctl"),
        Item("mode", "mode", "EVENT", "CONTROLLER_MODE", "ctl"),
        Item("exec", "execution", "EVENT", "EXECUTION", "path"),
        Item("program", "program", "EVENT", "PROGRAM", "path"),
        Item("partid", "part_id", "EVENT", "PART_ID", "path"),
        Item("pcount", "part_count", "EVENT", "PART_COUNT", "path"),
        Item("line", "line", "EVENT", "LINE_NUMBER", "path"),
        Item("Xact", "x_position", "SAMPLE", "POSITION", "x", "MILLIMETER", "ACTUAL"),
        Item("Srpm", "spindle_speed", "SAMPLE", "ROTARY_VELOCITY", "sp", "REVOLUTION/MINUTE", "ACTUAL"),
        Item("Stemp", "spindle_temp", "SAMPLE", "TEMPERATURE", "sp", "CELSIUS"),
        Item("Stemp_cond", "spindle_temp_cond", "CONDITION", "TEMPERATURE", "sp"),
        Item("system", "system_cond", "CONDITION", "SYSTEM", "ctl"),
    ]
    items += [Item(f"s{i:03d}", f"s{i:03d}", "SAMPLE", "TEMPERATURE", "dev", "CELSIUS") for i in range(extra_samples)]
    return items


def lathe_agent(device: str = "lathe", *, buffer_size: int = 4096, version: str = "2.0", extra: int = 0) -> SimAgent:
    """A simulated agent serving the lathe's device model (not yet started, nothing observed yet)."""
    return SimAgent(device, lathe_items(extra), COMPONENTS, buffer_size=buffer_size, version=version)


class Lathe:
    """The machine: `power_on` after the agent (re)started, then `step` once per tick."""

    def __init__(self, agent: SimAgent, seed: int | None = None) -> None:
        self.agent = agent
        self.random = random.Random(seed)
        self.extras = [i for i in agent.items if i.startswith("s") and i[1:].isdigit()]
        self.steps = 0
        self.line = 0
        self.parts = 0
        self.last: dict[str, str] = {}
        self.power_on()

    def set(self, item: str, value: object) -> None:
        """Add an observation when the value changed (an agent drops repeats)."""
        text = str(value)
        if self.last.get(item) != text:
            self.last[item] = text
            self.agent.add(item, text)

    def condition(self, item: str, level: str, code: str | None = None, text: str = "") -> None:
        self.last.pop(item, None)
        self.agent.add(item, text, level=level, code=code)

    def power_on(self) -> None:
        """What a controller reports once its agent has (re)started."""
        self.last.clear()
        self.set("avail", "AVAILABLE")
        self.set("mode", "AUTOMATIC")
        self.set("program", "O1000")
        self.set("partid", f"P-{self.parts + 1:05d}")
        self.set("pcount", self.parts)
        self.set("Xact", 0.0)
        self.set("Srpm", 0.0)
        self.set("Stemp", 31.5)
        self.condition("Stemp_cond", "Normal")
        self.condition("system", "Normal")
        self.set("exec", "READY")

    def step(self) -> None:
        cycle, at = divmod(self.steps, CYCLE_STEPS)
        self.steps += 1
        running = 3 <= at < 9 or 11 <= at < 15
        if at in CYCLE:
            self.set("exec", CYCLE[at])
        if running:
            self.line += 1
            self.set("line", self.line)
            self.set("Xact", round(at * 12.5 + self.random.uniform(-0.05, 0.05), 3))
        self.set("Srpm", 1200.0 if running else 0.0)
        self.set("Stemp", round(31.5 + at * 0.4 + self.random.uniform(-0.2, 0.2), 2))
        if cycle % 3 == 1 and at == 5:
            self.condition("Stemp_cond", "Warning", "TW1", "Spindle temperature high")
        if cycle % 3 == 1 and at == 12:
            self.condition("Stemp_cond", "Normal", "TW1")
        if cycle % 4 == 2 and at == 9:
            self.condition("system", "Fault", "E100", "Chuck pressure low")
        if cycle % 4 == 2 and at == 11:
            self.condition("system", "Normal")
        if at == CYCLE_STEPS - 1:
            self.parts += 1
            self.set("pcount", self.parts)
        if at == 0:
            self.set("partid", f"P-{self.parts + 1:05d}")  # the next part, loaded while the machine is ready
        for item in self.extras:
            self.set(item, round(20 + self.random.uniform(0, 10), 3))

    def restart_agent(self) -> None:
        """The agent restarts (a new instanceId, an empty buffer) and the machine reports again."""
        self.agent.restart()
        self.power_on()


async def simulate(
    equipment: EquipmentConfig, state_dir: Path, *, interval_s: float = 1.0, seed: int | None = None
) -> None:
    """Serve the lathe's agent on the equipment's URL until cancelled."""
    parts = urlsplit(equipment.connection.url)
    device = equipment.connection.device or "lathe"
    agent = lathe_agent(device)
    url = await agent.start(parts.hostname or "127.0.0.1", parts.port or 5000)
    lathe = Lathe(agent, seed)
    log.info("mtconnect_simulator_started", equipment_id=equipment.id, url=url, device=device)
    try:
        while True:
            await asyncio.sleep(interval_s)
            lathe.step()
    finally:
        await agent.stop()
