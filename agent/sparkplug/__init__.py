"""The Sparkplug B 3.0 edge node: the agent is the edge node, each equipment a device.

`payload` encodes with the generated protobuf schema (`sparkplug_b.proto`), `node` keeps the node's
session (bdSeq, seq, aliases, births, commands) and `link` plugs it into the MQTT sink.
"""

from __future__ import annotations

from typing import Any

from agent.config import SPARKPLUG_NAMESPACE as NAMESPACE

__all__ = ["NAMESPACE", "STATUS_FIELDS", "declared", "group_id", "is_sparkplug", "topic"]

# The equipment status fields a device carries as `Status/<field>` metrics.
STATUS_FIELDS = ("status", "current_operation", "progress", "error_message", "process_id")


def group_id(cfg: Any) -> str:
    """The configured group, by default the agent's site (`cfg` is an `AgentConfig`)."""
    return str(cfg.mqtt.sparkplug.group_id or cfg.agent.site)


def topic(cfg: Any, message_type: str, device: str | None = None) -> str:
    """`spBv1.0/<group>/<type>/<edge node>[/<device>]`; the edge node id is the agent id."""
    head = f"{NAMESPACE}/{group_id(cfg)}/{message_type}/{cfg.agent.id}"
    return head if device is None else f"{head}/{device}"


def is_sparkplug(topic_name: str) -> bool:
    """Whether a stored message belongs to the Sparkplug stream."""
    return topic_name.startswith(NAMESPACE + "/")


def declared(cfg: Any) -> list[tuple[str, list[tuple[str, Any]]]]:
    """What the births declare of the config: each device and its metrics (tag and unit)."""
    return [(eq.id, [(t.name, getattr(t, "unit", None)) for t in eq.tags]) for eq in cfg.equipment]
