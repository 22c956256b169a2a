"""What the profiles beside today's contract publish after every connect."""

from __future__ import annotations

import paho.mqtt.client as paho

from agent.config import AgentConfig
from agent.northbound import uns
from agent.sparkplug.link import SparkplugLink
from drivers.sdk.jsonio import message_bytes


def profile_births(client: paho.Client, cfg: AgentConfig, spb: SparkplugLink | None) -> None:
    """The Sparkplug births (and its command subscription), then every UNS tag's retained metadata."""
    if spb is not None:
        spb.connected(client)
    if "uns" in cfg.mqtt.profiles:
        for topic, meta in uns.metadata(cfg):
            client.publish(topic, message_bytes(meta), qos=1, retain=True)
