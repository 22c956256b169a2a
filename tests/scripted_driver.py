"""A scripted driver for tests and benchmarks, loaded into a daemon through `driver_modules`.

The test appends JSON lines to the file named by `connection.script`; the driver turns each into an
event:
- `{"tag": t, "value": v, "quality"?: q, "ts"?: iso}`: a reading;
- `{"op": "disconnect", "error": e}`: the link breaks;
- `{"op": "status", "status": s, ...}`: a status fact;
- `{"op": "quality", "result": {...}, "key": k}`: a quality result;
- `{"op": "burst", "tags": n, "rounds": m}`: n x m readings as fast as possible;
- `{"op": "status_burst", "count": n}`: n status changes;
- `{"op": "deep", "tag": t, "depth": n}`: a reading whose value is a list nested n deep (poison input).
While the file `connection.down_file` exists, connecting fails. Commands are appended to
`<script>.commands.jsonl`. The read offset is kept in the state folder, so a restarted daemon goes
on where the previous one stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

from agent.config import CommandBase, EquipmentConfig, Model
from agent.model import CommandResult, Event, QualityResult, Reading, StatusFact, parse_iso, utcnow
from drivers.base import Driver, DriverContext
from drivers.registry import register_driver


class ScriptedConnection(Model):
    script: Path
    down_file: Path | None = None
    poll_ms: int = 10


class ScriptedCommand(CommandBase):
    refuse: bool = False


@register_driver
class ScriptedDriver(Driver):
    """Replays a growing JSON-lines file as events."""

    name: ClassVar[str] = "scripted"
    connection_model = ScriptedConnection
    command_model = ScriptedCommand
    command_kinds = frozenset({"write", "pulse", "reset"})

    def __init__(self, equipment: EquipmentConfig, context: DriverContext) -> None:
        super().__init__(equipment, context)
        self.conn: ScriptedConnection = equipment.connection
        self.offset_file = context.state_dir / f"scripted-{equipment.id}.offset"
        self.offset = 0

    async def connect(self) -> None:
        if self.conn.down_file is not None and self.conn.down_file.exists():
            raise ConnectionError("device unreachable (down file present)")
        try:
            self.offset = int(self.offset_file.read_text())
        except (OSError, ValueError):
            self.offset = 0

    async def close(self) -> None:
        return None

    def _save_offset(self) -> None:
        # Best effort, as a real driver's bookkeeping would be: a read-only state_dir must not stop the data.
        tmp = self.offset_file.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(str(self.offset))
            os.replace(tmp, self.offset_file)

    async def events(self) -> AsyncIterator[Event]:
        while True:
            lines = self._read_lines()
            if not lines:
                await asyncio.sleep(self.conn.poll_ms / 1000)
                continue
            for end, line in lines:
                item = json.loads(line)
                op = item.get("op", "reading")
                if op == "disconnect":
                    self.offset = end
                    self._save_offset()
                    raise ConnectionError(item.get("error", "scripted disconnect"))
                if op == "reading":
                    ts = parse_iso(item["ts"]) if "ts" in item else utcnow()
                    yield Reading(item["tag"], item["value"], ts, item.get("quality", "good"))
                elif op == "status":
                    yield StatusFact(
                        status=item["status"],
                        current_operation=item.get("current_operation"),
                        progress=item.get("progress"),
                        error_message=item.get("error_message"),
                        process_id=item.get("process_id"),
                    )
                elif op == "quality":
                    fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
                    yield QualityResult(item["result"], item["key"], fut)
                    await fut
                elif op == "burst":
                    async for event in self._burst(int(item["tags"]), int(item["rounds"])):
                        yield event
                elif op == "deep":
                    value: Any = []
                    for _ in range(int(item["depth"])):
                        value = [value]
                    yield Reading(item["tag"], value, utcnow())
                elif op == "status_burst":
                    for i in range(int(item["count"])):
                        yield StatusFact(status="running", progress=float(i % 2), current_operation=f"op-{i}")
                        if i % 500 == 0:
                            await asyncio.sleep(0)
                self.offset = end
            self._save_offset()

    async def _burst(self, tags: int, rounds: int) -> AsyncIterator[Reading]:
        """Every tag changes every round; the loop is given a turn now and then, as a real source does."""
        names = [f"t{t}" for t in range(tags)]
        for r in range(rounds):
            ts = utcnow()
            for t, name in enumerate(names):
                yield Reading(name, r * 1.0 + t, ts)
                if t % 1000 == 999:
                    await asyncio.sleep(0)
            await asyncio.sleep(0)

    def _read_lines(self) -> list[tuple[int, str]]:
        try:
            with open(self.conn.script, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        out = []
        pos = self.offset
        for raw in data.split(b"\n")[:-1]:  # a line without its newline is still being written
            pos += len(raw) + 1
            if raw.strip():
                out.append((pos, raw.decode()))
        return out

    def _record(self, command: str, params: dict[str, Any]) -> None:
        with open(str(self.conn.script) + ".commands.jsonl", "a") as fh:
            fh.write(json.dumps({"command": command, "params": params}) + "\n")

    async def send_command(self, command: CommandBase, params: dict[str, Any]) -> CommandResult:
        self._record(command.name, params)
        if isinstance(command, ScriptedCommand) and command.refuse:
            return CommandResult(False, "device refused the command (status 0x80350000)", {"status": "BadNotWritable"})
        return CommandResult(True, f"{command.name} done", {"params": params})
