"""The durable store-and-forward queue for MQTT: SQLite in WAL mode under `state_dir`.

Every message under `R/equipment/` is committed here, with its `seq`, before it is sent, and deleted
only after the broker's PUBACK. Telemetry is evicted oldest first past `buffer_max_messages`; nothing
else ever is. `seq` is reserved in blocks in a side file as well as in the database, so that it never
repeats or goes back, even when a corrupt database is renamed aside and a fresh one started.

When `state_dir` cannot be written (read-only, an I/O error, a full disk) messages are held in memory
instead, bounded (telemetry first to go), still sent, and committed as soon as writing works again; the
store says it is not durable meanwhile. A store file deleted or replaced under the daemon is noticed by
`watch` and its rows are carried into a new file at the path.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import json
import os
import sqlite3
import time
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
# Messages held in memory while state_dir cannot be written, at most (telemetry goes first past it).
MEMORY_MAX_MESSAGES = 200_000
# How often a store that cannot write tries again, and checks that its file is still the one at its path.
WATCH_INTERVAL_S = 1.0
RETRY_ON_APPEND_S = 0.2

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
_INSERT = (
    "INSERT OR IGNORE INTO messages(id, seq, kind, topic, payload, qos, retain, response_topic, correlation)"
    " VALUES (?,?,?,?,?,?,?,?,?)"
)
_SELECT = "SELECT id, seq, kind, topic, payload, qos, retain, response_topic, correlation FROM messages"


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


def dumps(payload: dict[str, Any]) -> bytes:
    """Strict, compact JSON: NaN and infinities as strings."""
    try:
        return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    except (ValueError, TypeError):
        return json.dumps(json_safe(payload), separators=(",", ":"), allow_nan=False, default=str).encode()


def _is_disk_full(err: sqlite3.Error) -> bool:
    return getattr(err, "sqlite_errorcode", 0) == 13 or "full" in str(err).lower()


def describe_error(err: BaseException) -> str:
    """The real SQLite or OS error, with its code name where SQLite gives one."""
    name = getattr(err, "sqlite_errorname", None)
    return f"{err} ({name})" if name else str(err)


class Store:
    """SQLite-backed FIFO of outgoing messages plus a small key-value table for daemon state."""

    def __init__(self, state_dir: Path, max_messages: int = 1_000_000) -> None:
        self.state_dir = state_dir
        self.path = state_dir / "store.sqlite"
        self.seq_path = state_dir / "seq"
        self.max_messages = max_messages
        self.memory_max = min(max_messages, MEMORY_MAX_MESSAGES)
        self._db: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None
        self._next_seq = 0
        self._reserved = 0
        self._next_id = 1
        self._depth = 0  # rows in the database
        self._telemetry = 0
        self.seq_error: str | None = None
        self.not_durable: str | None = None  # why state_dir cannot be written, while it cannot
        self.incident: str | None = None  # the store file was deleted or replaced; cleared when drained
        self.evicted = 0
        self.dropped = 0
        self._listeners: list[Callable[[], None]] = []
        # Messages not (yet) committed, by id; `_held_ids` keeps their ids sorted (entries may be stale).
        self._held: dict[int, StoredMessage] = {}
        self._held_ids: list[int] = []
        self._held_telemetry = 0
        self._acked_undeleted: set[int] = set()  # acknowledged, but the delete could not be written
        self._held_kv: dict[str, Any] = {}  # state writes that could not be committed (None = delete)
        self._retried_at = 0.0

    # -- opening

    def open(self) -> None:
        """Open (or create) the database; a corrupt file is renamed aside and a fresh one started."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._open_db()
        self._load_seq()
        metrics.STORE_DEPTH.set(self._depth)
        metrics.STORE_DURABLE.set(1)

    def _open_db(self) -> None:
        # A queue read in order needs little cache; the default 2 MiB is memory a small box misses.
        self._db = open_durable(self.path, _SCHEMA, what="store", prepare=self._count, cache_kib=256)
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)
        top = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0]
        seqrow = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='messages'").fetchone()
        self._next_id = max(self._next_id, top + 1, (seqrow[0] if seqrow else 0) + 1)

    def _count(self, db: sqlite3.Connection) -> None:
        self._depth, self._telemetry = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(kind = 'telemetry'), 0) FROM messages"
        ).fetchone()

    def close(self) -> None:
        """Commit what memory still holds if that works now, count what cannot be kept, close."""
        if self._db is None:
            return
        if self._held or self._acked_undeleted or self._held_kv:
            self._commit_held()
        if self._held or self.not_durable:
            lost: dict[str, int] = {}
            for m in self._held.values():
                lost[m.kind] = lost.get(m.kind, 0) + 1
            for kind, n in lost.items():
                metrics.STORE_LOST.labels(kind).inc(n)
            # The one line a person needs after a stop with state_dir unwritable: what could not be kept.
            (log.error if self._held else log.warning)(
                "store_undelivered_at_stop",
                messages=len(self._held),
                by_kind=lost,
                error=self.not_durable,
            )
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.OperationalError("the store is not open")
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
        self.seq_error = None

    def next_seq(self) -> int:
        """Take the next `seq`."""
        seq = self._next_seq
        self._next_seq += 1
        if self._next_seq >= self._reserved:
            try:
                self._reserve(self._next_seq + SEQ_BLOCK)
            except OSError as err:
                # Without a new reservation a restart could reuse numbers: keep going, but say so.
                if self.seq_error is None:
                    log.error("seq_reserve_failed", error=str(err))
                self.seq_error = f"cannot reserve seq: {err}"
                self._reserved = self._next_seq + 1  # try again with the next message
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
        msg = StoredMessage(self._take_id(), seq, kind, topic, dumps(payload), qos, retain, response_topic, correlation)
        self._write([msg])
        return seq

    def append_encoded(self, items: Iterable[tuple[str, str, str, int, bool]]) -> None:
        """Append messages whose JSON body is already text, an object missing its closing brace;
        the store adds `"seq"` and the brace (telemetry, encoded value by value as it arrives)."""
        msgs = []
        for kind, topic, body, qos, retain in items:
            seq = self.next_seq()
            msgs.append(
                StoredMessage(
                    self._take_id(), seq, kind, topic, f'{body},"seq":{seq}}}'.encode(), qos, retain, None, None
                )
            )
        if msgs:
            self._write(msgs)

    def _take_id(self) -> int:
        i = self._next_id
        self._next_id += 1
        return i

    @property
    def last_id(self) -> int:
        """The id of the newest message appended (0 before any)."""
        return self._next_id - 1

    def _write(self, msgs: list[StoredMessage]) -> None:
        if self._held or self._acked_undeleted or self._held_kv:
            # Order matters: what memory holds goes to disk before anything newer does.
            now = time.monotonic()
            if len(self._held) < 256 or now - self._retried_at >= RETRY_ON_APPEND_S:
                self._retried_at = now
                self._commit_held()
            if self._held:
                self._hold(msgs)
                self._notify()
                return
        try:
            self._insert(msgs)
        except sqlite3.Error as err:
            if _is_disk_full(err) and self._evict(max(len(msgs), 100)):
                try:
                    self._insert(msgs)
                except sqlite3.Error as err2:
                    err = err2
                else:
                    self._committed(msgs)
                    return
            self._fail(err)
            self._hold(msgs)
            self._notify()
            return
        self._committed(msgs)
        if self.not_durable is not None and not (self._acked_undeleted or self._held_kv):
            log.info("store_durable_again", committed=0, was=self.not_durable)
            self.not_durable = None
            metrics.STORE_DURABLE.set(1)

    def _insert(self, msgs: list[StoredMessage]) -> None:
        with self._transaction():
            self.db.executemany(_INSERT, [m.row() for m in msgs])

    @contextlib.contextmanager
    def _transaction(self) -> Any:
        """BEGIN..COMMIT; a failed ROLLBACK (SQLite may have rolled back already) never hides the real error."""
        db = self.db
        db.execute("BEGIN")
        try:
            yield db
        except BaseException:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _committed(self, msgs: list[StoredMessage]) -> None:
        added_tel = 0
        for m in msgs:
            metrics.STORE_STORED.labels(m.kind).inc()
            if m.kind == "telemetry":
                added_tel += 1
        self._depth += len(msgs)
        self._telemetry += added_tel
        if self._depth > self.max_messages:
            self._evict(self._depth - self.max_messages)
        metrics.STORE_DEPTH.set(self.depth)
        self._notify()

    def _fail(self, err: BaseException) -> None:
        """Writing failed: from now on messages are held in memory until it works again."""
        metrics.STORE_ERRORS.inc()
        text = describe_error(err)
        if self.not_durable is None or not self.not_durable.startswith(text):
            text += self._os_cause()
        else:
            text = self.not_durable
        if self.not_durable is None:
            log.error("store_not_durable", error=text, path=str(self.path))
            metrics.STORE_DURABLE.set(0)
        self.not_durable = text

    def _os_cause(self) -> str:
        """What the OS says about writing state_dir: SQLite reports a read-only filesystem as an I/O error."""
        probe = self.state_dir / ".write-probe"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"probe")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.unlink(probe)
        except OSError as err:
            return f"; state_dir: {err.strerror}"
        return ""

    def _hold(self, msgs: list[StoredMessage]) -> None:
        for m in msgs:
            self._held[m.id] = m
            self._held_ids.append(m.id)  # ids only grow, so the list stays sorted
            if m.kind == "telemetry":
                self._held_telemetry += 1
        over = len(self._held) - self.memory_max
        if over > 0 and self._held_telemetry:
            gone = 0
            for i in list(self._held):
                if gone >= over or not self._held_telemetry:
                    break
                if self._held[i].kind == "telemetry":
                    del self._held[i]
                    self._held_telemetry -= 1
                    gone += 1
            self.dropped += gone
            metrics.STORE_EVICTED.inc(gone)
        metrics.STORE_HELD.set(len(self._held))

    def _commit_held(self) -> bool:
        """Write what memory holds (and the deletes and state it owes); True when nothing is owed any more."""
        if self._db is None:
            return False
        held = list(self._held.values())
        kv = dict(self._held_kv)
        acked = list(self._acked_undeleted)
        try:
            with self._transaction() as db:
                db.executemany(_INSERT, [m.row() for m in held])
                for i in range(0, len(acked), 500):
                    chunk = acked[i : i + 500]
                    db.execute(f"DELETE FROM messages WHERE id IN ({','.join('?' * len(chunk))})", chunk)
                for key, value in kv.items():
                    if value is None:
                        db.execute("DELETE FROM kv WHERE key=?", (key,))
                    else:
                        db.execute("INSERT OR REPLACE INTO kv(key, value) VALUES(?, ?)", (key, json.dumps(value)))
        except sqlite3.Error as err:
            self._fail(err)
            return False
        self._held.clear()
        self._held_ids.clear()
        self._held_telemetry = 0
        self._acked_undeleted.difference_update(acked)
        for key in kv:
            self._held_kv.pop(key, None)
        with contextlib.suppress(sqlite3.Error):
            self._count(self.db)
        metrics.STORE_HELD.set(0)
        if self.not_durable is not None:
            log.info("store_durable_again", committed=len(held), was=self.not_durable)
            self.not_durable = None
            metrics.STORE_DURABLE.set(1)
        for m in held:
            metrics.STORE_STORED.labels(m.kind).inc()
        metrics.STORE_DEPTH.set(self.depth)
        return True

    def _notify(self) -> None:
        for cb in self._listeners:
            cb()

    def _evict(self, count: int) -> int:
        """Delete up to `count` of the oldest telemetry messages; return how many went."""
        if count <= 0 or self._telemetry == 0:
            return 0
        try:
            with self._transaction() as db:
                cur = db.execute(
                    "DELETE FROM messages WHERE id IN"
                    " (SELECT id FROM messages WHERE kind='telemetry' ORDER BY id LIMIT ?)",
                    (count,),
                )
        except sqlite3.Error as err:
            log.error("store_evict_failed", error=describe_error(err))
            return 0
        n = cur.rowcount
        self._depth -= n
        self._telemetry -= n
        self.evicted += n
        metrics.STORE_EVICTED.inc(n)
        return n

    def fetch(self, after_id: int, limit: int, upto: int | None = None) -> list[StoredMessage]:
        """The next messages in order after `after_id` (and not after `upto`), from disk and memory."""
        rows: list[StoredMessage] = []
        if self._db is not None:
            try:
                if upto is None:
                    found = self.db.execute(f"{_SELECT} WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit))
                else:
                    found = self.db.execute(
                        f"{_SELECT} WHERE id > ? AND id <= ? ORDER BY id LIMIT ?", (after_id, upto, limit)
                    )
                rows = [StoredMessage(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7], r[8]) for r in found]
            except sqlite3.Error as err:
                # Unreadable now (an I/O error): what memory holds still goes; the rest waits for the disk.
                self._fail(err)
        if self._acked_undeleted:
            rows = [m for m in rows if m.id not in self._acked_undeleted]
        if not self._held:
            return rows
        held = self._held_after(after_id, upto, limit)
        if not rows:
            return held
        return list(heapq.merge(rows, held, key=lambda m: m.id))[:limit]

    def _held_after(self, after_id: int, upto: int | None, limit: int) -> list[StoredMessage]:
        ids = self._held_ids
        if len(ids) > 2 * len(self._held) + 64:
            ids[:] = [i for i in ids if i in self._held]
        out: list[StoredMessage] = []
        for i in ids[bisect.bisect_right(ids, after_id) :]:
            if upto is not None and i > upto:
                break
            m = self._held.get(i)
            if m is not None:
                out.append(m)
                if len(out) >= limit:
                    break
        return out

    def max_id(self) -> int:
        """The id of the newest stored message (0 when empty)."""
        return self.last_id if self.depth else 0

    def delete(self, ids: list[int]) -> None:
        """Remove acknowledged messages."""
        if not ids:
            return
        on_disk = []
        for i in ids:
            m = self._held.pop(i, None)
            if m is None:
                on_disk.append(i)
            elif m.kind == "telemetry":
                self._held_telemetry -= 1
        if len(on_disk) != len(ids):
            metrics.STORE_HELD.set(len(self._held))
        if on_disk:
            removed = telemetry = 0
            try:
                with self._transaction() as db:
                    for i in range(0, len(on_disk), 500):
                        chunk = on_disk[i : i + 500]
                        rows = db.execute(
                            f"DELETE FROM messages WHERE id IN ({','.join('?' * len(chunk))}) RETURNING kind", chunk
                        ).fetchall()
                        removed += len(rows)
                        telemetry += sum(1 for (kind,) in rows if kind == "telemetry")
            except sqlite3.Error as err:
                # Delivered, but still on disk: never sent again in this run, deleted once writing works.
                self._fail(err)
                self._acked_undeleted.update(on_disk)
            else:
                self._depth = max(0, self._depth - removed)
                self._telemetry = max(0, self._telemetry - telemetry)
        if self.incident is not None and self.depth == 0:
            log.info("store_incident_cleared", incident=self.incident)
            self.incident = None
        metrics.STORE_DEPTH.set(self.depth)

    @property
    def depth(self) -> int:
        """Messages waiting, including any held in memory."""
        return max(0, self._depth - len(self._acked_undeleted)) + len(self._held)

    @property
    def held(self) -> int:
        """Messages held in memory, not (yet) on disk."""
        return len(self._held)

    @property
    def degraded(self) -> str | None:
        """What is wrong with the store, if anything."""
        return self.not_durable or self.seq_error or self.incident

    # -- keeping watch: writing again, the file still ours

    async def watch(self, stop: asyncio.Event, interval_s: float = WATCH_INTERVAL_S) -> None:
        """Every `interval_s`: commit what memory holds once writing works; notice a deleted or replaced file."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):
                    await stop.wait()
            if stop.is_set():
                return
            self.check()

    def check(self) -> None:
        """One round of `watch`."""
        if self._db is None:
            return
        reason = self._file_gone()
        if reason is not None:
            self._carry_over(reason)
        if self._held or self._acked_undeleted or self._held_kv:
            if self._commit_held():
                self._notify()

    def _file_gone(self) -> str | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return "deleted"
        except OSError:
            return None
        if (st.st_dev, st.st_ino) != self._identity:
            return "replaced"
        return None

    def _carry_over(self, reason: str) -> None:
        """Copy the open (unlinked or displaced) database into a new file at the path and switch to it."""
        tmp = self.path.with_name(self.path.name + ".carry")
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)
            dst = sqlite3.connect(tmp)
            try:
                self.db.backup(dst)
            finally:
                dst.close()
        except (sqlite3.Error, OSError) as err:
            # Cannot write a new file now: keep going on the old one (still open) and try again next round.
            self._fail(err)
            return
        old, self._db = self._db, None
        if old is not None:
            with contextlib.suppress(sqlite3.Error):
                old.close()
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            other = Path(str(self.path) + suffix)
            with contextlib.suppress(OSError):
                if reason == "replaced" and other.exists():
                    other.rename(Path(f"{self.path}.replaced-{stamp}{suffix}"))
                elif suffix:
                    other.unlink(missing_ok=True)  # the WAL files of a deleted database are stale
        try:
            os.replace(tmp, self.path)
            self._open_db()
        except (sqlite3.Error, OSError) as err:
            self._fail(err)
            # Keep a connection to whichever copy exists; the next round tries again (the identity is stale).
            fallback = self.path if self.path.exists() else tmp
            with contextlib.suppress(sqlite3.Error):
                self._db = sqlite3.connect(fallback, isolation_level=None, check_same_thread=False)
            return
        metrics.STORE_RECREATED.inc()
        self.incident = f"the store file was {reason} under the daemon; {self._depth} messages carried into a new file"
        log.error("store_file_recreated", reason=reason, messages=self._depth, path=str(self.path))

    # -- key-value state (alerts, bookkeeping)

    def set_state(self, key: str, value: Any) -> None:
        """Store a JSON value under `key` (None deletes it)."""
        if self._held_kv or self._held:
            self._held_kv[key] = value
            return
        try:
            with self._transaction() as db:
                if value is None:
                    db.execute("DELETE FROM kv WHERE key=?", (key,))
                else:
                    db.execute("INSERT OR REPLACE INTO kv(key, value) VALUES(?, ?)", (key, json.dumps(value)))
        except sqlite3.Error as err:
            self._fail(err)
            self._held_kv[key] = value

    def state_items(self, prefix: str) -> dict[str, Any]:
        """Every stored state whose key starts with `prefix`."""
        out: dict[str, Any] = {}
        with contextlib.suppress(sqlite3.Error):
            rows = self.db.execute(
                "SELECT key, value FROM kv WHERE key >= ? AND key < ?", (prefix, prefix + "\uffff")
            ).fetchall()
            out = {k: json.loads(v) for k, v in rows}
        for k, v in self._held_kv.items():
            if k.startswith(prefix):
                if v is None:
                    out.pop(k, None)
                else:
                    out[k] = v
        return out
