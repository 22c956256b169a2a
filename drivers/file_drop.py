"""File drops: inspection reports that measuring machines write into a folder become quality results.

The top level of `directory` is watched (watchfiles) and rescanned every `rescan_s`, since inotify misses
changes made over network shares. A file is taken once its size and mtime have held for `stable_s`,
claimed by an atomic rename into `directory/.processing/`, parsed, and handed to the daemon as a
QualityResult whose `committed` future says when the result is durable. Only then is the file moved on,
to `processed_dir`, or to `failed_dir` with a `<name>.error.txt` when it cannot be parsed. What a crash
leaves in `.processing/` is finished on the next start; the content-derived idempotency key makes that
safe, since the daemon's outbox answers a key it already holds as a duplicate.
"""

from __future__ import annotations

import asyncio
import errno
import fnmatch
import itertools
import os
import shutil
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from watchfiles import awatch

from agent.config import CommandBase, EquipmentConfig, Model
from agent.errors import DataError
from agent.metrics import DRIVER_ERRORS, DRIVER_READS
from agent.model import CommandResult, ConnectionState, Event, QualityResult, StatusFact, iso, utcnow
from drivers.base import Driver, DriverContext
from drivers.inspection_report import idempotency_key, parse_report
from drivers.registry import register_driver

PROCESSING = ".processing"
IGNORED_SUFFIXES = (".tmp", ".part")
# How often a missing or unreadable folder is looked at again, and the longest sleep between checks.
HEALTH_POLL_S = 1.0
# Files claimed per round: keeps `.processing/` and memory small when thousands arrive at once.
CLAIM_BATCH = 64
# Errors of os.link that mean "this filesystem cannot hard-link here": fall back to copying.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS, errno.EOPNOTSUPP}


class FileDropConnection(Model):
    """`[equipment.connection]` of a file-drop equipment; patterns match file names case-insensitively."""

    directory: Path
    patterns: list[str] = Field(default_factory=lambda: ["*.csv", "*.json"], min_length=1)
    processed_dir: Path
    failed_dir: Path
    stable_s: float = Field(1.0, ge=0)
    max_file_bytes: int = Field(10_485_760, ge=1)
    rescan_s: float = Field(5.0, gt=0)

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p or "/" in p or os.sep in p:
                raise ValueError(f"pattern {p!r} must be a non-empty file-name pattern without a folder")
        return v


def numbered(name: str, n: int) -> str:
    """The n-th free-name candidate: part7.csv, part7.1.csv, part7.2.csv ..."""
    if n == 0:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        return f"{name}.{n}"
    return f"{stem}.{n}.{ext}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def place_file(src: Path, dst_dir: Path, name: str, error_text: str | None = None) -> Path:
    """Move `src` into `dst_dir` as `name`, or the first free numbered name; never overwrite.

    With `error_text`, `<final name>.error.txt` is written beside it. A hard link followed by an unlink
    makes "create only if free" atomic; a crash between the two leaves the same inode at both places,
    which the next attempt recognises and completes. Across filesystems the file is copied instead.
    """
    dst_dir.mkdir(parents=True, exist_ok=True)
    for n in itertools.count():
        target = dst_dir / numbered(name, n)
        err_path = dst_dir / f"{target.name}.error.txt" if error_text is not None else None
        if err_path is not None and not os.path.lexists(target) and os.path.lexists(err_path):
            continue  # a reason file without its file: leave it alone, take the next name
        try:
            os.link(src, target)
        except FileExistsError:
            if not _same_file(src, target):
                continue
        except OSError as err:
            if err.errno not in _NO_LINK:
                raise
            if not _copy_exclusive(src, target):
                continue
        if err_path is not None:
            with open(err_path, "w", encoding="utf-8") as f:
                f.write(error_text or "")
                f.flush()
                os.fsync(f.fileno())
        _fsync_dir(dst_dir)
        os.unlink(src)
        _fsync_dir(src.parent)
        return target
    raise AssertionError("unreachable")


def _copy_exclusive(src: Path, target: Path) -> bool:
    try:
        out = open(target, "xb")  # closed by the with below
    except FileExistsError:
        return False
    with out, open(src, "rb") as inp:
        shutil.copyfileobj(inp, out)
        out.flush()
        os.fsync(out.fileno())
    shutil.copystat(src, target)
    return True


