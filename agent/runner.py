"""`RunningDriver`: one equipment's driver kept connected, its events handed to the monitor.

The one reconnect loop for every driver, and the one owner of an equipment's link state (connected,
last error, transitions, the connected gauge): health, the command router and the Python API ask it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from agent import metrics
from agent.config import EquipmentConfig
from agent.linkstats import driver_link
from agent.model import ConnectionState, QualityResult, Reading
from agent.monitor import Monitor
from agent.reconnect import Backoff, Transitions, describe
from drivers.sdk.driver import Driver, DriverContext
from drivers.sdk.registry import get_driver

log = structlog.get_logger("edge_agent.supervisor")


class RunningDriver:
    """Keeps one equipment's driver connected and its events flowing to the monitor."""

    def __init__(self, eq: EquipmentConfig, monitor: Monitor, ctx: DriverContext) -> None:
        self.eq = eq
        self.monitor = monitor
        self.ctx = ctx
        self.driver: Driver | None = None  # while connected: commands go to it
        self.connected = False
        self.error: str | None = None
        self.log = log.bind(equipment_id=eq.id, driver=eq.driver)
        self._rejects = _Rejects(eq.id, monitor, self.log)
        self.stats = driver_link(eq.id)  # uptime, durations and errors of this link (health per link)

    def new_driver(self) -> Driver:
        """A driver object for this equipment (not connected)."""
        if self.ctx.metrics is None:
            self.ctx.metrics = metrics.PrometheusDriverMetrics(self.eq.id)
        return get_driver(self.eq.driver)(self.eq, self.ctx)

    async def connect_once(self) -> Driver:
        """Connect a new driver now (the Python API's `connect`); `run(connected=...)` then takes it over."""
        driver = self.new_driver()
        await driver.__aenter__()
        return driver

    def _link(self, connected: bool, error: str | None) -> None:
        self.connected = connected
        self.error = error
        metrics.DRIVER_CONNECTED.labels(self.eq.id).set(int(connected))
        if connected:
            self.stats.up()
        else:
            self.stats.down(error or "disconnected")

    async def run(self, connected: Driver | None = None) -> None:
        """Connect, stream, reconnect with backoff, until cancelled. `connected`: a driver already entered."""
        eq, monitor = self.eq, self.monitor
        backoff = Backoff(self.ctx.reconnect_max_s)
        transitions = Transitions(self.log, "driver")
        if connected is None:
            monitor.on_connection(eq.id, ConnectionState(False, "connecting"))
        try:
            while True:
                driver = connected or self.new_driver()
                error: str | None = None
                try:
                    async with contextlib.AsyncExitStack() as stack:
                        if connected is None:
                            await stack.enter_async_context(driver)
                        else:
                            stack.push_async_exit(driver)
                            connected = None
                        self.driver = driver
                        transitions.mark_up()
                        backoff.reset()
                        self._link(True, None)
                        monitor.on_connection(eq.id, ConnectionState(True))
                        await self._stream(driver)
                        error = "the driver's event stream ended"
                except asyncio.CancelledError:
                    raise
                except Exception as err:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        # A library turned our cancellation into its own error: stop anyway.
                        raise asyncio.CancelledError from err
                    error = describe(err)
                    if not isinstance(err, (OSError, ConnectionError, TimeoutError)):
                        self.log.warning(
                            "driver_failed",
                            error=error,
                            error_type=type(err).__name__,
                            exc_info=transitions.up is not False,
                        )
                finally:
                    self.driver = None
                metrics.DRIVER_RECONNECTS.labels(eq.id).inc()
                self._link(False, error)
                transitions.mark_down(error or "disconnected")
                monitor.on_connection(eq.id, ConnectionState(False, error))
                delay = backoff.next()
                self.log.debug("driver_attempt_failed", error=error, retry_in_s=round(delay, 2))
                await asyncio.sleep(delay)
        finally:
            self.driver = None

    async def _stream(self, driver: Driver) -> None:
        eid, monitor = self.eq.id, self.monitor
        me = asyncio.current_task()
        async for ev in driver.events():
            if me is not None and me.cancelling():
                # asyncio.wait_for in 3.11 can swallow a cancel that races a result (gh-86296);
                # a driver awaiting it would then poll on after being told to stop.
                raise asyncio.CancelledError
            try:
                if isinstance(ev, QualityResult):
                    await monitor.on_quality(eid, ev)
                    continue
                if isinstance(ev, ConnectionState):
                    self._link(ev.connected, ev.error)
                monitor.on_event(eid, ev)
            except Exception as err:
                # One value the pipeline cannot take (a value too deep or too large to encode)
                # costs that value only: a reconnect would read it again, for ever.
                self._rejects.reject(ev, err)

    def health(self) -> dict[str, Any]:
        """The driver's part of /healthz (the monitor adds status and last success), with its link's health."""
        return {"status": "up" if self.connected else "down", "error": self.error, "link": self.stats.report()}


class _Rejects:
    """Events the pipeline could not take: counted, logged once per tag and error, a value turned bad."""

    def __init__(self, eid: str, monitor: Monitor, dlog: Any) -> None:
        self.eid = eid
        self.monitor = monitor
        self.log = dlog
        self.seen: set[tuple[str, str]] = set()

    def reject(self, ev: object, err: Exception) -> None:
        metrics.DRIVER_ERRORS.labels(self.eid, "rejected_input").inc()
        tag = ev.tag if isinstance(ev, Reading) else type(ev).__name__
        key = (tag, type(err).__name__)
        if key not in self.seen and len(self.seen) < 1000:
            self.seen.add(key)
            self.log.error("input_rejected", tag=tag, error_type=type(err).__name__, error=str(err)[:300])
        if isinstance(ev, Reading) and ev.quality != "bad":
            with contextlib.suppress(Exception):
                self.monitor.on_reading(self.eid, Reading(ev.tag, None, ev.ts, "bad"))
