"""The durable store-and-forward queue for MQTT: SQLite in WAL mode under `state_dir`.

Every message under `R/equipment/` is committed here, with its `seq`, before it is sent, and deleted
only after the broker's PUBACK. Telemetry is evicted oldest first past `buffer_max_messages`; nothing
else ever is. `seq` is reserved in blocks in a side file as well as in the database, so that it never
repeats or goes back, even when a corrupt database is renamed aside and a fresh one started.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent import metrics
from agent.model import json_safe
from agent.sqlite_file import open_durable

log = structlog.get_logger("edge_agent.store")

SEQ_BLOCK = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    response_topic TEXT,
    correlation BLOB
);
CREATE INDEX IF NOT EXISTS messages_telemetry ON messages(kind, id);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(slots=True)
class StoredMessage:
    """One queued message as the MQTT sink sends it."""

    id: int
    seq: int
    kind: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None
    correlation: bytes | None


def dumps(payload: dict[str, Any]) -> bytes:
    """Strict, compact JSON: NaN and infinities as strings."""
    try:
        return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    except (ValueError, TypeError):
        return json.dumps(json_safe(payload), separators=(",", ":"), allow_nan=False, default=str).encode()


_RAW = "\0raw"  # key of a payload given as pre-encoded JSON text (see append_encoded)


def _encode(payload: dict[str, Any]) -> bytes:
    raw = payload.get(_RAW)
    if raw is not None:
        return f'{raw},"seq":{payload["seq"]}}}'.encode()
    return dumps(payload)


def _is_disk_full(err: sqlite3.Error) -> bool:
    text = str(err).lower()
    return "full" in text or "disk i/o" in text or getattr(err, "sqlite_errorcode", 0) == 13


class Store:
    """SQLite-backed FIFO of outgoing messages plus a small key-value table for daemon state."""

    def __init__(self, state_dir: Path, max_messages: int = 1_000_000) -> None:
        self.state_dir = state_dir
        self.path = state_dir / "store.sqlite"
        self.seq_path = state_dir / "seq"
        self.max_messages = max_messages
        self._db: sqlite3.Connection | None = None
        self._next_seq = 0
        self._reserved = 0
        self._depth = 0
        self._telemetry = 0
        self.degraded: str | None = None
        self.evicted = 0
        self.dropped = 0
        self._listeners: list[Callable[[], None]] = []
        # Messages that could not be written (a full disk) and must not be lost: retried on every append.
        self._unwritten: list[tuple[str, str, dict[str, Any], int, bool, str | None, bytes | None]] = []

    # -- opening

    def open(self) -> None:
        """Open (or create) the database; a corrupt file is renamed aside and a fresh one started."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # A queue read in order needs little cache; the default 2 MiB is memory a small box misses.
        self._db = open_durable(self.path, _SCHEMA, what="store", prepare=self._count, cache_kib=256)
        self._load_seq()
        metrics.STORE_DEPTH.set(self._depth)

    def _count(self, db: sqlite3.Connection) -> None:
        self._depth, self._telemetry = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(kind = 'telemetry'), 0) FROM messages"
        ).fetchone()

    def close(self) -> None:
        """Close the database."""
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "store not open"
        return self._db

    # -- seq

    def _load_seq(self) -> None:
        from_file = 0
        try:
            from_file = int(self.seq_path.read_text().strip() or 0)
        except (OSError, ValueError):
            pass
        row = self.db.execute("SELECT value FROM kv WHERE key='seq_reserved'").fetchone()
        from_db = int(row[0]) if row else 0
        top = self.db.execute("SELECT MAX(seq) FROM messages").fetchone()[0] or 0
        # Everything up to the last reservation may have been used by the previous run: start above it.
        self._next_seq = max(from_file, from_db, top + 1, 1)
        self._reserve(self._next_seq + SEQ_BLOCK)

    def _reserve(self, upto: int) -> None:
        tmp = self.seq_path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            fh.write(str(upto))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.seq_path)
        with contextlib.suppress(sqlite3.Error):
            self.db.execute("INSERT OR REPLACE INTO kv(key, value) VALUES('seq_reserved', ?)", (str(upto),))
        self._reserved = upto

    def next_seq(self) -> int:
        """Take the next `seq`."""
        seq = self._next_seq
        self._next_seq += 1
        if self._next_seq >= self._reserved:
            try:
                self._reserve(self._next_seq + SEQ_BLOCK)
            except OSError as err:
                # Without a new reservation a restart could reuse numbers: keep going, but say so.
                self.degraded = f"cannot reserve seq: {err}"
                log.error("seq_reserve_failed", error=str(err))
        return seq

    # -- queue

    def add_listener(self, cb: Callable[[], None]) -> None:
        """Call `cb` after every append (the MQTT sink wakes up)."""
        self._listeners.append(cb)

    def remove_listener(self, cb: Callable[[], None]) -> None:
        """Stop calling `cb` (a sink that has ended, e.g. replaced on reload)."""
        if cb in self._listeners:
            self._listeners.remove(cb)

    def append(
        self,
        kind: str,
        topic: str,
        payload: dict[str, Any],
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> int:
        """Give `payload` the next seq, commit it, and return the seq."""
        seq = self.next_seq()
        payload["seq"] = seq
        self._write([(kind, topic, payload, qos, retain, response_topic, correlation)])
        return seq

    def append_encoded(self, items: Iterable[tuple[str, str, str, int, bool]]) -> None:
        """Append messages whose JSON body is already text, an object missing its closing brace;
        the store adds `"seq"` and the brace (telemetry, encoded value by value as it arrives)."""
        rows: list[tuple[str, str, dict[str, Any], int, bool, str | None, bytes | None]] = []
        for kind, topic, body, qos, retain in items:
            rows.append((kind, topic, {"seq": self.next_seq(), _RAW: body}, qos, retain, None, None))
        if rows:
            self._write(rows)

    def _write(self, rows: list[tuple[str, str, dict[str, Any], int, bool, str | None, bytes | None]]) -> None:
        pending = self._unwritten + rows
        self._unwritten = []
        encoded = [
            (p["seq"], kind, topic, _encode(p), qos, int(retain), rt, corr)
            for kind, topic, p, qos, retain, rt, corr in pending
        ]
        for attempt in range(2):
            try:
                with self.db:
                    self.db.execute("BEGIN")
                    self.db.executemany(
                        "INSERT INTO messages(seq, kind, topic, payload, qos, retain, response_topic, correlation)"
                        " VALUES (?,?,?,?,?,?,?,?)",
                        encoded,
                    )
                break
            except sqlite3.OperationalError as err:
                if not _is_disk_full(err):
                    raise
                metrics.STORE_ERRORS.inc()
                if attempt == 0 and self._evict(max(len(encoded), 100)):
                    continue
                # Still full: drop telemetry (counted), keep the rest in memory and retry with the next write.
                if self.degraded is None:
                    log.error("store_disk_full", error=str(err))
                self.degraded = f"disk full: {err}"
                keep = [r for r in pending if r[0] != "telemetry"]
                self.dropped += len(pending) - len(keep)
                metrics.STORE_EVICTED.inc(len(pending) - len(keep))
                self._unwritten = keep
                self._notify()
                return
        else:  # pragma: no cover - the loop always breaks or returns
            return
        if self.degraded and self.degraded.startswith("disk full"):
            log.info("store_disk_ok")
            self.degraded = None
        added_tel = sum(1 for r in encoded if r[1] == "telemetry")
        self._depth += len(encoded)
        self._telemetry += added_tel
        for r in encoded:
            metrics.STORE_STORED.labels(r[1]).inc()
        if self._depth > self.max_messages:
            self._evict(self._depth - self.max_messages)
        metrics.STORE_DEPTH.set(self._depth)
        self._notify()

    def _notify(self) -> None:
        for cb in self._listeners:
            cb()

    def _evict(self, count: int) -> int:
        """Delete up to `count` of the oldest telemetry messages; return how many went."""
        if count <= 0 or self._telemetry == 0:
            return 0
        try:
            with self.db:
                cur = self.db.execute(
                    "DELETE FROM messages WHERE id IN"
                    " (SELECT id FROM messages WHERE kind='telemetry' ORDER BY id LIMIT ?)",
                    (count,),
                )
        except sqlite3.OperationalError as err:
            log.error("store_evict_failed", error=str(err))
            return 0
        n = cur.rowcount
        self._depth -= n
        self._telemetry -= n
        self.evicted += n
        metrics.STORE_EVICTED.inc(n)
        return n

    def fetch(self, after_id: int, limit: int) -> list[StoredMessage]:
        """The next messages in order after `after_id`."""
        rows = self.db.execute(
            "SELECT id, seq, kind, topic, payload, qos, retain, response_topic, correlation FROM messages"
            " WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        ).fetchall()
        return [StoredMessage(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7], r[8]) for r in rows]

    def max_id(self) -> int:
        """The id of the newest stored message (0 when empty)."""
        return int(self.db.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0])

    def delete(self, ids: list[int]) -> None:
        """Remove acknowledged messages."""
        if not ids:
            return
        removed = telemetry = 0
        with self.db:
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                rows = self.db.execute(
                    f"DELETE FROM messages WHERE id IN ({','.join('?' * len(chunk))}) RETURNING kind", chunk
                ).fetchall()
                removed += len(rows)
                telemetry += sum(1 for (kind,) in rows if kind == "telemetry")
        self._depth = max(0, self._depth - removed)
        self._telemetry = max(0, self._telemetry - telemetry)
        metrics.STORE_DEPTH.set(self._depth)

    @property
    def depth(self) -> int:
        """Messages waiting, including any held in memory by a full disk."""
        return self._depth + len(self._unwritten)

    # -- key-value state (alerts, bookkeeping)

    def set_state(self, key: str, value: Any) -> None:
        """Store a JSON value under `key` (None deletes it)."""
        try:
            with self.db:
                if value is None:
                    self.db.execute("DELETE FROM kv WHERE key=?", (key,))
                else:
                    self.db.execute("INSERT OR REPLACE INTO kv(key, value) VALUES(?, ?)", (key, json.dumps(value)))
        except sqlite3.OperationalError as err:
            log.error("store_state_write_failed", key=key, error=str(err))

    def state_items(self, prefix: str) -> dict[str, Any]:
        """Every stored state whose key starts with `prefix`."""
        rows = self.db.execute(
            "SELECT key, value FROM kv WHERE key >= ? AND key < ?", (prefix, prefix + "\uffff")
        ).fetchall()
        return {k: json.loads(v) for k, v in rows}
