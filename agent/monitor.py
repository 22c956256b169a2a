"""The monitoring loop: per-equipment state turned into status, telemetry, alerts and quality messages.

Drivers hand events in; the monitor derives status per the contract (`status_rules`), reports values by
exception with a deadband measured from the last reported value, batches telemetry per
`telemetry_interval_s` (`telemetry`), keeps alerts with hysteresis (`monitor_alerts`: persisted, so a
clear after a restart repeats the alert's id), and appends every message to the durable store, from
which the MQTT sink sends it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import structlog

from agent.config import AgentConfig
from agent.model import (
    ConnectionState,
    EquipmentStatus,
    Event,
    QualityResult,
    Reading,
    StatusFact,
    Unchanged,
    iso,
    json_safe,
)
from agent.monitor_alerts import check_alerts, device_event, index_alerts
from agent.monitor_quality import QualityHandler, commit_quality, quality_payload
from agent.monitor_state import EquipmentState, Sink, StatusListener, release_checkpoints
from agent.status_rules import changed, derive_status, is_stale, status_key
from agent.telemetry import (
    FLUSH_BURST,
    FLUSH_SLACK,
    MAX_VALUES_PER_MESSAGE,
    Stamps,
    TelemetryPacer,
    encode_value,
    tag_json,
    take_batches,
)
from agent.topics import topics_for
from agent.waits import wait_event

__all__ = [
    "FLUSH_BURST",
    "FLUSH_SLACK",
    "MAX_VALUES_PER_MESSAGE",
    "EquipmentState",
    "Monitor",
    "Sink",
    "StatusListener",
    "encode_value",
    "status_key",
]

log = structlog.get_logger("edge_agent.monitor")


class Monitor:
    """Per-equipment state, fed by drivers, writing messages to the store."""

    def __init__(
        self,
        cfg: AgentConfig,
        store: Sink,
        stale_defaults: dict[str, float] | None = None,
        *,
        telemetry: bool = True,
    ) -> None:
        self.store = store
        self.cfg = cfg
        # False where nobody publishes telemetry (the Python API): values are kept, no messages built.
        self._telemetry = telemetry
        self.equipment: dict[str, EquipmentState] = {}
        self.status_listeners: list[StatusListener] = []
        self.quality_handler: QualityHandler | None = None
        self._stale_defaults = stale_defaults or {}
        # Sources stamp many values with one timestamp object: format it once.
        self._stamps = Stamps()
        # Telemetry goes out when it arrives, paced (see `TelemetryPacer.schedule`).
        self._pacer = TelemetryPacer(self.flush, lambda: self.cfg.mqtt.telemetry_interval_s)
        self._time = time.monotonic  # the loop's clock (a test may give the monitor its own)
        self._unsettled: list[EquipmentState] = []
        self._settle_handle: asyncio.Handle | None = None
        self.apply_config(cfg)

    @property
    def _loop(self) -> asyncio.AbstractEventLoop | None:
        """The running loop while `run` runs: settling and telemetry pacing are scheduled on it."""
        return self._pacer.loop

    @_loop.setter
    def _loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._pacer.loop = loop

    # -- configuration

    def apply_config(self, cfg: AgentConfig, stale_defaults: dict[str, float] | None = None) -> None:
        """Take a (new) config: equipment added, changed or removed keeps what it still can."""
        self.cfg = cfg
        if stale_defaults:
            self._stale_defaults.update(stale_defaults)
        self._topics = topics_for(cfg)
        self._qos = cfg.mqtt.qos
        seen = set()
        for eq in cfg.equipment:
            seen.add(eq.id)
            old = self.equipment.get(eq.id)
            stale = eq.stale_after_s if eq.stale_after_s is not None else self._stale_defaults.get(eq.id, 0.0)
            if old is None:
                st = EquipmentState(
                    cfg=eq, status=EquipmentStatus(equipment_id=eq.id, type=eq.type), stale_after_s=stale
                )
                self.equipment[eq.id] = st
            else:
                st = old
                st.cfg = eq
                st.stale_after_s = stale
                st.status.type = eq.type
                known = {t.name for t in eq.tags}
                for name in list(st.reported):
                    if name not in known:
                        st.reported.pop(name, None)
                        st.values.pop(name, None)
            self._index(st)
        for eid in list(self.equipment):
            if eid not in seen:
                del self.equipment[eid]

    def _index(self, st: EquipmentState) -> None:
        eq = st.cfg
        roles: dict[str, list[str]] = {}
        if eq.status is not None:
            for role, tag in eq.status.tag_refs().items():
                roles.setdefault(tag, []).append(role)
        st.roles = {k: tuple(v) for k, v in roles.items()}
        st.status_tag = eq.status.tag if eq.status is not None else None
        index_alerts(st, eq, self.store)
        st.deadband = {t.name: t.deadband for t in eq.tags}
        st.units = {t.name: encode_value(t.unit) for t in eq.tags if t.unit is not None}

    # -- who listens (each returns its own unsubscribe)

    def add_status_listener(self, listener: StatusListener) -> Callable[[], None]:
        """Call `listener(eid, new, old)` on every status change; returns the call that stops it."""
        self.status_listeners.append(listener)

        def remove() -> None:
            if listener in self.status_listeners:
                self.status_listeners.remove(listener)

        return remove

    def set_quality_handler(self, handler: QualityHandler) -> Callable[[], None]:
        """Where quality results are made durable (the MPM outbox); returns the call that removes it."""
        self.quality_handler = handler

        def remove() -> None:
            if self.quality_handler is handler:
                self.quality_handler = None

        return remove

    # -- events

    def on_event(self, eid: str, ev: Event) -> None:
        """Take one event from a driver (QualityResult goes to `on_quality`)."""
        if type(ev) is Reading:
            self.on_reading(eid, ev)
        elif isinstance(ev, ConnectionState):
            self.on_connection(eid, ev)
        elif isinstance(ev, StatusFact):
            self.on_fact(eid, ev)
        elif isinstance(ev, Unchanged):
            self.on_unchanged(eid, ev)
        elif isinstance(ev, Reading):
            self.on_reading(eid, ev)
        elif (st := self.equipment.get(eid)) is not None:
            device_event(self.store, self._topics, st, ev)  # DeviceAlerts, Checkpoint

    def on_reading(self, eid: str, r: Reading) -> None:
        """A tag value: telemetry by exception, status and alerts."""
        st = self.equipment.get(eid)
        if st is None:
            return
        tag = r.tag
        if tag in st.touched:
            # A second value of a status tag in one delivery is a later moment (a server queue holding
            # several changes): the moment before it gets its own status, so no transition is lost.
            self._settle_now(st)
        st.values[tag] = r
        now = self._time()
        st.last_value_at = now
        last = st.reported.get(tag)
        if last is None or last[1] != r.quality or changed(r.value, last[0], st.deadband.get(tag, 0.0)):
            if self._telemetry:
                ts = r.ts
                # Encoded before anything is recorded as reported: a value that cannot be encoded leaves
                # the state as it was (the caller turns it into a bad-quality reading).
                st.pending.append(
                    f'{{"tag":{tag_json(tag)},"value":{encode_value(r.value)},"unit":{st.units.get(tag, "null")},'
                    f'"ts":"{self._stamps.text(ts)}","quality":"{r.quality}"}}'
                )
                self._pacer.waiting()
            st.reported[tag] = (r.value, r.quality)
        if tag in st.roles:
            if "tag" in st.roles[tag]:
                st.status_value_at = now
            self._defer(st)
            if st.unsettled:
                st.touched.add(tag)
        if tag in st.alerts and r.quality != "bad":
            st.alert_queue.append(r)
            self._defer(st)

    def _defer(self, st: EquipmentState) -> None:
        """Derive status and alerts once the current delivery is applied whole (see `_settle`)."""
        if self._loop is None:
            self._settle_one(st)  # no loop (the Python API's direct calls): each event is its own delivery
            return
        if not st.unsettled:
            st.unsettled = True
            self._unsettled.append(st)
            if self._settle_handle is None:
                self._settle_handle = self._loop.call_soon(self._settle)

    def _settle(self) -> None:
        """Runs when the loop turns, i.e. once a driver has handed over a whole delivery (a publish
        response, a poll, the initial read): one status per distinct status, and alerts carrying the
        process id, operation and job of that same snapshot."""
        self._settle_handle = None
        pending, self._unsettled = self._unsettled, []
        for st in pending:
            if st.unsettled:
                self._settle_now(st)

    def _settle_now(self, st: EquipmentState) -> None:
        st.unsettled = False
        self._settle_one(st)

    def _settle_one(self, st: EquipmentState) -> None:
        st.touched.clear()
        self._update_status(st)
        if st.alert_queue:
            queue, st.alert_queue = st.alert_queue, []
            for r in queue:
                if r.tag in st.alerts:
                    check_alerts(self.store, self._topics, st, r.tag, r)

    def on_unchanged(self, eid: str, ev: Unchanged) -> None:
        """A poll confirmed every value not newly given: they, and the status read from them, are fresh."""
        st = self.equipment.get(eid)
        if st is None:
            return
        now = self._time()
        st.last_value_at = now
        if st.status_tag is not None and st.status_tag in st.values:
            st.status_value_at = now
            if st.status.status == "unknown":
                self._defer(st)  # it may have gone stale before this poll

    def on_connection(self, eid: str, ev: ConnectionState) -> None:
        """The driver's link went up or down."""
        st = self.equipment.get(eid)
        if st is None:
            return
        if st.unsettled:
            self._settle_now(st)  # what came before the link changed is its own moment
        st.connected = ev.connected
        st.connection_error = None if ev.connected else ev.error
        if ev.connected:
            st.status_value_at = None
            st.fact = None
            self._defer(st)  # with the first read, if it comes in the same delivery: one status
        else:
            self._update_status(st)

    def on_fact(self, eid: str, fact: StatusFact) -> None:
        """Status that the driver knows directly."""
        st = self.equipment.get(eid)
        if st is None:
            return
        if st.unsettled:
            self._settle_now(st)
        st.fact = fact
        st.last_value_at = self._time()
        if not st.connected:
            st.connected = True
            st.connection_error = None
        # A fact is a whole status already: each one is published, none merged into a later one.
        self._update_status(st)

    async def on_quality(self, eid: str, q: QualityResult) -> None:
        """A quality result: made durable (outbox), published pending, its driver told the outcome."""
        st = self.equipment.get(eid)
        if await commit_quality(self.quality_handler, self.publish_quality, eid, q) and st is not None:
            st.last_value_at = self._time()

    def publish_quality(self, eid: str, result: dict[str, Any], delivery: str, key: str, **extra: Any) -> None:
        """Append a quality message (its `mpm_delivery` state) to the store."""
        payload = quality_payload(eid, result, delivery, key, extra)
        self.store.append("quality", self._topics.equipment(eid, "quality"), payload, 1, False)

    # -- status

    def _update_status(self, st: EquipmentState) -> None:
        new = derive_status(st, self._time())
        if new.differs(st.status) or (new.status == "unknown" and new.metadata != st.status.metadata):
            old = st.status
            st.status = new
            self._publish_status(st)
            if old.status != new.status:
                log.info(
                    "status_changed",
                    equipment_id=st.cfg.id,
                    status=new.status,
                    previous=old.status,
                    error_message=new.error_message,
                )
            for listener in self.status_listeners:
                try:
                    listener(st.cfg.id, new, old)
                except Exception:
                    log.exception("status_listener_failed", equipment_id=st.cfg.id)

    def _publish_status(self, st: EquipmentState) -> None:
        st.published_at = self._time()
        self.store.append("status", self._topics.equipment(st.cfg.id, "status"), st.status.to_dict(), 1, True)

    def republish_statuses(self) -> None:
        """Every current status again (after a reconnect, on rebirth)."""
        for st in self.equipment.values():
            self._publish_status(st)

    # -- periodic work

    def flush(self) -> int:
        """Write pending telemetry as batched messages; return the number of values written."""
        batch, count = take_batches(self.equipment.values(), self._topics, self._qos)
        if batch:
            self.store.append_encoded(batch)
        release_checkpoints(self.equipment.values())
        return count

    def tick(self) -> None:
        """Staleness and heartbeats."""
        now = self._time()
        heartbeat = self.cfg.mqtt.status_heartbeat_s
        for st in self.equipment.values():
            if st.stale_after_s > 0 and st.connected and st.status.status != "unknown" and is_stale(st, now):
                self._update_status(st)
            if now - st.published_at >= heartbeat:
                self._publish_status(st)

    async def run(self, stop: asyncio.Event) -> None:
        """Flush telemetry as it arrives (paced by `telemetry_interval_s`) and tick, until `stop` is set.

        Then flush once more.
        """
        self._loop = asyncio.get_running_loop()
        if any(st.pending for st in self.equipment.values()):
            self._pacer.schedule()
        try:
            while not stop.is_set():
                self.tick()
                await wait_event(stop, 0.25)
        finally:
            if self._settle_handle is not None:
                self._settle_handle.cancel()
                self._settle()
            self._pacer.cancel()
            self._loop = None
            self.flush()

    # -- read access (HTTP API, Python API)

    def unit(self, eid: str, tag: str) -> str | None:
        """The configured unit of a tag."""
        st = self.equipment.get(eid)
        text = st.units.get(tag) if st else None
        return json.loads(text) if text else None

    def snapshot(self, eid: str) -> dict[str, Any] | None:
        """The status object plus current values of one equipment."""
        st = self.equipment.get(eid)
        if st is None:
            return None
        out = st.status.to_dict()
        out["values"] = {
            tag: {"value": json_safe(r.value), "unit": self.unit(eid, tag), "ts": iso(r.ts), "quality": r.quality}
            for tag, r in st.values.items()
        }
        out["last_value_age_s"] = None if st.last_value_at is None else round(self._time() - st.last_value_at, 3)
        return out
