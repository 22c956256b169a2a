"""Alerts with hysteresis: raised past `threshold`, cleared past `clear_threshold`; and alerts a device raises
by itself (`DeviceAlerts`: an MTConnect condition). Active alerts are kept in the store's state, so a clear
after a restart repeats the alert's id."""

from __future__ import annotations

import uuid
from typing import Any

import structlog

from agent.config import AlertConfig, EquipmentConfig
from agent.model import Reading, iso, json_safe, utcnow
from agent.monitor_state import EquipmentState, Sink, hold_checkpoint
from agent.status_rules import number
from agent.topics import Topics
from drivers.sdk.events import Checkpoint, DeviceAlerts

log = structlog.get_logger("edge_agent.monitor")


def index_alerts(st: EquipmentState, eq: EquipmentConfig, store: Sink) -> None:
    """Give `st` its alerts by tag, and those of them that were active when the state was last written."""
    st.alerts = {}
    keys = set()
    for a in eq.alerts:
        key = f"alert|{eq.id}|{a.tag}|{'above' if a.above is not None else 'below'}|{a.threshold:g}"
        keys.add(key)
        st.alerts.setdefault(a.tag, []).append((a, key))
    # Device alerts are not configured: every one still active belongs to the equipment.
    device = _device_prefix(eq.id)
    persisted = store.state_items(f"alert|{eq.id}|")
    st.active_alerts = {k: v for k, v in persisted.items() if k in keys or k.startswith(device)}


def _device_prefix(eid: str, source: str = "") -> str:
    return f"alert|{eid}|device|{source}|" if source else f"alert|{eid}|device|"


def device_event(store: Sink, topics: Topics, st: EquipmentState, ev: object) -> None:
    """The events of drivers that speak for their device beyond values: its own alerts, checkpoints."""
    if isinstance(ev, DeviceAlerts):
        device_alerts(store, topics, st, ev)
    elif isinstance(ev, Checkpoint):
        hold_checkpoint(st, ev.done)


def device_alerts(store: Sink, topics: Topics, st: EquipmentState, ev: DeviceAlerts) -> None:
    """Make the device alerts of `ev.source` what `ev` says: raise the new, clear the gone (same id), and
    publish one again when its severity or message changed; an alert already active as given is left."""
    eid = st.cfg.id
    prefix = _device_prefix(eid, ev.source)
    wanted = {prefix + code: (code, severity, message) for code, (severity, message) in ev.active.items()}
    for key, (code, severity, message) in wanted.items():
        active = st.active_alerts.get(key)
        if active is not None and (active.get("severity"), active.get("message")) == (severity, message):
            continue
        alert_id = active["alert_id"] if active is not None else str(uuid.uuid4())
        since = active["since"] if active is not None else iso(utcnow())
        record = {"alert_id": alert_id, "since": since, "code": code, "severity": severity, "message": message}
        st.active_alerts[key] = record
        store.set_state(key, record)
        _publish_device(store, topics, st, ev, record, "active")
    for key in [k for k in st.active_alerts if k.startswith(prefix) and k not in wanted]:
        record = st.active_alerts.pop(key)
        store.set_state(key, None)
        _publish_device(store, topics, st, ev, record, "cleared")


def _publish_device(
    store: Sink, topics: Topics, st: EquipmentState, ev: DeviceAlerts, record: dict[str, Any], state: str
) -> None:
    payload: dict[str, Any] = {
        "alert_id": record["alert_id"],
        "equipment_id": st.cfg.id,
        "tag": ev.source,
        "value": record.get("code"),  # the device's native code
        "threshold": None,
        "severity": record.get("severity", "warning"),
        "state": state,
        "message": record.get("message", ""),
        "process_id": st.status.process_id,
        "timestamp": iso(ev.ts),
    }
    store.append("alert", topics.equipment(st.cfg.id, "alerts"), payload, 1, False)
    log.info("alert", equipment_id=st.cfg.id, alert_id=record["alert_id"], tag=ev.source, state=state)


def check_alerts(store: Sink, topics: Topics, st: EquipmentState, tag: str, r: Reading) -> None:
    """Raise or clear the alerts on `tag` for the reading `r`."""
    value = number(r.value)
    if value is None or value != value:
        return
    for a, key in st.alerts[tag]:
        active = st.active_alerts.get(key)
        above = a.above is not None
        if active is None:
            if (above and value > a.threshold) or (not above and value < a.threshold):
                alert_id = str(uuid.uuid4())
                active = {"alert_id": alert_id, "since": iso(utcnow()), "value": json_safe(r.value)}
                st.active_alerts[key] = active
                store.set_state(key, active)
                _publish(store, topics, st, a, alert_id, r, a.threshold, "active")
        elif (above and value < a.clear_threshold) or (not above and value > a.clear_threshold):
            st.active_alerts.pop(key, None)
            store.set_state(key, None)
            _publish(store, topics, st, a, active["alert_id"], r, a.clear_threshold, "cleared")


def _publish(
    store: Sink,
    topics: Topics,
    st: EquipmentState,
    a: AlertConfig,
    alert_id: str,
    r: Reading,
    threshold: float,
    state: str,
) -> None:
    payload: dict[str, Any] = {
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
    store.append("alert", topics.equipment(st.cfg.id, "alerts"), payload, 1, False)
    log.info("alert", equipment_id=st.cfg.id, alert_id=alert_id, tag=a.tag, state=state, severity=a.severity)
