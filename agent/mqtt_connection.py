"""One broker connection kept up: a fresh paho client per attempt (its Will set before the connect), the
CONNACK awaited, a lost link noticed, and reconnects with the one backoff policy until the stop. What runs
on a live connection is the subclass's (`MqttSink`: today's contract and UNS; `SparkplugSink`: the edge
node, on a connection of its own because MQTT gives a connection only one Will)."""

from __future__ import annotations

import abc
import asyncio
import ssl
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import AgentConfig
from agent.mqtt_client import close_client, new_client
from agent.reconnect import Backoff, Transitions, describe
from agent.store import Store
from agent.waits import wait_event

Will = tuple[str, bytes, bool]  # topic, payload, retained (always QoS 1)


class BrokerConnection(abc.ABC):
    """The life cycle of one MQTT connection; subclasses say what it carries."""

    def __init__(self, cfg: AgentConfig, store: Store, log: Any, name: str, client_id: str) -> None:
        self.cfg = cfg
        self.store = store
        self.log = log
        self.client_id = client_id
        self.connected = False
        self.down_since: float | None = time.monotonic()
        self.last_error: str | None = None
        self.transitions = Transitions(log, name)
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: paho.Client | None = None
        self._lost: asyncio.Event | None = None
        self._connack_ok = asyncio.Event()
        self._paho_error: str | None = None
        store.add_listener(self._wake.set)

    # -- what a subclass provides

    @abc.abstractmethod
    def will(self) -> Will | None:
        """The Will of the next connection (None: none)."""

    @abc.abstractmethod
    async def connected_session(self, client: paho.Client, stop: asyncio.Event) -> None:
        """After CONNACK: births, subscriptions, then send until the link is lost or `stop` (drained)."""

    @abc.abstractmethod
    def on_incoming(self, client: paho.Client, msg: paho.MQTTMessage) -> None:
        """A message on a subscribed topic, in paho's network thread: hand it to the event loop."""

    @abc.abstractmethod
    def on_acked(self, mid: int) -> None:
        """A PUBACK, in paho's network thread."""

    # -- paho callbacks (paho's network thread): hand over to the event loop only

    def _cb_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._connack, client, rc)

    def _cb_disconnect(self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        # Stop paho's own reconnect loop: this class reconnects with a fresh client, by its own policy.
        client.loop_stop()
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._link_lost, client, str(rc))

    def _cb_publish(self, client: paho.Client, userdata: Any, mid: int, rc: ReasonCode, props: Any) -> None:
        if client is self._client:
            self.on_acked(mid)

    def _cb_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self.on_incoming(client, msg)

    def _cb_log(self, client: paho.Client, userdata: Any, level: int, text: str) -> None:
        # paho reports the socket or TLS error behind a lost connection only in its log.
        if level in (paho.MQTT_LOG_ERR, paho.MQTT_LOG_WARNING) and client is self._client:
            self._paho_error = text

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

    def lose(self, reason: str) -> None:
        """End the current connection on purpose (a failed publish, the primary host gone); it reconnects."""
        self.last_error = self.last_error or reason
        if self._lost is not None:
            self._lost.set()
        self._wake.set()

    def _make_client(self) -> paho.Client:
        client = new_client(self.cfg, self.will(), client_id=self.client_id)
        client.on_connect = self._cb_connect
        client.on_disconnect = self._cb_disconnect
        client.on_publish = self._cb_publish
        client.on_message = self._cb_message
        client.on_log = self._cb_log
        return client

    def request_stop(self) -> None:
        """Drain within the grace period, say goodbye, disconnect; `run` then returns."""
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        """Connect, carry, reconnect with backoff until `request_stop`."""
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
                m = self.cfg.mqtt
                self.transitions.mark_down(self.last_error or "disconnected", broker=f"{m.host}:{m.port}")
                delay = backoff.next()
                self.log.debug("mqtt_attempt_failed", error=self.last_error, retry_in_s=round(delay, 2))
                await wait_event(stop, delay)
        finally:
            # A connection replaced on reload must not be woken by every later append.
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
        self.connected = True
        self.down_since = None
        self.transitions.mark_up(broker=f"{m.host}:{m.port}")
        try:
            await self.connected_session(client, stop)
        finally:
            self.connected = False
            self.down_since = time.monotonic()

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        await close_client(client)