@dataclass(slots=True)
class _Seen:
    """What a candidate file looked like when first seen so, and since when (monotonic)."""

    size: int
    mtime_ns: int
    since: float


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
        self._changes: set[str] = set()
        self._wake = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self._watch_stop: asyncio.Event | None = None
        self._watched: tuple[int, int] | None = None
        self._seen: dict[str, _Seen] = {}
        # Files in .processing/ whose result the daemon already holds: a retry only moves them.
        self._committed: dict[str, tuple[int, int]] = {}
        self._fault: str | None = None
        self._leftovers_due = True
        self._retry_at = 0.0
        self._closed = False

    # -- config hooks

    @classmethod
    def check_equipment(cls, equipment: EquipmentConfig) -> list[tuple[tuple[str | int, ...], str]]:
        conn = equipment.connection
        problems: list[tuple[tuple[str | int, ...], str]] = []
        directory = os.path.realpath(conn.directory)
        for field in ("processed_dir", "failed_dir"):
            target = os.path.realpath(getattr(conn, field))
            if target == directory:
                problems.append((("connection", field), f"must differ from connection.directory ({conn.directory})"))
            elif target == os.path.join(directory, PROCESSING):
                problems.append((("connection", field), f"must not be the work folder {PROCESSING} of the directory"))
        return problems

    # -- lifecycle

    async def connect(self) -> None:
        """Nothing to open: the folder may come and go, and `events()` reports it as it does."""
        self._closed = False
        self._seen.clear()
        self._changes.clear()
        self._leftovers_due = True
        self._retry_at = 0.0
        self.log.info("watching", directory=str(self.directory), patterns=self.conn.patterns)

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        await self._stop_watcher()

    async def send_command(self, command: CommandBase, params: dict[str, Any]) -> CommandResult:
        return CommandResult(False, f"equipment {self.equipment.id!r} (file_drop) takes no commands")

    # -- the event stream

    async def events(self) -> AsyncIterator[Event]:
        reported: tuple[str, str | None] | None = None
        next_rescan = 0.0
        while not self._closed:
            self._wake.clear()
            # In a thread: a stat on a network share that stopped answering must not stall the daemon.
            health, message, ident = await asyncio.to_thread(self._probe)
            listing: dict[str, tuple[int, int]] | None = None
            if health == "ok":
                if ident != self._watched:
                    await self._start_watcher(ident)
                    next_rescan = 0.0  # events may have been missed while no watch was in place
                if time.monotonic() >= next_rescan:
                    try:
                        listing = await asyncio.to_thread(self._list_top)
                    except OSError as err:
                        health, message = "error", f"cannot read {self.directory}: {err.strerror or err}"
                    next_rescan = time.monotonic() + self.conn.rescan_s
            if health != "ok":
                await self._stop_watcher()
                self._seen.clear()
                self._changes.clear()
            state = self._state(health, message)
            for ev in self._transition(reported, state):
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
                for ev in self._transition(reported, state):
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
            deadline = min(deadline, next_rescan)
            for seen in self._seen.values():
                deadline = min(deadline, seen.since + self.conn.stable_s)
            if self._leftovers_due:
                deadline = min(deadline, self._retry_at)
        if self._changes or deadline <= now:
            await asyncio.sleep(0)  # due now; still let the rest of the daemon run
            return
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that arrives just as
        # the event is set, and the driver's task would then never stop.
        try:
            async with asyncio.timeout(deadline - now):
                await self._wake.wait()
        except TimeoutError:
            pass

    def _state(self, health: str, message: str | None) -> tuple[str, str | None]:
        if health == "ok" and self._fault is not None:
            return "error", self._fault
        return health, message

    def _transition(self, prev: tuple[str, str | None] | None, cur: tuple[str, str | None]) -> list[Event]:
        """Events for a change of folder state; nothing when it holds."""
        if prev == cur:
            return []
        health, message = cur
        if health == "missing":
            self.log.warning("directory_missing", directory=str(self.directory))
            return [ConnectionState(False, message)]
        events: list[Event] = []
        if prev is None or prev[0] == "missing":
            events.append(ConnectionState(True))
        if health == "ok":
            if prev is not None:
                self.log.info("directory_ok", directory=str(self.directory))
            events.append(StatusFact("idle"))
        else:
            self.log.warning("directory_error", directory=str(self.directory), error=message)
            events.append(StatusFact("error", error_message=message))
        return events

    def _probe(self) -> tuple[str, str | None, tuple[int, int] | None]:
        """("ok" | "missing" | "error", why, the folder's (device, inode) when ok)."""
        try:
            st = os.stat(self.directory)
        except FileNotFoundError:
            return "missing", f"directory missing: {self.directory}", None
        except OSError as err:
            return "error", f"cannot read {self.directory}: {err.strerror or err}", None
        if not stat.S_ISDIR(st.st_mode):
            return "error", f"{self.directory} is not a directory", None
        if not os.access(self.directory, os.R_OK | os.X_OK):
            return "error", f"cannot read {self.directory}: permission denied", None
        return "ok", None, (st.st_dev, st.st_ino)

    def wanted(self, name: str) -> bool:
        """Whether a top-level file name is a report to take (not hidden, not in progress, matching)."""
        lower = name.lower()
        if name.startswith(".") or lower.endswith(IGNORED_SUFFIXES):
            return False
        return any(fnmatch.fnmatchcase(lower, p) for p in self._patterns)

    def _list_top(self) -> dict[str, tuple[int, int]]:
        found: dict[str, tuple[int, int]] = {}
        with os.scandir(self.directory) as it:
            for entry in it:
                if not self.wanted(entry.name):
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                found[entry.name] = (st.st_size, st.st_mtime_ns)
        return found

    async def _observe(self, listing: dict[str, tuple[int, int]] | None) -> None:
        """Update what each candidate looks like from a full listing and the names the watcher reported."""
        names = self._changes
        self._changes = set()
        if listing is not None:
            now = time.monotonic()
            for gone in set(self._seen) - set(listing):
                del self._seen[gone]
            for name, (size, mtime_ns) in listing.items():
                self._note(name, size, mtime_ns, now)
            names -= set(listing)
        if not names:
            return
        # In a thread: a stat on a network share that stopped answering must not stall the daemon.
        stats = await asyncio.to_thread(self._stat_top, names)
        now = time.monotonic()
        for name, st in stats.items():
            if st is None:
                self._seen.pop(name, None)
            else:
                self._note(name, st[0], st[1], now)

    def _stat_top(self, names: set[str]) -> dict[str, tuple[int, int] | None]:
        found: dict[str, tuple[int, int] | None] = {}
        for name in names:
            try:
                st = os.stat(self.directory / name, follow_symlinks=False)
            except OSError:
                found[name] = None
                continue
            found[name] = (st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None
        return found

    def _note(self, name: str, size: int, mtime_ns: int, now: float) -> None:
        seen = self._seen.get(name)
        if seen is None or seen.size != size or seen.mtime_ns != mtime_ns:
            self._seen[name] = _Seen(size, mtime_ns, now)

    async def _take_ready(self) -> AsyncIterator[Event]:
        """Claim and process every file stable for `stable_s`, oldest first, a batch at a time."""
        while not self._closed:
            now = time.monotonic()
            ready = sorted(
                (seen.mtime_ns, name) for name, seen in self._seen.items() if now - seen.since >= self.conn.stable_s
            )
            if not ready:
                return
            batch = [(name, self._seen[name].size, mtime_ns) for mtime_ns, name in ready[:CLAIM_BATCH]]
            try:
                claimed, changed = await asyncio.to_thread(self._claim, batch)
            except OSError as err:
                self._set_fault(f"cannot claim files in {self.directory}: {err.strerror or err}")
                for name, _, _ in batch:  # look again after a rescan period, not in a tight loop
                    if name in self._seen:
                        self._seen[name].since = now + self.conn.rescan_s
                return
            now = time.monotonic()
            for name, _, _ in batch:
                if name in claimed:
                    self._seen.pop(name, None)
                elif name in changed:
                    st = changed[name]
                    if st is None:
                        self._seen.pop(name, None)
                    else:
                        self._seen[name] = _Seen(st[0], st[1], now)  # still being written: wait again
                elif name in self._seen:
                    # The name still waits in .processing/ (a move failed); try again later.
                    self._seen[name].since = now + self.conn.rescan_s
            if not claimed:
                return
            for name in claimed:
                async for ev in self._handle(name):
                    yield ev

    def _claim(self, batch: list[tuple[str, int, int]]) -> tuple[list[str], dict[str, tuple[int, int] | None]]:
        """Rename files still as last seen into .processing/ (same filesystem: atomic) and make it durable.

        Returns the names claimed, and the new look of those that changed or vanished meanwhile.
        """
        os.makedirs(self.processing_dir, exist_ok=True)
        claimed: list[str] = []
        changed: dict[str, tuple[int, int] | None] = {}
        for name, size, mtime_ns in batch:
            src = self.directory / name
            try:
                st = os.stat(src, follow_symlinks=False)
            except FileNotFoundError:
                changed[name] = None
                continue
            if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                changed[name] = (st.st_size, st.st_mtime_ns)
                continue
            target = self.processing_dir / name
            if os.path.lexists(target):
                continue  # rename would replace it silently
            try:
                os.rename(src, target)
            except FileNotFoundError:
                changed[name] = None
                continue
            claimed.append(name)
        if claimed:
            _fsync_dir(self.directory)
            _fsync_dir(self.processing_dir)
        return claimed, changed

    async def _finish_leftovers(self) -> AsyncIterator[Event]:
        """Process what a crash or a failed move left in .processing/, oldest first."""
        try:
            names = await asyncio.to_thread(self._list_processing)
        except OSError as err:
            self._set_fault(f"cannot read {self.processing_dir}: {err.strerror or err}")
            self._retry_later()
            return
        if names:
            self.log.info("finishing_leftovers", count=len(names))
        for name in names:
            if self._closed:
                return
            async for ev in self._handle(name):
                yield ev

    def _list_processing(self) -> list[str]:
        if not os.path.isdir(self.processing_dir):
            return []
        files: list[tuple[int, str]] = []
        with os.scandir(self.processing_dir) as it:
            for entry in it:
                if entry.is_file(follow_symlinks=False):
                    files.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.name))
        return [name for _, name in sorted(files)]

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
        fresh: bool | None = None
        process_id: str | None = None
        if self._committed.get(name) != (st.st_size, st.st_mtime_ns):
            try:
                result, key = await asyncio.to_thread(self._read, path, name)
            except DataError as err:
                await self._reject(path, name, str(err))
                return
            except FileNotFoundError:
                return
            except OSError as err:
                self._set_fault(f"cannot read files in {self.processing_dir}: {err.strerror or err}")
                self._retry_later()
                return
            process_id = result["process_id"]
            committed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            yield QualityResult(result, key, committed=committed)
            # asyncio.wait does not raise when the daemon cancels or fails the future, only when we are.
            await asyncio.wait({committed})
            if committed.cancelled() or committed.exception() is not None:
                why = "cancelled" if committed.cancelled() else str(committed.exception())
                self._set_fault(f"results are not being stored: {why}")
                self._retry_later()
                return
            fresh = committed.result()
            self._committed[name] = (st.st_size, st.st_mtime_ns)
        try:
            final = await asyncio.to_thread(place_file, path, self.processed_dir, name)
        except OSError as err:
            self._set_fault(f"cannot move files to {self.processed_dir}: {err.strerror or err}")
            self._retry_later()
            return
        self._committed.pop(name, None)
        self._clear_fault()
        DRIVER_READS.labels(self.equipment.id).inc()
        self.log.info(
            "report_processed",
            file=name,
            moved_to=final.name,
            process_id=process_id,
            duplicate=None if fresh is None else not fresh,
        )

    def _read(self, path: Path, name: str) -> tuple[dict[str, Any], str]:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_size > self.conn.max_file_bytes:
                raise DataError(f"{name}: file is {st.st_size} bytes, over max_file_bytes ({self.conn.max_file_bytes})")
            data = f.read(self.conn.max_file_bytes + 1)
        result = parse_report(
            name, data, equipment_id=self.equipment.id, mtime_ns=st.st_mtime_ns, max_bytes=self.conn.max_file_bytes
        )
        return result, idempotency_key(data)

    async def _reject(self, path: Path, name: str, reason: str) -> None:
        text = f"{reason}\n\nfile: {name}\nequipment: {self.equipment.id}\nrejected_at: {iso(utcnow())}\n"
        try:
            final = await asyncio.to_thread(place_file, path, self.failed_dir, name, text)
        except OSError as err:
            self._set_fault(f"cannot move files to {self.failed_dir}: {err.strerror or err}")
            self._retry_later()
            return
        self._clear_fault()
        DRIVER_ERRORS.labels(self.equipment.id, "bad_file").inc()
        self.log.warning("report_rejected", file=name, moved_to=final.name, reason=reason)

    def _set_fault(self, message: str) -> None:
        if self._fault is None:
            DRIVER_ERRORS.labels(self.equipment.id, "file_io").inc()
        self._fault = message

    def _clear_fault(self) -> None:
        self._fault = None

    def _retry_later(self) -> None:
        self._leftovers_due = True
        self._retry_at = time.monotonic() + self.conn.rescan_s

    # -- the watcher

    async def _start_watcher(self, ident: tuple[int, int] | None) -> None:
        await self._stop_watcher()
        stop = asyncio.Event()
        self._watch_stop = stop
        self._watched = ident
        self._watch_task = asyncio.create_task(self._watch(stop), name=f"file_drop[{self.equipment.id}].watch")

    async def _stop_watcher(self) -> None:
        task, stop = self._watch_task, self._watch_stop
        self._watch_task = self._watch_stop = None
        self._watched = None
        if stop is not None:
            stop.set()  # the watch thread sees this within one step and returns
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=10)
        if not done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _watch(self, stop: asyncio.Event) -> None:
        try:
            async for changes in awatch(
                self.directory, watch_filter=None, recursive=False, stop_event=stop, debounce=200, step=50
            ):
                relevant = False
                for _change, raw in changes:
                    path = Path(raw)
                    if path.parent == self.directory and self.wanted(path.name):
                        self._changes.add(path.name)
                        relevant = True
                    elif path == self.directory:
                        relevant = True
                if relevant:
                    self._wake.set()
        except Exception as err:  # the periodic rescan still finds files; a new folder gets a new watch
            self.log.warning("watch_failed", directory=str(self.directory), error=str(err))
        self._wake.set()
