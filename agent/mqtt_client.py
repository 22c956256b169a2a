"""The paho client for one connection: built fresh per connection (credentials, TLS, the will, paho's own
queue switched off so the store stays the only source of truth), what a received message becomes, and
how the client is put away."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import AgentConfig


@dataclass(slots=True)
class Incoming:
    """A message received on a subscribed topic."""

    topic: str
    payload: bytes
    retain: bool
    response_topic: str | None
    correlation: bytes | None
    expiry_s: int | None
    received_at: float


def new_client(cfg: AgentConfig, will: tuple[str, bytes, bool] | None, *, client_id: str) -> paho.Client:
    """A paho client for the configured broker with its Will (topic, payload, retained; QoS 1), if any;
    no callbacks yet."""
    m = cfg.mqtt
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5,
    )
    if m.username:
        client.username_pw_set(m.username, m.secret("password"))
    if m.tls:
        ctx = ssl.create_default_context(cafile=str(m.ca_file) if m.ca_file else None)
        if m.cert_file:
            ctx.load_cert_chain(str(m.cert_file), str(m.key_file) if m.key_file else None)
        client.tls_set_context(ctx)
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=will[2])
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    return client


def incoming(msg: paho.MQTTMessage) -> Incoming:
    """What a message paho received is handed over to the event loop as."""
    props = getattr(msg, "properties", None)
    return Incoming(
        topic=msg.topic,
        payload=bytes(msg.payload),
        retain=bool(msg.retain),
        response_topic=getattr(props, "ResponseTopic", None) if props else None,
        correlation=getattr(props, "CorrelationData", None) if props else None,
        expiry_s=getattr(props, "MessageExpiryInterval", None) if props else None,
        received_at=time.time(),
    )


async def close_client(client: paho.Client | None) -> None:
    """Disconnect, stop paho's network thread, and close a socket paho left open (None: nothing to do)."""
    if client is None:
        return
    with contextlib.suppress(Exception):
        client.disconnect()
    await asyncio.to_thread(client.loop_stop)
    with contextlib.suppress(Exception):
        # A socket paho did not close itself (connect failed before the loop started).
        sock = client.socket()
        if sock is not None:
            sock.close()
