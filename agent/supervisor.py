"""The daemon's lifecycle: a TaskGroup of named tasks, driver reconnects, signals, reload, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import signal
import sqlite3
import ssl
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog

from agent import __version__, metrics
from agent import systemd as sd
from agent.commands import CommandRouter
from agent.config import AgentConfig, EquipmentConfig, load_config
from agent.config_holder import ConfigHolder
from agent.errors import ConfigError, StartupError
from agent.logging import configure as configure_logging
from agent.model import iso, utcnow
from agent.monitor import Monitor
from agent.mqtt import Incoming, MqttSink
from agent.runner import RunningDriver
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
        self.router: CommandRouter | None = None
        self.runners: dict[str, RunningDriver] = {}
        self.driver_tasks: dict[str, asyncio.Task[None]] = {}
        self.extensions: list[Any] = []  # optional components (outbox, HTTP API) with start/stop
        self.outbox: Any = None
        self._tg: asyncio.TaskGroup | None = None
        self._mqtt_task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    @property
    def cfg(self) -> AgentConfig:
        """The current config (the holder's)."""
        return self.config.cfg

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
        now = time.monotonic()
        healthy = True
        degraded = False
        components: dict[str, Any] = {}
        mqtt = self.mqtt
        if mqtt is not None:
            down_for = None if mqtt.connected or mqtt.down_since is None else round(now - mqtt.down_since, 1)
            components["mqtt"] = {
                "status": "up" if mqtt.connected else "down",
                "down_for_s": down_for,
                "error": None if mqtt.connected else mqtt.last_error,
            }
            if not mqtt.connected:
                degraded = True
                if down_for is not None and down_for > limit:
                    healthy = False
        store = self.store
        components["store"] = {
            "status": "not_durable" if store.not_durable else "degraded" if store.degraded else "up",
            "depth": store.depth,
            "held_in_memory": store.held,
            "evicted": store.evicted,
            "error": store.degraded,
        }
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
            }
            degraded = degraded or link["status"] != "up"
        components["drivers"] = drivers
        if self.outbox is not None:
            # MPM down (unreachable, credentials refused) degrades health but never makes it 503: restarting
            # the agent cannot fix MPM, and nothing is lost while the outbox holds its items.
            outbox = self.outbox.health()
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
        metrics.STORE_DEPTH.set(self.store.depth)
        if self.outbox is not None:
            metrics.OUTBOX_DEPTH.set(self.outbox.depth())

    # -- run

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        try:
            check_readable_files(self.cfg)
            try:
                self.store.open()
            except (OSError, sqlite3.Error) as err:
                raise StartupError(f"agent.state_dir {self.cfg.agent.state_dir} cannot be written: {err}") from err
            self.monitor = Monitor(self.cfg, self.store, self._stale_defaults(self.cfg))
            self.router = CommandRouter(self.cfg, self.store, self.status_of, self.driver_of)
            await self._start_extensions()
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self.monitor.run(self.stop_event), name="monitor")
                tg.create_task(self.store.watch(self.stop_event), name="store")
                self._start_mqtt()
                for eq in self.cfg.equipment:
                    self._start_driver(eq)
                tg.create_task(sd.watchdog(self.stop_event), name="watchdog")
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
        await self._stop_extensions()
        if self.mqtt is not None and self._mqtt_task is not None:
            self.mqtt.request_stop()
            await asyncio.gather(self._mqtt_task, return_exceptions=True)
        if stuck:
            # Everything is durable by now; a driver that ignores cancellation must not keep the process up.
            log.error("exiting_with_stuck_drivers", drivers=[t.get_name() for t in stuck])
            self.store.close()
            os._exit(0)

    # -- optional components

    async def _start_extensions(self) -> None:
        from agent.extensions import build_extensions

        self.extensions = build_extensions(self)
        for i, ext in enumerate(self.extensions):
            try:
                await ext.start()
            except OSError as err:
                # A taken port or an unusable address: stop what started and say which setting is at fault.
                self.extensions = self.extensions[:i]
                await self._stop_extensions()
                what = f"http.listen {self.cfg.http.listen}" if type(ext).__name__ == "HttpApi" else type(ext).__name__
                raise StartupError(f"{what}: {err.strerror or err}") from err

    async def _stop_extensions(self) -> None:
        for ext in reversed(self.extensions):
            with contextlib.suppress(Exception):
                await ext.stop()

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
        """SIGHUP: validate the file again and restart only what changed; an invalid file changes nothing."""
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
        for eid in changed + removed:
            task = self.driver_tasks.pop(eid, None)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self.config.replace(new)
        assert self.monitor is not None and self.router is not None
        self.monitor.apply_config(new, self._stale_defaults(new))
        self.router.cfg = new
        self.store.max_messages = new.mqtt.buffer_max_messages
        for eid in changed + added:
            self._start_driver(new_eq[eid])
        mqtt_changed = _dump(old.mqtt) != _dump(new.mqtt) or old.mqtt._secrets != new.mqtt._secrets
        if mqtt_changed and self.mqtt is not None:
            self.mqtt.request_stop()
            if self._mqtt_task is not None:
                await asyncio.gather(self._mqtt_task, return_exceptions=True)
            self._start_mqtt()
        for ext in self.extensions:
            if hasattr(ext, "reload"):
                await ext.reload(old, new)
        log.info("reloaded", changed=changed, added=added, removed=removed, mqtt_restarted=mqtt_changed)


