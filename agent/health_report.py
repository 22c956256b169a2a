"""The /healthz parts of the broker connections and the store: each one's status, error and figures."""

from __future__ import annotations

import time
from typing import Any

from agent import linkstats
from agent.mqtt import MqttSink
from agent.sparkplug.sink import SparkplugSink
from agent.store import Store


def broker(mqtt: MqttSink) -> tuple[dict[str, Any], float | None]:
    """The main connection's part, and for how long it has been down (None while up)."""
    down_for = None if mqtt.connected or mqtt.down_since is None else round(time.monotonic() - mqtt.down_since, 1)
    report = {
        "status": "up" if mqtt.connected else "down",
        "down_for_s": down_for,
        "error": None if mqtt.connected else mqtt.last_error,
        "link": linkstats.link("broker").report(),
    }
    return report, down_for


def sparkplug(spb: SparkplugSink) -> dict[str, Any]:
    """The edge node's connection: up (born), waiting for its primary host, or down."""
    state = "waiting_for_host" if spb.waiting_for_host else "up" if spb.born else "down"
    error = None
    if state == "waiting_for_host":
        error = spb.last_error or f"primary host {spb.link.host.host_id} not online"
    elif state == "down":
        error = spb.last_error or "not connected yet"
    return {"status": state, "error": error, "bdseq": spb.link.node.bdseq, "kept_for_window": spb.link.held}


def store(s: Store) -> dict[str, Any]:
    """The durable queue: its state and depth (the depth counts the Sparkplug window's sent messages too:
    `kept_for_window` under `sparkplug`)."""
    return {
        "status": "not_durable" if s.not_durable else "degraded" if s.degraded else "up",
        "depth": s.depth,
        "held_in_memory": s.held,
        "evicted": s.evicted,
        "error": s.degraded,
    }
