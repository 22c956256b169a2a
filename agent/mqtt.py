"""The MQTT sink (paho-mqtt, MQTT 5): sends what the durable store holds, in order, and takes commands.

Each connection uses a fresh paho client so that paho never re-sends from its own queue: the store is
the only source of truth. A message leaves the store only on its PUBACK. On every (re)connect: the birth,
then every current status, then live traffic, always ahead of what waited in the store; that backlog is
replayed behind it in order, marked `is_historical`, never retained, paced by `replay_max_per_s`
(the two streams and the pace: `mqtt_streams`; the paho client itself: `mqtt_client`; the connection's
life cycle: `mqtt_connection`). The Sparkplug edge node's messages are another connection's
(`agent.sparkplug.sink`): this one skips them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent import metrics, sparkplug, topics
from agent.config import AgentConfig
from agent.mqtt_client import Incoming, incoming
from agent.mqtt_connection import BrokerConnection, Will
from agent.mqtt_streams import FETCH, AckProbe, ReplayPace, Stream
from agent.northbound import uns
from agent.store import Lane, Store, StoredMessage
from agent.topics import topics_for
from agent.waits import wait_event
from drivers.sdk.jsonio import message_bytes

__all__ = ["DELETE_BATCH", "DELETE_DELAY_S", "FETCH", "HISTORICAL", "LIVE_RESERVE", "WINDOW", "Incoming", "MqttSink"]

log = structlog.get_logger("edge_agent.mqtt")

WINDOW = 200  # messages handed to paho and not yet acknowledged
LIVE_RESERVE = 50  # of the window, never filled by the replay: live traffic never waits for its acks
# Acknowledged messages leave the store in batches: at most DELETE_BATCH, at the latest DELETE_DELAY_S after the
# first (acknowledged but not yet deleted goes out again after a crash: a duplicate, not a loss).
DELETE_BATCH, DELETE_DELAY_S = 500, 0.05
HISTORICAL = b',"is_historical":true}'
# With the Sparkplug profile on, its messages are the edge node's connection's; this one sends all others.
NOT_SPARKPLUG = Lane(sparkplug.NAMESPACE + "/", inside=False)


class MqttSink(BrokerConnection):
    """Today's contract (and the UNS profile) on one connection: birth and Will, the store pump, commands."""

    def __init__(
        self,
        cfg: AgentConfig,
        store: Store,
        *,
        session: str,
        version: str,
        started_at: str,
        on_connected: Callable[[], None],
        on_message: Callable[[Incoming], None],
    ) -> None:
        super().__init__(cfg, store, log, "mqtt", cfg.client_id)
        self.session = session
        self.version = version
        self.started_at = started_at
        self._on_connected = on_connected
        self._on_message = on_message
        self.topics = topics_for(cfg)
        self._acks: collections.deque[int] = collections.deque()
        self._inflight: dict[int, StoredMessage] = {}
        self._rtt = AckProbe()
        self.profiles = cfg.mqtt.profiles
        # Two streams read ahead from the store: live (newer than the connect) and the replayed backlog.
        lane = NOT_SPARKPLUG if "sparkplug" in self.profiles else None
        self._live = Stream(lane)
        self._replay = Stream(lane)
        self._replay_upto = 0  # the backlog is every stored message up to this id at the connect
        self._pace = ReplayPace(self._wake.set)
        self._ack_signalled = False
        self._to_delete: list[int] = []
        self._delete_timer: asyncio.TimerHandle | None = None

    # -- paho's network thread: hand over to the event loop only

    def on_acked(self, mid: int) -> None:
        self._acks.append(mid)
        # One wake-up per batch of acks, not one per ack: the loop drains the whole deque.
        if not self._ack_signalled:
            self._ack_signalled = True
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._wake.set)

    def on_incoming(self, client: paho.Client, msg: paho.MQTTMessage) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._on_message, incoming(msg))

    # -- event-loop side

    def will(self) -> Will | None:
        """The contract's retained offline state (no Will when today's profile is off)."""
        if "edge-agent" not in self.profiles:
            return None
        return self.topics.state, message_bytes(self._offline()), True

    def birth(self) -> dict[str, Any]:
        """The retained `R/state` birth payload."""
        a = self.cfg.agent
        return topics.birth(a.id, a.site, self.version, self.started_at, self.session)

    def _offline(self) -> dict[str, Any]:
        return topics.offline(self.cfg.agent.id, self.cfg.agent.site, self.session)

    async def connected_session(self, client: paho.Client, stop: asyncio.Event) -> None:
        """Birth, backlog (historical), current statuses, then live."""
        m = self.cfg.mqtt
        metrics.MQTT_CONNECTED.set(1)
        metrics.MQTT_CONNECTS.inc()
        self._inflight.clear()
        self._rtt.reset()
        self._acks.clear()
        self._replay_upto = self.store.max_id()
        self._replay.reset(0, self._replay_upto)
        self._live.reset(self._replay_upto, None)
        rate = m.replay_max_per_s
        self._pace.start(rate if self._replay_upto else 0.0)
        if self._replay_upto:
            log.info("mqtt_replay", messages=self.store.depth, max_per_s=rate or None)
        # Each profile's birth: today's retained state, the UNS metadata (the Sparkplug births: its own link).
        if "edge-agent" in self.profiles:
            client.publish(self.topics.state, message_bytes(self.birth()), qos=1, retain=True)
        if "uns" in self.profiles:
            for topic, meta in uns.metadata(self.cfg):
                client.publish(topic, message_bytes(meta), qos=1, retain=True)
        # retainAsPublished: a request published with retain is recognised (and refused) even when live.
        opts = SubscribeOptions(qos=1, retainAsPublished=True)
        subscriptions = [(self.topics.rebirth, opts)]
        if m.commands_enabled:
            subscriptions.append((self.topics.commands, opts))
        client.subscribe(subscriptions)
        self._on_connected()
        try:
            await self._pump(stop)
        finally:
            self._pace.stop()
            self._handle_acks()
            self._flush_deletes()
            metrics.MQTT_CONNECTED.set(0)

    def _drained(self) -> bool:
        """Nothing of this connection's left to send or to be acknowledged."""
        return not self._inflight and self._replay.done and not self._live.pending(self.store)

    async def _pump(self, stop: asyncio.Event) -> None:
        assert self._client is not None and self._lost is not None
        client = self._client
        deadline: float | None = None
        while not self._lost.is_set():
            self._wake.clear()
            self._handle_acks()
            if self._to_delete and stop.is_set():
                self._flush_deletes()
            if stop.is_set():
                if deadline is None:
                    deadline = time.monotonic() + self.cfg.agent.shutdown_grace_s
                    if self.store.held:
                        # What only memory holds is lost at exit unless it goes now: no pacing for it.
                        self._pace.lift()
                if self._drained() or time.monotonic() >= deadline:
                    await self._goodbye(client)
                    return
            room = WINDOW - len(self._inflight)
            while room > 0:
                # Live first: the backlog only fills what live traffic leaves of the window, at its pace.
                msg = self._live.next(self.store)
                if msg is None:
                    if self._replay.done or room <= LIVE_RESERVE or not self._pace.allows(self._loop):
                        break
                    msg = self._replay.next(self.store)
                    if msg is None:
                        if self._replay.done:
                            log.info("mqtt_replay_done")
                        break
                self._send(client, msg)
                room -= 1
                if self._lost.is_set():
                    return
            if deadline is None:
                await self._wake.wait()
            else:
                await wait_event(self._wake, max(0.01, min(0.1, deadline - time.monotonic())))

    async def _goodbye(self, client: paho.Client) -> None:
        """The clean stop: the retained offline state (the Will is not sent on a normal disconnect)."""
        infos = []
        if "edge-agent" in self.profiles:
            infos.append(client.publish(self.topics.state, message_bytes(self._offline()), qos=1, retain=True))
        with contextlib.suppress(Exception):
            async with asyncio.timeout(3.0):
                await asyncio.gather(*(asyncio.to_thread(i.wait_for_publish, 2.0) for i in infos))
        self._handle_acks()
        self._flush_deletes()
        if not self._drained():
            log.warning("mqtt_stopped_with_backlog", messages=self.store.depth, held_in_memory=self.store.held)
        log.info("mqtt_disconnected_cleanly")

    def _send(self, client: paho.Client, msg: StoredMessage) -> None:
        historical = msg.id <= self._replay_upto
        if sparkplug.is_sparkplug(msg.topic):
            # Left from a run with the Sparkplug profile on (not sent without its edge node): let it go.
            self.store.delete([msg.id])
            return
        payload = msg.payload[:-1] + HISTORICAL if historical and msg.payload.endswith(b"}") else msg.payload
        info = client.publish(msg.topic, payload, qos=msg.qos, retain=msg.retain and not historical)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            # Not connected any more: the message stays stored and goes out after the reconnect.
            self.lose(f"publish failed: {paho.error_string(info.rc)}")
            return
        if historical:
            metrics.MQTT_REPLAYED.inc()
        if msg.response_topic:
            props = Properties(PacketTypes.PUBLISH)
            if msg.correlation is not None:
                props.CorrelationData = msg.correlation
            client.publish(msg.response_topic, payload, qos=1, retain=False, properties=props)
        if msg.qos == 0:
            self._done([msg])
        else:
            self._inflight[info.mid] = msg
            self._rtt.sent(info.mid)

    def _handle_acks(self) -> None:
        self._ack_signalled = False
        done = []
        while self._acks:
            mid = self._acks.popleft()
            msg = self._inflight.pop(mid, None)
            self._rtt.acked(mid)
            if msg is not None:
                done.append(msg)
        if done:
            self._done(done)

    def _done(self, msgs: list[StoredMessage]) -> None:
        # Deleted in batches: a message acknowledged but not yet deleted is at worst sent twice after a crash.
        if not self._to_delete and self._delete_timer is None and self._loop is not None:
            self._delete_timer = self._loop.call_later(DELETE_DELAY_S, self._flush_deletes)
        kinds: dict[str, int] = {}
        for m in msgs:
            self._to_delete.append(m.id)
            kinds[m.kind] = kinds.get(m.kind, 0) + 1
        for kind, n in kinds.items():
            metrics.MQTT_PUBLISHED.labels(kind).inc(n)
        if len(self._to_delete) >= DELETE_BATCH:
            self._flush_deletes()

    def _flush_deletes(self) -> None:
        if self._delete_timer is not None:
            self._delete_timer.cancel()
            self._delete_timer = None
        if self._to_delete:
            ids, self._to_delete = self._to_delete, []
            self.store.delete(ids)

    def equipment_changed(self, cfg: AgentConfig) -> None:
        """A reload changed the equipment (not `[mqtt]`): the UNS metadata follows at once; that of a tag or
        equipment no longer configured is cleared (an empty retained message)."""
        old, self.cfg = self.cfg, cfg
        if "uns" in self.profiles and self._client is not None and self.connected:
            before = {topic for topic, _ in uns.metadata(old)}
            now = uns.metadata(cfg)
            for topic in before - {topic for topic, _ in now}:
                self._client.publish(topic, b"", qos=1, retain=True)
            for topic, meta in now:
                self._client.publish(topic, message_bytes(meta), qos=1, retain=True)

    def publish_direct(self, topic: str, payload: dict[str, Any], retain: bool = False) -> None:
        """Publish outside the store (birth on rebirth); a no-op while disconnected."""
        if self._client is not None and self.connected:
            self._client.publish(topic, message_bytes(payload), qos=1, retain=retain)

    def rebirth(self) -> None:
        """Republish the birth (the caller republishes the statuses)."""
        self.publish_direct(self.topics.state, self.birth(), retain=True)
