"""Filesystems a test can break under a running process (needs root, which CI has).

- `ext4_image` + `fail_ext4`: a loop-mounted ext4 with errors=remount-ro, made read-only at run time the way
  the kernel does it after an I/O error (ext4's own error trigger). Like the real thing, it stays read-only.
- `tmpfs` + `fill`: a small tmpfs filled to the last byte, then given space back.

A tmpfs cannot be remounted read-only while a process holds a file open for writing (the kernel answers
"busy"), which is why read-only is made through ext4's error path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _need_root(what: str) -> None:
    if os.geteuid() == 0 and shutil.which("mount"):
        return
    if os.environ.get("CI") == "true":
        raise AssertionError(f"this test needs root to {what} (CI runs as root)")
    pytest.skip(f"needs root to {what}")


@contextmanager
def tmpfs(where: Path, size_mib: int = 64) -> Iterator[Path]:
    """A tmpfs mounted at `where` for the duration."""
    _need_root("mount a tmpfs")
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@contextmanager
def ext4_image(where: Path, size_mib: int = 64) -> Iterator[Path]:
    """An ext4 image loop-mounted at `where` with errors=remount-ro, for the duration."""
    _need_root("loop-mount an ext4 image")
    where.mkdir(parents=True, exist_ok=True)
    image = where.with_name(where.name + ".img")
    with open(image, "wb") as fh:
        fh.truncate(size_mib * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(image), str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        image.unlink(missing_ok=True)


def fail_ext4(where: Path) -> None:
    """Make the ext4 mounted at `where` hit an error: the kernel remounts it read-only under its users."""
    source = subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE", str(where)], check=True, capture_output=True, text=True
    ).stdout.strip()
    (Path("/sys/fs/ext4") / Path(source).name / "trigger_fs_error").write_text("1")


def fill(where: Path) -> Path:
    """Fill the filesystem at `where` to the last block; return the filler to delete for space."""
    filler = where / "filler"
    chunk = b"\0" * (1 << 20)
    with open(filler, "wb", buffering=0) as fh:
        for size in (len(chunk), 4096, 512):
            try:
                while fh.write(chunk[:size]):
                    pass
            except OSError:
                pass
    return filler


def remount(where: Path, mode: str) -> None:
    """Remount `where` `ro` or `rw` (the kernel refuses `ro` while a process holds a file open for writing)."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], check=True)