def release_memory() -> None:
    """Hand memory freed after start-up (the parsed TOML, validation scratch) back to the OS.

    Parsing a large config leaves many small freed blocks that glibc keeps; on a small edge box that is
    a few MiB per 10,000 tags that nobody uses again.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    # What exists now (config, modules) lives as long as the process: keep the collector off it, so
    # collections triggered by the stream of readings stay cheap.
    gc.freeze()


def _dump(model: Any) -> Any:
    return model.model_dump(mode="json")


def run_daemon(path: Path) -> int:
    """`edge-agent run`: load the config, run the daemon, map failures to the contract's exit codes."""
    try:
        cfg = load_config(path)
    except ConfigError as err:
        configure_logging()
        for line in err.problems:
            log.error("config_invalid", problem=line)
        return 2
    configure_logging(cfg.agent.log_level, cfg.agent.log_format)
    release_memory()
    try:
        return asyncio.run(Supervisor(cfg).run())
    except StartupError as err:
        # A fault of the machine or the config's surroundings, not a bug: one line, no traceback.
        log.error("startup_failed", error=str(err))
        return 2
    except Exception:
        log.exception("fatal")
        return 1


def check_readable_files(cfg: AgentConfig) -> None:
    """Certificates and keys the daemon will need are readable now, not at the first connect."""
    m = cfg.mqtt
    checks: list[tuple[str, Path | None]] = [
        ("mqtt.ca_file", m.ca_file),
        ("mqtt.cert_file", m.cert_file),
        ("mqtt.key_file", m.key_file),
    ]
    if cfg.mpm is not None:
        checks.append(("mpm.ca_file", cfg.mpm.ca_file))
    for eq in cfg.equipment:
        conn = eq.connection
        for name in type(conn).model_fields:
            if name.endswith("_file"):
                value = getattr(conn, name, None)
                # Files a driver generates when absent (an OPC UA client certificate) may be missing.
                if isinstance(value, Path) and value.exists():
                    checks.append((f"equipment[{eq.id}].connection.{name}", value))
    for where, path in checks:
        if path is None:
            continue
        try:
            with open(path, "rb") as fh:
                fh.read(1)
        except OSError as err:
            raise StartupError(f"{where} {path}: {err.strerror or err}") from err
    if m.tls:
        try:
            ctx = ssl.create_default_context(cafile=str(m.ca_file) if m.ca_file else None)
            if m.cert_file:
                ctx.load_cert_chain(str(m.cert_file), str(m.key_file) if m.key_file else None)
        except (ssl.SSLError, OSError, ValueError) as err:
            raise StartupError(f"mqtt certificates cannot be used: {err}") from err
