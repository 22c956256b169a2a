"""A serial printer's configuration: `[equipment.connection]`, its tags and commands, and their checks."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from drivers.printer.lines import gcode_lines, line_problem
from drivers.sdk import CommandBase, CommandError, EquipmentConfig, Model, TagBase, refuse_unknown

BUILTIN_TAGS = frozenset({"hotend_temp", "hotend_target", "bed_temp", "bed_target", "progress"})
KINDS = frozenset({"start_print", "pause", "resume", "cancel", "reset", "set_temperature", "gcode"})
HEATERS = {"hotend": "M104", "bed": "M140"}


class SerialPrinterConnection(Model):
    """`[equipment.connection]` of a serial printer."""

    serial_port: Path
    baudrate: int = Field(115200, gt=0)
    flavor: Literal["marlin"] = "marlin"
    poll_interval_s: float = Field(2.0, gt=0)
    max_hotend_temp: float = Field(280.0, gt=0)
    max_bed_temp: float = Field(120.0, gt=0)
    process_id_pattern: str | None = None
    ok_timeout_s: float = Field(10.0, gt=0)
    long_command_timeout_s: float = Field(300.0, gt=0)
    handshake_timeout_s: float = Field(20.0, gt=0)
    max_line_bytes: int = Field(1024, ge=96)
    max_in_flight: int = Field(1, ge=1, le=32)
    gcode_dir: Path | None = None

    @field_validator("process_id_pattern")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as err:
                raise ValueError(f"not a valid regular expression: {err}") from None
        return v


class SerialPrinterTag(TagBase):
    """A printer tag: one of the built-in names, declared only to give it a unit or deadband."""


class SerialPrinterCommand(CommandBase):
    """A printer command: a built-in kind, or `gcode` with a fixed text."""

    gcode: str | None = None


def check_printer(equipment: EquipmentConfig) -> list[tuple[tuple[str | int, ...], str]]:
    """The printer's cross-field checks: (path below the equipment, message) pairs."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    folder = equipment.connection.gcode_dir
    if folder is not None and folder.exists() and not folder.is_dir():
        problems.append((("connection", "gcode_dir"), f"{folder} is not a folder"))
    for j, tag in enumerate(equipment.tags):
        if tag.name not in BUILTIN_TAGS:
            known = ", ".join(sorted(BUILTIN_TAGS))
            problems.append((("tags", j, "name"), f"unknown printer tag {tag.name!r} (a printer reports {known})"))
    for j, cmd in enumerate(equipment.commands):
        where = ("commands", j, "gcode")
        if cmd.kind != "gcode":
            if cmd.gcode is not None:
                problems.append((where, 'only kind = "gcode" takes a gcode text'))
            continue
        lines = gcode_lines(cmd.gcode or "")
        if not lines:
            problems.append((where, 'kind = "gcode" needs a gcode text with at least one command'))
        for line in lines:
            if (problem := line_problem(line)) is not None:
                problems.append((where, f"line {line!r}: {problem}"))
    return problems


def validate_params(equipment: EquipmentConfig, command: CommandBase, params: dict[str, Any]) -> dict[str, Any] | None:
    """The checked parameters of a `start_print` or `set_temperature` command; None for the other kinds."""
    name = command.name

    def bad(message: str, reason: str = "bad_parameters") -> CommandError:
        return CommandError(f"command {name!r}: {message}", reason)

    if command.kind == "start_print":
        refuse_unknown(name, params, {"file"})
        file = params.get("file")
        if not isinstance(file, str) or not file.strip():
            raise bad("parameter 'file' (a file name from the SD listing) is required")
        file = file.strip()
        if not file.isascii() or any(c in file for c in "*;") or any(ord(c) < 32 for c in file):
            raise bad(f"file name {file!r} has characters a printer cannot take")
        return {"file": file}
    if command.kind == "set_temperature":
        refuse_unknown(name, params, {"heater", "target"})
        heater = params.get("heater")
        if heater not in HEATERS:
            raise bad(f"unknown heater {heater!r} (hotend or bed)")
        target = params.get("target")
        if isinstance(target, bool) or not isinstance(target, (int, float)):
            raise bad("parameter 'target' must be a number of degrees C")
        if not math.isfinite(target):
            raise bad("parameter 'target' must be finite")
        conn: SerialPrinterConnection = equipment.connection
        limit = conn.max_hotend_temp if heater == "hotend" else conn.max_bed_temp
        if command.max is not None:
            limit = min(limit, command.max)
        low = max(0.0, command.min) if command.min is not None else 0.0
        if target > limit:
            raise bad(f"{heater} target {target:g} is above the limit {limit:g}", "out_of_range")
        if target < low:
            raise bad(f"{heater} target {target:g} is below the minimum {low:g}", "out_of_range")
        return {"heater": heater, "target": target}
    return None
