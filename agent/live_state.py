"""What the live view reads of the daemon's state: active alerts, the gauges dashboards use, and one
snapshot of everything the status page shows (equipment, alerts, recent quality results, link health)."""

from __future__ import annotations

import sqlite3
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent import metrics
from agent.model import STATUSES, json_safe, parse_iso, utcnow

if TYPE_CHECKING:
    from agent.monitor import Monitor

RECENT_QUALITY = 50  # quality results the status page lists


def active_alerts(monitor: Monitor) -> list[dict[str, Any]]:
    """Every active alert, oldest first: its id, equipment, tag, severity, threshold, message, since
    (when it was raised, kept across restarts), value (the value that raised it) and current_value. An alert
    the device raised itself (an MTConnect condition) has its source as tag and its code as value."""
    out = []
    for eid, st in list(monitor.equipment.items()):
        configs = {key: cfg for pairs in st.alerts.values() for cfg, key in pairs}
        for key, active in list(st.active_alerts.items()):
            cfg = configs.get(key)
            alert: dict[str, Any] = {
                "alert_id": active.get("alert_id"),
                "equipment_id": eid,
                "since": active.get("since"),
                "process_id": st.status.process_id,
            }
            if cfg is not None:
                reading = st.values.get(cfg.tag)
                alert.update(
                    tag=cfg.tag,
                    severity=cfg.severity,
                    threshold=cfg.threshold,
                    clear_threshold=cfg.clear_threshold,
                    message=cfg.message,
                    value=active.get("value"),  # the value that raised it (None for one raised before it was kept)
                    current_value=None if reading is None else json_safe(reading.value),
                )
            elif "severity" in active:  # alert|{eid}|device|{source}|{code}
                parts = key.split("|", 4)
                alert.update(
                    tag=parts[3] if len(parts) > 4 else None,
                    severity=active.get("severity"),
                    threshold=None,
                    clear_threshold=None,
                    message=active.get("message"),
                    value=active.get("code"),
                )
            else:
                continue
            out.append(alert)
    out.sort(key=lambda a: str(a["since"]))
    return out


def _age_s(timestamp: Any) -> float:
    """Seconds since an ISO 8601 timestamp; 0 for anything that is not one."""
    if not isinstance(timestamp, str):
        return 0.0
    try:
        return max(0.0, (utcnow() - parse_iso(timestamp)).total_seconds())
    except ValueError:
        return 0.0


class BacklogClock:
    """When the store's messages were appended, to tell the age of the oldest one still waiting.

    The store's message ids only grow. Each append (the store's listener) starts a mark `(first id, time)`
    at most every `MARK_EVERY_S`, so the oldest message's age is known to that: the last mark at or below
    its id. A message older than the first mark was there when the daemon started: its age counts from
    then, a lower bound.
    """

    MARK_EVERY_S = 0.1

    def __init__(self, store: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self._clock = clock
        self.started = clock()
        self.marks: deque[tuple[int, float]] = deque()
        self._seen = 0  # the newest id at the last append
        store.add_listener(self.appended)

    def appended(self) -> None:
        newest = self.store.max_id()
        now = self._clock()
        if newest > self._seen and (not self.marks or now - self.marks[-1][1] >= self.MARK_EVERY_S):
            self.marks.append((self._seen + 1 if self._seen else newest, now))
        self._seen = max(self._seen, newest)

    def oldest_age(self) -> float:
        """Seconds since the oldest waiting message was appended (0 when the store is empty)."""
        if self.store.depth <= len(self.store.kept):
            return 0.0  # only what the Sparkplug window keeps: sent, not waiting
        try:
            first = self.store.first_waiting_id()
        except (sqlite3.Error, OSError):
            return 0.0
        if first is None:
            return 0.0
        while len(self.marks) > 1 and self.marks[1][0] <= first:
            self.marks.popleft()  # marks of delivered messages
        at = self.marks[0][1] if self.marks and self.marks[0][0] <= first else self.started
        return max(0.0, self._clock() - at)


def outbox_oldest_age(outbox: Any) -> float:
    """Age of the oldest item waiting in the MPM outbox (0 without an outbox or when it is empty)."""
    if outbox is None:
        return 0.0
    try:
        pending = outbox.pending(1)
    except (sqlite3.Error, OSError):
        return 0.0
    return _age_s(pending[0].created_at) if pending else 0.0


def refresh_gauges(monitor: Monitor | None, backlog: BacklogClock, outbox: Any) -> None:
    """Bring the dashboard gauges up to date (called when /metrics is scraped)."""
    metrics.EQUIPMENT_STATUS.clear()
    metrics.ALERTS_ACTIVE.clear()
    if monitor is not None:
        for eid, st in list(monitor.equipment.items()):
            for status in STATUSES:
                metrics.EQUIPMENT_STATUS.labels(eid, status).set(1 if st.status.status == status else 0)
            for severity in {cfg.severity for pairs in st.alerts.values() for cfg, _ in pairs}:
                metrics.ALERTS_ACTIVE.labels(eid, severity).set(0)
        for alert in active_alerts(monitor):
            metrics.ALERTS_ACTIVE.labels(alert["equipment_id"], alert["severity"]).inc()
    metrics.STORE_OLDEST_AGE.set(backlog.oldest_age())
    metrics.OUTBOX_OLDEST_AGE.set(outbox_oldest_age(outbox))


class RecentQuality:
    """The last quality results seen, with their MPM delivery state, newest last (the status page's list)."""

    def __init__(self, size: int = RECENT_QUALITY) -> None:
        self.items: deque[dict[str, Any]] = deque(maxlen=size)

    def add(self, payload: dict[str, Any]) -> None:
        """A quality message as published; a later state of the same result replaces the earlier one."""
        key = payload.get("idempotency_key") or payload.get("process_id")
        for i, old in enumerate(self.items):
            if key is not None and (old.get("idempotency_key") or old.get("process_id")) == key:
                del self.items[i]
                break
        self.items.append(
            {
                k: payload.get(k)
                for k in ("process_id", "equipment_id", "overall_score", "mpm_delivery", "idempotency_key", "timestamp")
            }
        )
