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
import errno
import fnmatch
import itertools
import json
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

from agent import jsonin
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
# A file that was being handled when the agent died this many times is failed, not tried again.
CRASHES_MAX = 2

# What a listing knows of an entry: (size, mtime_ns, inode); a change of any restarts its stability wait.
Look = tuple[int, int, int]


def _look(st: os.stat_result) -> Look:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


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


def _same_entry(a: Path, b: Path) -> bool:
    """Whether two names are one inode, links not followed (two symlinks to one target are not one)."""
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def place_file(src: Path, dst_dir: Path, name: str, error_text: str | None = None) -> Path:
    """Move `src` into `dst_dir` as `name`, or the first free numbered name; never overwrite.

    With `error_text`, `<final name>.error.txt` is written beside it. A hard link followed by an unlink
    makes "create only if free" atomic; a crash between the two leaves the same inode at both places,
    which the next attempt recognises and completes. Across filesystems the file is copied instead.
    An entry that is not a regular file is moved as what it is and never opened: a symbolic link as the
    link (its target is not followed), a FIFO, socket or device as its node, a directory by a rename
    (which cannot cross filesystems: OSError EXDEV).
    """
    st = os.lstat(src)
    dst_dir.mkdir(parents=True, exist_ok=True)
    for n in itertools.count():
        target = dst_dir / numbered(name, n)
        err_path = dst_dir / f"{target.name}.error.txt" if error_text is not None else None
        if err_path is not None and not os.path.lexists(target) and os.path.lexists(err_path):
            continue  # a reason file without its file: leave it alone, take the next name
        if not _put(src, st, target):
            continue
        if err_path is not None:
            # backslashreplace: a file name that is not UTF-8 must not stop its own reason being written.
            with open(err_path, "w", encoding="utf-8", errors="backslashreplace") as f:
                f.write(error_text or "")
                f.flush()
                os.fsync(f.fileno())
        _fsync_dir(dst_dir)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(src)
        _fsync_dir(src.parent)
        return target
    raise AssertionError("unreachable")


def _put(src: Path, st: os.stat_result, target: Path) -> bool:
    """Make `target` the entry `src` is, leaving `src` (a directory: moving it); False if the name is taken."""
    if stat.S_ISDIR(st.st_mode):
        # A directory cannot be hard-linked, and a rename would replace an empty directory of that name.
        if os.path.lexists(target):
            return False
        os.rename(src, target)
        return True
    try:
        os.link(src, target, follow_symlinks=False)
        return True
    except FileExistsError:
        return _same_entry(src, target)
    except OSError as err:
        if err.errno not in _NO_LINK:
            raise
    try:
        if stat.S_ISREG(st.st_mode):
            _copy_exclusive(src, target)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), target)
        elif stat.S_ISFIFO(st.st_mode):
            os.mkfifo(target, stat.S_IMODE(st.st_mode))
        else:  # a socket or a device node: made anew, never opened
            os.mknod(target, st.st_mode, st.st_rdev)
    except FileExistsError:
        return False
    return True


def _copy_exclusive(src: Path, target: Path) -> None:
    out = open(target, "xb")  # FileExistsError when taken; closed by the with below
    with out, open(os.open(src, os.O_RDONLY | os.O_NOFOLLOW), "rb") as inp:
        shutil.copyfileobj(inp, out)
        out.flush()
        os.fsync(out.fileno())
    shutil.copystat(src, target)


def describe_kind(mode: int) -> str:
    """What an entry that is not a regular file is, as an error file says it."""
    for test, kind in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return f"an entry of unknown kind (mode {mode:o})"


def not_regular_reason(path: Path, name: str, mode: int) -> str:
    """The reason an entry that is not a regular file is failed; a link's target is named, never opened."""
    kind = describe_kind(mode)
    if stat.S_ISLNK(mode):
        try:
            kind += f" to {os.readlink(path)!r}"
        except OSError:
            pass
        return f"{name}: {kind}, not a regular file; moved here without following it"
    return f"{name}: {kind}, not a regular file; moved here unread"


def attempts_ledger_path(state_dir: Path, equipment_id: str) -> Path:
    """Where a file-drop equipment keeps its attempts ledger."""
    return Path(state_dir) / "file_drop" / f"{equipment_id}.attempts.json"


