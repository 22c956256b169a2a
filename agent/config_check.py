"""Validating a config, one piece at a time: each equipment by the model its driver names, the
cross-field checks of an equipment, and pydantic's errors turned into located problems (with a
"did you mean" for a near miss), so that every problem of a file is reported at once."""

from __future__ import annotations

import difflib
import importlib
import re
import types
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, Field, ValidationError, create_model

from agent.tomlpos import Path as ConfigPath
from drivers.sdk.config import ID_PATTERN, EquipmentBase, Problem, SecretHolder
from drivers.sdk.registry import get_driver, known_drivers

SPARKPLUG_NAMESPACE = "spBv1.0"  # the Sparkplug B topic namespace: the edge node's connection carries it

# Command kinds the router runs itself, on any driver that has write commands.
ROUTER_KINDS = frozenset({"load_process"})
M = TypeVar("M", bound=BaseModel)


_variants: dict[type, type[EquipmentBase]] = {}


def equipment_variant(driver: str) -> type[EquipmentBase]:
    """The `[[equipment]]` model of one driver: the generic fields with the driver's own models."""
    cls = get_driver(driver)
    model = _variants.get(cls)
    if model is None:
        model = create_model(
            f"Equipment[{driver}]",
            __base__=EquipmentBase,
            driver=(Literal[driver], ...),  # type: ignore[arg-type]
            connection=(cls.connection_model, ...),
            tags=(list[cls.tag_model], Field(default_factory=list)),  # type: ignore[name-defined]
            commands=(list[cls.command_model], Field(default_factory=list)),  # type: ignore[name-defined]
        )
        _variants[cls] = model
    return model


def import_driver_modules(modules: list[str], problems: list[Problem]) -> None:
    for i, mod in enumerate(modules):
        try:
            importlib.import_module(mod)
        except Exception as err:  # any import failure is a config problem, reported with its path
            problems.append(Problem(("agent", "driver_modules", i), f"cannot import driver module {mod!r}: {err}"))


def _unwrap(annotation: Any) -> Any:
    """`Annotated[X, ...]` and `X | None` -> X."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def model_at(model: type[BaseModel], loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model class that validates the value at `loc` below `model`, or None when it is not a model."""
    annotation: Any = model
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(part, int) and get_origin(annotation) is list:
            annotation = get_args(annotation)[0]
        elif isinstance(part, str) and isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(part)
            if field is None:
                return None
            annotation = field.annotation
        elif isinstance(part, str) and get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        else:
            return None
    annotation = _unwrap(annotation)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def did_you_mean(word: str, names: Iterable[str]) -> str:
    """The suffix "; did you mean 'port'?" for a near miss among `names`, else ""."""
    close = difflib.get_close_matches(word, list(names), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def validate_model(model: type[M], value: Any, where: ConfigPath, problems: list[Problem]) -> M | None:
    """`value` validated by `model`, or None with every problem (each located below `where`) appended."""
    try:
        return model.model_validate(value)
    except ValidationError as err:
        for e in err.errors(include_input=False, include_url=False, include_context=False):
            loc = tuple(p for p in e["loc"] if p != "__root__")
            if e["type"] == "missing":
                msg = "field required"
            elif e["type"] == "extra_forbidden":
                parent = model_at(model, loc[:-1])
                msg = "unknown key" + (did_you_mean(str(loc[-1]), parent.model_fields) if parent else "")
            elif e["type"] in ("model_type", "model_attributes_type", "dict_type"):
                msg = "must be a table"  # pydantic's words name a Python class
            else:
                msg = e["msg"].removeprefix("Value error, ")
            # Model-level checks (one of two keys missing) carry no field: the table's path locates them.
            problems.append(Problem((*where, *loc), msg))
        return None


def _walk_models(obj: BaseModel, where: ConfigPath) -> Iterator[tuple[BaseModel, ConfigPath]]:
    """`obj` and every model below it, each with its path."""
    yield obj, where
    for name in type(obj).model_fields:
        value = getattr(obj, name)
        if isinstance(value, BaseModel):
            yield from _walk_models(value, (*where, name))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from _walk_models(item, (*where, name, i))


def resolve_paths(obj: BaseModel, base: Path) -> None:
    """Make every relative path below `obj` absolute against the config file's folder."""
    for model, _ in _walk_models(obj, ()):
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, Path) and not value.is_absolute():
                setattr(model, name, base / value)


def read_secrets(obj: BaseModel, where: ConfigPath, base: Path, problems: list[Problem]) -> None:
    """Read the secrets of every secret holder below `obj`."""
    for model, path in _walk_models(obj, where):
        if isinstance(model, SecretHolder):
            model.resolve_secrets(base, path, problems)


