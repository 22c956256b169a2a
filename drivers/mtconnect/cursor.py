"""Where the driver is in an agent's stream of observations, kept across daemon restarts.

An MTConnect agent numbers every observation; `/sample?from=N` gives those from N on, as long as N is still
in its ring buffer (`firstSequence` .. `lastSequence`). The cursor is the next sequence to ask for, tied to
the agent's `instanceId` (sequences restart with the agent). It is written to the state folder so that a
restarted daemon goes on where it stopped: no observation twice, none left out, unless the agent's buffer
moved past it meanwhile (then the lost range is reported) or the agent itself restarted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from drivers.mtconnect.documents import Header
from drivers.sdk import InputError, json_bytes, load_json


class Start(Enum):
    """How to start streaming after connecting."""

    RESUME = "resume"  # the saved cursor is in the agent's buffer: go on from it
    FRESH = "fresh"  # nothing saved (or saved for another agent or device): start from /current
    RESTARTED = "restarted"  # the agent has a new instanceId: its sequences are new, start from /current
    WRAPPED = "wrapped"  # the buffer moved past the saved cursor: the range between is lost


@dataclass(frozen=True, slots=True)
class Lost:
    """Observations the agent dropped from its buffer before we read them: `first` .. `last` inclusive."""

    first: int
    last: int

    @property
    def count(self) -> int:
        return self.last - self.first + 1


def plan(saved: tuple[str, int] | None, header: Header) -> tuple[Start, Lost | None]:
    """What to do with the saved (instanceId, next sequence) given the agent's current header."""
    if saved is None:
        return Start.FRESH, None
    instance, nxt = saved
    if instance != header.instance_id:
        return Start.RESTARTED, None
    if nxt < header.first_sequence:
        return Start.WRAPPED, Lost(nxt, header.first_sequence - 1)
    if nxt > header.next_sequence:
        # Ahead of the agent with the same instance: not an agent that keeps its promises; start over.
        return Start.RESTARTED, None
    return Start.RESUME, None


# What this process has handed on, by cursor file: a driver reconnecting in the same daemon goes on from
# there (the pipeline holds it, stored or about to be), not from the file, which lags behind by design.
_HANDED: dict[Path, tuple[str, tuple[str, int]]] = {}


class Cursor:
    """The next sequence to read from one agent's device, and the last one known stored, in a JSON file.

    `set` moves the position as observations are handed over; `save` writes a position once the pipeline
    has confirmed that everything before it is stored (see the driver's checkpoints).
    """

    def __init__(self, path: Path, source: str) -> None:
        self.path = path
        self.source = source  # the agent URL and device: a cursor for another one is not used
        self.instance_id: str | None = None
        self.next: int | None = None
        self.saved: tuple[str, int] | None = None

    def load(self) -> tuple[str, int] | None:
        """Where to go on: what this process handed on last, else the saved (instanceId, next sequence);
        None when there is neither for this source."""
        handed = _HANDED.get(self.path)
        if handed is not None and handed[0] == self.source:
            return handed[1]
        try:
            data = load_json(self.path.read_bytes(), max_bytes=4096, what=str(self.path))
        except (OSError, InputError):
            return None  # missing, unreadable or damaged: start fresh (the driver logs the choice)
        if not isinstance(data, dict) or data.get("source") != self.source:
            return None
        instance, nxt = data.get("instance_id"), data.get("next")
        if not isinstance(instance, str) or not isinstance(nxt, int) or isinstance(nxt, bool) or nxt < 0:
            return None
        self.saved = (instance, nxt)
        return self.saved

    def set(self, instance_id: str, nxt: int) -> None:
        """The position after what has just been handed on."""
        self.instance_id = instance_id
        self.next = nxt
        _HANDED[self.path] = (self.source, (instance_id, nxt))

    def position(self) -> tuple[str, int] | None:
        """Where the cursor is now, to be saved later."""
        if self.instance_id is None or self.next is None:
            return None
        return self.instance_id, self.next

    def save(self, position: tuple[str, int]) -> None:
        """Write `position` unless it is the one saved already: replaced whole, never half written."""
        if position == self.saved:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_bytes(json_bytes({"source": self.source, "instance_id": position[0], "next": position[1]}))
        os.replace(tmp, self.path)
        self.saved = position
