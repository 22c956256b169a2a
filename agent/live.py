"""The live view's fan-out: the daemon's messages to WebSocket clients by channel, never slowing the daemon.

`LiveTap` sits between the monitor and the store: every message the monitor commits is also offered to
the `LiveHub`, which encodes it once and queues the text on each subscribed client's bounded queue. A
client whose queue is full is dropped (`Client.drop`), so a client that never reads costs one bounded
queue and never back-pressure. Channels and their events:

- `equipment`: `equipmentStatus` (the status object), `telemetry` (the latest values, conflated);
- `quality`: `qualityResult` (the quality message with its `mpm_delivery` state);
- `alerts`: `qualityAlert` (an alert raised or cleared on a process value);
- `system`: `systemAlert` (a link or the store changing state), `systemHealth` (the /healthz report).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import structlog

from agent import linkstats
from agent.live_state import RecentQuality
from agent.model import iso, utcnow
from agent.store_rows import Encoded
from drivers.sdk.jsonio import message_bytes

if TYPE_CHECKING:
    from agent.monitor_state import Sink

log = structlog.get_logger("edge_agent.live")

CHANNELS = ("equipment", "quality", "alerts", "system")
# A client is dropped when its oldest queued message has waited `SLOW_AFTER_S`, or it is `QUEUE_MAX`
# messages or `QUEUE_MAX_BYTES` behind. A burst fills every queue at once before any writer runs, so the
# bounds are generous; the texts are shared by all queues, so the memory held is one client's worth.
SLOW_AFTER_S = 10.0
QUEUE_MAX = 20_000
QUEUE_MAX_BYTES = 32 << 20
HEALTH_EVERY_S = 1.0
# Telemetry to WebSocket clients is conflated: at most one `telemetry` event per equipment this often,
# with the latest value of each tag that changed. A live view needs the latest values; every value (the
# contract's report by exception) goes over MQTT. Unconflated, 200 clients cost the pipeline ~4x its rate.
TELEMETRY_EVERY_S = 0.25  # how often the system channel gets the health report
_EVENTS = {"status": ("equipment", "equipmentStatus"), "quality": ("quality", "qualityResult")}


def event_text(event: str, data: Any) -> str:
    """One server event as the text sent: `{"event": ..., "data": ...}` in strict JSON."""
    return message_bytes({"event": event, "data": data}).decode()


class Client:
    """One WebSocket client's subscriptions and its bounded queue of texts to send."""

    def __init__(self, name: str, queue_max: int = QUEUE_MAX, queue_max_bytes: int = QUEUE_MAX_BYTES) -> None:
        self.name = name
        self.channels: set[str] = set()
        self.queue: deque[tuple[float, str]] = deque()  # (when queued, text)
        self.queue_max = queue_max
        self.queue_max_bytes = queue_max_bytes
        self.queued_bytes = 0
        self.wake = asyncio.Event()
        self.gone = asyncio.Event()  # set when dropped
        self.dropped: str | None = None  # why the hub dropped it

    def offer(self, text: str) -> bool:
        """Queue `text`; False when the queue is full (the client is too slow)."""
        if self.dropped is not None:
            return True
        if len(self.queue) >= self.queue_max or self.queued_bytes + len(text) > self.queue_max_bytes:
            return False
        self.queue.append((time.monotonic(), text))
        self.queued_bytes += len(text)
        self.wake.set()
        return True

    def take(self) -> str:
        """The next text to send."""
        _, text = self.queue.popleft()
        self.queued_bytes -= len(text)
        return text

    def lag_s(self, now: float) -> float:
        """How long the oldest queued message has waited."""
        return now - self.queue[0][0] if self.queue else 0.0

    def drop(self, reason: str) -> None:
        """Stop queueing for this client; its writer closes the connection with `reason`."""
        self.dropped = reason
        self.queue.clear()
        self.queued_bytes = 0
        self.wake.set()
        self.gone.set()


