"""The outbox's queue side: items committed in order (or held in memory while the disk cannot take
them), the small key-value table, the ledger and dead letters to inspect, and the wake-ups of the
delivery side (`agent.outbox.Outbox`)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from agent.errors import DataError
from agent.metrics import OUTBOX_DEPTH
from agent.model import json_bytes
from agent.outbox_held import HeldWrites
from agent.outbox_ledger import Batch, Ledger, OutboxItem, Row, StatusUpdate
from agent.sqlite_file import is_storage_fault

log = structlog.get_logger("edge_agent.outbox")


class OutboxQueue:
    """The durable queue of `Outbox`: its file, its held writes and its depth."""

    def __init__(self, path: Path | str, *, max_body_bytes: int | None, max_held: int) -> None:
        self.path = Path(path)
        self.max_body_bytes = max_body_bytes
        self.max_held = max_held
        self._idle = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._held = HeldWrites(max_held)
        self._ledger = Ledger(self.path, self._prepare)
        self._depth_changed()
        log.info("outbox_opened", path=str(self.path), pending=self._ledger.depth)

    def _prepare(self, ledger: Ledger) -> None:
        try:
            ledger.reset_lanes()
        except sqlite3.Error as err:
            if not is_storage_fault(err):
                raise
            # A full disk at start: open anyway (reads work) and reset the lanes once writes do.
            self._held.failed(err, kind="open")
            self._held.reset_pending = True

    def close(self) -> None:
        """Close the database (no draining; `stop` first when running)."""
        with self._ledger.lock:
            if not self._ledger.closed:
                if self._held.pending and self._flush_held() is not None:
                    log.error("outbox_held_lost", items=self._held.items, batches=len(self._held.batches))
                self._ledger.close()

    def _depth_changed(self) -> None:
        depth = self.depth()
        OUTBOX_DEPTH.set(depth)
        self._call_in_loop(self._idle.set if depth == 0 else self._idle.clear)

    # ---- enqueueing ---------------------------------------------------------------------------

    def _enqueue(self, items: Sequence[Row], state: tuple[str, str] | None, *, hold: bool) -> list[bool]:
        """Commit items (and state); with `hold`, a disk that cannot take them keeps them in memory, in order."""
        for kind, pid, _eid, key, _body in items:
            if not pid:
                raise ValueError(f"outbox {kind} without a process_id")
            if not key:
                raise ValueError(f"outbox {kind} for process {pid!r} without an idempotency key")
        batch: Batch = (list(items), state)
        with self._ledger.lock:
            # Held batches go first: nothing may overtake them in its process's lane.
            err = self._flush_held() if self._held.pending else None
            if err is None:
                try:
                    added = self._ledger.write(batch)
                except sqlite3.Error as write_err:
                    err = write_err
                else:
                    self._held.succeeded(self._ledger.depth)
            if err is not None:
                self._held.failed(err, kind=items[0][0] if items else "state")
                if not hold or not is_storage_fault(err) or not self._held.has_room(len(items)):
                    raise err
                self._held.hold(batch)
                # A held update is new as far as anyone can tell now; a duplicate is skipped when committed.
                added = [True] * len(items)
        self._depth_changed()
        if any(added):
            self._notify()
        return added

    def _flush_held(self) -> sqlite3.Error | None:
        """Commit held batches in order; the error that stopped it, or None when all are committed."""
        err = self._held.flush(self._ledger)
        if err is None:
            self._depth_changed()
            self._notify()
        return err

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
        with self._ledger.lock:
            held = self._held.state(key)
            return held if held is not None else self._ledger.get_state(key)

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
        return self._ledger.depth + self._held.items

    def is_known(self, idempotency_key: str) -> str | None:
        """The state of a key in the ledger: 'pending', 'delivered', 'dead', or None."""
        return self._ledger.key_state(idempotency_key)

    def pending(self, limit: int = 100) -> list[OutboxItem]:
        """The oldest pending items (for inspection)."""
        return self._ledger.pending(limit)

    def dead_letters(self, limit: int = 1000, offset: int = 0) -> list[OutboxItem]:
        """Dead letters, oldest first (`to_dict()` gives the contract's object)."""
        return self._ledger.dead_letters(limit, offset)

    def dead_letter(self, item_id: int) -> OutboxItem | None:
        """One dead letter by id, or None."""
        return self._ledger.dead_letter(item_id)

    def dead_letter_count(self) -> int:
        """How many dead letters are kept."""
        return self._ledger.dead_letter_count()

    def retry_dead_letter(self, item_id: int) -> bool:
        """Move a dead letter back to pending (same key, same body, its original place); False if unknown."""
        process_id = self._ledger.retry_dead_letter(item_id)
        if process_id is None:
            return False
        self._depth_changed()
        log.info("dead_letter_retried", id=item_id, process_id=process_id)
        self._notify()
        return True

    def delete_dead_letter(self, item_id: int) -> bool:
        """Delete a dead letter for good; False if unknown."""
        deleted = self._ledger.delete_dead_letter(item_id)
        if deleted:
            log.info("dead_letter_deleted", id=item_id)
        return deleted

    async def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until nothing is pending (for tests and the drain on shutdown); False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True
