"""The shared command vocabulary: every command kind a config may declare, its parameters and its rules.

The router checks the state rules from here (which kinds run in `error`, which need the equipment idle),
so it never names a driver's kinds; a driver says which kinds it runs (`Driver.command_kinds`) and may
validate a kind's parameters further (device limits) in `Driver.validate_command`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CommandKind:
    """One kind of command."""

    name: str
    parameters: tuple[str, ...]  # the parameter names it takes
    runs_in_error: bool = False  # the only kinds allowed on equipment in `error`
    needs_idle: bool = False  # refused while the equipment is running or paused
    summary: str = ""


VOCABULARY: dict[str, CommandKind] = {
    k.name: k
    for k in (
        CommandKind("write", ("value",), summary="write a value to the command's tag, within min/max"),
        CommandKind("method", ("args",), summary="call a device method with positional arguments"),
        CommandKind("reset", (), runs_in_error=True, summary="clear an error on the device"),
        CommandKind(
            "load_process",
            ("process_id",),
            needs_idle=True,
            summary="fetch a process's parameters from MPM and write them through the declared write commands",
        ),
        CommandKind("start_print", ("file",), needs_idle=True, summary="start printing a file"),
        CommandKind("pause", (), summary="pause the running job"),
        CommandKind("resume", (), summary="resume a paused job"),
        CommandKind("cancel", (), summary="cancel the running job"),
        CommandKind("set_temperature", ("heater", "target"), summary="set a heater's target temperature"),
        CommandKind("gcode", (), summary="send the command's fixed G-code text"),
    )
}


def kind(name: str) -> CommandKind | None:
    """The kind called `name`, or None for a kind nobody declared."""
    return VOCABULARY.get(name)
