"""Moving folder entries without losing or overwriting any: into processed/failed folders under a free
name (with an error file beside a failed one), whatever kind of entry it is, and saying what an entry
that is not a regular file is."""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import stat
from pathlib import Path

# Errors of os.link that mean "this filesystem cannot hard-link here": fall back to copying.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS, errno.EOPNOTSUPP}

# What a listing knows of an entry: (size, mtime_ns, inode); a change of any restarts its stability wait.
Look = tuple[int, int, int]


def look_of(st: os.stat_result) -> Look:
    """The look of an entry from its (l)stat."""
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def numbered(name: str, n: int) -> str:
    """The n-th free-name candidate: part7.csv, part7.1.csv, part7.2.csv ..."""
    if n == 0:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        return f"{name}.{n}"
    return f"{stem}.{n}.{ext}"


def fsync_dir(path: Path) -> None:
    """Make the entries of a folder durable."""
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
        fsync_dir(dst_dir)
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(src)
        fsync_dir(src.parent)
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
