"""The contract's MQTT topic tree under the root `R = {topic_prefix}/{site}/{agent_id}`, and the payloads of
`R/state` (birth, offline): the one place that spells them."""

from __future__ import annotations

from typing import Any


class Topics:
    """Topic names for one agent."""

    def __init__(self, prefix: str, site: str, agent_id: str) -> None:
        self.root = f"{prefix}/{site}/{agent_id}"
        self.state = f"{self.root}/state"
        self.rebirth = f"{self.root}/cmd/rebirth"
        self.commands = f"{self.root}/equipment/+/cmd/+"

    def equipment(self, eid: str, leaf: str) -> str:
        """`R/equipment/{eid}/{leaf}` (status, telemetry, alerts, quality)."""
        return f"{self.root}/equipment/{eid}/{leaf}"

    def command_result(self, eid: str, command: str) -> str:
        """Where the result of a command goes."""
        return f"{self.root}/equipment/{eid}/cmd/{command}/result"

    def parse_command(self, topic: str) -> tuple[str, str] | None:
        """(equipment id, command) of a command request topic, or None."""
        if not topic.startswith(self.root + "/"):
            return None
        parts = topic[len(self.root) + 1 :].split("/")
        if len(parts) != 4 or parts[0] != "equipment" or parts[2] != "cmd" or not parts[1] or not parts[3]:
            return None
        return parts[1], parts[3]

    def owns(self, topic: str) -> bool:
        """Whether `topic` is the root or under it."""
        return topic == self.root or topic.startswith(self.root + "/")


def birth(agent_id: str, site: str, version: str, started_at: str, session: str) -> dict[str, Any]:
    """The retained `R/state` birth."""
    return {
        "online": True,
        "agent_id": agent_id,
        "site": site,
        "version": version,
        "started_at": started_at,
        "session": session,
    }


def offline(agent_id: str, site: str, session: str) -> dict[str, Any]:
    """The retained `R/state` of an agent gone: the Last Will and the clean stop."""
    return {"online": False, "agent_id": agent_id, "site": site, "session": session}


def topics_for(cfg: Any) -> Topics:
    """The topics of a loaded config (an `AgentConfig`)."""
    return Topics(cfg.mqtt.topic_prefix, cfg.agent.site, cfg.agent.id)
