"""What the driver does to the watched folder, synchronously: run each in a thread, since a stat on a
network share that stopped answering must not stall the daemon."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from drivers.file_drop.entries import Look, describe_kind, fsync_dir, look_of
from drivers.sdk import DataError


def probe(directory: Path) -> tuple[str, str | None, tuple[int, int] | None]:
    """("ok" | "missing" | "error", why, the folder's (device, inode) when ok)."""
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return "missing", f"directory missing: {directory}", None
    except OSError as err:
        return "error", f"cannot read {directory}: {err.strerror or err}", None
    if not stat.S_ISDIR(st.st_mode):
        return "error", f"{directory} is not a directory", None
    if not os.access(directory, os.R_OK | os.X_OK):
        return "error", f"cannot read {directory}: permission denied", None
    return "ok", None, (st.st_dev, st.st_ino)


def list_top(directory: Path, wanted: Callable[[str], bool]) -> dict[str, Look]:
    """Every wanted entry, whatever its kind (lstat: a link is looked at, never followed)."""
    found: dict[str, Look] = {}
    with os.scandir(directory) as it:
        for entry in it:
            if not wanted(entry.name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            found[entry.name] = look_of(st)
    return found


def stat_top(directory: Path, names: set[str]) -> dict[str, Look | None]:
    """The look of each named entry, None for one that is gone or cannot be looked at."""
    found: dict[str, Look | None] = {}
    for name in names:
        try:
            found[name] = look_of(os.stat(directory / name, follow_symlinks=False))
        except OSError:
            found[name] = None
    return found


def claim(
    directory: Path, processing_dir: Path, batch: list[tuple[str, Look]]
) -> tuple[list[str], dict[str, Look | None], dict[str, os.stat_result]]:
    """Rename files still as last seen into .processing/ (same filesystem: atomic) and make it durable.

    Returns the names claimed, the new look of those that changed or vanished meanwhile, and the
    entries that are not regular files (never claimed).
    """
    os.makedirs(processing_dir, exist_ok=True)
    claimed: list[str] = []
    changed: dict[str, Look | None] = {}
    odd: dict[str, os.stat_result] = {}
    for name, look in batch:
        src = directory / name
        try:
            st = os.stat(src, follow_symlinks=False)
        except FileNotFoundError:
            changed[name] = None
            continue
        if look_of(st) != look:
            changed[name] = look_of(st)
            continue
        if not stat.S_ISREG(st.st_mode):
            odd[name] = st
            continue
        target = processing_dir / name
        if os.path.lexists(target):
            continue  # rename would replace it silently
        try:
            os.rename(src, target)
        except FileNotFoundError:
            changed[name] = None
            continue
        claimed.append(name)
    if claimed:
        fsync_dir(directory)
        fsync_dir(processing_dir)
    return claimed, changed, odd


def list_processing(processing_dir: Path) -> list[str]:
    """Every entry in .processing/, of whatever kind (something may have been put there by hand), oldest first."""
    if not os.path.isdir(processing_dir):
        return []
    entries: list[tuple[int, str]] = []
    with os.scandir(processing_dir) as it:
        for entry in it:
            try:
                entries.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.name))
            except FileNotFoundError:
                continue
    return [name for _, name in sorted(entries)]


def read_claimed(path: Path, name: str, max_bytes: int) -> tuple[bytes, os.stat_result]:
    """The bytes and stat of a claimed regular file of at most `max_bytes`; DataError for anything else."""
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
        if st.st_size > max_bytes:
            raise DataError(f"{name}: file is {st.st_size} bytes, over max_file_bytes ({max_bytes})")
        data = f.read(max_bytes + 1)
    return data, st
