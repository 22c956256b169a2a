"""The monitoring loop: per-equipment state turned into status, telemetry, alerts and quality messages.

Drivers hand events in; the monitor derives status per the contract, reports values by exception with
a deadband measured from the last reported value, batches telemetry per `telemetry_interval_s`, keeps
alerts with hysteresis (persisted, so a clear after a restart repeats the alert's id), and appends every
message to the durable store, from which the MQTT sink sends it.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from agent import metrics
from agent.config import AgentConfig, AlertConfig, EquipmentConfig
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
    utcnow,
)
from agent.topics import topics_for
from agent.waits import wait_event

log = structlog.get_logger("edge_agent.monitor")

MAX_VALUES_PER_MESSAGE = 1000
# Telemetry pacing (see Monitor._schedule_flush): how much faster than one per interval the flushes of a
# source delivering about once per interval may go, and how many may go back to back.
FLUSH_SLACK = 0.25
FLUSH_BURST = 2.0


class Sink(Protocol):
    """Where the monitor's messages and bookkeeping go: the durable store, or memory for the Python API."""

    def append(
        self,
        kind: str,
        topic: str,
        payload: dict[str, Any],
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> int: ...

    def append_encoded(self, items: Iterable[tuple[str, str, str, int, bool]]) -> None: ...

    def set_state(self, key: str, value: Any) -> None: ...

    def state_items(self, prefix: str) -> dict[str, Any]: ...


StatusListener = Callable[[str, EquipmentStatus, EquipmentStatus | None], None]


def status_key(value: Any) -> str:
    """How a status-tag value matches a map key: integers and integral floats by their integer."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value)


def encode_value(value: Any) -> str:
    """A value as strict JSON text (NaN and infinities as strings), fast for the common scalars."""
    t = type(value)
    if t is float:
        if value != value:
            return '"NaN"'
        if value in (math.inf, -math.inf):
            return '"Infinity"' if value > 0 else '"-Infinity"'
        return repr(value)
    if t is int:
        return str(value)
    if t is bool:
        return "true" if value else "false"
    if value is None:
        return "null"
    if t is str:
        return json.dumps(value)
    return json.dumps(json_safe(value), default=str)


def _tag_json(tag: str) -> str:
    # Configured tag names are identifiers ([A-Za-z0-9_-]); only a driver's own odd name needs escaping.
    return f'"{tag}"' if tag.isidentifier() or tag.replace("-", "_").isidentifier() else json.dumps(tag)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _changed(value: Any, last: Any, deadband: float) -> bool:
    if type(value) is not type(last) and not (isinstance(value, (int, float)) and isinstance(last, (int, float))):
        return True
    if isinstance(value, float) or isinstance(last, float):
        a, b = float(value), float(last)
        if a != a or b != b:  # NaN: a change only to or from NaN
            return (a != a) != (b != b)
        if deadband > 0:
            return abs(a - b) >= deadband
        return a != b
    if deadband > 0 and isinstance(value, int) and not isinstance(value, bool):
        return abs(value - last) >= deadband
    return bool(value != last)


@dataclass
class EquipmentState:
    """Everything the monitor knows about one equipment."""

    cfg: EquipmentConfig
    status: EquipmentStatus
    stale_after_s: float
    connected: bool = False
    connection_error: str | None = None
    values: dict[str, Reading] = field(default_factory=dict)
    reported: dict[str, tuple[Any, str]] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)  # values as JSON text, encoded once on arrival
    fact: StatusFact | None = None
    status_value_at: float | None = None
    last_value_at: float | None = None
    published_at: float = 0.0
    active_alerts: dict[str, dict[str, Any]] = field(default_factory=dict)
    # tag -> what it feeds, precomputed so the hot path does one dict lookup per reading
    roles: dict[str, tuple[str, ...]] = field(default_factory=dict)
    alerts: dict[str, list[tuple[AlertConfig, str]]] = field(default_factory=dict)
    deadband: dict[str, float] = field(default_factory=dict)
    # tag -> its unit as JSON text, only for tags that have one (names are plain identifiers)
    units: dict[str, str] = field(default_factory=dict)
    status_tag: str | None = None  # the tag the status is read from, if any
    # One delivery, one derivation: status and alerts wait until the driver has handed over all it had.
    unsettled: bool = False
    touched: set[str] = field(default_factory=set)  # status tags given a value in the unsettled delivery
    alert_queue: list[Reading] = field(default_factory=list)


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
        self.quality_handler: Callable[[str, dict[str, Any], str], Awaitable[tuple[bool, str]]] | None = None
        self._stale_defaults = stale_defaults or {}
        # Sources stamp many values with one timestamp object: format it once.
        self._last_ts: datetime | None = None
        self._last_iso = ""
        self._sec_key: tuple[int, int, int, int, int, int] | None = None
        self._sec_prefix = ""
        # Telemetry goes out when it arrives, paced (see `_schedule_flush`).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._flushed_at = -math.inf
        self._turned = False  # the event loop has turned since the values now waiting started to arrive
        self._batch_spread = False  # so they came in more than one delivery
        self._last_spread = False  # so did the last flush's
        self._tokens = FLUSH_BURST
        self._tokens_at = 0.0
        self._time = time.monotonic  # the loop's clock (a test may give the monitor its own)
        self._unsettled: list[EquipmentState] = []
        self._settle_handle: asyncio.Handle | None = None
        self.apply_config(cfg)

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
        st.alerts = {}
        keys = set()
        for a in eq.alerts:
            key = f"alert|{eq.id}|{a.tag}|{'above' if a.above is not None else 'below'}|{a.threshold:g}"
            keys.add(key)
            st.alerts.setdefault(a.tag, []).append((a, key))
        persisted = self.store.state_items(f"alert|{eq.id}|") if keys else {}
        st.active_alerts = {k: v for k, v in persisted.items() if k in keys}
        st.deadband = {t.name: t.deadband for t in eq.tags}
        st.units = {t.name: json.dumps(t.unit) for t in eq.tags if t.unit is not None}

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
        if last is None or last[1] != r.quality or _changed(r.value, last[0], st.deadband.get(tag, 0.0)):
            if self._telemetry:
                ts = r.ts
                if ts is not self._last_ts:
                    self._last_ts = ts
                    self._last_iso = self._iso(ts)
                # Encoded before anything is recorded as reported: a value that cannot be encoded leaves
                # the state as it was (the caller turns it into a bad-quality reading).
                st.pending.append(
                    f'{{"tag":{_tag_json(tag)},"value":{encode_value(r.value)},"unit":{st.units.get(tag, "null")},'
                    f'"ts":"{self._last_iso}","quality":"{r.quality}"}}'
                )
                if self._flush_handle is None:
                    if self._loop is not None:
                        self._schedule_flush(self._loop)
                elif self._turned:
                    self._batch_spread = True
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
                    self._check_alerts(st, r.tag, r)

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

    def _iso(self, ts: datetime) -> str:
        """`iso(ts)`, formatting the date and time once per second: sources give each value its own stamp."""
        if ts.tzinfo is not UTC:
            return iso(ts)
        key = (ts.year, ts.month, ts.day, ts.hour, ts.minute, ts.second)
        if key != self._sec_key:
            self._sec_key = key
            self._sec_prefix = f"{ts.year:04d}" + ts.strftime("-%m-%dT%H:%M:%S.")
        return f"{self._sec_prefix}{ts.microsecond // 1000:03d}Z"

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
        result = dict(q.result)
        result.setdefault("equipment_id", eid)
        result.setdefault("timestamp", iso(utcnow()))
        try:
            if self.quality_handler is not None:
                new, delivery = await self.quality_handler(eid, result, q.idempotency_key)
            else:
                new, delivery = True, "disabled"
            extra: dict[str, Any] = {"duplicate": True} if not new else {}
            if not new:
                metrics.OUTBOX_DUPLICATES.inc()
            self.publish_quality(eid, result, delivery, q.idempotency_key, **extra)
        except Exception as err:
            # Not durable: the driver keeps its source (a file stays claimed) and offers it again later.
            log.error("quality_result_not_committed", equipment_id=eid, key=q.idempotency_key, error=str(err))
            if q.committed is not None and not q.committed.done():
                q.committed.set_exception(err)
            return
        if q.committed is not None and not q.committed.done():
            q.committed.set_result(new)
        if st is not None:
            st.last_value_at = self._time()

    def publish_quality(self, eid: str, result: dict[str, Any], delivery: str, key: str, **extra: Any) -> None:
        """Append a quality message (its `mpm_delivery` state) to the store."""
        payload = json_safe(dict(result))
        payload["equipment_id"] = payload.get("equipment_id") or eid
        payload["mpm_delivery"] = delivery
        payload["idempotency_key"] = key
        payload.update(extra)
        self.store.append("quality", self._topics.equipment(eid, "quality"), payload, 1, False)

    # -- status

    def _derive(self, st: EquipmentState) -> EquipmentStatus:
        eq = st.cfg
        new = EquipmentStatus(equipment_id=eq.id, type=eq.type, status="unknown")
        if not st.connected:
            new.status = "offline"
            new.error_message = st.connection_error
            return new
        if st.fact is not None:
            f = st.fact
            new.status = f.status
            new.current_operation = f.current_operation
            new.progress = f.progress
            new.error_message = f.error_message
            new.process_id = f.process_id
            new.metadata = dict(f.metadata)
        elif eq.status is None or eq.status.tag is None:
            new.status = "idle" if eq.status is None else "unknown"
        else:
            r = st.values.get(eq.status.tag)
            if r is None or st.status_value_at is None:
                new.status = "unknown"
            elif r.quality == "bad":
                new.status = "unknown"
                new.metadata["raw_status_quality"] = r.quality
            elif self._is_stale(st):
                new.status = "unknown"
                new.metadata["stale"] = True
            else:
                mapped = eq.status.map.get(status_key(r.value))
                if mapped is None:
                    new.status = "unknown"
                    new.metadata["raw_status"] = json_safe(r.value)
                else:
                    new.status = mapped
        sc = eq.status
        if sc is not None:
            if sc.progress_tag and (p := st.values.get(sc.progress_tag)) is not None and p.quality != "bad":
                num = _number(p.value)
                if num is not None and math.isfinite(num):
                    new.progress = min(1.0, max(0.0, num))
            if sc.operation_tag and (o := st.values.get(sc.operation_tag)) is not None and o.quality != "bad":
                new.current_operation = str(o.value) if o.value not in (None, "") else None
            if sc.process_id_tag and (j := st.values.get(sc.process_id_tag)) is not None and j.quality != "bad":
                new.process_id = status_key(j.value) if j.value not in (None, "", 0) else None
            if sc.error_tag and (e := st.values.get(sc.error_tag)) is not None and e.quality != "bad":
                new.error_message = str(e.value) if e.value not in (None, "", 0) else None
        return new

    def _is_stale(self, st: EquipmentState) -> bool:
        return bool(
            st.stale_after_s > 0
            and st.status_value_at is not None
            and self._time() - st.status_value_at > st.stale_after_s
        )

    def _update_status(self, st: EquipmentState) -> None:
        new = self._derive(st)
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

    # -- alerts

    def _check_alerts(self, st: EquipmentState, tag: str, r: Reading) -> None:
        value = _number(r.value)
        if value is None or value != value:
            return
        for a, key in st.alerts[tag]:
            active = st.active_alerts.get(key)
            above = a.above is not None
            if active is None:
                if (above and value > a.threshold) or (not above and value < a.threshold):
                    alert_id = str(uuid.uuid4())
                    active = {"alert_id": alert_id, "since": iso(utcnow())}
                    st.active_alerts[key] = active
                    self.store.set_state(key, active)
                    self._publish_alert(st, a, alert_id, r, a.threshold, "active")
            elif (above and value < a.clear_threshold) or (not above and value > a.clear_threshold):
                st.active_alerts.pop(key, None)
                self.store.set_state(key, None)
                self._publish_alert(st, a, active["alert_id"], r, a.clear_threshold, "cleared")

    def _publish_alert(
        self, st: EquipmentState, a: AlertConfig, alert_id: str, r: Reading, threshold: float, state: str
    ) -> None:
        payload = {
            "alert_id": alert_id,
            "equipment_id": st.cfg.id,
            "tag": a.tag,
            "value": json_safe(r.value),
            "threshold": threshold,
            "severity": a.severity,
            "state": state,
            "message": a.message,
            "process_id": st.status.process_id,
            "timestamp": iso(r.ts),
        }
        self.store.append("alert", self._topics.equipment(st.cfg.id, "alerts"), payload, 1, False)
        log.info("alert", equipment_id=st.cfg.id, alert_id=alert_id, tag=a.tag, state=state, severity=a.severity)

    # -- periodic work

    def _schedule_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """Schedule the flush of telemetry that has just started to wait (the first value since a flush).

        A flush is a callback, so it runs once the driver has handed over all it had (a whole
        notification or poll), not in the middle. When it runs depends on how the sources deliver:
        - values that arrived in several deliveries before the last flush (a source delivering more
          often than telemetry_interval_s): one interval after the last flush, so such sources are
          batched into one message per interval;
        - otherwise (a source delivering about once per interval, or slower): at once, as long as a
          token bucket allows it. It refills at (1 + FLUSH_SLACK) tokens per interval and holds
          FLUSH_BURST, so a delivery that comes early after a late one is not held back; a bucket
          refilled at exactly one token per interval would, for a source beating at the interval,
          hold every delivery back by whatever delay it once had, for good.
        """
        # A driver hands over a delivery without yielding to the loop: what arrives after it turned is another.
        self._turned = False
        loop.call_soon(self._mark_turn)
        interval = self.cfg.mqtt.telemetry_interval_s
        if interval <= 0:
            self._flush_handle = loop.call_soon(self._flush_due)
            return
        now = loop.time()
        if self._last_spread:
            self._flush_handle = loop.call_at(max(now, self._flushed_at + interval), self._flush_due)
            return
        self._refill(now, interval)
        if self._tokens >= 1.0:
            self._flush_handle = loop.call_soon(self._flush_due)
        else:
            wait = (1.0 - self._tokens) * interval / (1.0 + FLUSH_SLACK)
            self._flush_handle = loop.call_at(now + wait, self._flush_due)

    def _mark_turn(self) -> None:
        self._turned = True

    def _refill(self, now: float, interval: float) -> None:
        gained = (now - self._tokens_at) * (1.0 + FLUSH_SLACK) / interval
        self._tokens = min(FLUSH_BURST, self._tokens + gained)
        self._tokens_at = now

    def _flush_due(self) -> None:
        self._flush_handle = None
        self._last_spread, self._batch_spread = self._batch_spread, False
        if self._loop is not None:
            now = self._loop.time()
            self._flushed_at = now
            interval = self.cfg.mqtt.telemetry_interval_s
            if interval > 0:
                self._refill(now, interval)
                self._tokens = max(0.0, self._tokens - 1.0)
        self.flush()

    def flush(self) -> int:
        """Write pending telemetry as batched messages; return the number of values written."""
        batch: list[tuple[str, str, str, int, bool]] = []
        count = 0
        for st in self.equipment.values():
            if not st.pending:
                continue
            pending, st.pending = st.pending, []
            count += len(pending)
            metrics.TELEMETRY_VALUES.labels(st.cfg.id).inc(len(pending))
            topic = self._topics.equipment(st.cfg.id, "telemetry")
            head = f'{{"equipment_id":{json.dumps(st.cfg.id)},"timestamp":"{iso(utcnow())}","values":['
            for i in range(0, len(pending), MAX_VALUES_PER_MESSAGE):
                body = head + ",".join(pending[i : i + MAX_VALUES_PER_MESSAGE]) + "]"
                batch.append(("telemetry", topic, body, self._qos, False))
        if batch:
            self.store.append_encoded(batch)
        return count

    def tick(self) -> None:
        """Staleness and heartbeats."""
        now = self._time()
        heartbeat = self.cfg.mqtt.status_heartbeat_s
        for st in self.equipment.values():
            if st.stale_after_s > 0 and st.connected and st.status.status != "unknown" and self._is_stale(st):
                self._update_status(st)
            if now - st.published_at >= heartbeat:
                self._publish_status(st)

    async def run(self, stop: asyncio.Event) -> None:
        """Flush telemetry as it arrives (paced by `telemetry_interval_s`) and tick, until `stop` is set.

        Then flush once more.
        """
        self._loop = asyncio.get_running_loop()
        if any(st.pending for st in self.equipment.values()):
            self._schedule_flush(self._loop)
        try:
            while not stop.is_set():
                self.tick()
                await wait_event(stop, 0.25)
        finally:
            if self._settle_handle is not None:
                self._settle_handle.cancel()
                self._settle()
            if self._flush_handle is not None:
                self._flush_handle.cancel()
                self._flush_handle = None
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
