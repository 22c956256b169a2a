"""What the outbox keeps in memory while its disk cannot take a write (full, I/O error, read-only).

Status updates and state are held here, in order, and committed before anything new as soon as the file
takes writes again; a lane reset refused at start waits here too. The write error that put them here is
logged once per transition and reported by health.
"""

from __future__ import annotations

import sqlite3
import time
from collections import deque
from typing import Any

import structlog

from agent.outbox_ledger import Batch, Ledger
from agent.reconnect import jittered

log = structlog.get_logger("edge_agent.outbox")


class HeldWrites:
    """Batches the disk refused, oldest first, and the state of the disk's writes."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self.batches: deque[Batch] = deque()
        self.items = 0
        self.reset_pending = False  # the lane reset at start still to be written
        self.error: sqlite3.Error | None = None  # the write error that holds them, None when writes work
        self.flush_after = 0.0
        self._flush_attempts = 0

    @property
    def pending(self) -> bool:
        """Writes the disk refused earlier that must succeed before any new one (order)."""
        return bool(self.batches) or self.reset_pending

    def has_room(self, n: int) -> bool:
        return self.items + n <= self.max_items

    def hold(self, batch: Batch) -> None:
        self.batches.append(batch)
        self.items += len(batch[0])

    def state(self, key: str) -> str | None:
        """The newest held value of a key-value pair, or None."""
        for _, state in reversed(self.batches):
            if state is not None and state[0] == key:
                return state[1]
        return None

    def flush(self, ledger: Ledger) -> sqlite3.Error | None:
        """Commit the held writes in order; the error that stopped it, or None when all are committed."""
        with ledger.lock:
            if self.reset_pending:
                try:
                    ledger.reset_lanes()
                except sqlite3.Error as err:
                    return err
                self.reset_pending = False
            while self.batches:
                try:
                    ledger.write(self.batches[0])
                except sqlite3.Error as err:
                    return err
                items, _ = self.batches.popleft()
                self.items -= len(items)
            self._flush_attempts = 0
            self.succeeded(ledger.depth)
        return None

    def retry_later(self, base_s: float, cap_s: float) -> None:
        """A flush failed: the next try waits on a capped jittered backoff."""
        self.flush_after = time.monotonic() + jittered(base_s, cap_s, self._flush_attempts)
        self._flush_attempts += 1

    def failed(self, err: sqlite3.Error, **fields: Any) -> None:
        """A write the database refused: logged with SQLite's own words once per transition."""
        if self.error is None:
            log.error(
                "outbox_write_failed",
                error=str(err),
                sqlite_error=getattr(err, "sqlite_errorname", None),
                held=self.items,
                **fields,
            )
        self.error = err

    def succeeded(self, committed: int) -> None:
        """A write went through: writes have recovered once nothing is held any more."""
        if self.error is not None and not self.pending:
            self.error = None
            log.info("outbox_write_recovered", pending=committed)
