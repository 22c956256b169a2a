"""The Sparkplug B edge node's part of its connection (`sink`): the Will, births, the stored stream encoded
as it is sent (QoS 0, never retained, as the specification requires), NCMD, DCMD, the primary host's
STATE, and the rolling history window: a sent message stays stored for `history_window_s` (default 2.5x
the keep-alive), so that after a connection that died silently it is replayed, as historical, behind the
new births."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

import paho.mqtt.client as paho
import structlog

from agent import sparkplug
from agent.config import AgentConfig
from agent.northbound.fanout import ProfileSink
from agent.sparkplug.commands import DeviceCommands, Execute
from agent.sparkplug.host import PrimaryHost
from agent.sparkplug.node import SparkplugNode
from agent.store import StoredMessage

log = structlog.get_logger("edge_agent.sparkplug")


class SparkplugLink:
    """The edge node's session logic on one connection (the connection itself: `SparkplugSink`)."""

    def __init__(
        self,
        cfg: AgentConfig,
        data: ProfileSink,
        version: str,
        execute: Execute | None = None,
        done: Callable[[list[StoredMessage]], None] | None = None,
    ) -> None:
        """`execute` runs DCMD writes (the command router's); `done` takes what the window lets go."""
        self.cfg = cfg
        self.node = SparkplugNode(cfg, data, version)
        enabled = cfg.mqtt.sparkplug.dcmd_enabled and execute is not None
        self.dcmd = DeviceCommands(cfg, self.node.aliases, execute) if enabled and execute else None
        s = cfg.mqtt.sparkplug
        # paho notices a silent death at most two keep-alives after the last packet in: the window outlasts it,
        # and stops with the session (`session_ended`), so an outage of any length loses nothing.
        self.window_s = s.history_window_s if s.history_window_s is not None else 2.5 * cfg.mqtt.keepalive_s
        self._sent: collections.deque[tuple[float, StoredMessage]] = collections.deque()
        self._kept = data.store.kept  # the same ids, for the store's figures (it forgets what it deletes)
        self._timer: asyncio.TimerHandle | None = None
        self._done = done
        self.host = PrimaryHost(s.primary_host_id)

    def will(self) -> tuple[str, bytes]:
        """The NDEATH of the next connection (bdSeq counted and persisted)."""
        return self.node.new_session()

    def connected(self, client: paho.Client) -> bool:
        """After CONNACK: a new window (what the old one held is in the replay), commands, and the births
        unless a primary host is awaited; whether the node was born."""
        self.session_ended()  # normally done when the last session ended; a new window either way
        self.host.reset()
        subscriptions = [(sparkplug.topic(self.cfg, "NCMD"), 1)]
        if self.dcmd is not None:
            subscriptions.append((sparkplug.topic(self.cfg, "DCMD", "+"), 1))
        if self.host.topic is not None:
            subscriptions.append((self.host.topic, 1))
        client.subscribe(subscriptions)
        if self.host.online:
            self.birth(client)
        return self.host.online

    def birth(self, client: paho.Client) -> None:
        """NBIRTH and every DBIRTH (also on a rebirth request)."""
        for topic, data in self.node.births():
            client.publish(topic, data, qos=0, retain=False)
        log.info("sparkplug_born", bdseq=self.node.bdseq, devices=len(self.cfg.equipment))

    def on_message(self, client: paho.Client, topic: str, data: bytes) -> bool | None:
        """A message on a subscribed topic (NCMD, DCMD, the host's STATE), on the event loop; the primary
        host's new online flag when it changed (born on True: the caller sends what waited, as historical)."""
        dcmd = sparkplug.topic(self.cfg, "DCMD", "")
        if topic == self.host.topic:
            online = self.host.update(data)
            if online and client.is_connected():
                self.birth(client)
            return online
        if self.dcmd is not None and topic.startswith(dcmd) and "/" not in topic[len(dcmd) :]:
            self.dcmd.handle(topic[len(dcmd) :], data)
        elif client.is_connected() and self.host.online and self.node.command(topic, data):
            self.birth(client)
        return None

    def send(self, client: paho.Client, msg: StoredMessage, historical: bool) -> int:
        """Publish a stored message (the node is born); it stays stored in the window. Returns paho's
        result code."""
        rc = paho.MQTT_ERR_SUCCESS
        for topic, data in self.node.encode(msg, historical):
            rc = client.publish(topic, data, qos=0, retain=False).rc
        self._sent.append((time.monotonic(), msg))
        self._kept.add(msg.id)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.window_s, self._expire)
        return rc

    def _expire(self) -> None:
        self._timer = None
        gone = self.expired(time.monotonic())
        if gone and self._done is not None:
            self._done(gone)
        due = self.next_expiry()
        if due is not None:
            self._timer = asyncio.get_running_loop().call_later(max(0.05, due - time.monotonic()), self._expire)

    @property
    def held(self) -> int:
        """Messages sent and kept in the store for the window."""
        return len(self._sent)

    def expired(self, now: float) -> list[StoredMessage]:
        """Messages whose window is over: they can leave the store."""
        out = []
        while self._sent and now - self._sent[0][0] >= self.window_s:
            out.append(self._sent.popleft()[1])
        return out

    def next_expiry(self) -> float | None:
        """When the oldest held message's window ends (monotonic), if any is held."""
        return self._sent[0][0] + self.window_s if self._sent else None

    def session_ended(self) -> list[StoredMessage]:
        """The connection is gone: the window stops (what it holds stays stored, for the next births' replay,
        however long the outage); returns what it held."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held = [m for _, m in self._sent]
        self._sent.clear()
        self._kept.difference_update(m.id for m in held)  # not sent any more as far as the store knows: waiting
        return held

    def goodbye(self, client: paho.Client) -> paho.MQTTMessageInfo:
        """The clean stop: the NDEATH the Will would have been."""
        topic, data = self.node.death()
        return client.publish(topic, data, qos=1, retain=False)
