"""Drivers by name: the built-ins are imported on first use, extra modules register themselves."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from drivers.base import Driver

BUILTIN = {
    "opcua": "drivers.opcua",
    "modbus": "drivers.modbus",
    "serial_printer": "drivers.serial_printer",
    "file_drop": "drivers.file_drop",
}
_registry: dict[str, type[Driver]] = {}


def register_driver(cls: type[Driver]) -> type[Driver]:
    """Class decorator: make a driver available under its `name`."""
    _registry[cls.name] = cls
    return cls


def known_drivers() -> list[str]:
    """Every driver name a config may use: the built-ins and those registered so far."""
    return sorted(set(_registry) | set(BUILTIN))


def get_driver(name: str) -> type[Driver]:
    """The driver class called `name`, importing a built-in module on first use."""
    if name not in _registry and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    try:
        return _registry[name]
    except KeyError:
        raise KeyError(f"unknown driver {name!r}") from None
