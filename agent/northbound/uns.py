"""The Unified Namespace profile: `<location>/<equipment>/<class>/<tag>`, one JSON message per value.

`location` is the equipment's place in the plant ("enterprise/site/area/line/cell", default the site).
Classes: `telemetry/<tag>` (`{value, timestamp, quality, unit}`), `status` (retained), `alerts/<tag>`,
`quality`, and `metadata/<tag>` (retained, published on every connect from the config).
"""

from __future__ import annotations

import json
from typing import Any

from agent.config import AgentConfig, EquipmentConfig
from agent.store_rows import Encoded


def base(cfg: AgentConfig, eq: EquipmentConfig) -> str:
    """`<location>/<equipment>`: the equipment's root in the namespace."""
    return f"{eq.location or cfg.agent.site}/{eq.id}"


def _text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def values(root: str, telemetry: dict[str, Any], qos: int) -> list[Encoded]:
    """One message per value of an edge-agent telemetry message."""
    out = []
    for v in telemetry.get("values", ()):
        body = (
            f'{{"value":{_text(v.get("value"))},"timestamp":{_text(v.get("ts"))},'
            f'"quality":{_text(v.get("quality"))},"unit":{_text(v.get("unit"))}'
        )
        out.append(("telemetry", f"{root}/telemetry/{v.get('tag')}", body, qos, False))
    return out


def message(root: str, kind: str, payload: dict[str, Any]) -> tuple[str, dict[str, Any], bool] | None:
    """(topic, payload, retained) in the namespace of a status, alert or quality message; None for others."""
    if kind == "status":
        return f"{root}/status", dict(payload), True
    if kind == "alert":
        return f"{root}/alerts/{payload.get('tag')}", dict(payload), False
    if kind == "quality":
        return f"{root}/quality", dict(payload), False
    return None


def metadata(cfg: AgentConfig) -> list[tuple[str, dict[str, Any]]]:
    """The retained metadata message of every configured tag, published on every connect."""
    out = []
    for eq in cfg.equipment:
        root = base(cfg, eq)
        for tag in eq.tags:
            meta = {
                "equipment_id": eq.id,
                "equipment_name": eq.name,
                "equipment_type": eq.type,
                "location": eq.location or cfg.agent.site,
                "tag": tag.name,
                "unit": getattr(tag, "unit", None),
                "deadband": getattr(tag, "deadband", None),
                "topic": f"{root}/telemetry/{tag.name}",
            }
            out.append((f"{root}/metadata/{tag.name}", meta))
    return out
