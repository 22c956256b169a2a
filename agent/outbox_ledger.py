"""The outbox's SQLite file: the items (pending, delivered as a ledger of keys, dead letters), one lane row
per process with pending items, and a small key-value table. Every write is one transaction."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.model import iso, utcnow
from agent.sqlite_file import open_durable, transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    process_id TEXT NOT NULL,
    equipment_id TEXT,
    idempotency_key TEXT NOT NULL UNIQUE,
    body BLOB NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    status_code INTEGER,
    reason TEXT,
    created_at TEXT NOT NULL,
    finished_at TEXT
);
CREATE INDEX IF NOT EXISTS items_lane ON items(process_id, id) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS items_dead ON items(id) WHERE state = 'dead';
CREATE TABLE IF NOT EXISTS lanes (
    process_id TEXT PRIMARY KEY,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    position INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS lanes_due ON lanes(next_attempt_at, position);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# An item to insert: (kind, process_id, equipment_id, idempotency_key, body).
Row = tuple[str, str, str | None, str, bytes]
# What one enqueue commits together: items in order, and optionally one key-value pair.
Batch = tuple[Sequence[Row], tuple[str, str] | None]

_COLUMNS = "id, kind, process_id, equipment_id, idempotency_key, body, status_code, reason, created_at, attempts"


@dataclass(slots=True)
class OutboxItem:
    """One outbox item as it is delivered, reported to the outcome callback, or listed as a dead letter."""

    id: int
    kind: str
    process_id: str
    equipment_id: str | None
    idempotency_key: str
    body: bytes
    status_code: int | None = None
    reason: str | None = None
    created_at: str = ""
    attempts: int = 0

    def payload(self) -> Any:
        """The stored body, parsed."""
        try:
            return json.loads(self.body) if self.body else None
        except ValueError:
            return None

    def to_dict(self) -> dict[str, Any]:
        """The contract's dead-letter object."""
        return {
            "id": self.id,
            "kind": self.kind,
            "process_id": self.process_id,
            "equipment_id": self.equipment_id,
            "idempotency_key": self.idempotency_key,
            "status_code": self.status_code,
            "reason": self.reason,
            "created_at": self.created_at,
            "body": self.payload(),
        }

    @classmethod
    def _from_row(cls, row: Sequence[Any]) -> OutboxItem:
        return cls(
            id=row[0],
            kind=row[1],
            process_id=row[2],
            equipment_id=row[3],
            idempotency_key=row[4],
            body=bytes(row[5]),
            status_code=row[6],
            reason=row[7],
            created_at=row[8],
            attempts=row[9],
        )


@dataclass(slots=True)
class StatusUpdate:
    """A process status update to enqueue."""

    process_id: str
    equipment_id: str | None
    status: str
    metadata: dict[str, Any]
    idempotency_key: str


