"""Drivers by name: one entry per driver naming its class and its simulator by module path.

The built-ins are listed here and imported on first use; a plant's own driver (`[agent] driver_modules`)
registers itself when its module is imported, with `register_driver` on its class. This is the only map
from driver names to code: the config, the supervisor and `edge-agent simulate` all ask it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from drivers.sdk.driver import Driver

D = TypeVar("D", bound="type[Driver]")


@dataclass(frozen=True)
class DriverSpec:
    """A driver: its name in configs, its class and its simulator as `module:attribute` paths."""

    name: str
    driver: str
    simulator: str | None = None  # `async def simulate(equipment, state_dir)`, for `edge-agent simulate`


BUILTIN = (
    DriverSpec("opcua", "drivers.opcua.driver:OpcUaDriver", "drivers.opcua.sim:simulate"),
    DriverSpec("modbus", "drivers.modbus.driver:ModbusDriver", "drivers.modbus.sim:simulate"),
    DriverSpec("serial_printer", "drivers.printer.serial:SerialPrinterDriver", "drivers.printer.sim:simulate"),
    DriverSpec("file_drop", "drivers.file_drop.driver:FileDropDriver", "drivers.file_drop.sim:simulate"),
    DriverSpec("mtconnect", "drivers.mtconnect.driver:MTConnectDriver", "drivers.mtconnect.sim:simulate"),
)

_specs: dict[str, DriverSpec] = {spec.name: spec for spec in BUILTIN}
_classes: dict[str, type[Driver]] = {}


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def register(spec: DriverSpec) -> None:
    """Add (or replace) a driver entry."""
    _specs[spec.name] = spec
    _classes.pop(spec.name, None)


def register_driver(cls: D | None = None, *, simulator: str | None = None) -> Any:
    """Class decorator (`@register_driver` or `@register_driver(simulator="pkg.sim:simulate")`): make a
    driver available under its `name`."""

    def add(klass: D) -> D:
        name = klass.name
        _specs[name] = DriverSpec(name, f"{klass.__module__}:{klass.__qualname__}", simulator or _simulator(name))
        _classes[name] = klass
        return klass

    return add(cls) if cls is not None else add


def _simulator(name: str) -> str | None:
    spec = _specs.get(name)
    return spec.simulator if spec is not None else None


def builtin_drivers() -> list[str]:
    """The drivers that ship with the agent (what the reference documents), in registry order."""
    return [spec.name for spec in BUILTIN]


def known_drivers() -> list[str]:
    """Every driver name a config may use: the built-ins and those registered so far."""
    return sorted(_specs)


def get_driver(name: str) -> type[Driver]:
    """The driver class called `name`, importing its module on first use."""
    cls = _classes.get(name)
    if cls is not None:
        return cls
    spec = _specs.get(name)
    if spec is None:
        raise KeyError(f"unknown driver {name!r}")
    cls = _load(spec.driver)
    _classes[name] = cls
    return cls  # type: ignore[no-any-return]


def get_simulator(name: str) -> Callable[..., Any] | None:
    """The simulator of driver `name` (`async def simulate(equipment, state_dir)`), or None."""
    spec = _specs.get(name)
    if spec is None or spec.simulator is None:
        return None
    return _load(spec.simulator)  # type: ignore[no-any-return]
