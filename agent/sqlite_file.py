"""Opening the daemon's SQLite files (the MQTT store, the MPM outbox) the one way: WAL, checked, and a
corrupt file renamed aside for a fresh one rather than left for a person to delete on an unattended box."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger("edge_agent.sqlite")


def open_durable(
    path: Path,
    schema: str,
    *,
    what: str,
    prepare: Callable[[sqlite3.Connection], None] | None = None,
    cache_kib: int | None = None,
) -> sqlite3.Connection:
    """Open `path` with `schema` and run `prepare` on it; on corruption set the file aside and start afresh."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _connect(path, schema, prepare, cache_kib)
    except sqlite3.DatabaseError as err:
        set_aside(path, err, what)
        return _connect(path, schema, prepare, cache_kib)


def _connect(
    path: Path, schema: str, prepare: Callable[[sqlite3.Connection], None] | None, cache_kib: int | None
) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash (SIGKILL); only an OS crash may lose the last commits.
        db.execute("PRAGMA synchronous=NORMAL")
        if cache_kib is not None:
            db.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
        db.executescript(schema)
        ok = db.execute("PRAGMA quick_check").fetchone()
        if not ok or ok[0] != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {ok[0] if ok else 'no answer'}")
        if prepare is not None:
            prepare(db)
    except sqlite3.DatabaseError:
        db.close()
        raise
    return db


def set_aside(path: Path, err: Exception, what: str) -> None:
    """Rename a database and its WAL files to `<name>.corrupt-<time>`."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(path) + suffix)
        if src.exists():
            with contextlib.suppress(OSError):
                src.rename(Path(f"{path}.corrupt-{stamp}{suffix}"))
    log.error(f"{what}_corrupt_renamed", path=str(path), error=str(err), renamed_to=f"{path}.corrupt-{stamp}")