class AttemptsLedger:
    """How many times each file in .processing/ was being handled when the agent died.

    `begin` counts an attempt and makes it durable (fsync, atomic replace) before the parse starts; `end`
    takes it back once the attempt is over with the agent still alive. What remains counts deaths. An
    entry holds the file's look, so another file that later takes the name starts from nothing. When
    state_dir cannot be written the counts are kept in memory, and that is logged once.
    """

    def __init__(self, path: Path, log: Any) -> None:
        self.path = path
        self.log = log
        self._files: dict[str, tuple[int, Look]] = {}
        self._durable = True

    def load(self) -> None:
        """Read the ledger; an unreadable or foreign one counts as empty (a poison file then gets 2 more tries)."""
        self._files = {}
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as err:
            self.log.warning("attempts_ledger_unreadable", path=str(self.path), error=err.strerror or str(err))
            return
        try:
            files = jsonin.loads(data, what=str(self.path))["files"]
            for name, entry in files.items():
                count, look = entry["attempts"], tuple(entry["look"])
                if isinstance(count, int) and len(look) == 3 and all(isinstance(v, int) for v in look):
                    self._files[name] = (count, (look[0], look[1], look[2]))
        except (DataError, KeyError, TypeError, AttributeError):
            self.log.warning("attempts_ledger_unreadable", path=str(self.path), error="not a ledger")

    def begin(self, name: str, look: Look) -> int:
        """How many earlier attempts at this file the agent died in; below CRASHES_MAX this one is counted."""
        count, seen = self._files.get(name, (0, look))
        prior = count if seen == look else 0
        if prior < CRASHES_MAX:
            self._files[name] = (prior + 1, look)
            self._save(durable=True)
        return prior

    def end(self, name: str) -> None:
        """The attempt at `name` is over with the agent alive (or the file left .processing/)."""
        if self._files.pop(name, None) is not None:
            # No fsync: a death of the process keeps what the kernel was given; only a power cut could
            # bring back a count, which then needs two more deaths to fail the file.
            self._save(durable=False)

    def keep_only(self, names: set[str]) -> None:
        """Forget files no longer in .processing/."""
        if set(self._files) - names:
            self._files = {n: v for n, v in self._files.items() if n in names}
            self._save(durable=False)

    def _save(self, durable: bool) -> None:
        body = {"files": {n: {"attempts": c, "look": list(look)} for n, (c, look) in self._files.items()}}
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="ascii") as f:  # names that are not UTF-8 are \u-escaped
                json.dump(body, f)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            os.replace(tmp, self.path)
            if durable:
                _fsync_dir(self.path.parent)
        except OSError as err:
            if self._durable:
                self._durable = False
                self.log.warning("attempts_ledger_not_durable", path=str(self.path), error=err.strerror or str(err))
            return
        if not self._durable:
            self._durable = True
            self.log.info("attempts_ledger_durable", path=str(self.path))


