"""File drops: inspection reports that measuring machines write into a folder become quality results.

The top level of `directory` is watched (watchfiles) and rescanned every `rescan_s`, since inotify misses
changes made over network shares. A file is taken once its size and mtime have held for `stable_s`,
claimed by an atomic rename into `directory/.processing/`, parsed, and handed to the daemon as a
QualityResult whose `committed` future says when the result is durable. Only then is the file moved on,
to `processed_dir`, or to `failed_dir` with a `<name>.error.txt` when it cannot be parsed. What a crash
leaves in `.processing/` is finished on the next start; the content-derived idempotency key makes that
safe, since the daemon's outbox answers a key it already holds as a duplicate.

Poison never halts the folder: whatever goes wrong while one file is parsed (a refusal, a library
exception, a result larger than MPM takes) fails that file alone, and a file that was being handled when
the agent died twice (counted in a durable attempts ledger in state_dir) is failed instead of tried a
third time. An entry that is not a regular file (a symbolic link, never followed; a FIFO, socket or device;
a directory whose name matches) is moved to `failed_dir` as what it is, never opened; one that cannot be
moved is logged once and left alone.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from drivers.file_drop.candidates import Candidates
from drivers.file_drop.config import PROCESSING, FileDropConnection, check_folders
from drivers.file_drop.config import wanted as name_wanted
from drivers.file_drop.entries import Look, look_of, not_regular_reason, place_file
from drivers.file_drop.folder import claim, list_processing, list_top, probe, read_claimed, stat_top
from drivers.file_drop.ledger import CRASHES_MAX, AttemptsLedger, attempts_ledger_path
from drivers.file_drop.report import idempotency_key, parse_report
from drivers.file_drop.status import State, transition
from drivers.file_drop.watch import FolderWatch
from drivers.sdk import (
    CommandBase,
    CommandResult,
    DataError,
    Driver,
    DriverContext,
    EquipmentConfig,
    Event,
    QualityResult,
    iso,
    register_driver,
    utcnow,
)

# How often a missing or unreadable folder is looked at again, and the longest sleep between checks.
HEALTH_POLL_S = 1.0
# Files claimed per round: keeps `.processing/` and memory small when thousands arrive at once.
CLAIM_BATCH = 64


@register_driver
class FileDropDriver(Driver):
    """Watches a folder for inspection reports and turns each into one quality result."""

    name = "file_drop"
    connection_model = FileDropConnection
    command_kinds = frozenset()

    def __init__(self, equipment: EquipmentConfig, context: DriverContext) -> None:
        super().__init__(equipment, context)
        self.conn: FileDropConnection = equipment.connection
        # abspath removes ".." so that the paths watchfiles reports compare equal to ours.
        self.directory = Path(os.path.abspath(self.conn.directory))
        self.processing_dir = self.directory / PROCESSING
        self.processed_dir = Path(os.path.abspath(self.conn.processed_dir))
        self.failed_dir = Path(os.path.abspath(self.conn.failed_dir))
        self._patterns = [p.lower() for p in self.conn.patterns]
        self._watch = FolderWatch(self.directory, self.wanted, self.log, f"file_drop[{equipment.id}].watch")
        self._candidates = Candidates(self.directory, self.conn.stable_s)
        # Files in .processing/ whose result the daemon already holds: a retry only moves them.
        self._committed: dict[str, Look] = {}
        self._attempts = AttemptsLedger(attempts_ledger_path(context.state_dir, equipment.id), self.log)
        self._fault: str | None = None
        self._leftovers_due = True
        self._retry_at = 0.0
        self._closed = False

    @classmethod
    def check_equipment(cls, equipment: EquipmentConfig) -> list[tuple[tuple[str | int, ...], str]]:
        return check_folders(equipment)

    def wanted(self, name: str) -> bool:
        """Whether a top-level file name is a report to take (not hidden, not in progress, matching)."""
        return name_wanted(name, self._patterns)

    # -- lifecycle

    async def connect(self) -> None:
        """Nothing to open: the folder may come and go, and `events()` reports it as it does."""
        self._closed = False
        self._candidates.clear()
        self._watch.take_changes()
        self._leftovers_due = True
        self._retry_at = 0.0
        await asyncio.to_thread(self._attempts.load)
        self.log.info("watching", directory=str(self.directory), patterns=self.conn.patterns)

    async def close(self) -> None:
        self._closed = True
        self._watch.wake.set()
        await self._watch.stop()

    async def send_command(self, command: CommandBase, params: dict[str, Any]) -> CommandResult:
        return CommandResult(False, f"equipment {self.equipment.id!r} (file_drop) takes no commands")

    # -- the event stream

    async def events(self) -> AsyncIterator[Event]:
        reported: State | None = None
        next_rescan = 0.0
        while not self._closed:
            self._watch.wake.clear()
            # In a thread: a stat on a network share that stopped answering must not stall the daemon.
            health, message, ident = await asyncio.to_thread(probe, self.directory)
            listing: dict[str, Look] | None = None
            if health == "ok":
                if ident != self._watch.watched:
                    await self._watch.start(ident)
                    next_rescan = 0.0  # events may have been missed while no watch was in place
                if time.monotonic() >= next_rescan:
                    try:
                        listing = await asyncio.to_thread(list_top, self.directory, self.wanted)
                    except OSError as err:
                        health, message = "error", f"cannot read {self.directory}: {err.strerror or err}"
                    next_rescan = time.monotonic() + self.conn.rescan_s
            if health != "ok":
                await self._watch.stop()
                self._candidates.clear()
                self._watch.take_changes()
            state = self._state(health, message)
            for ev in transition(reported, state, self.directory, self.log):
                yield ev
            reported = state
            if health == "ok":
                if self._leftovers_due and time.monotonic() >= self._retry_at:
                    self._leftovers_due = False
                    async for ev in self._finish_leftovers():
                        yield ev
                await self._observe(listing)
                async for ev in self._take_ready():
                    yield ev
                state = self._state(health, message)
                for ev in transition(reported, state, self.directory, self.log):
                    yield ev
                reported = state
            if self._closed:
                break
            await self._sleep(next_rescan if health == "ok" else None)

    async def _sleep(self, next_rescan: float | None) -> None:
        """Until the watcher reports a change or the next thing falls due; a missing folder is polled."""
        now = time.monotonic()
        deadline = now + HEALTH_POLL_S
        if next_rescan is not None:
            deadline = self._candidates.next_due(min(deadline, next_rescan))
            if self._leftovers_due:
                deadline = min(deadline, self._retry_at)
        if self._watch.changes or deadline <= now:
            await asyncio.sleep(0)  # due now; still let the rest of the daemon run
            return
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that arrives just as
        # the event is set, and the driver's task would then never stop.
        try:
            async with asyncio.timeout(deadline - now):
                await self._watch.wake.wait()
        except TimeoutError:
            pass

    def _state(self, health: str, message: str | None) -> State:
        if health == "ok" and self._fault is not None:
            return "error", self._fault
        return health, message

    async def _observe(self, listing: dict[str, Look] | None) -> None:
        """Update what each candidate looks like from a full listing and the names the watcher reported."""
        names = self._watch.take_changes()
        if listing is not None:
            self._candidates.listed(listing, time.monotonic())
            names -= set(listing)
        if not names:
            return
        # In a thread: a stat on a network share that stopped answering must not stall the daemon.
        stats = await asyncio.to_thread(stat_top, self.directory, names)
        now = time.monotonic()
        for name, found in stats.items():
            self._candidates.note(name, found, now)

    # -- taking files

    async def _take_ready(self) -> AsyncIterator[Event]:
        """Claim and process every file stable for `stable_s`, oldest first, a batch at a time."""
        while not self._closed:
            now = time.monotonic()
            batch = self._candidates.ready(now, CLAIM_BATCH)
            if not batch:
                return
            names = [name for name, _ in batch]
            try:
                claimed, changed, odd = await asyncio.to_thread(claim, self.directory, self.processing_dir, batch)
            except OSError as err:
                self._set_fault(f"cannot claim files in {self.directory}: {err.strerror or err}")
                self._candidates.postpone(names, now + self.conn.rescan_s)  # no tight loop: after a rescan period
                return
            now = time.monotonic()
            # The names neither claimed, nor changed, nor odd still wait in .processing/ (a move failed).
            self._candidates.after_claim(names, {*claimed, *odd}, changed, now, now + self.conn.rescan_s)
            for name, st in odd.items():
                # Not claimed: moved straight from where it was put, and left there, in sight, if it cannot be.
                path = self.directory / name
                reason = await asyncio.to_thread(not_regular_reason, path, name, st.st_mode)
                await self._reject(path, name, reason, look_of(st), regular=False)
            if not claimed and not odd:
                return
            for name in claimed:
                async for ev in self._handle(name):
                    yield ev

    async def _finish_leftovers(self) -> AsyncIterator[Event]:
        """Process what a crash or a failed move left in .processing/, oldest first."""
        try:
            names = await asyncio.to_thread(list_processing, self.processing_dir)
        except OSError as err:
            self._set_fault(f"cannot read {self.processing_dir}: {err.strerror or err}")
            self._retry_later()
            return
        await asyncio.to_thread(self._attempts.keep_only, set(names))
        self._candidates.keep_stuck_in(self.processing_dir, names)
        if names:
            self.log.info("finishing_leftovers", count=len(names))
        for name in names:
            if self._closed:
                return
            async for ev in self._handle(name):
                yield ev

    async def _handle(self, name: str) -> AsyncIterator[Event]:
        """One claimed file: parse, hand over, wait until durable, then move it out of .processing/."""
        path = self.processing_dir / name
        try:
            st = await asyncio.to_thread(os.stat, path, follow_symlinks=False)
        except FileNotFoundError:
            self._committed.pop(name, None)
            return
        except OSError as err:
            self._set_fault(f"cannot read files in {self.processing_dir}: {err.strerror or err}")
            self._retry_later()
            return
        look = look_of(st)
        if self._candidates.left_alone(path, look):
            return
        if not stat.S_ISREG(st.st_mode):  # swapped in between our look and the claim, or put here by hand
            reason = await asyncio.to_thread(not_regular_reason, path, name, st.st_mode)
            await self._reject(path, name, reason, look, regular=False)
            return
        fresh: bool | None = None
        process_id: str | None = None
        if self._committed.get(name) != look:
            prior = await asyncio.to_thread(self._attempts.begin, name, look)
            if prior >= CRASHES_MAX:
                reason = (
                    f"{name}: the agent stopped {prior} times while handling this file (killed or crashed); "
                    "it is not tried again"
                )
                await self._reject(path, name, reason, look)
                return
            if prior:
                self.log.warning("report_retried_after_crash", file=name, attempt=prior + 1)
            try:
                try:
                    result, key = await asyncio.to_thread(self._read, path, name)
                except DataError as err:
                    await self._reject(path, name, str(err), look)
                    return
                except FileNotFoundError:
                    return
                except OSError as err:
                    self._set_fault(f"cannot read files in {self.processing_dir}: {err.strerror or err}")
                    self._retry_later()
                    return
                except Exception as err:  # a parser or library fault (RecursionError, MemoryError): this file only
                    self.log.error("report_parse_failed", file=name, error=str(err), error_type=type(err).__name__)
                    why = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                    await self._reject(path, name, f"{name}: cannot be read as a report: {why}", look)
                    return
                process_id = result["process_id"]
                committed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
                yield QualityResult(result, key, committed=committed)
                # asyncio.wait does not raise when the daemon cancels or fails the future, only when we are.
                await asyncio.wait({committed})
                refusal = None if committed.cancelled() else committed.exception()
                if isinstance(refusal, DataError):  # the daemon refuses this result: it will never take it
                    await self._reject(path, name, f"{name}: the result was refused: {refusal}", look)
                    return
                if committed.cancelled() or refusal is not None:
                    why = "cancelled" if committed.cancelled() else str(refusal)
                    self._set_fault(f"results are not being stored: {why}")
                    self._retry_later()
                    return
                fresh = committed.result()
                self._committed[name] = look
            finally:
                # The attempt is over and the agent alive: only a death during an attempt counts against
                # the file. Synchronous (a small local write) so that it also runs when the task is cancelled.
                self._attempts.end(name)
        try:
            final = await asyncio.to_thread(place_file, path, self.processed_dir, name)
        except OSError as err:
            self._set_fault(f"cannot move files to {self.processed_dir}: {err.strerror or err}")
            self._retry_later()
            return
        self._committed.pop(name, None)
        self._clear_fault()
        self.metrics.read()
        self.log.info(
            "report_processed",
            file=name,
            moved_to=final.name,
            process_id=process_id,
            duplicate=None if fresh is None else not fresh,
        )

    def _read(self, path: Path, name: str) -> tuple[dict[str, Any], str]:
        """The quality result and idempotency key of a claimed file (in a thread)."""
        data, st = read_claimed(path, name, self.conn.max_file_bytes)
        result = parse_report(
            name,
            data,
            equipment_id=self.equipment.id,
            mtime_ns=st.st_mtime_ns,
            max_bytes=self.conn.max_file_bytes,
            max_result_bytes=self.context.max_result_bytes,
        )
        return result, idempotency_key(data)

    async def _reject(self, path: Path, name: str, reason: str, look: Look, *, regular: bool = True) -> None:
        """Move an entry to failed_dir with its reason.

        A regular file that cannot be moved is tried again after a rescan period (the folder may come
        back); anything else that cannot be moved is logged once and left alone while it looks the same.
        """
        text = f"{reason}\n\nfile: {name}\nequipment: {self.equipment.id}\nrejected_at: {iso(utcnow())}\n"
        try:
            final = await asyncio.to_thread(place_file, path, self.failed_dir, name, text)
        except OSError as err:
            if regular:
                self._set_fault(f"cannot move files to {self.failed_dir}: {err.strerror or err}")
                self._retry_later()
                return
            self._leave_alone(path, look, reason, f"cannot move it to {self.failed_dir}: {err.strerror or err}")
            return
        except Exception as err:  # never a reason to stop the folder: this entry only
            self._leave_alone(path, look, reason, f"cannot move it to {self.failed_dir}: {type(err).__name__}: {err}")
            return
        if path.parent == self.processing_dir:
            await asyncio.to_thread(self._attempts.end, name)
        self._clear_fault()
        self.metrics.error("bad_file")
        self.log.warning("report_rejected", file=name, moved_to=final.name, reason=reason)

    def _leave_alone(self, path: Path, look: Look, reason: str, why: str) -> None:
        self._candidates.leave_alone(path, look)
        self.metrics.error("bad_file")
        self.log.error("entry_left_alone", path=str(path), reason=reason, error=why)

    def _set_fault(self, message: str) -> None:
        if self._fault is None:
            self.metrics.error("file_io")
        self._fault = message

    def _clear_fault(self) -> None:
        self._fault = None

    def _retry_later(self) -> None:
        self._leftovers_due = True
        self._retry_at = time.monotonic() + self.conn.rescan_s