def _equipment_checks(eq: EquipmentBase) -> list[tuple[ConfigPath, str]]:
    """Cross-field checks of one validated equipment: (path below it, message) pairs."""
    driver = get_driver(eq.driver)
    out: list[tuple[ConfigPath, str]] = []
    tag_names: dict[str, int] = {}
    for j, tag in enumerate(eq.tags):
        if tag.name in tag_names:
            out.append((("tags", j, "name"), f"duplicate tag name {tag.name!r}"))
        tag_names.setdefault(tag.name, j)
    if eq.status is not None:
        for field, ref in eq.status.tag_refs().items():
            if ref not in tag_names and not driver.has_builtin_tag(ref):
                out.append((("status", field), f"unknown tag {ref!r}" + did_you_mean(ref, tag_names)))
    for j, alert in enumerate(eq.alerts):
        if alert.tag not in tag_names and not driver.has_builtin_tag(alert.tag):
            out.append((("alerts", j, "tag"), f"unknown tag {alert.tag!r}" + did_you_mean(alert.tag, tag_names)))
    cmd_names: set[str] = set()
    for j, cmd in enumerate(eq.commands):
        if cmd.name in cmd_names:
            out.append((("commands", j, "name"), f"duplicate command name {cmd.name!r}"))
        cmd_names.add(cmd.name)
        if cmd.kind not in driver.command_kinds and cmd.kind not in ROUTER_KINDS:
            out.append(
                (
                    ("commands", j, "kind"),
                    f"kind {cmd.kind!r} is not supported by driver {eq.driver!r} "
                    f"(supported: {', '.join(sorted(driver.command_kinds | ROUTER_KINDS))})",
                )
            )
        if cmd.tag is not None and cmd.tag not in tag_names:
            out.append((("commands", j, "tag"), f"unknown tag {cmd.tag!r}" + did_you_mean(cmd.tag, tag_names)))
    for param, cmd_name in eq.parameters.items():
        cmd = eq.command(cmd_name)
        if cmd is None:
            out.append((("parameters", param), f"unknown command {cmd_name!r}"))
        elif cmd.kind != "write":
            out.append((("parameters", param), f"command {cmd_name!r} is not a write command"))
    out.extend(driver.check_equipment(eq))
    return out


def _equipment(
    item: Any, where: ConfigPath, base: Path, problems: list[Problem], *, resolve_secrets: bool
) -> EquipmentBase | None:
    """One `[[equipment]]` table validated and checked, or None when it has problems of its own fields.

    Without a usable driver only the generic fields are validated, so their problems are still reported.
    """
    driver = item.get("driver") if isinstance(item, dict) else None
    model: type[EquipmentBase] = EquipmentBase
    usable = False
    if isinstance(driver, str):
        if driver not in known_drivers():
            problems.append(
                Problem(
                    (*where, "driver"),
                    f"unknown driver {driver!r} (known: {', '.join(known_drivers())})"
                    + did_you_mean(driver, known_drivers()),
                )
            )
        else:
            try:
                model = equipment_variant(driver)
                usable = True
            except Exception as err:  # a driver module that fails on import is this equipment's problem
                problems.append(Problem((*where, "driver"), f"driver {driver!r} failed to load: {err}"))
    eq = validate_model(model, item, where, problems)
    if eq is None or not usable:
        return None
    resolve_paths(eq, base)
    problems.extend(Problem((*where, *sub), msg) for sub, msg in _equipment_checks(eq))
    if resolve_secrets:
        read_secrets(eq, where, base, problems)
    return eq


def _valid_id(value: Any) -> str | None:
    if isinstance(value, str) and len(value) <= 128 and re.fullmatch(ID_PATTERN, value):
        return value
    return None


def equipment_list(
    raw: Any, base: Path, problems: list[Problem], *, resolve_secrets: bool
) -> tuple[list[EquipmentBase], dict[ConfigPath, str]]:
    """Every `[[equipment]]` validated on its own, so one equipment's problems never hide another's.

    Also returns the labels for problem paths: an equipment is named by its id when that id is valid,
    unique and not a number (which would read as an index), else by its index.
    """
    if not isinstance(raw, list):
        problems.append(Problem(("equipment",), "must be an array of tables ([[equipment]])"))
        return [], {}
    ids = [_valid_id(item.get("id")) if isinstance(item, dict) else None for item in raw]
    counts = Counter(i for i in ids if i)
    labels: dict[ConfigPath, str] = {
        ("equipment", i): eid for i, eid in enumerate(ids) if eid and counts[eid] == 1 and not eid.isdigit()
    }
    first: dict[str, int] = {}
    for i, eid in enumerate(ids):
        if eid is not None and eid in first:
            problems.append(
                Problem(("equipment", i, "id"), f"duplicate equipment id {eid!r} (also equipment[{first[eid]}])")
            )
        elif eid is not None:
            first[eid] = i
    equipment = []
    for i, item in enumerate(raw):
        eq = _equipment(item, ("equipment", i), base, problems, resolve_secrets=resolve_secrets)
        if eq is not None:
            equipment.append(eq)
    return equipment, labels


def northbound_problems(data: dict[str, Any], sections: dict[str, Any], problems: list[Problem]) -> None:
    """What the profiles need across sections: the edge node's own client id, UNS topics outside the
    Sparkplug namespace."""
    agent, mqtt = sections.get("agent"), sections.get("mqtt")
    if agent is None or mqtt is None:
        return
    main = mqtt.client_id or f"edge-agent-{agent.id}"
    spb = mqtt.sparkplug.client_id
    if "sparkplug" in mqtt.profiles and (spb or f"{main}-sparkplug") == main:
        # Two connections with one id would throw each other off the broker, each firing the other's Will.
        problems.append(
            Problem(
                ("mqtt", "sparkplug", "client_id"),
                f"{spb!r} is the main connection's client id: give the edge node its own",
            )
        )
    raw = data.get("equipment")
    if "uns" not in mqtt.profiles or not isinstance(raw, list):
        return
    for i, item in enumerate(raw):
        location = item.get("location") if isinstance(item, dict) else None
        root = (location if isinstance(location, str) else agent.site).split("/", 1)[0]
        if root == SPARKPLUG_NAMESPACE:
            where: ConfigPath = ("equipment", i, "location") if isinstance(location, str) else ("agent", "site")
            problems.append(Problem(where, f"{SPARKPLUG_NAMESPACE} is the Sparkplug namespace, not a UNS location"))
