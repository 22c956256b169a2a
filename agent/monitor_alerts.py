"""Alerts with hysteresis: raised past `threshold`, cleared past `clear_threshold`. Active alerts are kept in
the store's state, so a clear after a restart repeats the alert's id."""

from __future__ import annotations

import uuid
from typing import Any

import structlog

from agent.config import AlertConfig, EquipmentConfig
from agent.model import Reading, iso, json_safe, utcnow
from agent.monitor_state import EquipmentState, Sink
from agent.status_rules import number
from agent.topics import Topics

log = structlog.get_logger("edge_agent.monitor")


def index_alerts(st: EquipmentState, eq: EquipmentConfig, store: Sink) -> None:
    """Give `st` its alerts by tag, and those of them that were active when the state was last written."""
    st.alerts = {}
    keys = set()
    for a in eq.alerts:
        key = f"alert|{eq.id}|{a.tag}|{'above' if a.above is not None else 'below'}|{a.threshold:g}"
        keys.add(key)
        st.alerts.setdefault(a.tag, []).append((a, key))
    persisted = store.state_items(f"alert|{eq.id}|") if keys else {}
    st.active_alerts = {k: v for k, v in persisted.items() if k in keys}


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
                active = {"alert_id": alert_id, "since": iso(utcnow())}
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
