"""The numbered lines of one Marlin session: which are queued, written, owed an `ok`, or to be written again.

No I/O here: `MarlinLink` writes what `take()` hands out, and reports the printer's `ok`s and `Resend:`
requests. Marlin answers in order, so an `ok` acknowledges the oldest line written; every rejection
carries an `ok` of its own, which acknowledges nothing. A `Resend: N` rewinds to line N and writes each
line from there once more; a second request for the same line before any line from there is acknowledged
is a duplicate and ignored (so a resent line garbled once more is recovered by the link's timeout nudge).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from drivers.printer.lines import is_long

# What a resend request came to: the printer has every line already, nothing of ours is in it, a second
# request for the line being resent, a line no longer in the history, or a rewind.
ResendOutcome = Literal["beyond", "unsolicited", "duplicate", "lost", "rewound"]


@dataclass
class Pending:
    """One command on its way: queued, written (awaiting its `ok`), or rewound for a resend."""

    command: str
    future: asyncio.Future[list[str]] | None
    long: bool
    on_ok: Callable[[list[str]], None] | None = None
    number: int | None = None
    first_written: float | None = None
    response: list[str] = field(default_factory=list)


class Window:
    """Line numbers, the history kept for resends, and at most `max_in_flight` lines ahead of their `ok`s."""

    def __init__(self, max_in_flight: int, history_size: int) -> None:
        self.max_in_flight = max(1, max_in_flight)
        # Enough history for every line that can be in flight, several times over.
        self._history_size = max(history_size, 8 * self.max_in_flight)
        self._history: OrderedDict[int, str] = OrderedDict()
        self.last_number = 0  # the last number given to a line
        self._new: deque[Pending] = deque()  # queued, not numbered yet
        self._rewound: list[Pending] = []  # numbered, to be written again (ascending)
        self._out: deque[Pending] = deque()  # written, awaiting their ok (ascending)
        self._swallow = 0  # oks still to come for rejected lines: they acknowledge nothing
        # Lines written after a rejected one, before the resend request: the printer refuses each (another
        # request for the same line, with its ok) or drops it unread. They hold their place in the window
        # until then, or until a resent line is acknowledged (the printer answers in order).
        self._stale_tx = 0
        self._rewound_to: int | None = None  # the line of the last resend request acted on, until acknowledged
        self.lines_resent = 0  # lines written again (for a resend request or a nudge)

    @property
    def in_flight(self) -> int:
        """Lines the printer has not answered yet (written ones and rejections still owing their ok)."""
        return len(self._out) + self._swallow + self._stale_tx

    @property
    def owed(self) -> bool:
        """Whether the printer owes an answer (a written line, a rejection's ok, a line to write again)."""
        return bool(self._out or self._swallow or self._rewound)

    @property
    def waiting(self) -> Pending | None:
        """The written line the printer answers next, if any."""
        return self._out[0] if self._out else None

    def oldest(self) -> Pending | None:
        """The oldest line the printer owes an answer for (written, or rewound to be written again)."""
        if self._out:
            return self._out[0]
        return self._rewound[0] if self._rewound else None

    def restart(self, *lines: str) -> None:
        """A new session whose first lines, numbered from 0, were written by the handshake."""
        self._history.clear()
        for number, command in enumerate(lines):
            self._history[number] = command
        self.last_number = len(lines) - 1

    def queue(self, pending: Pending) -> None:
        self._new.append(pending)

    def take(self) -> Pending | None:
        """The next line to write if the window allows one (lines to resend first, then new ones), now written."""
        if not self.owed:
            self._stale_tx = 0  # everything of ours is answered: nothing stale can still hold a place
        if self.in_flight >= self.max_in_flight:
            return None
        if self._rewound:
            pending = self._rewound.pop(0)
            self.lines_resent += 1
        else:
            while self._new and self._new[0].future is not None and self._new[0].future.done():
                self._new.popleft()  # its sender gave up before it was written
            if not self._new:
                return None
            pending = self._new.popleft()
            self.last_number += 1
            pending.number = self.last_number
            self._history[pending.number] = pending.command
            while len(self._history) > self._history_size:
                self._history.popitem(last=False)
        self._out.append(pending)
        return pending

    def close_rejection(self) -> bool:
        """An `ok` that closes a rejection (the rejected line's place in the printer's buffer is free)?"""
        if self._swallow > 0:
            self._swallow -= 1
            return True
        return False

    def acknowledge(self) -> Pending | None:
        """The line an `ok` acknowledges, or None when nothing is owed one."""
        if not self._out:
            return None
        pending = self._out.popleft()
        if self._rewound_to is not None and pending.number is not None and pending.number >= self._rewound_to:
            self._rewound_to = None  # the resend got through: a new request for that line is a new fault
            self._stale_tx = 0  # and whatever was written before it has been answered or dropped
        return pending

    def resend(self, number: int) -> ResendOutcome:
        """A `Resend: number` request: rewind to that line so that each line from there is written once more."""
        if number > self.last_number:
            # The printer has every line we wrote (after M999, or a nudge for a line whose ok was lost):
            # nothing to write again, and the ok that follows is the line's own.
            return "beyond"
        if not self.owed:
            # Nothing of ours is in the printer: a leftover or a garbled line; the ok after it is unexpected.
            return "unsolicited"
        self._swallow += 1
        if number == self._rewound_to:
            self._stale_tx = max(0, self._stale_tx - 1)  # its place in the window now waits for this ok
            return "duplicate"
        if number not in self._history:
            return "lost"
        keep = deque(p for p in self._out if p.number is not None and p.number < number)
        again = {p.number: p for p in (*self._out, *self._rewound) if p.number is not None and p.number >= number}
        for n in range(number, self.last_number + 1):
            # Lines from there that were acknowledged already (an ok taken for theirs) go again too: the
            # printer says it has none of them.
            if n not in again and n in self._history:
                again[n] = Pending(self._history[n], None, is_long(self._history[n]), number=n)
        self._stale_tx += sum(1 for p in self._out if p.number is not None and p.number > number)
        self._out = keep
        self._rewound = [again[n] for n in sorted(again)]
        self._rewound_to = number
        return "rewound"

    def rewind_all(self) -> None:
        """After a timeout: write every unanswered line again (a printer that has them asks for the next)."""
        self._rewound = sorted((*self._out, *self._rewound), key=lambda p: p.number or 0)
        self._out.clear()
        self._swallow = self._stale_tx = 0
        self._rewound_to = None

    def fail_all(self, reason: str) -> None:
        """Forget every line not answered yet; their senders get ConnectionError(reason)."""
        pendings = [*self._out, *self._rewound, *self._new]
        self._out.clear()
        self._rewound.clear()
        self._new.clear()
        for pending in pendings:
            fail_future(pending.future, ConnectionError(reason))


def fail_future(fut: asyncio.Future[Any] | None, error: BaseException) -> None:
    """Fail a future whose waiter may be gone, without an "exception was never retrieved" warning."""
    if fut is not None and not fut.done():
        fut.set_exception(error)
        fut.add_done_callback(_retrieve)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
