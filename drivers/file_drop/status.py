"""The folder's state as the equipment's connection and status: a folder that is missing is a lost
connection; one that cannot be read or written, or whose results are not being stored, is `error`;
otherwise the equipment is `idle` (a file drop has no running state)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from drivers.sdk import ConnectionState, Event, StatusFact

# The folder's state as reported: ("ok" | "missing" | "error", why).
State = tuple[str, str | None]


def transition(prev: State | None, cur: State, directory: Path, log: Any) -> list[Event]:
    """Events for a change of folder state (logged); nothing when it holds."""
    if prev == cur:
        return []
    health, message = cur
    if health == "missing":
        log.warning("directory_missing", directory=str(directory))
        return [ConnectionState(False, message)]
    events: list[Event] = []
    if prev is None or prev[0] == "missing":
        events.append(ConnectionState(True))
    if health == "ok":
        if prev is not None:
            log.info("directory_ok", directory=str(directory))
        events.append(StatusFact("idle"))
    else:
        log.warning("directory_error", directory=str(directory), error=message)
        events.append(StatusFact("error", error_message=message))
    return events
