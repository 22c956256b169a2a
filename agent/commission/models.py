"""The config models by section, read from the core and from every driver through the registry."""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from agent.commission.meanings import MEANINGS
from agent.commission.meanings_drivers import DRIVER_MEANINGS
from agent.config import AgentSection, ApiKey, HttpSection, MpmSection, MqttSection
from drivers.sdk.config import AlertConfig, EquipmentBase, StatusConfig
from drivers.sdk.registry import builtin_drivers, get_driver

CORE_SECTIONS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("[agent]", AgentSection),
    ("[mqtt]", MqttSection),
    ("[mpm]", MpmSection),
    ("[http]", HttpSection),
    ("[[http.api_keys]]", ApiKey),
    ("[[equipment]]", EquipmentBase),
    ("[equipment.status]", StatusConfig),
    ("[[equipment.alerts]]", AlertConfig),
)

#: Units read from a key's suffix; a key without one of these has no unit.
UNITS = (
    ("_per_minute", "1/min"),
    ("_per_s", "1/s"),
    ("_ms", "ms"),
    ("_s", "s"),
    ("_bytes", "bytes"),
    ("_temp", "degC"),
    ("baudrate", "bit/s"),
)


@dataclass(frozen=True)
class Key:
    """One documented config key."""

    section: str
    name: str
    type: str
    default: str
    unit: str
    meaning: str


def driver_sections(driver: str) -> tuple[tuple[str, type[BaseModel]], ...]:
    """(table, model) of a driver's connection, tags and commands."""
    cls = get_driver(driver)
    return (
        ("[equipment.connection]", cls.connection_model),
        ("[[equipment.tags]]", cls.tag_model),
        ("[[equipment.commands]]", cls.command_model),
    )


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models_in(a)]


def _with_nested(
    driver: str | None, sections: tuple[tuple[str, type[BaseModel]], ...], listed: set[type[BaseModel]]
) -> list[tuple[str | None, str, type[BaseModel]]]:
    """The sections and, after each, the tables nested in it that are not listed on their own."""
    out: list[tuple[str | None, str, type[BaseModel]]] = []
    for table, model in sections:
        out.append((driver, table, model))
        base = table.strip("[]")
        nested = [
            (f"[{base}.{name}]", sub)
            for name, f in model.model_fields.items()
            for sub in _models_in(f.annotation)
            if sub not in listed
        ]
        listed.update(sub for _, sub in nested)
        out += _with_nested(driver, tuple(nested), listed)
    return out


def all_sections() -> list[tuple[str | None, str, type[BaseModel]]]:
    """(driver or None, table, model) for every section of the config, nested tables included."""
    listed = {m for _, m in CORE_SECTIONS}
    out = _with_nested(None, CORE_SECTIONS, listed)
    for driver in builtin_drivers():
        sections = driver_sections(driver)
        out += _with_nested(driver, sections, listed | {m for _, m in sections})
    return out


def type_text(annotation: Any) -> str:
    """A TOML-minded name of a field's type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " | ".join(type_text(a) for a in inner)
    if origin is typing.Annotated:
        return type_text(args[0])
    if origin is list:
        return f"list of {type_text(args[0])}" if args else "list"
    if origin is dict:
        return "table of " + type_text(args[1]) if len(args) == 2 else "table"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "table"
        return {
            "str": "string",
            "int": "integer",
            "float": "number",
            "bool": "boolean",
            "PosixPath": "path",
            "Path": "path",
        }.get(annotation.__name__, annotation.__name__)
    return "any"


def _bounds(field: FieldInfo) -> str:
    parts = []
    for m in field.metadata:
        for attr, sign in (
            ("ge", ">="),
            ("gt", ">"),
            ("le", "<="),
            ("lt", "<"),
            ("pattern", "~"),
            ("min_length", "len>="),
        ):
            v = getattr(m, attr, None)
            if v is not None:
                parts.append(f"{sign}{v}")
    return f" ({', '.join(parts)})" if parts else ""


def default_text(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, BaseModel):
        return "(table below)"
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str)
    return str(value)


def unit_of(name: str) -> str:
    for suffix, unit in UNITS:
        if name.endswith(suffix):
            return unit
    return ""


def meaning_of(model: type[BaseModel], name: str) -> str:
    """The field's description, else the meaning of the class in the MRO that declares it; "" when none."""
    field = model.model_fields[name]
    if field.description:
        return field.description
    for klass in model.__mro__:
        key = f"{klass.__name__}.{name}"
        text = MEANINGS.get(key) or DRIVER_MEANINGS.get(key)
        if text:
            return text
    return ""


def keys(section: str, model: type[BaseModel]) -> list[Key]:
    """Every key of a model, documented."""
    return [
        Key(
            section, name, type_text(f.annotation) + _bounds(f), default_text(f), unit_of(name), meaning_of(model, name)
        )
        for name, f in model.model_fields.items()
    ]
