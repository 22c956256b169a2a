"""The durable store-and-forward queue for MQTT: SQLite in WAL mode under `state_dir`.

Every message under `R/equipment/` is committed here, with its `seq`, before it is sent, and deleted
only after the broker's PUBACK. Telemetry is evicted oldest first past `buffer_max_messages`; nothing
else ever is. `seq` is reserved in blocks in a side file as well as in the database (`store_seq`), so
that it never repeats or goes back, even when a corrupt database is renamed aside and a fresh one started.

When `state_dir` cannot be written (read-only, an I/O error, a full disk) messages are held in memory
instead, bounded (telemetry first to go), still sent, and committed as soon as writing works again; the
store says it is not durable meanwhile. A store file deleted or replaced under the daemon is noticed by
`watch` and its rows are carried into a new file at the path (both in `store_recovery`).
"""

from __future__ import annotations

import contextlib
import heapq
import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import structlog

from agent import metrics
from agent.store_recovery import MEMORY_MAX_MESSAGES, WATCH_INTERVAL_S, StoreFile, write_kv
from agent.store_rows import INSERT, SELECT, Encoded, Lane, StoredMessage, describe_error, is_disk_full
from agent.store_seq import SEQ_BLOCK, SeqReservation
from drivers.sdk.jsonio import message_bytes as dumps

__all__ = [
    "MEMORY_MAX_MESSAGES",
    "RETRY_ON_APPEND_S",
    "SEQ_BLOCK",
    "WATCH_INTERVAL_S",
    "Lane",
    "Store",
    "StoredMessage",
    "describe_error",
    "dumps",
]

log = structlog.get_logger("edge_agent.store")

# While memory holds messages, how often an append tries to commit them first (always, for a few).
RETRY_ON_APPEND_S = 0.2


