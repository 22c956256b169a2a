"""The daemon's lifecycle: a TaskGroup of named tasks, driver reconnects, signals, reload, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import time
import uuid
from datetime import timedelta
from typing import Any

import structlog

from agent import __version__, health_report, linkstats, metrics, sparkplug
from agent import systemd as sd
from agent.commands import CommandRouter
from agent.config import AgentConfig, EquipmentConfig, load_config
from agent.config_holder import ConfigHolder
from agent.errors import ConfigError, StartupError
from agent.http import HttpApi, HttpDeps
from agent.live import LiveHub, LiveTap
from agent.live_state import BacklogClock, refresh_gauges
from agent.logging import configure as configure_logging
from agent.model import iso, utcnow
from agent.monitor import Monitor
from agent.mpm_bridge import MpmBridge
from agent.mqtt import Incoming, MqttSink
from agent.northbound.fanout import ProfileSink
from agent.outbox import Outbox
from agent.runner import RunningDriver
from agent.sparkplug.sink import SparkplugSink
from agent.store import Store
from agent.topics import topics_for
from drivers.sdk.driver import Driver, DriverContext
from drivers.sdk.registry import get_driver

log = structlog.get_logger("edge_agent.supervisor")


class Supervisor:
    """Owns every component of a running daemon."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.config = ConfigHolder(cfg)
        self.session = str(uuid.uuid4())
        self.started_at = iso(utcnow())
        self.stop_event = asyncio.Event()
        self.store = Store(cfg.agent.state_dir, cfg.mqtt.buffer_max_messages)
        self.monitor: Monitor | None = None
        self.mqtt: MqttSink | None = None
        self.spb: SparkplugSink | None = None  # the Sparkplug edge node's own connection, when that profile is on
        self.northbound: ProfileSink | None = None
        self.router: CommandRouter | None = None
        self.runners: dict[str, RunningDriver] = {}
        self.driver_tasks: dict[str, asyncio.Task[None]] = {}
        self.mpm: MpmBridge | None = None  # the MPM link (idle without [mpm]; a reload may start it)
        self.http: HttpApi | None = None
        self.hub = LiveHub()  # the live view: what the monitor commits also goes to WebSocket clients
        self.backlog = BacklogClock(self.store)  # the age of the oldest waiting message, for /metrics
        self._tg: asyncio.TaskGroup | None = None
        self._mqtt_task: asyncio.Task[None] | None = None
        self._spb_task: asyncio.Task[None] | None = None
        self._reload_lock = asyncio.Lock()
        self.ready = asyncio.Event()

    @property
    def cfg(self) -> AgentConfig:
        """The current config (the holder's)."""
        return self.config.cfg

    @property
    def outbox(self) -> Outbox | None:
        """The MPM outbox while `[mpm]` is configured."""
        return self.mpm.outbox if self.mpm is not None else None

    # -- helpers for components

    def status_of(self, eid: str) -> str | None:
        """The current status of an equipment."""
        if self.monitor is None or eid not in self.monitor.equipment:
            return None
        return self.monitor.equipment[eid].status.status

    def driver_of(self, eid: str) -> Driver | None:
        """The live driver of an equipment, when connected."""
        runner = self.runners.get(eid)
        return runner.driver if runner is not None else None

    def _stale_defaults(self, cfg: AgentConfig) -> dict[str, float]:
        out = {}
        for eq in cfg.equipment:
            out[eq.id] = get_driver(eq.driver).default_stale_after_s(eq)
        return out

    # -- health

    def health(self) -> tuple[dict[str, Any], bool]:
        """The /healthz report and whether the daemon is healthy (no needed component down too long)."""
        limit = self.cfg.http.unhealthy_after_s
        healthy = True
        degraded = False
        components: dict[str, Any] = {}
        if self.mqtt is not None:
            self.sample_broker()
            components["mqtt"], down_for = health_report.broker(self.mqtt)
            if not self.mqtt.connected:
                degraded = True
                healthy = down_for is None or down_for <= limit
        if self.spb is not None:
            # Waiting for the primary host is the specification's behaviour, not a fault: degraded, not unhealthy.
            components["sparkplug"] = health_report.sparkplug(self.spb)
            degraded = degraded or components["sparkplug"]["status"] != "up"
        store = self.store
        components["store"] = health_report.store(store)
        degraded = degraded or bool(store.degraded) or store.depth > self.cfg.mqtt.buffer_max_messages
        drivers = {}
        for eq in self.cfg.equipment:
            runner = self.runners.get(eq.id)
            link = runner.health() if runner is not None else {"status": "down", "error": None}
            drivers[eq.id] = {
                "status": link["status"],
                "equipment_status": self.status_of(eq.id),
                "last_success": self._last_success(eq.id),
                "error": link["error"],
                "link": link.get("link"),
            }
            degraded = degraded or link["status"] != "up"
        components["drivers"] = drivers
        if self.outbox is not None:
            # MPM down (unreachable, credentials refused) degrades health but never makes it 503: restarting
            # the agent cannot fix MPM, and nothing is lost while the outbox holds its items.
            outbox = self.outbox.health()
            outbox["link"] = linkstats.link("mpm").report()
            components["outbox"] = outbox
            degraded = degraded or outbox["status"] != "up" or bool(outbox["dead_letters"])
        status = "ok" if healthy and not degraded else "degraded"
        return {"status": status, "session": self.session, "components": components}, healthy

    def _last_success(self, eid: str) -> str | None:
        """When the equipment's driver last delivered a good read (a poll, a notification, a status)."""
        st = self.monitor.equipment.get(eid) if self.monitor is not None else None
        if st is None or st.last_value_at is None:
            return None
        return iso(utcnow() - timedelta(seconds=max(0.0, time.monotonic() - st.last_value_at)))

    def refresh_metrics(self) -> None:
        """Gauges read at scrape time."""
        self.sample_broker()
        metrics.STORE_DEPTH.set(self.store.depth)
        if self.outbox is not None:
            metrics.OUTBOX_DEPTH.set(self.outbox.depth())
        refresh_gauges(self.monitor, self.backlog, self.outbox)

    def sample_broker(self) -> None:
        """The broker link's health follows the MQTT sink's connection, looked at twice a second (`_links`)."""
        if self.mqtt is not None:
            linkstats.link("broker").follow(self.mqtt.connected, self.mqtt.last_error)

    async def _links(self) -> None:
        while not self.stop_event.is_set():
            self.sample_broker()
            await asyncio.sleep(0.5)

    # -- run

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        try:
            try:
                self.store.open()
            except (OSError, sqlite3.Error) as err:
                raise StartupError(f"agent.state_dir {self.cfg.agent.state_dir} cannot be written: {err}") from err
            # The monitor's messages reach the store through the profiles configured (`[mqtt] profiles`).
            self.northbound = ProfileSink(self.store, lambda: self.cfg)
            # What the monitor commits also reaches the live view's WebSocket clients (`agent.live`).
            self.monitor = Monitor(self.cfg, LiveTap(self.northbound, self.hub), self._stale_defaults(self.cfg))
            self.router = CommandRouter(self.cfg, self.store, self.status_of, self.driver_of)
            self._follow_reloads(self.monitor, self.router)
            await self._start_services()
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self.monitor.run(self.stop_event), name="monitor")
                tg.create_task(self.store.watch(self.stop_event), name="store")
                self._start_mqtt()
                for eq in self.cfg.equipment:
                    self._start_driver(eq)
                tg.create_task(sd.watchdog(self.stop_event), name="watchdog")
                tg.create_task(self._links(), name="links")
                self.ready.set()
                sd.notify(f"READY=1\nSTATUS=running: {len(self.cfg.equipment)} equipment")
                log.info("started", session=self.session, version=__version__, equipment=len(self.cfg.equipment))
                await self.stop_event.wait()
                sd.notify("STOPPING=1")
                log.info("stopping")
                await self._shutdown()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self.store.close()
        log.info("stopped")
        return 0

    async def _shutdown(self) -> None:
        # Stop drivers first so nothing new arrives, then flush what the monitor holds, then drain MQTT.
        tasks = list(self.driver_tasks.values())
        for task in tasks:
            task.cancel()
        stuck: set[asyncio.Task[None]] = set()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=max(5.0, self.cfg.agent.shutdown_grace_s))
        for task in stuck:
            log.error("driver_stuck_on_stop", task=task.get_name())
        if self.router is not None:
            await self.router.close()
        if self.monitor is not None:
            self.monitor.flush()
        await self._stop_services()
        await self._stop_mqtt()
        if stuck:
            # Everything is durable by now; a driver that ignores cancellation must not keep the process up.
            log.error("exiting_with_stuck_drivers", drivers=[t.get_name() for t in stuck])
            self.store.close()
            os._exit(0)

    def _follow_reloads(self, monitor: Monitor, router: CommandRouter) -> None:
        """What takes a reloaded config synchronously, subscribed once to the holder."""

        def take(old: AgentConfig, new: AgentConfig) -> None:
            monitor.apply_config(new, self._stale_defaults(new))
            router.cfg = new
            self.store.max_messages = new.mqtt.buffer_max_messages

        self.config.listen(take)

    # -- MPM and the local API

    async def _start_services(self) -> None:
        assert self.monitor is not None and self.router is not None
        self.mpm = MpmBridge(self.config, self.monitor, self.router)
        await self.mpm.start()
        if not self.cfg.http.enabled:
            return
        deps = HttpDeps(
            config=self.config,
            router=self.router,
            monitor=self.monitor,
            health=self.health,
            refresh_metrics=self.refresh_metrics,
            dead_letters=lambda: self.outbox,
            hub=self.hub,
        )
        self.http = HttpApi(deps)
        try:
            await self.http.start()
        except OSError as err:
            # A taken port or an unusable address: stop what started and say which setting is at fault.
            self.http = None
            await self._stop_services()
            raise StartupError(f"http.listen {self.cfg.http.listen}: {err.strerror or err}") from err

    async def _stop_services(self) -> None:
        for service in (self.http, self.mpm):
            if service is not None:
                with contextlib.suppress(Exception):
                    await service.stop()

    # -- MQTT

    def _start_mqtt(self) -> None:
        assert self._tg is not None and self.monitor is not None
        monitor = self.monitor
        self.mqtt = MqttSink(
            self.cfg,
            self.store,
            session=self.session,
            version=__version__,
            started_at=self.started_at,
            on_connected=monitor.republish_statuses,
            on_message=self._on_message,
        )
        self._mqtt_task = self._tg.create_task(self.mqtt.run(), name="sink[mqtt]")
        self._start_spb()

    def _start_spb(self) -> None:
        assert self._tg is not None and self.spb is None, "one edge node connection at a time"
        if "sparkplug" in self.cfg.mqtt.profiles and self.northbound is not None:
            execute = self.router.execute if self.router is not None else None
            self.spb = SparkplugSink(self.cfg, self.store, self.northbound, __version__, execute)
            self._spb_task = self._tg.create_task(self.spb.run(), name="sink[sparkplug]")

    async def _stop_mqtt(self, main: bool = True) -> None:
        """Drain and stop both connections, or only the edge node's (each says its goodbye)."""
        sinks: list[tuple[Any, asyncio.Task[None] | None]] = [(self.spb, self._spb_task)]
        if main:
            sinks.append((self.mqtt, self._mqtt_task))
        for sink, _ in sinks:
            if sink is not None:
                sink.request_stop()
        await asyncio.gather(*(t for _, t in sinks if t is not None), return_exceptions=True)
        self.spb, self._spb_task = None, None

    def _on_message(self, msg: Incoming) -> None:
        if msg.topic == topics_for(self.cfg).rebirth:
            log.info("rebirth_requested")
            if self.mqtt is not None and self.monitor is not None:
                self.mqtt.rebirth()
                self.monitor.republish_statuses()
            return
        if self.router is not None and self.cfg.mqtt.commands_enabled:
            self.router.handle_mqtt(msg)

    # -- drivers

    def _start_driver(self, eq: EquipmentConfig) -> None:
        assert self._tg is not None and self.monitor is not None
        runner = RunningDriver(eq, self.monitor, self.driver_context())
        self.runners[eq.id] = runner
        self.driver_tasks[eq.id] = self._tg.create_task(runner.run(), name=f"driver[{eq.id}]")

    def driver_context(self) -> DriverContext:
        """What every driver is given."""
        a = self.cfg.agent
        max_result = self.cfg.mpm.max_body_bytes if self.cfg.mpm is not None else None
        return DriverContext(state_dir=a.state_dir, reconnect_max_s=a.reconnect_max_s, max_result_bytes=max_result)

    # -- reload

    async def reload(self) -> None:
        """SIGHUP: validate the file again and restart only what changed; an invalid file changes nothing.
        One reload at a time: a second SIGHUP waits for the first."""
        async with self._reload_lock:
            await self._reload()

    async def _reload(self) -> None:
        path = self.cfg.path
        assert path is not None
        try:
            new = await asyncio.to_thread(load_config, path)
        except ConfigError as err:
            log.error("reload_refused", problems=err.problems)
            return
        old = self.cfg
        if (new.agent.id, new.agent.site, new.agent.state_dir, new.mqtt.topic_prefix) != (
            old.agent.id,
            old.agent.site,
            old.agent.state_dir,
            old.mqtt.topic_prefix,
        ):
            log.error(
                "reload_refused",
                problems=["agent.id, agent.site, agent.state_dir and mqtt.topic_prefix need a restart"],
            )
            return
        configure_logging(new.agent.log_level, new.agent.log_format)
        old_eq = {e.id: e for e in old.equipment}
        new_eq = {e.id: e for e in new.equipment}
        changed = [eid for eid, e in new_eq.items() if eid in old_eq and _dump(old_eq[eid]) != _dump(e)]
        removed = [eid for eid in old_eq if eid not in new_eq]
        added = [eid for eid in new_eq if eid not in old_eq]
        mqtt_changed = self.mqtt is not None and (
            _dump(old.mqtt) != _dump(new.mqtt) or old.mqtt._secrets != new.mqtt._secrets
        )
        # The edge node's births declare the devices and metrics: a new set needs a new session. The old one
        # ends before anything of the new config is produced, so it never holds rows it cannot encode.
        restart_spb = self.spb is not None and (mqtt_changed or sparkplug.declared(old) != sparkplug.declared(new))
        if mqtt_changed or restart_spb:
            await self._stop_mqtt(main=mqtt_changed)
        for eid in changed + removed:
            task = self.driver_tasks.pop(eid, None)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for eid in removed:
            linkstats.LINKS.pop(f"driver:{eid}", None)  # its health leaves /metrics with it
        self.config.replace(new)  # the monitor, the router and the store follow through their listeners
        for eid in changed + added:
            self._start_driver(new_eq[eid])
        if mqtt_changed:
            self._start_mqtt()
        else:
            if self.mqtt is not None and (changed or added or removed):
                self.mqtt.equipment_changed(new)  # the UNS metadata of the equipment now configured
            if restart_spb:
                self._start_spb()
        for service in (self.mpm, self.http):
            if service is not None:
                await service.reload(old, new)
        log.info("reloaded", changed=changed, added=added, removed=removed, mqtt_restarted=mqtt_changed)


def _dump(model: Any) -> Any:
    return model.model_dump(mode="json")
