"""DCMD: a host's writes to device metrics, run as the equipment's declared write commands through the one
command router (its validation, ranges and equipment-state rules), only with `dcmd_enabled = true`.

A metric is resolved by name or alias to its tag; the tag's first declared `write` command takes the value
as `{"value": ...}`. A metric with no such command (an undeclared write) is ignored with a log line."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from google.protobuf.message import DecodeError

from agent.config import AgentConfig
from agent.sparkplug import payload as pl

log = structlog.get_logger("edge_agent.sparkplug")

# The router's entry point: (equipment id, command, parameters, source=...) -> (result body, status)
Execute = Callable[..., Awaitable[tuple[dict[str, Any], int]]]
SIGNED = {1: 8, 2: 16, 3: 32, 4: 64}  # Int8..Int64: sent as two's complement in unsigned fields


def metric_value(m: Any) -> Any:
    """The Python value of a received metric (None when null or empty)."""
    kind = m.WhichOneof("value")
    if m.is_null or kind is None:
        return None
    value = getattr(m, kind)
    bits = SIGNED.get(m.datatype)
    if bits and kind in ("int_value", "long_value") and value >= 1 << (bits - 1):
        value -= 1 << bits
    return value


class DeviceCommands:
    """Runs DCMD writes; `aliases` maps (equipment id, metric name) to the alias it was born with."""

    def __init__(self, cfg: AgentConfig, aliases: dict[tuple[str, str], int], execute: Execute) -> None:
        self.cfg = cfg
        self.aliases = aliases
        self.execute = execute
        self._tasks: set[asyncio.Task[None]] = set()

    def handle(self, eid: str, data: bytes) -> None:
        """One DCMD for device `eid`: each metric written through its declared write command."""
        eq = next((e for e in self.cfg.equipment if e.id == eid), None)
        if eq is None:
            log.warning("sparkplug_dcmd_ignored", equipment_id=eid, reason="unknown device")
            return
        try:
            p = pl.decode(data)
        except DecodeError:
            log.warning("sparkplug_dcmd_malformed", equipment_id=eid)
            return
        by_alias = {alias: name for (e, name), alias in self.aliases.items() if e == eid}
        for m in p.metrics:
            name = m.name or by_alias.get(m.alias)
            cmd = next((c for c in eq.commands if c.kind == "write" and c.tag == name), None) if name else None
            if cmd is None:
                # Only declared writes run: a metric without one is not written, and the operator is told why.
                log.warning("sparkplug_dcmd_undeclared", equipment_id=eid, metric=name, alias=m.alias or None)
                continue
            task = asyncio.get_running_loop().create_task(self._run(eid, cmd.name, metric_value(m)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, eid: str, command: str, value: Any) -> None:
        # The router validates, runs and logs the outcome (event "command", source "sparkplug").
        await self.execute(eid, command, {"value": value}, source="sparkplug")