class Store(StoreFile):
    """SQLite-backed FIFO of outgoing messages plus a small key-value table for daemon state."""

    def __init__(self, state_dir: Path, max_messages: int = 1_000_000) -> None:
        super().__init__(state_dir, max_messages)
        self.seq_path = state_dir / "seq"
        self._seq = SeqReservation(self.seq_path, lambda: self.db)
        self.evicted = 0
        self._retried_at = 0.0

    # -- opening

    def open(self) -> None:
        """Open (or create) the database; a corrupt file is renamed aside and a fresh one started."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._open_db()
        self._seq.load()
        metrics.STORE_DEPTH.set(self._depth)
        metrics.STORE_DURABLE.set(1)

    def close(self) -> None:
        """Commit what memory still holds if that works now, count what cannot be kept, close."""
        if self._db is None:
            return
        if self._owing:
            self._commit_held()
        if self._held or self.not_durable:
            lost = self._held.by_kind()
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

    # -- seq

    @property
    def seq_error(self) -> str | None:
        """Why a block of seq could not be reserved, while it could not."""
        return self._seq.error

    def next_seq(self) -> int:
        """Take the next `seq`."""
        return self._seq.take()

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
        *,
        numbered: bool = True,
    ) -> int:
        """Give `payload` the next seq, commit it, and return the seq. Not `numbered` (another profile's
        message): no seq, so that today's stream keeps its counter without gaps; returns 0."""
        seq = self.next_seq() if numbered else 0
        if numbered:
            payload["seq"] = seq
        msg = StoredMessage(self._take_id(), seq, kind, topic, dumps(payload), qos, retain, response_topic, correlation)
        self._write([msg])
        return seq

    def append_encoded(
        self,
        items: Iterable[Encoded],
        *,
        plain: Iterable[Encoded] = (),
    ) -> None:
        """Append messages whose JSON body is already text, an object missing its closing brace; the store
        adds `"seq"` and the brace (telemetry, encoded value by value as it arrives). `plain` ones (another
        profile's) get the brace only, no seq; all in one commit."""
        msgs = []
        for kind, topic, body, qos, retain in items:
            seq = self.next_seq()
            data = f'{body},"seq":{seq}}}'.encode()
            msgs.append(StoredMessage(self._take_id(), seq, kind, topic, data, qos, retain, None, None))
        for kind, topic, body, qos, retain in plain:
            data = f"{body}}}".encode()
            msgs.append(StoredMessage(self._take_id(), 0, kind, topic, data, qos, retain, None, None))
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
        if self._owing:
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
            if is_disk_full(err) and self._evict(max(len(msgs), 100)):
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
            self.db.executemany(INSERT, [m.row() for m in msgs])

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

    def _evict(self, count: int) -> int:
        """Delete up to `count` of the oldest telemetry messages; return how many went."""
        if count <= 0 or self._telemetry == 0:
            return 0
        try:
            with self._transaction() as db:
                gone = db.execute(
                    "DELETE FROM messages WHERE id IN"
                    " (SELECT id FROM messages WHERE kind='telemetry' ORDER BY id LIMIT ?) RETURNING id",
                    (count,),
                ).fetchall()
        except sqlite3.Error as err:
            log.error("store_evict_failed", error=describe_error(err))
            return 0
        n = len(gone)
        if self.kept:
            self.kept.difference_update(i for (i,) in gone)
        self._depth -= n
        self._telemetry -= n
        self.evicted += n
        metrics.STORE_EVICTED.inc(n)
        return n

    def fetch(
        self, after_id: int, limit: int, upto: int | None = None, lane: Lane | None = None
    ) -> list[StoredMessage]:
        """The next messages (of `lane`; all without one) in order after `after_id` (and not after `upto`), from
        disk and memory."""
        return self.fetch_through(after_id, limit, upto, lane)[0]

    def fetch_through(
        self, after_id: int, limit: int, upto: int | None = None, lane: Lane | None = None
    ) -> tuple[list[StoredMessage], int]:
        """`fetch`, and the id up to which every message of `lane` has been returned: past the other lane's
        rows when the batch was short, so that a reader does not scan them again."""
        top = self.last_id if upto is None else min(upto, self.last_id)
        rows: list[StoredMessage] = []
        complete = False  # whether disk had no more rows of the lane up to `top`
        if self._db is not None:
            try:
                where, args = ("", ()) if lane is None else lane.sql()
                if upto is None:
                    found = self.db.execute(
                        f"{SELECT} WHERE id > ?{where} ORDER BY id LIMIT ?", (after_id, *args, limit)
                    )
                else:
                    found = self.db.execute(
                        f"{SELECT} WHERE id > ? AND id <= ?{where} ORDER BY id LIMIT ?", (after_id, upto, *args, limit)
                    )
                rows = [StoredMessage(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7], r[8]) for r in found]
                complete = len(rows) < limit
            except sqlite3.Error as err:
                # Unreadable now (an I/O error): what memory holds still goes; the rest waits for the disk.
                self._fail(err)
        if self._acked_undeleted:
            rows = [m for m in rows if m.id not in self._acked_undeleted]
        if self._held:
            held = self._held.after(after_id, upto, limit, lane)
            complete = complete and len(held) < limit
            rows = list(heapq.merge(rows, held, key=lambda m: m.id))[:limit] if rows else held
        if complete and len(rows) < limit:
            return rows, max(after_id, top)
        return rows, rows[-1].id if rows else after_id

    def first_waiting_id(self) -> int | None:
        """The id of the oldest message still to be delivered (not one kept for the Sparkplug window), if any."""
        limit = len(self.kept) + len(self._acked_undeleted) + 1
        ids: list[int] = []
        if self._db is not None:
            try:
                ids = [r[0] for r in self.db.execute("SELECT id FROM messages ORDER BY id LIMIT ?", (limit,))]
            except sqlite3.Error:
                ids = []
        if self._held:
            ids = sorted({*ids, *(m.id for m in self._held.after(0, None, limit))})
        return next((i for i in ids if i not in self.kept and i not in self._acked_undeleted), None)

    def max_id(self) -> int:
        """The id of the newest stored message (0 when empty)."""
        return self.last_id if self.depth else 0

    def delete(self, ids: list[int]) -> None:
        """Remove acknowledged messages."""
        if not ids:
            return
        if self.kept:
            self.kept.difference_update(ids)
        on_disk = [i for i in ids if self._held.pop(i) is None]
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
        if self.incident is not None and self.depth <= len(self.kept):
            log.info("store_incident_cleared", incident=self.incident)
            self.incident = None
        metrics.STORE_DEPTH.set(self.depth)

    @property
    def degraded(self) -> str | None:
        """What is wrong with the store, if anything."""
        return self.not_durable or self.seq_error or self.incident

    # -- key-value state (alerts, bookkeeping)

    def set_state(self, key: str, value: Any) -> None:
        """Store a JSON value under `key` (None deletes it)."""
        if self._held_kv or self._held:
            self._held_kv[key] = value
            return
        try:
            with self._transaction() as db:
                write_kv(db, key, value)
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
