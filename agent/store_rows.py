"""What the store's SQLite file holds: the schema, one queued message (`StoredMessage`), the statements
that write and read it, and how an SQLite error is told."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

SCHEMA = """
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
INSERT = (
    "INSERT OR IGNORE INTO messages(id, seq, kind, topic, payload, qos, retain, response_topic, correlation)"
    " VALUES (?,?,?,?,?,?,?,?,?)"
)
SELECT = "SELECT id, seq, kind, topic, payload, qos, retain, response_topic, correlation FROM messages"


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

    def row(self) -> tuple[Any, ...]:
        return (
            self.id,
            self.seq,
            self.kind,
            self.topic,
            self.payload,
            self.qos,
            int(self.retain),
            self.response_topic,
            self.correlation,
        )


# A queue entry whose JSON body is already text: kind, topic, the object without its closing brace, qos, retain.
Encoded = tuple[str, str, str, int, bool]


@dataclass(frozen=True, slots=True)
class Lane:
    """The part of the queue one broker connection sends: the topics under `prefix` (`inside`) or all others."""

    prefix: str
    inside: bool

    def keeps(self, topic: str) -> bool:
        return topic.startswith(self.prefix) == self.inside

    def sql(self) -> tuple[str, tuple[Any, ...]]:
        """The WHERE clause part and its parameters."""
        return " AND (substr(topic, 1, ?) = ?) = ?", (len(self.prefix), self.prefix, int(self.inside))


def is_disk_full(err: sqlite3.Error) -> bool:
    return getattr(err, "sqlite_errorcode", 0) == 13 or "full" in str(err).lower()


def describe_error(err: BaseException) -> str:
    """The real SQLite or OS error, with its code name where SQLite gives one."""
    name = getattr(err, "sqlite_errorname", None)
    return f"{err} ({name})" if name else str(err)
