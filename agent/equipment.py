"""The Python API: drive one piece of equipment through its driver without the daemon.

`EquipmentClient` validates its configuration with the daemon's own models, connects the driver,
keeps it connected with the daemon's reconnect loop, derives status with the daemon's monitor, and
runs commands through the daemon's command router (the same parameter and state checks).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from agent.commands import CommandRouter
from agent.config import AgentConfig, validate_data
from agent.errors import ConfigError
from agent.model import EquipmentStatus, iso, json_safe
from agent.monitor import Monitor
from agent.monitor_state import MemorySink as _MemorySink  # its old name, which tests use
from agent.runner import RunningDriver
from drivers.sdk.driver import Driver, DriverContext
from drivers.sdk.registry import get_driver

__all__ = ["EquipmentClient", "EquipmentStatus"]

StatusCallback = Callable[[EquipmentStatus], Awaitable[None] | None]


class EquipmentClient:
    """One equipment, driven directly: `async with EquipmentClient("cnc_mill", "press-1", {...}) as eq:`."""

    def __init__(
        self,
        equipment_type: str,
        equipment_id: str,
        connection_config: dict[str, Any],
        *,
        state_dir: str | Path | None = None,
        reconnect_max_s: float = 30.0,
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if state_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="edge-agent-")
            state_dir = self._tmp.name
        data = {
            "agent": {
                "id": "python-api",
                "site": "local",
                "state_dir": str(state_dir),
                "reconnect_max_s": reconnect_max_s,
            },
            "equipment": [{"id": equipment_id, "type": equipment_type, **connection_config}],
        }
        try:
            self.config: AgentConfig = validate_data(data, Path.cwd() / "python-api.toml")
        except ConfigError:
            self.close_tmp()
            raise
        self.equipment = self.config.equipment[0]
        self.equipment_id = equipment_id
        self._sink = _MemorySink()
        self._monitor = Monitor(
            self.config,
            self._sink,
            {equipment_id: get_driver(self.equipment.driver).default_stale_after_s(self.equipment)},
            telemetry=False,  # nothing publishes it: building it would only pile up
        )
        self._monitor.add_status_listener(self._status_changed)
        self._runner: RunningDriver | None = None
        self._drive_task: asyncio.Task[None] | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self._callbacks: list[StatusCallback] = []
        self._pending: set[asyncio.Future[None]] = set()
        self._router = CommandRouter(self.config, self._sink, self._status_of, self._driver_of)
        self._connected = False

    # -- state

    @property
    def is_connected(self) -> bool:
        """Whether `connect` succeeded and `disconnect` has not been called."""
        return self._connected

    @property
    def is_monitoring(self) -> bool:
        """Whether periodic status callbacks run."""
        return self._monitor_task is not None and not self._monitor_task.done()

    def _status_of(self, eid: str) -> str | None:
        st = self._monitor.equipment.get(eid)
        return st.status.status if st else None

    def _driver_of(self, eid: str) -> Driver | None:
        return self._runner.driver if self._runner is not None and eid == self.equipment_id else None

    def _require(self) -> None:
        if not self._connected:
            raise ConnectionError(f"equipment {self.equipment_id!r} is not connected")

    # -- lifecycle

    async def connect(self) -> None:
        """Connect the driver (raise ConnectionError when the device cannot be reached)."""
        if self._connected:
            return
        self.config.agent.state_dir.mkdir(parents=True, exist_ok=True)
        mpm = self.config.mpm
        ctx = DriverContext(
            self.config.agent.state_dir,
            self.config.agent.reconnect_max_s,
            max_result_bytes=mpm.max_body_bytes if mpm is not None else None,
        )
        runner = RunningDriver(self.equipment, self._monitor, ctx)
        try:
            driver = await runner.connect_once()
        except Exception as err:
            raise ConnectionError(f"equipment {self.equipment_id!r}: {err}") from err
        self._runner = runner
        self._drive_task = asyncio.create_task(runner.run(connected=driver), name=f"driver[{self.equipment_id}]")
        self._connected = True
        # Let the first events arrive so that status is current when connect returns.
        await asyncio.sleep(0)

    async def disconnect(self) -> None:
        """Stop monitoring and close the driver."""
        await self.stop_monitoring()
        self._connected = False
        if self._drive_task is not None:
            self._drive_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drive_task
            self._drive_task = None
        self.close_tmp()

    def close_tmp(self) -> None:
        """Remove the temporary state folder, if one was made."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def __aenter__(self) -> EquipmentClient:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.disconnect()

    # -- reading

    async def read_sensor_data(self, sensor_id: str, timeout: float = 5.0) -> dict[str, Any]:
        """The latest value of a tag `{tag, value, unit, ts, quality}`, waiting up to `timeout` for a first one."""
        self._require()
        tag = self.equipment.tag(sensor_id)
        if tag is None and not get_driver(self.equipment.driver).has_builtin_tag(sensor_id):
            raise ValueError(f"equipment {self.equipment_id!r} has no tag {sensor_id!r}")
        st = self._monitor.equipment[self.equipment_id]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while sensor_id not in st.values:
            self._require()
            if loop.time() >= deadline:
                raise TimeoutError(f"no value of {sensor_id!r} within {timeout} s")
            await asyncio.sleep(0.02)
        r = st.values[sensor_id]
        return {
            "tag": r.tag,
            "value": json_safe(r.value),
            "unit": self._monitor.unit(self.equipment_id, r.tag),
            "ts": iso(r.ts),
            "quality": r.quality,
        }

    async def get_equipment_status(self) -> EquipmentStatus:
        """The current status object."""
        self._require()
        return self._monitor.equipment[self.equipment_id].status

    async def send_command(self, command: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run a declared command; the result object `{success, message, data, timestamp}`."""
        self._require()
        body, _ = await self._router.execute(self.equipment_id, command, parameters or {}, source="python")
        return body

    # -- callbacks

    def register_status_callback(self, callback: StatusCallback) -> None:
        """Call `callback(status)` (plain or async) on every status change and every monitoring tick."""
        self._callbacks.append(callback)

    def _status_changed(self, eid: str, new: EquipmentStatus, old: EquipmentStatus | None) -> None:
        self._fire(new)

    def _fire(self, status: EquipmentStatus) -> None:
        for cb in self._callbacks:
            res = cb(status)
            if inspect.isawaitable(res):
                task = asyncio.ensure_future(res)
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)

    async def start_monitoring(self, update_interval: float = 5.0) -> None:
        """Report the status to the callbacks every `update_interval` s (and on every change)."""
        self._require()
        if self.is_monitoring:
            raise RuntimeError(f"equipment {self.equipment_id!r} is already being monitored")
        self._monitor_task = asyncio.create_task(self._tick(update_interval), name=f"monitoring[{self.equipment_id}]")

    async def _tick(self, interval: float) -> None:
        while True:
            self._fire(self._monitor.equipment[self.equipment_id].status)
            await asyncio.sleep(interval)

    async def stop_monitoring(self) -> None:
        """Stop the periodic reports."""
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor_task
            self._monitor_task = None
