"""`edge-agent config schema`: the JSON Schema of the whole config (every driver's equipment), for editors."""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Field, create_model

from agent.config import AgentConfig, equipment_variant
from drivers.sdk.registry import builtin_drivers


def schema() -> dict[str, Any]:
    """The JSON Schema: `[[equipment]]` is one of the drivers' models, chosen by its `driver` key."""
    variants = tuple(equipment_variant(d) for d in builtin_drivers())
    item: Any = Annotated[Union[variants], Field(discriminator="driver")] if len(variants) > 1 else variants[0]  # noqa: UP007
    model = create_model(
        "EdgeAgentConfig",
        __base__=AgentConfig,
        equipment=(list[item], Field(default_factory=list)),  # type: ignore[valid-type]
    )
    out = model.model_json_schema(mode="validation")
    items = out["properties"]["equipment"]["items"]
    if "oneOf" in items:
        # Editors and validators ignore OpenAPI's `discriminator`: an if/then per driver names the bad key
        # of the matching driver instead of "not valid under any of the given schemas".
        refs = items["discriminator"]["mapping"]
        out["properties"]["equipment"]["items"] = {
            "type": "object",
            "required": ["driver"],
            "properties": {"driver": {"enum": sorted(refs)}},
            "allOf": [
                {"if": {"properties": {"driver": {"const": d}}}, "then": {"$ref": ref}}
                for d, ref in sorted(refs.items())
            ],
        }
    out["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    out["title"] = "edge-agent configuration (agent.toml)"
    return out
