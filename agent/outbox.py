"""The durable MPM outbox: SQLite in WAL mode, one ordered lane per process, dead letters, a key ledger.

Every quality result and process status update is committed here before it is attempted and keeps
its Idempotency-Key and stored body bytes until MPM answers. A process's items go out one after the
other (its lane); lanes are independent, so one process stuck behind failures never holds up another.
A transient failure backs the lane off (capped, with jitter, honouring Retry-After) and is retried
without end; a final 4xx turns the item into a dead letter. Refused credentials (401/403) are no
verdict on an item: the whole outbox pauses, keeps every item and probes again on a capped backoff
(at once after `retry_now`, a reload). Delivered items stay as a ledger of keys (their body dropped)
so a repeated key is recognised as a duplicate and never sent again.

The backlog lives in the database: the dispatcher reads a few ready lanes at a time from the `lanes`
table (one row per process with pending items) and each lane task reads its head item. The one
exception is a disk that cannot take a write (full, I/O error, read-only): status updates and state
are then held in memory, in order, and committed as soon as the file takes writes again; a quality
result is refused instead (its source keeps it and offers it again).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import structlog

from agent.errors import DataError, RejectedError, TransientError
from agent.metrics import MPM_CREDENTIALS_REFUSED, OUTBOX_DELIVERED, OUTBOX_DEPTH, OUTBOX_REJECTED
from agent.model import iso, json_bytes, utcnow
from agent.mpm import CredentialsRefused
from agent.reconnect import jittered
from agent.sqlite_file import is_storage_fault, open_durable, transaction

if TYPE_CHECKING:
    from agent.mpm import MPMClient

log = structlog.get_logger("edge_agent.outbox")

Kind = Literal["quality_result", "process_status"]
Outcome = Literal["delivered", "rejected"]
OutcomeCallback = Callable[["OutboxItem", str], Any]

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


class Outbox:
    """The durable outbox in front of `MPMClient`; see the module docstring."""

    def __init__(
        self,
        path: Path | str,
        client: MPMClient,
        *,
        backoff_max_s: float = 30.0,
        backoff_base_s: float = 0.5,
        on_outcome: OutcomeCallback | None = None,
        concurrency: int = 8,
        max_body_bytes: int | None = None,
        max_held: int = 100_000,
    ) -> None:
        self.path = Path(path)
        self.client = client
        self.backoff_max_s = backoff_max_s
        self.backoff_base_s = min(backoff_base_s, backoff_max_s)
        self.on_outcome = on_outcome
        self.concurrency = max(1, concurrency)
        self.max_body_bytes = max_body_bytes
        self.max_held = max_held
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._depth = 0
        self._idle = asyncio.Event()
        self._position = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._lanes: dict[str, asyncio.Task[None]] = {}
        self._outcome_tasks: set[asyncio.Task[Any]] = set()
        # Whole-MPM health, to stop hammering a dead MPM from every lane at once (see _dispatch).
        self._failing_lanes: set[str] = set()
        self._global_failures = 0
        self._probe_after = 0.0
        self._down = False
        self._down_since: float | None = None
        self._last_error: str | None = None
        # Refused credentials pause every lane (see _credentials_refused); counted for the metrics.
        self._refused: CredentialsRefused | None = None
        self.credentials_refused_count = 0
        # Batches that the disk could not take, oldest first, and the write error that put them here.
        self._held: deque[Batch] = deque()
        self._held_items = 0
        self._flush_attempts = 0
        self._flush_after = 0.0
        self._write_error: sqlite3.Error | None = None
        self._lanes_reset_pending = False
        self._open()

    # ---- the database -------------------------------------------------------------------------

    def _open(self) -> None:
        self._db = open_durable(self.path, _SCHEMA, what="outbox", prepare=self._prepare)
        self._depth_changed()
        log.info("outbox_opened", path=str(self.path), pending=self._depth)

    def _prepare(self, db: sqlite3.Connection) -> None:
        try:
            self._reset_lanes(db)
        except sqlite3.Error as err:
            if not is_storage_fault(err):
                raise
            # A full disk at start: open anyway (reads work) and reset the lanes once writes do.
            self._write_failed(err, kind="open")
            self._lanes_reset_pending = True
        self._depth = db.execute("SELECT COUNT(*) FROM items WHERE state = 'pending'").fetchone()[0]
        self._position = db.execute("SELECT COALESCE(MAX(position), 0) FROM lanes").fetchone()[0]

    def _reset_lanes(self, db: sqlite3.Connection) -> None:
        """A restart retries at once (backoffs were on the old process's clock); lanes of pending items that
        lost their row get one back."""
        with transaction(db):
            db.execute("UPDATE lanes SET next_attempt_at = 0")
            db.execute(
                "INSERT OR IGNORE INTO lanes(process_id, next_attempt_at, attempts, position) "
                "SELECT process_id, 0, 0, MIN(id) FROM items WHERE state = 'pending' GROUP BY process_id"
            )
        self._lanes_reset_pending = False

    @property
    def _writes_pending(self) -> bool:
        """Writes the disk refused earlier that must succeed before any new one (order)."""
        return bool(self._held) or self._lanes_reset_pending

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "outbox is closed"
        return self._db

    def close(self) -> None:
        """Close the database (no draining; `stop` first when running)."""
        with self._lock:
            if self._db is not None:
                if self._writes_pending and self._flush_held() is not None:
                    log.error("outbox_held_lost", items=self._held_items, batches=len(self._held))
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
                self._db = None

    def _depth_changed(self) -> None:
        depth = self.depth()
        OUTBOX_DEPTH.set(depth)
        self._call_in_loop(self._idle.set if depth == 0 else self._idle.clear)

    # ---- enqueueing ---------------------------------------------------------------------------

    def _insert(self, kind: str, process_id: str, equipment_id: str | None, key: str, body: bytes) -> bool:
        """Insert one pending item inside the caller's transaction; False when the key is a duplicate."""
        db = self.db
        row = db.execute("SELECT id, state FROM items WHERE idempotency_key = ?", (key,)).fetchone()
        if row is not None:
            if row[1] != "dead":
                return False
            # A dead letter's key submitted again is a new attempt: the old dead letter makes way.
            db.execute("DELETE FROM items WHERE id = ?", (row[0],))
        db.execute(
            "INSERT INTO items(kind, process_id, equipment_id, idempotency_key, body, state, created_at) "
            "VALUES (?, ?, ?, ?, ?, 'pending', ?)",
            (kind, process_id, equipment_id, key, body, iso(utcnow())),
        )
        self._position += 1
        db.execute(
            "INSERT OR IGNORE INTO lanes(process_id, next_attempt_at, attempts, position) VALUES (?, 0, 0, ?)",
            (process_id, self._position),
        )
        return True

    def _write(self, batch: Batch) -> list[bool]:
        """Commit one batch in one transaction; the depth follows."""
        items, state = batch
        with self._lock, transaction(self.db) as db:
            added = [self._insert(*item) for item in items]
            if state is not None:
                db.execute("INSERT OR REPLACE INTO kv(key, value) VALUES (?, ?)", state)
        self._depth += sum(added)
        return added

    def _enqueue(self, items: Sequence[Row], state: tuple[str, str] | None, *, hold: bool) -> list[bool]:
        """Commit items (and state); with `hold`, a disk that cannot take them keeps them in memory, in order."""
        for kind, pid, _eid, key, _body in items:
            if not pid:
                raise ValueError(f"outbox {kind} without a process_id")
            if not key:
                raise ValueError(f"outbox {kind} for process {pid!r} without an idempotency key")
        batch: Batch = (list(items), state)
        with self._lock:
            # Held batches go first: nothing may overtake them in its process's lane.
            err = self._flush_held() if self._writes_pending else None
            if err is None:
                try:
                    added = self._write(batch)
                except sqlite3.Error as write_err:
                    err = write_err
                else:
                    self._write_ok()
            if err is not None:
                self._write_failed(err, kind=items[0][0] if items else "state")
                if not hold or not is_storage_fault(err) or self._held_items + len(items) > self.max_held:
                    raise err
                self._held.append(batch)
                self._held_items += len(items)
                # A held update is new as far as anyone can tell now; a duplicate is skipped when committed.
                added = [True] * len(items)
        self._depth_changed()
        if any(added):
            self._notify()
        return added

    def _flush_held(self) -> sqlite3.Error | None:
        """Commit held batches in order; the error that stopped it, or None when all are committed."""
        with self._lock:
            if self._lanes_reset_pending:
                try:
                    self._reset_lanes(self.db)
                except sqlite3.Error as err:
                    return err
            while self._held:
                try:
                    self._write(self._held[0])
                except sqlite3.Error as err:
                    return err
                items, _ = self._held.popleft()
                self._held_items -= len(items)
            self._flush_attempts = 0
            self._write_ok()
        self._depth_changed()
        self._notify()
        return None

    def _try_flush(self) -> None:
        """The dispatcher's retry of held batches, on a capped jittered backoff."""
        err = self._flush_held()
        if err is not None:
            self._flush_after = time.monotonic() + jittered(
                self.backoff_base_s, self.backoff_max_s, self._flush_attempts
            )
            self._flush_attempts += 1

    def _write_failed(self, err: sqlite3.Error, **fields: Any) -> None:
        """A write the database refused: logged with SQLite's own words once per transition."""
        if self._write_error is None:
            log.error(
                "outbox_write_failed",
                error=str(err),
                sqlite_error=getattr(err, "sqlite_errorname", None),
                held=self._held_items,
                **fields,
            )
        self._write_error = err

    def _write_ok(self) -> None:
        if self._write_error is not None and not self._writes_pending:
            self._write_error = None
            log.info("outbox_write_recovered", pending=self._depth)

    def enqueue_quality(
        self, process_id: str, equipment_id: str | None, result: dict[str, Any], idempotency_key: str
    ) -> bool:
        """Commit a quality result; True when new, False when its key is already pending or delivered."""
        body = json_bytes(result)
        if self.max_body_bytes is not None and len(body) > self.max_body_bytes:
            # MPM would only refuse it; the driver fails its source instead of a dead letter appearing later.
            raise DataError(
                f"quality result {idempotency_key!r} for process {process_id!r} is {len(body)} bytes, "
                f"more than the {self.max_body_bytes} accepted ([mpm] max_body_bytes)"
            )
        # Not held in memory when the disk is full: the caller keeps its source until it is durable.
        row: Row = ("quality_result", process_id, equipment_id, idempotency_key, body)
        return self._enqueue([row], None, hold=False)[0]

    def enqueue_status(
        self,
        process_id: str,
        equipment_id: str | None,
        status: str,
        metadata: dict[str, Any] | None,
        idempotency_key: str,
    ) -> bool:
        """Commit a process status update; True when new, False when its key was seen before."""
        update = StatusUpdate(process_id, equipment_id, status, metadata or {}, idempotency_key)
        return self.enqueue_statuses([update])[0]

    def enqueue_statuses(self, updates: Sequence[StatusUpdate], state: tuple[str, str] | None = None) -> list[bool]:
        """Commit status updates, in order, and optionally a key-value pair, in one transaction.

        A disk that cannot take them keeps them in memory, in order, until it can (see the module docstring).
        """
        rows: list[Row] = [
            (
                "process_status",
                u.process_id,
                u.equipment_id,
                u.idempotency_key,
                json_bytes({"status": u.status, "metadata": u.metadata}),
            )
            for u in updates
        ]
        return self._enqueue(rows, state, hold=True)

    def get_state(self, key: str) -> str | None:
        """A value of the outbox's small key-value table (process sync keeps its state there)."""
        with self._lock:
            for _, state in reversed(self._held):
                if state is not None and state[0] == key:
                    return state[1]
            row = self.db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_state(self, key: str, value: str) -> None:
        """Store a value in the key-value table (held in memory, in order, while the disk is full)."""
        self._enqueue([], (key, value), hold=True)

    def _notify(self) -> None:
        if self._wake is not None:
            self._call_in_loop(self._wake.set)

    def _call_in_loop(self, fn: Callable[[], Any]) -> None:
        """Run `fn` now when on the outbox's loop (or before it runs), else hand it to the loop's thread."""
        loop = self._loop
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or running is loop:
            fn()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(fn)

    # ---- inspection ---------------------------------------------------------------------------

    def depth(self) -> int:
        """Items waiting for delivery (those held in memory while the disk is full included)."""
        return self._depth + self._held_items

    def health(self) -> dict[str, Any]:
        """The outbox's part of /healthz: MPM `down` (credentials refused, unreachable), `degraded` (the
        disk refuses writes; updates held in memory) or `up`, with the reason and the backlog."""
        status, reason = "up", None
        error = self._last_error
        if self._refused is not None:
            status, reason, error = "down", self._refused.reason, str(self._refused)
        elif self._down:
            status, reason = "down", "unreachable"
        elif self._write_error is not None:
            status, reason = "degraded", f"cannot write {self.path.name}: {self._write_error}"
        try:
            dead: int | None = self.dead_letter_count()
        except sqlite3.Error:
            dead = None
        since = self._down_since if status == "down" else None
        return {
            "status": status,
            "reason": reason,
            "error": error if status != "up" else None,
            "depth": self.depth(),
            "held_in_memory": self._held_items,
            "dead_letters": dead,
            "down_for_s": None if since is None else round(time.monotonic() - since, 1),
            "write_error": None if self._write_error is None else str(self._write_error),
        }

    def is_known(self, idempotency_key: str) -> str | None:
        """The state of a key in the ledger: 'pending', 'delivered', 'dead', or None."""
        with self._lock:
            row = self.db.execute("SELECT state FROM items WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
        return None if row is None else str(row[0])

    def pending(self, limit: int = 100) -> list[OutboxItem]:
        """The oldest pending items (for inspection)."""
        with self._lock:
            rows = self.db.execute(
                f"SELECT {_COLUMNS} FROM items WHERE state = 'pending' ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
        return [OutboxItem._from_row(r) for r in rows]

    def dead_letters(self, limit: int = 1000, offset: int = 0) -> list[OutboxItem]:
        """Dead letters, oldest first (`to_dict()` gives the contract's object)."""
        with self._lock:
            rows = self.db.execute(
                f"SELECT {_COLUMNS} FROM items WHERE state = 'dead' ORDER BY id LIMIT ? OFFSET ?", (limit, offset)
            ).fetchall()
        return [OutboxItem._from_row(r) for r in rows]

    def dead_letter(self, item_id: int) -> OutboxItem | None:
        """One dead letter by id, or None."""
        with self._lock:
            row = self.db.execute(
                f"SELECT {_COLUMNS} FROM items WHERE id = ? AND state = 'dead'", (item_id,)
            ).fetchone()
        return None if row is None else OutboxItem._from_row(row)

    def dead_letter_count(self) -> int:
        """How many dead letters are kept."""
        with self._lock:
            return int(self.db.execute("SELECT COUNT(*) FROM items WHERE state = 'dead'").fetchone()[0])

    def retry_dead_letter(self, item_id: int) -> bool:
        """Move a dead letter back to pending (same key, same body, its original place); False if unknown."""
        with self._lock, transaction(self.db) as db:
            row = db.execute("SELECT process_id FROM items WHERE id = ? AND state = 'dead'", (item_id,)).fetchone()
            if row is not None:
                db.execute(
                    "UPDATE items SET state = 'pending', attempts = 0, status_code = NULL, reason = NULL, "
                    "finished_at = NULL WHERE id = ?",
                    (item_id,),
                )
                self._position += 1
                db.execute(
                    "INSERT OR IGNORE INTO lanes(process_id, next_attempt_at, attempts, position) VALUES (?, 0, 0, ?)",
                    (row[0], self._position),
                )
        if row is None:
            return False
        with self._lock:
            self._depth += 1
        self._depth_changed()
        log.info("dead_letter_retried", id=item_id, process_id=row[0])
        self._notify()
        return True

    def delete_dead_letter(self, item_id: int) -> bool:
        """Delete a dead letter for good; False if unknown."""
        with self._lock:
            cur = self.db.execute("DELETE FROM items WHERE id = ? AND state = 'dead'", (item_id,))
        if cur.rowcount:
            log.info("dead_letter_deleted", id=item_id)
        return bool(cur.rowcount)

    # ---- running ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._dispatcher is not None and not self._dispatcher.done()

    async def start(self) -> None:
        """Start delivering in the background."""
        if self.running:
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._wake.set()
        self._dispatcher = asyncio.create_task(self._dispatch(), name="outbox")

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop delivering; waits up to `grace_s` for the backlog to drain first. What is left stays durable."""
        if grace_s > 0 and self.running and self._refused is None:
            await self.wait_idle(grace_s)
        tasks = [t for t in (self._dispatcher, *self._lanes.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._dispatcher = None
        self._lanes.clear()
        if self._writes_pending:
            self._flush_held()
        # Outcome callbacks already started are allowed to finish: they republish a state change.
        if self._outcome_tasks:
            await asyncio.wait(list(self._outcome_tasks), timeout=5.0)

    async def __aenter__(self) -> Outbox:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        self.close()

    def retry_now(self) -> None:
        """Try again at once, past every backoff (after a reload: the key may have been fixed)."""
        self._probe_after = 0.0
        self._flush_after = 0.0
        with contextlib.suppress(sqlite3.Error), self._lock:
            self.db.execute("UPDATE lanes SET next_attempt_at = 0")
        self._notify()

    async def set_client(self, client: MPMClient) -> None:
        """Deliver through another client from now on (new credentials); retried at once."""
        self.client = client
        self.retry_now()

    async def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until nothing is pending (for tests and the drain on shutdown); False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def _due_lanes(self, limit: int, now: float) -> list[str]:
        busy = list(self._lanes)
        placeholders = ",".join("?" * len(busy))
        exclude = f"AND process_id NOT IN ({placeholders})" if busy else ""
        with self._lock:
            rows = self.db.execute(
                f"SELECT process_id FROM lanes WHERE next_attempt_at <= ? {exclude} "
                "ORDER BY next_attempt_at, position LIMIT ?",
                (now, *busy, limit),
            ).fetchall()
        return [r[0] for r in rows]

    def _next_due(self) -> float | None:
        busy = list(self._lanes)
        placeholders = ",".join("?" * len(busy))
        exclude = f"WHERE process_id NOT IN ({placeholders})" if busy else ""
        with self._lock:
            row = self.db.execute(f"SELECT MIN(next_attempt_at) FROM lanes {exclude}", busy).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    async def _dispatch(self) -> None:
        """Start lane tasks for due lanes, up to `concurrency` at once (one probe while MPM seems down)."""
        assert self._wake is not None
        wake = self._wake
        while True:
            wake.clear()
            now = time.monotonic()
            if self._writes_pending and now >= self._flush_after:
                self._try_flush()
            limit = self.concurrency - len(self._lanes)
            if self._global_failures:
                # MPM looks down: one lane at a time, spaced by the global backoff, until something succeeds.
                limit = 0 if self._lanes or time.monotonic() < self._probe_after else 1
            started = 0
            if limit > 0:
                try:
                    due = self._due_lanes(limit, now)
                except sqlite3.Error as err:
                    log.error("outbox_read_failed", error=str(err))
                    due = []
                for pid in due:
                    self._lanes[pid] = asyncio.create_task(self._run_lane(pid), name=f"outbox[{pid}]")
                    started += 1
            if started and started == limit:
                continue  # there may be more due lanes for the free slots
            timeout = 5.0  # a finishing lane or a new item wakes us earlier
            if not self._lanes or limit > 0:
                with contextlib.suppress(sqlite3.Error):
                    nxt = self._next_due()
                    if nxt is not None:
                        timeout = min(timeout, nxt - time.monotonic())
                if self._global_failures and not self._lanes:
                    timeout = max(timeout, self._probe_after - time.monotonic())
            if self._writes_pending:
                timeout = min(timeout, self._flush_after - time.monotonic())
            # asyncio.timeout rather than wait_for: in 3.11 wait_for may swallow a cancellation that races
            # with the event being set, and stop() would wait forever. The floor keeps a lane that cannot
            # be started (a read error) from spinning the loop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.005, timeout)):
                    await wake.wait()

    def _head(self, pid: str) -> OutboxItem | None:
        """The lane's first pending item; an empty lane is removed (in the same transaction)."""
        with self._lock:
            db = self.db
            row = db.execute(
                f"SELECT {_COLUMNS} FROM items WHERE state = 'pending' AND process_id = ? ORDER BY id LIMIT 1", (pid,)
            ).fetchone()
            if row is None:
                db.execute("DELETE FROM lanes WHERE process_id = ?", (pid,))
                return None
        return OutboxItem._from_row(row)

    async def _run_lane(self, pid: str) -> None:
        """Deliver one process's items in order until the lane is empty or backs off."""
        try:
            while True:
                item = self._head(pid)
                if item is None:
                    return
                try:
                    await self._send(item)
                except (TransientError, OSError) as err:
                    self._lane_failed(item, err)
                    return
                except CredentialsRefused as err:
                    self._credentials_refused(item, err)
                    return
                except RejectedError as err:
                    self._finish(item, "dead", err.status_code, str(err))
                except ValueError as err:
                    # A body the client refuses to send (or a 404 seen as ValueError) can never succeed.
                    self._finish(item, "dead", None, str(err))
                except Exception as err:  # a bug must not spin the lane: log it and back off like a failure
                    log.error("outbox_send_failed", process_id=pid, id=item.id, error=repr(err))
                    self._lane_failed(item, err)
                    return
                else:
                    self._finish(item, "delivered", None, None)
                self._write_ok()
        except sqlite3.Error as err:
            # A full disk or a broken file: pause this lane instead of resending in a tight loop.
            self._write_failed(err, process_id=pid)
            await asyncio.sleep(min(self.backoff_max_s, 5.0))
        finally:
            self._lanes.pop(pid, None)
            if self._wake is not None:
                self._wake.set()

    async def _send(self, item: OutboxItem) -> None:
        if item.kind == "quality_result":
            await self.client.submit_quality_results(item.process_id, item.body, item.idempotency_key)
        elif item.kind == "process_status":
            payload = item.payload()
            status = payload.get("status") if isinstance(payload, dict) else None
            if not isinstance(status, str):
                raise ValueError(f"stored status update {item.id} has no status")
            await self.client.update_process_status(item.process_id, status, None, item.idempotency_key, body=item.body)
        else:
            raise ValueError(f"unknown outbox item kind {item.kind!r}")

    def _finish(self, item: OutboxItem, state: str, status_code: int | None, reason: str | None) -> None:
        with self._lock:
            with transaction(self.db) as db:
                if state == "delivered":
                    # The ledger keeps the key; the body is no longer needed.
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
            self._depth -= 1
        self._depth_changed()
        self._mpm_answered()
        item.status_code, item.reason = status_code, reason
        if state == "delivered":
            OUTBOX_DELIVERED.labels(kind=item.kind).inc()
            self._report(item, "delivered")
        else:
            OUTBOX_REJECTED.labels(kind=item.kind).inc()
            log.warning(
                "outbox_dead_letter",
                id=item.id,
                kind=item.kind,
                process_id=item.process_id,
                equipment_id=item.equipment_id,
                status_code=status_code,
                reason=reason,
            )
            self._report(item, "rejected")

    def _mpm_answered(self) -> None:
        self._failing_lanes.clear()
        if self._global_failures:
            self._global_failures = 0
            if self._wake is not None:
                self._wake.set()  # back to full concurrency
        if self._refused is not None:
            self._refused = None
            log.info("outbox_credentials_accepted", pending=self.depth())
        if self._down:
            self._down = False
            log.info("outbox_mpm_reachable", pending=self.depth())
        self._down_since = None
        self._last_error = None

    def _credentials_refused(self, item: OutboxItem, err: CredentialsRefused) -> None:
        """MPM refuses the credentials: pause every lane and probe with one item on a capped backoff.

        The item keeps its place and its lane is not backed off, so a fixed key delivers at once.
        """
        self.credentials_refused_count += 1
        MPM_CREDENTIALS_REFUSED.labels(str(err.status_code)).inc()
        changed = self._refused is None or self._refused.status_code != err.status_code
        self._refused = err
        self._last_error = str(err)
        if self._down_since is None:
            self._down_since = time.monotonic()
        self._global_failures += 1
        self._probe_after = time.monotonic() + self._backoff(self._global_failures, None)
        if changed:
            log.error(
                "outbox_credentials_refused",
                status_code=err.status_code,
                reason=err.reason,
                error=str(err),
                process_id=item.process_id,
                pending=self.depth(),
            )

    def _lane_failed(self, item: OutboxItem, err: Exception) -> None:
        """Back off one lane; failures across several lanes in a row also back off MPM as a whole."""
        retry_after = getattr(err, "retry_after", None)
        self._last_error = str(err)
        with self._lock, transaction(self.db) as db:
            row = db.execute("SELECT attempts FROM lanes WHERE process_id = ?", (item.process_id,)).fetchone()
            attempts = (row[0] if row else 0) + 1
            delay = self._backoff(attempts, retry_after)
            db.execute(
                "UPDATE lanes SET attempts = ?, next_attempt_at = ? WHERE process_id = ?",
                (attempts, time.monotonic() + delay, item.process_id),
            )
            db.execute("UPDATE items SET attempts = attempts + 1 WHERE id = ?", (item.id,))
        if attempts == 1:
            # The lane's transition to failing, logged once; the retries that follow are not.
            log.warning("outbox_delivery_retrying", process_id=item.process_id, kind=item.kind, error=str(err))
        if len(self._failing_lanes) < 4:
            self._failing_lanes.add(item.process_id)
        # One stuck process is that process's problem; failures from two or more in a row mean MPM is down.
        if len(self._failing_lanes) >= 2:
            self._global_failures += 1
            self._probe_after = time.monotonic() + self._backoff(self._global_failures, retry_after)
            if not self._down:
                self._down = True
                if self._down_since is None:
                    self._down_since = time.monotonic()
                log.warning("outbox_mpm_unreachable", error=str(err), pending=self.depth())

    def _backoff(self, attempts: int, retry_after: float | None) -> float:
        delay = jittered(self.backoff_base_s, self.backoff_max_s, max(0, attempts - 1))
        if retry_after is not None:
            # Honour the server, within reason: an hour at most.
            delay = max(delay, min(float(retry_after), 3600.0))
        return delay

    def _report(self, item: OutboxItem, state: Outcome) -> None:
        cb = self.on_outcome
        if cb is None:
            return
        try:
            res = cb(item, state)
        except Exception as err:  # a failing callback must not stop deliveries
            log.error("outbox_outcome_callback_failed", id=item.id, error=repr(err))
            return
        if inspect.isawaitable(res):
            task = asyncio.ensure_future(res)
            self._outcome_tasks.add(task)
            task.add_done_callback(self._outcome_done)

    def _outcome_done(self, task: asyncio.Future[Any]) -> None:
        self._outcome_tasks.discard(task)  # type: ignore[arg-type]
        if not task.cancelled() and task.exception() is not None:
            log.error("outbox_outcome_callback_failed", error=repr(task.exception()))
