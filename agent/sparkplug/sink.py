"""The Sparkplug B edge node's own broker connection. MQTT gives a connection one Will: this one's is the
NDEATH (the specification's), the other connection's stays the contract's offline `R/state`, so an
unclean death leaves both behind.

It sends the store's Sparkplug messages (and only those) once the node is born: at the connect, or when
the primary host comes online. What the store held at that moment is replayed behind the births as
historical, paced by `replay_max_per_s`; then live data. A primary host going offline ends the session
(NDEATH, disconnect) and a new one waits for it; meanwhile data stays in the store, bounded as every
queued message is (`buffer_max_messages`)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import paho.mqtt.client as paho
import structlog

from agent import metrics, sparkplug
from agent.config import AgentConfig
from agent.mqtt_connection import BrokerConnection, Will
from agent.mqtt_streams import FETCH, ReplayPace, Stream
from agent.northbound.fanout import ProfileSink
from agent.sparkplug.commands import Execute
from agent.sparkplug.link import SparkplugLink
from agent.store import Lane, Store, StoredMessage
from agent.waits import wait_event

log = structlog.get_logger("edge_agent.sparkplug")

SPARKPLUG = Lane(sparkplug.NAMESPACE + "/", inside=True)


def client_id(cfg: AgentConfig) -> str:
    """The edge node connection's MQTT client id: configured, or the agent's with `-sparkplug`."""
    return cfg.mqtt.sparkplug.client_id or f"{cfg.client_id}-sparkplug"


class SparkplugSink(BrokerConnection):
    """The edge node's connection: births, the stored Sparkplug stream, commands, the primary host."""

    def __init__(
        self, cfg: AgentConfig, store: Store, data: ProfileSink, version: str, execute: Execute | None = None
    ) -> None:
        super().__init__(cfg, store, log, "sparkplug", client_id(cfg))
        self.link = SparkplugLink(cfg, data, version, execute, self._expired)
        self.born = False
        self._ending = False  # the clean stop's NDEATH went out: the session takes nothing more
        self._live = Stream(SPARKPLUG)
        self._replay = Stream(SPARKPLUG)
        self._replay_upto = 0
        self._pace = ReplayPace(self._wake.set)

    @property
    def waiting_for_host(self) -> bool:
        """Connected, not born: the primary host is not online."""
        return self.connected and not self.born

    def will(self) -> Will:
        """The NDEATH of the next session (bdSeq counted and persisted), not retained."""
        topic, data = self.link.will()
        return topic, data, False

    def on_acked(self, mid: int) -> None:
        """Only the clean stop's NDEATH is QoS 1 (its wait is on the message info): nothing to track."""

    def on_incoming(self, client: paho.Client, msg: paho.MQTTMessage) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._incoming, client, msg.topic, bytes(msg.payload))

    def _incoming(self, client: paho.Client, topic: str, data: bytes) -> None:
        if client is not self._client or self._lost is None or self._lost.is_set() or self._ending:
            return  # a session that is ending: nothing more goes out on it (no births after its NDEATH)
        online = self.link.on_message(client, topic, data)
        if online is True and not self.born:
            self._born()
        elif online is False and self.born:
            # The specification's answer to a host gone: end this session and wait for it in a new one.
            self.born = False
            metrics.SPARKPLUG_BORN.set(0)
            client.publish(*self.link.node.death(), qos=1, retain=False)
            self.lose(f"primary host {self.link.host.host_id} offline")

    def _born(self) -> None:
        """Births went out: what the store holds now follows as historical, then live data."""
        self.born = True
        metrics.SPARKPLUG_BORN.set(1)
        self._replay_upto = self.store.max_id()
        self._replay.reset(0, self._replay_upto)
        self._live.reset(self._replay_upto, None)
        rate = self.cfg.mqtt.replay_max_per_s
        self._pace.start(rate if self._replay_upto else 0.0)
        self._wake.set()

    async def connected_session(self, client: paho.Client, stop: asyncio.Event) -> None:
        self.born = False
        self._ending = False
        if self.link.connected(client):
            self._born()
        try:
            await self._pump(client, stop)
        finally:
            self._pace.stop()
            self.born = False
            metrics.SPARKPLUG_BORN.set(0)
            # The window stops with the session: what it holds stays stored and is replayed after the next births.
            self.link.session_ended()

    def _drained(self) -> bool:
        return self._replay.done and not self._live.pending(self.store)

    async def _pump(self, client: paho.Client, stop: asyncio.Event) -> None:
        assert self._lost is not None
        deadline: float | None = None
        while not self._lost.is_set():
            self._wake.clear()
            if stop.is_set():
                if deadline is None:
                    deadline = time.monotonic() + self.cfg.agent.shutdown_grace_s
                    if self.store.held:
                        # What only memory holds is lost at exit unless it goes now: no pacing for it.
                        self._pace.lift()
                if not self.born or self._drained() or time.monotonic() >= deadline:
                    await self._goodbye(client)
                    return
            sent = 0
            while self.born and sent < FETCH:
                msg = self._live.next(self.store)
                historical = False
                if msg is None:
                    if self._replay.done or not self._pace.allows(self._loop):
                        break
                    msg = self._replay.next(self.store)
                    if msg is None:
                        break
                    historical = True
                if self.link.send(client, msg, historical) != paho.MQTT_ERR_SUCCESS:
                    self.lose("publish failed: not connected")
                    return
                sent += 1
            if sent >= FETCH:
                await asyncio.sleep(0)  # more to send: let the rest of the daemon run in between
                continue
            if deadline is None:
                await self._wake.wait()
            else:
                await wait_event(self._wake, max(0.01, min(0.1, deadline - time.monotonic())))

    async def _goodbye(self, client: paho.Client) -> None:
        """The clean stop: the NDEATH the Will would have been (a Will is not sent on a normal disconnect)."""
        self._ending = True
        info = self.link.goodbye(client)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(3.0):
                await asyncio.to_thread(info.wait_for_publish, 2.0)
        kept = self.link.held
        # paho raises on a message that never went out (the link was already gone): then nothing is known.
        if info.rc == paho.MQTT_ERR_SUCCESS and info.is_published():
            # The broker acknowledged the NDEATH: what went out before it on the same connection reached it.
            delivered = self.link.session_ended()
            self._expired(delivered)
            kept = 0
        log.info("sparkplug_disconnected_cleanly", kept_for_the_window=kept)

    def _expired(self, msgs: list[StoredMessage]) -> None:
        """Messages whose window is over leave the store."""
        self.store.delete([m.id for m in msgs])
