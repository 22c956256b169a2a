"""The driver SDK: the one door a driver imports through.

A driver is a package under `drivers/` (or a plant's own module named in `[agent] driver_modules`) that
imports `drivers.sdk` and itself only: it subclasses `Driver` (or `PollingDriver`), declares its config
models (`Model` for `[equipment.connection]`, `TagBase`, `CommandBase`), yields the events below, and is
listed once in the registry (`register_driver`, or a `DriverSpec` line for a built-in).
"""

from __future__ import annotations

from drivers.sdk.commands import VOCABULARY, CommandKind, kind
from drivers.sdk.config import (
    ID_PATTERN,
    AlertConfig,
    CommandBase,
    EquipmentBase,
    EquipmentConfig,
    Ident,
    Model,
    Problem,
    Role,
    SecretHolder,
    StatusConfig,
    TagBase,
)
from drivers.sdk.driver import Driver, DriverContext, PollingDriver, refuse_unknown, validate_write
from drivers.sdk.errors import AgentError, CommandError, ConfigError, DataError, RejectedError, TransientError
from drivers.sdk.events import (
    STATUSES,
    Checkpoint,
    CommandResult,
    ConnectionState,
    DeviceAlerts,
    Event,
    QualityResult,
    Reading,
    StatusFact,
    Unchanged,
    iso,
    parse_iso,
    utcnow,
)
from drivers.sdk.handle import CountingMetrics, DriverMetrics
from drivers.sdk.jsonio import MAX_DEPTH, InputError, json_bytes, json_safe
from drivers.sdk.jsonio import loads as load_json
from drivers.sdk.net import Port, check_url
from drivers.sdk.registry import DriverSpec, register, register_driver

__all__ = [
    "ID_PATTERN",
    "MAX_DEPTH",
    "STATUSES",
    "VOCABULARY",
    "AgentError",
    "AlertConfig",
    "Checkpoint",
    "CommandBase",
    "CommandError",
    "CommandKind",
    "CommandResult",
    "ConfigError",
    "ConnectionState",
    "CountingMetrics",
    "DataError",
    "DeviceAlerts",
    "Driver",
    "DriverContext",
    "DriverMetrics",
    "DriverSpec",
    "EquipmentBase",
    "EquipmentConfig",
    "Event",
    "Ident",
    "InputError",
    "Model",
    "PollingDriver",
    "Port",
    "Problem",
    "QualityResult",
    "Reading",
    "RejectedError",
    "Role",
    "SecretHolder",
    "StatusConfig",
    "StatusFact",
    "TagBase",
    "TransientError",
    "Unchanged",
    "check_url",
    "iso",
    "json_bytes",
    "json_safe",
    "kind",
    "load_json",
    "parse_iso",
    "refuse_unknown",
    "register",
    "register_driver",
    "utcnow",
    "validate_write",
]