class LiveHub:
    """Clients by channel; `publish` encodes an event once and offers it to every subscriber."""

    def __init__(self) -> None:
        self.clients: set[Client] = set()
        self.recent_quality = RecentQuality()
        self.dropped_total = 0
        self._latest: dict[str, dict[str, Any]] = {}  # eid -> tag -> value object, not sent yet
        self._flush: asyncio.TimerHandle | None = None

    def add(self, client: Client) -> None:
        self.clients.add(client)

    def remove(self, client: Client) -> None:
        self.clients.discard(client)

    def subscribers(self, channel: str) -> list[Client]:
        return [c for c in self.clients if channel in c.channels]

    def publish(self, channel: str, event: str, data: Any = None, *, text: str | None = None) -> None:
        """Offer one event to the channel's subscribers (`text`: already encoded)."""
        targets = self.subscribers(channel)
        if not targets:
            return
        body = text if text is not None else event_text(event, data)
        for client in targets:
            if not client.offer(body):
                self._drop(client, f"too slow: {len(client.queue)} messages ({client.queued_bytes} bytes) waiting")

    def sweep(self) -> None:
        """Drop the clients whose oldest queued message has waited too long."""
        now = time.monotonic()
        for client in list(self.clients):
            lag = client.lag_s(now)
            if lag > SLOW_AFTER_S and client.dropped is None:
                self._drop(client, f"too slow: a message waited {lag:.0f} s")

    def _drop(self, client: Client, reason: str) -> None:
        self.dropped_total += 1
        log.warning(
            "ws_client_dropped",
            client=client.name,
            reason=reason,
            queued=len(client.queue),
            queued_bytes=client.queued_bytes,
        )
        client.drop(reason)

    def message(self, kind: str, payload: dict[str, Any]) -> None:
        """A message the monitor committed (status, alert, quality), as its channel's event."""
        if kind == "quality":
            self.recent_quality.add(payload)
        if kind == "alert":
            self.publish("alerts", "qualityAlert", payload)
            return
        found = _EVENTS.get(kind)
        if found is not None:
            self.publish(found[0], found[1], payload)

    def telemetry(self, bodies: Iterable[str]) -> None:
        """Telemetry messages as the monitor encoded them (objects missing their closing brace): their
        values wait, the latest per tag, for the next `telemetry` event of their equipment."""
        if not self.subscribers("equipment"):
            return
        for body in bodies:
            msg = json.loads(body + "}")
            latest = self._latest.setdefault(msg["equipment_id"], {})
            for value in msg["values"]:
                latest[value["tag"]] = value
        if self._latest and self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(TELEMETRY_EVERY_S, self.flush_telemetry)

    def flush_telemetry(self) -> None:
        """One `telemetry` event per equipment with the values that waited."""
        self._flush = None
        latest, self._latest = self._latest, {}
        stamp = iso(utcnow())
        for eid, values in latest.items():
            self.publish(
                "equipment", "telemetry", {"equipment_id": eid, "timestamp": stamp, "values": list(values.values())}
            )

    def close_all(self, reason: str) -> None:
        """Drop every client (the daemon stops)."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        for client in list(self.clients):
            client.drop(reason)


class LiveTap:
    """The monitor's sink: each message goes to the store, then to the hub. The store's answer is kept."""

    def __init__(self, store: Sink, hub: LiveHub) -> None:
        self.store = store
        self.hub = hub

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
        seq = self.store.append(kind, topic, payload, qos, retain, response_topic, correlation)
        self._offer(lambda: self.hub.message(kind, payload))
        return seq

    def append_encoded(self, items: Iterable[Encoded]) -> None:
        batch = list(items)
        self.store.append_encoded(batch)
        self._offer(lambda: self.hub.telemetry(body for kind, _, body, _, _ in batch if kind == "telemetry"))

    def set_state(self, key: str, value: Any) -> None:
        self.store.set_state(key, value)

    def state_items(self, prefix: str) -> dict[str, Any]:
        return self.store.state_items(prefix)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    @staticmethod
    def _offer(fn: Callable[[], None]) -> None:
        # The live view must never cost the pipeline a message: a failure here is logged and forgotten.
        try:
            fn()
        except Exception:
            log.exception("live_publish_failed")


class SystemWatch:
    """Turns changes in the health report into `systemAlert` events and sends the report every few seconds."""

    def __init__(self, hub: LiveHub, health: Callable[[], tuple[dict[str, Any], bool]]) -> None:
        self.hub = hub
        self.health = health
        self.previous: dict[str, tuple[str, Any]] = {}

    @staticmethod
    def states(report: dict[str, Any]) -> dict[str, tuple[str, Any]]:
        """Component -> (status, error) from a health report: those that are not links (`link_changed`)."""
        comps = report.get("components", {})
        return {
            n: (comps[n].get("status"), comps[n].get("error")) for n in ("store", "outbox", "sparkplug") if n in comps
        }

    def link_changed(self, name: str, up: bool, was: bool | None, error: str | None) -> None:
        """A link (broker, MPM, a driver) went up or down: told at once, so a short outage is seen too."""
        self._alert(name, "up" if up else "down", None if was is None else "up" if was else "down", error)

    def _alert(self, component: str, status: str, previous: str | None, error: Any) -> None:
        data = {"component": component, "status": status, "previous": previous, "error": error}
        self.hub.publish("system", "systemAlert", {**data, "timestamp": iso(utcnow())})

    def check(self) -> None:
        """One look at the health report: a systemAlert per changed component, the report itself."""
        if not self.hub.clients:
            self.previous = {}
            return
        report, healthy = self.health()
        now = self.states(report)
        for name, (status, error) in now.items():
            old = self.previous.get(name)
            if self.previous and (old is None or old[0] != status):
                self._alert(name, status, None if old is None else old[0], error)
        self.previous = now
        self.hub.publish("system", "systemHealth", {**report, "healthy": healthy})

    async def run(self) -> None:
        """Follow the links and check the rest until cancelled."""
        stop_watching = linkstats.watch(self.link_changed)
        try:
            await self._poll()
        finally:
            stop_watching()

    async def _poll(self) -> None:
        while True:
            try:
                self.hub.sweep()
                self.check()
            except Exception:  # the next round tries again; the live view never stops the daemon
                log.exception("live_health_failed")
            await asyncio.sleep(HEALTH_EVERY_S)
