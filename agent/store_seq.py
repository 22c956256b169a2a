"""`seq` for the store's messages, reserved in blocks in a side file as well as in the database, so that it
never repeats or goes back, even when a corrupt database is renamed aside and a fresh one started."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger("edge_agent.store")

SEQ_BLOCK = 10_000


class SeqReservation:
    """Hands out `seq` numbers above everything a previous run may have used."""

    def __init__(self, path: Path, db: Callable[[], sqlite3.Connection]) -> None:
        self.path = path
        self._db = db
        self._next = 0
        self._reserved = 0
        self.error: str | None = None  # set while a block could not be reserved

    def load(self) -> None:
        """Start above the last reservation (from the side file or the database) and every stored seq."""
        from_file = 0
        try:
            from_file = int(self.path.read_text().strip() or 0)
        except (OSError, ValueError):
            pass
        db = self._db()
        row = db.execute("SELECT value FROM kv WHERE key='seq_reserved'").fetchone()
        from_db = int(row[0]) if row else 0
        top = db.execute("SELECT MAX(seq) FROM messages").fetchone()[0] or 0
        # Everything up to the last reservation may have been used by the previous run: start above it.
        self._next = max(from_file, from_db, top + 1, 1)
        self._reserve(self._next + SEQ_BLOCK)

    def _reserve(self, upto: int) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            fh.write(str(upto))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        with contextlib.suppress(sqlite3.Error):
            self._db().execute("INSERT OR REPLACE INTO kv(key, value) VALUES('seq_reserved', ?)", (str(upto),))
        self._reserved = upto
        self.error = None

    def take(self) -> int:
        """The next `seq`."""
        seq = self._next
        self._next += 1
        if self._next >= self._reserved:
            try:
                self._reserve(self._next + SEQ_BLOCK)
            except OSError as err:
                # Without a new reservation a restart could reuse numbers: keep going, but say so.
                if self.error is None:
                    log.error("seq_reserve_failed", error=str(err))
                self.error = f"cannot reserve seq: {err}"
                self._reserved = self._next + 1  # try again with the next message
        return seq
