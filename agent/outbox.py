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

The parts: committing, holding and inspecting in `agent.outbox_queue` (over the SQLite file in
`agent.outbox_ledger` and the writes held in memory in `agent.outbox_held`), MPM's health and the retry
backoff in `agent.outbox_health`; delivery (the lanes and their dispatcher) is here.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import structlog

from agent.errors import RejectedError, TransientError
from agent.metrics import OUTBOX_DELIVERED, OUTBOX_REJECTED
from agent.mpm_models import CredentialsRefused
from agent.outbox_health import MpmHealth
from agent.outbox_ledger import Batch, OutboxItem, Row, StatusUpdate
from agent.outbox_queue import OutboxQueue

if TYPE_CHECKING:
    from agent.mpm import MPMClient

__all__ = ["Batch", "Kind", "Outbox", "OutboxItem", "Outcome", "OutcomeCallback", "Row", "StatusUpdate"]

log = structlog.get_logger("edge_agent.outbox")

Kind = Literal["quality_result", "process_status"]
Outcome = Literal["delivered", "rejected"]
OutcomeCallback = Callable[["OutboxItem", str], Any]


class Outbox(OutboxQueue):
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
        self.client = client
        self.backoff_max_s = backoff_max_s
        self.backoff_base_s = min(backoff_base_s, backoff_max_s)
        self.on_outcome = on_outcome
        self.concurrency = max(1, concurrency)
        self._dispatcher: asyncio.Task[None] | None = None
        self._lanes: dict[str, asyncio.Task[None]] = {}
        self._outcome_tasks: set[asyncio.Task[Any]] = set()
        self._health = MpmHealth(self.backoff_base_s, self.backoff_max_s)
        super().__init__(path, max_body_bytes=max_body_bytes, max_held=max_held)

    @property
    def credentials_refused_count(self) -> int:
        """How often MPM refused the credentials."""
        return self._health.refused_count

    def health(self) -> dict[str, Any]:
        """The outbox's part of /healthz (see `MpmHealth.report`)."""
        try:
            dead: int | None = self.dead_letter_count()
        except sqlite3.Error:
            dead = None
        return self._health.report(
            write_error=self._held.error, file=self.path.name, depth=self.depth(), held=self._held.items, dead=dead
        )

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
        if grace_s > 0 and self.running and self._health.refused is None:
            await self.wait_idle(grace_s)
        tasks = [t for t in (self._dispatcher, *self._lanes.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._dispatcher = None
        self._lanes.clear()
        if self._held.pending:
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
        self._health.probe_after = 0.0
        self._held.flush_after = 0.0
        with contextlib.suppress(sqlite3.Error):
            self._ledger.retry_all()
        self._notify()

    async def set_client(self, client: MPMClient) -> None:
        """Deliver through another client from now on (new credentials); retried at once."""
        self.client = client
        self.retry_now()

    async def _dispatch(self) -> None:
        """Start lane tasks for due lanes, up to `concurrency` at once (one probe while MPM seems down)."""
        assert self._wake is not None
        wake = self._wake
        while True:
            wake.clear()
            now = time.monotonic()
            if self._held.pending and now >= self._held.flush_after and self._flush_held() is not None:
                self._held.retry_later(self.backoff_base_s, self.backoff_max_s)
            limit = self.concurrency - len(self._lanes)
            if self._health.failures:
                # MPM looks down: one lane at a time, spaced by the global backoff, until something succeeds.
                limit = 0 if self._lanes or time.monotonic() < self._health.probe_after else 1
            started = 0
            if limit > 0:
                try:
                    due = self._ledger.due_lanes(limit, now, list(self._lanes))
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
                    nxt = self._ledger.next_due(list(self._lanes))
                    if nxt is not None:
                        timeout = min(timeout, nxt - time.monotonic())
                if self._health.failures and not self._lanes:
                    timeout = max(timeout, self._health.probe_after - time.monotonic())
            if self._held.pending:
                timeout = min(timeout, self._held.flush_after - time.monotonic())
            # asyncio.timeout rather than wait_for: in 3.11 wait_for may swallow a cancellation that races
            # with the event being set, and stop() would wait forever. The floor keeps a lane that cannot
            # be started (a read error) from spinning the loop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.005, timeout)):
                    await wake.wait()

    def _head(self, pid: str) -> OutboxItem | None:
        """The lane's first pending item, or None when the lane is empty (and removed)."""
        return self._ledger.head(pid)

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
                self._held.succeeded(self._ledger.depth)
        except sqlite3.Error as err:
            # A full disk or a broken file: pause this lane instead of resending in a tight loop.
            self._held.failed(err, process_id=pid)
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
        self._ledger.finish(item, state, status_code, reason)
        self._depth_changed()
        if self._health.answered(self.depth()) and self._wake is not None:
            self._wake.set()  # back to full concurrency
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

    def _credentials_refused(self, item: OutboxItem, err: CredentialsRefused) -> None:
        """MPM refuses the credentials: pause every lane and probe with one item on a capped backoff.

        The item keeps its place and its lane is not backed off, so a fixed key delivers at once.
        """
        self._health.credentials_refused(err, item.process_id, self.depth())

    def _lane_failed(self, item: OutboxItem, err: Exception) -> None:
        """Back off one lane; failures across several lanes in a row also back off MPM as a whole."""
        retry_after = getattr(err, "retry_after", None)
        self._health.last_error = str(err)
        attempts = self._ledger.back_off(item, lambda n: self._health.backoff(n, retry_after))
        if attempts == 1:
            # The lane's transition to failing, logged once; the retries that follow are not.
            log.warning("outbox_delivery_retrying", process_id=item.process_id, kind=item.kind, error=str(err))
        self._health.lane_failed(item.process_id, err, retry_after, self.depth())

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