class Ledger:
    """The outbox's database; `lock` guards the connection (enqueues may come from other threads)."""

    def __init__(self, path: Path, prepare: Callable[[Ledger], None]) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.depth = 0  # committed pending items
        self.position = 0  # the last lane position handed out: lanes start in order of arrival
        self._db: sqlite3.Connection | None = None
        self._prepare = prepare
        self._db = open_durable(path, _SCHEMA, what="outbox", prepare=self._opened)

    def _opened(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._prepare(self)
        self.depth = db.execute("SELECT COUNT(*) FROM items WHERE state = 'pending'").fetchone()[0]
        self.position = db.execute("SELECT COALESCE(MAX(position), 0) FROM lanes").fetchone()[0]

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "outbox is closed"
        return self._db

    @property
    def closed(self) -> bool:
        return self._db is None

    def close(self) -> None:
        with self.lock:
            db, self._db = self._db, None
            if db is not None:
                with contextlib.suppress(sqlite3.Error):
                    db.close()

    def reset_lanes(self) -> None:
        """A restart retries at once (backoffs were on the old process's clock); lanes of pending items that
        lost their row get one back."""
        with self.lock, transaction(self.db) as db:
            db.execute("UPDATE lanes SET next_attempt_at = 0")
            db.execute(
                "INSERT OR IGNORE INTO lanes(process_id, next_attempt_at, attempts, position) "
                "SELECT process_id, 0, 0, MIN(id) FROM items WHERE state = 'pending' GROUP BY process_id"
            )

    def retry_all(self) -> None:
        """Every lane due now, past its backoff."""
        with self.lock, transaction(self.db) as db:
            db.execute("UPDATE lanes SET next_attempt_at = 0")

    # ---- writing ------------------------------------------------------------------------------

    def _open_lane(self, db: sqlite3.Connection, process_id: str) -> None:
        self.position += 1
        db.execute(
            "INSERT OR IGNORE INTO lanes(process_id, next_attempt_at, attempts, position) VALUES (?, 0, 0, ?)",
            (process_id, self.position),
        )

    def _insert(
        self, db: sqlite3.Connection, kind: str, process_id: str, eid: str | None, key: str, body: bytes
    ) -> bool:
        """Insert one pending item inside the caller's transaction; False when the key is a duplicate."""
        row = db.execute("SELECT id, state FROM items WHERE idempotency_key = ?", (key,)).fetchone()
        if row is not None:
            if row[1] != "dead":
                return False
            # A dead letter's key submitted again is a new attempt: the old dead letter makes way.
            db.execute("DELETE FROM items WHERE id = ?", (row[0],))
        db.execute(
            "INSERT INTO items(kind, process_id, equipment_id, idempotency_key, body, state, created_at) "
            "VALUES (?, ?, ?, ?, ?, 'pending', ?)",
            (kind, process_id, eid, key, body, iso(utcnow())),
        )
        self._open_lane(db, process_id)
        return True

    def write(self, batch: Batch) -> list[bool]:
        """Commit one batch in one transaction; the depth follows."""
        items, state = batch
        with self.lock:
            with transaction(self.db) as db:
                added = [self._insert(db, *item) for item in items]
                if state is not None:
                    db.execute("INSERT OR REPLACE INTO kv(key, value) VALUES (?, ?)", state)
            self.depth += sum(added)
        return added

    def head(self, pid: str) -> OutboxItem | None:
        """The lane's first pending item; an empty lane is removed."""
        with self.lock:
            row = self.db.execute(
                f"SELECT {_COLUMNS} FROM items WHERE state = 'pending' AND process_id = ? ORDER BY id LIMIT 1", (pid,)
            ).fetchone()
            if row is None:
                with transaction(self.db) as db:
                    db.execute("DELETE FROM lanes WHERE process_id = ?", (pid,))
                return None
        return OutboxItem._from_row(row)

    def finish(self, item: OutboxItem, state: str, status_code: int | None, reason: str | None) -> None:
        """An item MPM answered: delivered (the ledger keeps its key, not its body) or dead; its lane is reset."""
        with self.lock:
            with transaction(self.db) as db:
                if state == "delivered":
                    db.execute(
                        "UPDATE items SET state = 'delivered', body = x'', finished_at = ?, attempts = attempts + 1 "
                        "WHERE id = ?",
                        (iso(utcnow()), item.id),
                    )
                else:
                    db.execute(
                        "UPDATE items SET state = 'dead', status_code = ?, reason = ?, finished_at = ?, "
                        "attempts = attempts + 1 WHERE id = ?",
                        (status_code, reason, iso(utcnow()), item.id),
                    )
                db.execute(
                    "UPDATE lanes SET attempts = 0, next_attempt_at = 0 WHERE process_id = ?", (item.process_id,)
                )
            self.depth -= 1

    def back_off(self, item: OutboxItem, delay_for: Callable[[int], float]) -> int:
        """A failed attempt: the lane waits `delay_for(its failures in a row)`; that count is returned."""
        with self.lock, transaction(self.db) as db:
            row = db.execute("SELECT attempts FROM lanes WHERE process_id = ?", (item.process_id,)).fetchone()
            attempts = (row[0] if row else 0) + 1
            db.execute(
                "UPDATE lanes SET attempts = ?, next_attempt_at = ? WHERE process_id = ?",
                (attempts, time.monotonic() + delay_for(attempts), item.process_id),
            )
            db.execute("UPDATE items SET attempts = attempts + 1 WHERE id = ?", (item.id,))
        return attempts

    def retry_dead_letter(self, item_id: int) -> str | None:
        """Move a dead letter back to pending (same key, same body, its original place); its process id, or
        None if unknown."""
        with self.lock:
            with transaction(self.db) as db:
                row = db.execute("SELECT process_id FROM items WHERE id = ? AND state = 'dead'", (item_id,)).fetchone()
                if row is None:
                    return None
                db.execute(
                    "UPDATE items SET state = 'pending', attempts = 0, status_code = NULL, reason = NULL, "
                    "finished_at = NULL WHERE id = ?",
                    (item_id,),
                )
                self._open_lane(db, row[0])
            self.depth += 1
        return str(row[0])

    def delete_dead_letter(self, item_id: int) -> bool:
        """Delete a dead letter for good; False if unknown."""
        with self.lock, transaction(self.db) as db:
            return bool(db.execute("DELETE FROM items WHERE id = ? AND state = 'dead'", (item_id,)).rowcount)

    # ---- reading ------------------------------------------------------------------------------

    def _rows(self, where: str, params: Sequence[Any]) -> list[OutboxItem]:
        with self.lock:
            rows = self.db.execute(f"SELECT {_COLUMNS} FROM items WHERE {where}", params).fetchall()
        return [OutboxItem._from_row(r) for r in rows]

    def pending(self, limit: int) -> list[OutboxItem]:
        return self._rows("state = 'pending' ORDER BY id LIMIT ?", (limit,))

    def dead_letters(self, limit: int, offset: int) -> list[OutboxItem]:
        return self._rows("state = 'dead' ORDER BY id LIMIT ? OFFSET ?", (limit, offset))

    def dead_letter(self, item_id: int) -> OutboxItem | None:
        found = self._rows("id = ? AND state = 'dead'", (item_id,))
        return found[0] if found else None

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first column of the first row, or None."""
        with self.lock:
            row = self.db.execute(sql, params).fetchone()
        return None if row is None else row[0]

    def dead_letter_count(self) -> int:
        return int(self._one("SELECT COUNT(*) FROM items WHERE state = 'dead'"))

    def key_state(self, idempotency_key: str) -> str | None:
        state = self._one("SELECT state FROM items WHERE idempotency_key = ?", (idempotency_key,))
        return None if state is None else str(state)

    def get_state(self, key: str) -> str | None:
        value = self._one("SELECT value FROM kv WHERE key = ?", (key,))
        return None if value is None else str(value)

    def due_lanes(self, limit: int, now: float, busy: list[str]) -> list[str]:
        """Lanes due at `now`, not `busy`, in order of due time and arrival."""
        exclude = f"AND process_id NOT IN ({','.join('?' * len(busy))})" if busy else ""
        with self.lock:
            rows = self.db.execute(
                f"SELECT process_id FROM lanes WHERE next_attempt_at <= ? {exclude} "
                "ORDER BY next_attempt_at, position LIMIT ?",
                (now, *busy, limit),
            ).fetchall()
        return [r[0] for r in rows]

    def next_due(self, busy: list[str]) -> float | None:
        """When the next lane that is not `busy` is due, or None."""
        exclude = f"WHERE process_id NOT IN ({','.join('?' * len(busy))})" if busy else ""
        due = self._one(f"SELECT MIN(next_attempt_at) FROM lanes {exclude}", busy)
        return None if due is None else float(due)
