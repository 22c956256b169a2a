"""The daemon's errors: the shared hierarchy (from the driver SDK) and the core's own start-up fault."""

from __future__ import annotations

from drivers.sdk.errors import (
    AgentError,
    CommandError,
    ConfigError,
    DataError,
    RejectedError,
    TransientError,
)

__all__ = [
    "AgentError",
    "CommandError",
    "ConfigError",
    "DataError",
    "RejectedError",
    "StartupError",
    "TransientError",
]


class StartupError(AgentError):
    """The daemon cannot start here (a taken port, an unwritable state_dir, an unreadable certificate)."""