@dataclass(slots=True)
class _Seen:
    """What a candidate entry looked like when first seen so, and since when (monotonic)."""

    look: Look
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
        self._committed: dict[str, Look] = {}
        # Entries that could not be moved out of the way: left alone while they look the same.
        self._stuck: dict[Path, Look] = {}
        self._attempts = AttemptsLedger(attempts_ledger_path(context.state_dir, equipment.id), self.log)
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
        await asyncio.to_thread(self._attempts.load)
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
            listing: dict[str, Look] | None = None
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

    def _list_top(self) -> dict[str, Look]:
        """Every wanted entry, whatever its kind (lstat: a link is looked at, never followed)."""
        found: dict[str, Look] = {}
        with os.scandir(self.directory) as it:
            for entry in it:
                if not self.wanted(entry.name):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                found[entry.name] = _look(st)
        return found

    async def _observe(self, listing: dict[str, Look] | None) -> None:
        """Update what each candidate looks like from a full listing and the names the watcher reported."""
        names = self._changes
        self._changes = set()
        if listing is not None:
            now = time.monotonic()
            for gone in set(self._seen) - set(listing):
                del self._seen[gone]
            for path in [p for p in self._stuck if p.parent == self.directory and p.name not in listing]:
                del self._stuck[path]
            for name, now_look in listing.items():
                self._note(name, now_look, now)
            names -= set(listing)
        if not names:
            return
        # In a thread: a stat on a network share that stopped answering must not stall the daemon.
        stats = await asyncio.to_thread(self._stat_top, names)
        now = time.monotonic()
        for name, found in stats.items():
            if found is None:
                self._seen.pop(name, None)
            else:
                self._note(name, found, now)

    def _stat_top(self, names: set[str]) -> dict[str, Look | None]:
        found: dict[str, Look | None] = {}
        for name in names:
            try:
                found[name] = _look(os.stat(self.directory / name, follow_symlinks=False))
            except OSError:
                found[name] = None
        return found

    def _note(self, name: str, look: Look, now: float) -> None:
        if self._stuck.get(self.directory / name) == look:
            self._seen.pop(name, None)
            return
        seen = self._seen.get(name)
        if seen is None or seen.look != look:
            self._seen[name] = _Seen(look, now)

    async def _take_ready(self) -> AsyncIterator[Event]:
        """Claim and process every file stable for `stable_s`, oldest first, a batch at a time."""
        while not self._closed:
            now = time.monotonic()
            ready = sorted(
                (seen.look[1], name) for name, seen in self._seen.items() if now - seen.since >= self.conn.stable_s
            )
            if not ready:
                return
            batch = [(name, self._seen[name].look) for _, name in ready[:CLAIM_BATCH]]
            try:
                claimed, changed, odd = await asyncio.to_thread(self._claim, batch)
            except OSError as err:
                self._set_fault(f"cannot claim files in {self.directory}: {err.strerror or err}")
                for name, _ in batch:  # look again after a rescan period, not in a tight loop
                    if name in self._seen:
                        self._seen[name].since = now + self.conn.rescan_s
                return
            now = time.monotonic()
            for name, _ in batch:
                if name in claimed or name in odd:
                    self._seen.pop(name, None)
                elif name in changed:
                    new_look = changed[name]
                    if new_look is None:
                        self._seen.pop(name, None)
                    else:
                        self._seen[name] = _Seen(new_look, now)  # still being written: wait again
                elif name in self._seen:
                    # The name still waits in .processing/ (a move failed); try again later.
                    self._seen[name].since = now + self.conn.rescan_s
            for name, st in odd.items():
                # Not claimed: moved straight from where it was put, and left there, in sight, if it cannot be.
                path = self.directory / name
                reason = await asyncio.to_thread(not_regular_reason, path, name, st.st_mode)
                await self._reject(path, name, reason, _look(st), regular=False)
            if not claimed and not odd:
                return
            for name in claimed:
                async for ev in self._handle(name):
                    yield ev

    def _claim(
        self, batch: list[tuple[str, Look]]
    ) -> tuple[list[str], dict[str, Look | None], dict[str, os.stat_result]]:
        """Rename files still as last seen into .processing/ (same filesystem: atomic) and make it durable.

        Returns the names claimed, the new look of those that changed or vanished meanwhile, and the
        entries that are not regular files (never claimed).
        """
        os.makedirs(self.processing_dir, exist_ok=True)
        claimed: list[str] = []
        changed: dict[str, Look | None] = {}
        odd: dict[str, os.stat_result] = {}
        for name, look in batch:
            src = self.directory / name
            try:
                st = os.stat(src, follow_symlinks=False)
            except FileNotFoundError:
                changed[name] = None
                continue
            if _look(st) != look:
                changed[name] = _look(st)
                continue
            if not stat.S_ISREG(st.st_mode):
                odd[name] = st
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
        return claimed, changed, odd

    async def _finish_leftovers(self) -> AsyncIterator[Event]:
        """Process what a crash or a failed move left in .processing/, oldest first."""
        try:
            names = await asyncio.to_thread(self._list_processing)
        except OSError as err:
            self._set_fault(f"cannot read {self.processing_dir}: {err.strerror or err}")
            self._retry_later()
            return
        await asyncio.to_thread(self._attempts.keep_only, set(names))
        for path in [p for p in self._stuck if p.parent == self.processing_dir and p.name not in names]:
            del self._stuck[path]
        if names:
            self.log.info("finishing_leftovers", count=len(names))
        for name in names:
            if self._closed:
                return
            async for ev in self._handle(name):
                yield ev

    def _list_processing(self) -> list[str]:
        """Every entry in .processing/, of whatever kind (something may have been put there by hand)."""
        if not os.path.isdir(self.processing_dir):
            return []
        entries: list[tuple[int, str]] = []
        with os.scandir(self.processing_dir) as it:
            for entry in it:
                try:
                    entries.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.name))
                except FileNotFoundError:
                    continue
        return [name for _, name in sorted(entries)]

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
        look = _look(st)
        if self._stuck.get(path) == look:
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
        DRIVER_READS.labels(self.equipment.id).inc()
        self.log.info(
            "report_processed",
            file=name,
            moved_to=final.name,
            process_id=process_id,
            duplicate=None if fresh is None else not fresh,
        )

    def _read(self, path: Path, name: str) -> tuple[dict[str, Any], str]:
        # O_NOFOLLOW: a link swapped in after our look is refused, never followed; O_NONBLOCK: nor does a
        # FIFO swapped in hold the open.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise DataError(f"{name}: a symbolic link, not a regular file; not followed") from None
            raise
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise DataError(f"{name}: {describe_kind(st.st_mode)}, not a regular file; not read")
            if st.st_size > self.conn.max_file_bytes:
                raise DataError(f"{name}: file is {st.st_size} bytes, over max_file_bytes ({self.conn.max_file_bytes})")
            data = f.read(self.conn.max_file_bytes + 1)
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
        DRIVER_ERRORS.labels(self.equipment.id, "bad_file").inc()
        self.log.warning("report_rejected", file=name, moved_to=final.name, reason=reason)

    def _leave_alone(self, path: Path, look: Look, reason: str, why: str) -> None:
        self._stuck[path] = look
        DRIVER_ERRORS.labels(self.equipment.id, "bad_file").inc()
        self.log.error("entry_left_alone", path=str(path), reason=reason, error=why)

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
