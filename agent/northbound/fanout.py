"""Where the monitor's messages go when more than today's contract is published: each message is turned
into the configured profiles' messages (`[mqtt] profiles`) and all of them are appended to the one durable
store, so that every stream is kept until it is delivered and replayed after an outage like today's.

The Sparkplug stream is stored as JSON (today's telemetry body with its `values`, or `{"status": ...}`,
per device, under the device's DDATA topic);
the MQTT sink encodes it at send time, when `seq`, aliases and `is_historical` are known. The latest value
of every tag and status is kept here for the births.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from agent import sparkplug
from agent.config import AgentConfig
from agent.northbound import uns
from agent.store import Store
from agent.store_rows import Encoded
from agent.topics import topics_for


class ProfileSink:
    """The monitor's sink: the store, fanned out into the configured profiles."""

    def __init__(self, store: Store, cfg: Callable[[], AgentConfig]) -> None:
        self.store = store
        self._cfg = cfg
        # eid -> tag -> the latest value object ({tag, value, unit, ts, quality}); eid -> the latest status
        self.latest: dict[str, dict[str, dict[str, Any]]] = {}
        self.statuses: dict[str, dict[str, Any]] = {}

    def _equipment(self, cfg: AgentConfig, topic: str) -> Any:
        head = topics_for(cfg).root + "/equipment/"
        if not topic.startswith(head):
            return None
        eid = topic[len(head) :].split("/", 1)[0]
        return next((eq for eq in cfg.equipment if eq.id == eid), None)

    def append(
        self,
        kind: str,
        topic: str,
        payload: dict[str, Any],
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> int:
        """Append `payload` for every profile that publishes it; the seq of today's message (0 without it)."""
        cfg = self._cfg()
        profiles = cfg.mqtt.profiles
        eq = self._equipment(cfg, topic) if profiles != ["edge-agent"] else None
        seq = 0
        # Other profiles' messages take no seq: today's stream keeps its counter without gaps.
        if eq is not None and "uns" in profiles:
            found = uns.message(uns.base(cfg, eq), kind, payload)
            if found is not None:
                self.store.append(kind, found[0], found[1], 1, found[2], numbered=False)
        if eq is not None and "sparkplug" in profiles and kind == "status":
            # Only a change: a heartbeat or a republished status would grow the store while the node is unborn
            # (status rows are never evicted), and the births carry the current status anyway.
            last = self.statuses.get(eq.id)
            self.statuses[eq.id] = dict(payload)
            if last is None or any(last.get(f) != payload.get(f) for f in sparkplug.STATUS_FIELDS):
                status = {"status": dict(payload)}
                self.store.append("status", sparkplug.topic(cfg, "DDATA", eq.id), status, 0, False, numbered=False)
        if "edge-agent" in profiles:
            seq = self.store.append(kind, topic, payload, qos, retain, response_topic, correlation)
        return seq

    def append_encoded(self, items: Iterable[Encoded]) -> None:
        """Telemetry as the monitor encoded it, and each profile's messages made from it."""
        cfg = self._cfg()
        profiles = cfg.mqtt.profiles
        if profiles == ["edge-agent"]:
            self.store.append_encoded(items)
            return
        ours: list[Encoded] = []
        out: list[Encoded] = []
        for item in items:
            if "edge-agent" in profiles:
                ours.append(item)
            eq = self._equipment(cfg, item[1])
            if eq is None:
                continue
            telemetry = json.loads(item[2] + "}")
            if "uns" in profiles:
                out.extend(uns.values(uns.base(cfg, eq), telemetry, 1))
            if "sparkplug" in profiles:
                latest = self.latest.setdefault(eq.id, {})
                for v in telemetry.get("values", ()):
                    latest[v["tag"]] = v
                # today's telemetry body as it is (its `values`): encoded at send time, not written twice
                out.append(("telemetry", sparkplug.topic(cfg, "DDATA", eq.id), item[2], 0, False))
        if ours or out:
            self.store.append_encoded(ours, plain=out)

    def set_state(self, key: str, value: Any) -> None:
        """Daemon state goes to the store as it is."""
        self.store.set_state(key, value)

    def state_items(self, prefix: str) -> dict[str, Any]:
        """Daemon state from the store."""
        return self.store.state_items(prefix)
