"""Opening the daemon's SQLite files (the MQTT store, the MPM outbox) the one way: WAL, checked, and a
corrupt file renamed aside for a fresh one rather than left for a person to delete on an unattended box."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog

log = structlog.get_logger("edge_agent.sqlite")

# Primary result codes of a file that cannot take a write now (full, I/O error, read-only, busy) but may later.
_STORAGE_FAULTS = frozenset(
    {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL,
     sqlite3.SQLITE_CANTOPEN}
)  # fmt: skip
# Primary result codes that mean the file itself is damaged.
_CORRUPT = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


def _primary(err: sqlite3.Error) -> int | None:
    code = getattr(err, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def is_storage_fault(err: BaseException) -> bool:
    """True for an SQLite error of the storage (disk full, I/O error, read-only), which may pass."""
    return isinstance(err, sqlite3.Error) and _primary(err) in _STORAGE_FAULTS


def is_corrupt(err: BaseException) -> bool:
    """True for an SQLite error saying the file is damaged (not for a full disk or an I/O error)."""
    if not isinstance(err, sqlite3.DatabaseError):
        return False
    code = _primary(err)
    # No code: raised by us (quick_check) or by the module for a file it cannot read as a database.
    return code in _CORRUPT or (code is None and not isinstance(err, sqlite3.OperationalError))


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT on an autocommit connection; on an error, ROLLBACK if still open.

    SQLite may already have rolled back after SQLITE_FULL or SQLITE_IOERR; a ROLLBACK then fails with
    "cannot rollback - no transaction is active", which must never replace the real error.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error as err:
                log.warning("sqlite_rollback_failed", error=str(err))
        raise


def open_durable(
    path: Path,
    schema: str,
    *,
    what: str,
    prepare: Callable[[sqlite3.Connection], None] | None = None,
    cache_kib: int | None = None,
) -> sqlite3.Connection:
    """Open `path` with `schema` and run `prepare` on it; on corruption set the file aside and start afresh.

    A full disk or an I/O error is raised as it is: the file is fine and keeps its data for later.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _connect(path, schema, prepare, cache_kib)
    except sqlite3.DatabaseError as err:
        if not is_corrupt(err):
            raise
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
