"""The MQTT sink (paho-mqtt, MQTT 5): sends what the durable store holds, in order, and takes commands.

Each connection uses a fresh paho client so that paho never re-sends from its own queue: the store is
the only source of truth. A message leaves the store only on its PUBACK. On every (re)connect: the birth,
then every current status, then live traffic, always ahead of what waited in the store; that backlog is
replayed behind it in order, marked `is_historical`, never retained, paced by `replay_max_per_s`
(the two streams and the pace: `mqtt_streams`; the paho client itself: `mqtt_client`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent import metrics, topics
from agent.config import AgentConfig
from agent.mqtt_client import Incoming, close_client, incoming, new_client
from agent.mqtt_streams import FETCH, AckProbe, ReplayPace, Stream
from agent.northbound.connect import profile_births
from agent.northbound.fanout import ProfileSink
from agent.reconnect import Backoff, Transitions, describe
from agent.sparkplug.commands import Execute
from agent.sparkplug.link import SparkplugLink
from agent.store import Store, StoredMessage
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


class MqttSink:
    """Owns the broker connection: birth and will, the store pump, subscriptions."""

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
        northbound: ProfileSink | None = None,
        execute: Execute | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.session = session
        self.version = version
        self.started_at = started_at
        self._on_connected = on_connected
        self._on_message = on_message
        self.topics = topics_for(cfg)
        self.connected = False
        self.down_since: float | None = time.monotonic()
        self.last_error: str | None = None
        self._wake = asyncio.Event()
        self._acks: collections.deque[int] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: paho.Client | None = None
        self._lost: asyncio.Event | None = None
        self._inflight: dict[int, StoredMessage] = {}
        self._rtt = AckProbe()
        # Two streams read ahead from the store: live (newer than the connect) and the replayed backlog.
        self._live = Stream()
        self._replay = Stream()
        self._replay_upto = 0  # the backlog is every stored message up to this id at the connect
        self._pace = ReplayPace(self._wake.set)
        self._stop = asyncio.Event()
        self._ack_signalled = False
        self._paho_error: str | None = None
        self._to_delete: list[int] = []
        self._delete_timer: asyncio.TimerHandle | None = None
        self._connack_ok = asyncio.Event()
        self.transitions = Transitions(log, "mqtt")
        # The profiles beside today's contract (`[mqtt] profiles`): the Sparkplug edge node's part of the link.
        self.profiles = cfg.mqtt.profiles
        on = northbound is not None and "sparkplug" in self.profiles
        self._spb = SparkplugLink(cfg, northbound, version, execute, self._done) if on and northbound else None
        store.add_listener(self._wake.set)

    # -- paho callbacks (paho's network thread): hand over to the event loop only

    def _cb_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._connack, client, rc)

    def _cb_disconnect(self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        # Stop paho's own reconnect loop: the supervisor's policy reconnects with a fresh client.
        client.loop_stop()
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._link_lost, client, str(rc))

    def _cb_publish(self, client: paho.Client, userdata: Any, mid: int, rc: ReasonCode, props: Any) -> None:
        if client is self._client:
            self._acks.append(mid)
            # One wake-up per batch of acks, not one per ack: the loop drains the whole deque.
            if not self._ack_signalled:
                self._ack_signalled = True
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._wake.set)

    def _cb_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        received = incoming(msg)
        assert self._loop is not None
        if self._spb is not None and self._spb.owns(received.topic):
            self._loop.call_soon_threadsafe(self._spb.on_message, client, received.topic, received.payload)
        else:
            self._loop.call_soon_threadsafe(self._on_message, received)

    # -- event-loop side

    def _connack(self, client: paho.Client, rc: ReasonCode) -> None:
        if client is not self._client or self._lost is None:
            return
        if rc.is_failure:
            self.last_error = f"broker refused the connection: {rc}"
            self._lost.set()
        else:
            self._connack_ok.set()

    def _link_lost(self, client: paho.Client, reason: str) -> None:
        if client is not self._client or self._lost is None:
            return
        detail = self._paho_error or reason
        if self._connack_ok.is_set():
            self.last_error = self.last_error or f"connection lost: {detail}"
        else:
            hint = ""
            if self.cfg.mqtt.tls and not self.cfg.mqtt.cert_file:
                hint = " (the broker may require a client certificate; none is configured)"
            self.last_error = self.last_error or f"the broker closed the connection before accepting it: {detail}{hint}"
        self._lost.set()
        self._wake.set()

    def _make_client(self) -> paho.Client:
        # One Will per connection: with the Sparkplug profile it is the NDEATH, as the specification requires.
        will = self._spb.will() if self._spb is not None else (self.topics.state, message_bytes(self._offline()))
        client = new_client(self.cfg, *will, retain=self._spb is None)
        client.on_connect = self._cb_connect
        client.on_disconnect = self._cb_disconnect
        client.on_publish = self._cb_publish
        client.on_message = self._cb_message
        client.on_log = self._cb_log
        return client

    def _cb_log(self, client: paho.Client, userdata: Any, level: int, text: str) -> None:
        # paho reports the socket or TLS error behind a lost connection only in its log.
        if level in (paho.MQTT_LOG_ERR, paho.MQTT_LOG_WARNING) and client is self._client:
            self._paho_error = text

    def birth(self) -> dict[str, Any]:
        """The retained `R/state` birth payload."""
        a = self.cfg.agent
        return topics.birth(a.id, a.site, self.version, self.started_at, self.session)

    def _offline(self) -> dict[str, Any]:
        return topics.offline(self.cfg.agent.id, self.cfg.agent.site, self.session)

    def request_stop(self) -> None:
        """Drain within the grace period, publish the offline state, disconnect; `run` then returns."""
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        """Connect, pump, reconnect with backoff until `request_stop`."""
        self._loop = asyncio.get_running_loop()
        stop = self._stop
        backoff = Backoff(self.cfg.agent.reconnect_max_s)
        try:
            while not stop.is_set():
                try:
                    await self._session(stop)
                    backoff.reset()
                except (OSError, TimeoutError, ConnectionError, ssl.SSLError) as err:
                    self.last_error = describe(err)
                finally:
                    await self._close_client()
                if stop.is_set():
                    break
                self.transitions.mark_down(
                    self.last_error or "disconnected", broker=f"{self.cfg.mqtt.host}:{self.cfg.mqtt.port}"
                )
                delay = backoff.next()
                log.debug("mqtt_attempt_failed", error=self.last_error, retry_in_s=round(delay, 2))
                await wait_event(stop, delay)
        finally:
            # A sink replaced on reload must not be woken by every later append.
            self.store.remove_listener(self._wake.set)

    async def _session(self, stop: asyncio.Event) -> None:
        m = self.cfg.mqtt
        client = self._make_client()
        self._client = client
        self._lost = asyncio.Event()
        self._connack_ok = asyncio.Event()
        self.last_error = None
        self._paho_error = None
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0
        async with asyncio.timeout(max(10.0, m.keepalive_s)):
            await asyncio.to_thread(client.connect, m.host, m.port, m.keepalive_s, clean_start=True, properties=props)
        client.loop_start()
        waiter = asyncio.create_task(self._connack_ok.wait())
        lost = asyncio.create_task(self._lost.wait())
        try:
            await asyncio.wait({waiter, lost}, timeout=max(10.0, m.keepalive_s), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            lost.cancel()
        if not self._connack_ok.is_set():
            raise ConnectionError(self.last_error or "no CONNACK from the broker")
        # Connected: birth, backlog (historical), current statuses, then live.
        self.connected = True
        self.down_since = None
        metrics.MQTT_CONNECTED.set(1)
        metrics.MQTT_CONNECTS.inc()
        self.transitions.mark_up(broker=f"{m.host}:{m.port}")
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
        # Each profile's birth: today's retained state, the Sparkplug births, the UNS metadata.
        if "edge-agent" in self.profiles:
            client.publish(self.topics.state, message_bytes(self.birth()), qos=1, retain=True)
        profile_births(client, self.cfg, self._spb)
        # retainAsPublished: a request published with retain is recognised (and refused) even when live.
        opts = SubscribeOptions(qos=1, retainAsPublished=True)
        topics = [(self.topics.rebirth, opts)]
        if m.commands_enabled:
            topics.append((self.topics.commands, opts))
        client.subscribe(topics)
        self._on_connected()
        try:
            await self._pump(stop)
        finally:
            self._pace.stop()
            self._handle_acks()
            self._flush_deletes()
            self.connected = False
            self.down_since = time.monotonic()
            metrics.MQTT_CONNECTED.set(0)

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
                windowed = self._spb.held if self._spb is not None else 0
                if (not self._inflight and self.store.depth <= windowed) or time.monotonic() >= deadline:
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
        """The clean stop: the retained offline state, the NDEATH (the will is not sent on a normal disconnect)."""
        infos = [self._spb.goodbye(client)] if self._spb is not None else []
        if "edge-agent" in self.profiles:
            infos.append(client.publish(self.topics.state, message_bytes(self._offline()), qos=1, retain=True))
        with contextlib.suppress(Exception):
            async with asyncio.timeout(3.0):
                await asyncio.gather(*(asyncio.to_thread(i.wait_for_publish, 2.0) for i in infos))
        self._handle_acks()
        self._flush_deletes()
        if self.store.depth:
            log.warning("mqtt_stopped_with_backlog", messages=self.store.depth, held_in_memory=self.store.held)
        log.info("mqtt_disconnected_cleanly")

    def _send(self, client: paho.Client, msg: StoredMessage) -> None:
        historical = msg.id <= self._replay_upto
        if self._spb is not None and self._spb.owns(msg.topic):
            if self._spb.send(client, msg, historical) != paho.MQTT_ERR_SUCCESS:
                assert self._lost is not None
                self.last_error = "publish failed: not connected"
                self._lost.set()
            return
        payload = msg.payload[:-1] + HISTORICAL if historical and msg.payload.endswith(b"}") else msg.payload
        info = client.publish(msg.topic, payload, qos=msg.qos, retain=msg.retain and not historical)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            # Not connected any more: the message stays stored and goes out after the reconnect.
            assert self._lost is not None
            self.last_error = f"publish failed: {paho.error_string(info.rc)}"
            self._lost.set()
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

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        await close_client(client)

    def publish_direct(self, topic: str, payload: dict[str, Any], retain: bool = False) -> None:
        """Publish outside the store (birth on rebirth); a no-op while disconnected."""
        if self._client is not None and self.connected:
            self._client.publish(topic, message_bytes(payload), qos=1, retain=retain)

    def rebirth(self) -> None:
        """Republish the birth (the caller republishes the statuses)."""
        self.publish_direct(self.topics.state, self.birth(), retain=True)
