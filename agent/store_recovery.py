"""The store's SQLite file and how it stays durable: transactions; messages held in memory while
state_dir cannot be written (read-only, an I/O error, a full disk), committed back, with the deletes
and state writes owed, once writing works again; and a store file deleted or replaced under the daemon,
noticed by `watch` and its rows carried into a new file at the path."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

from agent import metrics
from agent.sqlite_file import open_durable
from agent.store_memory import HeldMessages
from agent.store_rows import INSERT, SCHEMA, StoredMessage, describe_error

log = structlog.get_logger("edge_agent.store")

# Messages held in memory while state_dir cannot be written, at most (telemetry goes first past it).
MEMORY_MAX_MESSAGES = 200_000
# How often a store that cannot write tries again, and checks that its file is still the one at its path.
WATCH_INTERVAL_S = 1.0


def write_kv(db: sqlite3.Connection, key: str, value: Any) -> None:
    """Store a state value as the kv table keeps it (JSON text); None deletes it."""
    if value is None:
        db.execute("DELETE FROM kv WHERE key=?", (key,))
    else:
        db.execute("INSERT OR REPLACE INTO kv(key, value) VALUES(?, ?)", (key, json.dumps(value)))


class StoreFile:
    """The database under `state_dir`, falling back to memory while it cannot be written."""

    def __init__(self, state_dir: Path, max_messages: int) -> None:
        self.state_dir = state_dir
        self.path = state_dir / "store.sqlite"
        self.max_messages = max_messages
        self.memory_max = min(max_messages, MEMORY_MAX_MESSAGES)
        self._db: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None
        self._next_id = 1
        self._depth = 0  # rows in the database
        self._telemetry = 0
        self.not_durable: str | None = None  # why state_dir cannot be written, while it cannot
        self.incident: str | None = None  # the store file was deleted or replaced; cleared when drained
        self.dropped = 0
        self._listeners: list[Callable[[], None]] = []
        self._held = HeldMessages()  # messages not (yet) committed
        # Sent messages kept on purpose (the Sparkplug history window), not a backlog: the edge node's sink adds
        # and removes them; every deletion here forgets them too.
        self.kept: set[int] = set()
        self._acked_undeleted: set[int] = set()  # acknowledged, but the delete could not be written
        self._held_kv: dict[str, Any] = {}  # state writes that could not be committed (None = delete)

    def _open_db(self) -> None:
        # A queue read in order needs little cache; the default 2 MiB is memory a small box misses.
        self._db = open_durable(self.path, SCHEMA, what="store", prepare=self._count, cache_kib=256)
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)
        top = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0]
        seqrow = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name='messages'").fetchone()
        self._next_id = max(self._next_id, top + 1, (seqrow[0] if seqrow else 0) + 1)

    def _count(self, db: sqlite3.Connection) -> None:
        self._depth, self._telemetry = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(kind = 'telemetry'), 0) FROM messages"
        ).fetchone()

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.OperationalError("the store is not open")
        return self._db

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN..COMMIT; a failed ROLLBACK (SQLite may have rolled back already) never hides the real error."""
        db = self.db
        db.execute("BEGIN")
        try:
            yield db
        except BaseException:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _notify(self) -> None:
        for cb in self._listeners:
            cb()

    @property
    def depth(self) -> int:
        """Messages waiting, including any held in memory."""
        return max(0, self._depth - len(self._acked_undeleted)) + len(self._held)

    @property
    def held(self) -> int:
        """Messages held in memory, not (yet) on disk."""
        return len(self._held)

    @property
    def _owing(self) -> bool:
        """Memory holds messages, or deletes or state writes the database has not had yet."""
        return bool(self._held or self._acked_undeleted or self._held_kv)

    # -- failing over to memory, and back

    def _fail(self, err: BaseException) -> None:
        """Writing failed: from now on messages are held in memory until it works again."""
        metrics.STORE_ERRORS.inc()
        text = describe_error(err)
        if self.not_durable is None or not self.not_durable.startswith(text):
            text += self._os_cause()
        else:
            text = self.not_durable
        if self.not_durable is None:
            log.error("store_not_durable", error=text, path=str(self.path))
            metrics.STORE_DURABLE.set(0)
        self.not_durable = text

    def _os_cause(self) -> str:
        """What the OS says about writing state_dir: SQLite reports a read-only filesystem as an I/O error."""
        probe = self.state_dir / ".write-probe"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"probe")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.unlink(probe)
        except OSError as err:
            return f"; state_dir: {err.strerror}"
        return ""

    def _hold(self, msgs: list[StoredMessage]) -> None:
        gone = self._held.add(msgs, self.memory_max, self.kept)
        if gone:
            self.dropped += gone
            metrics.STORE_EVICTED.inc(gone)
        metrics.STORE_HELD.set(len(self._held))

    def _commit_held(self) -> bool:
        """Write what memory holds (and the deletes and state it owes); True when nothing is owed any more."""
        if self._db is None:
            return False
        held = list(self._held.values())
        kv = dict(self._held_kv)
        acked = list(self._acked_undeleted)
        try:
            with self._transaction() as db:
                db.executemany(INSERT, [m.row() for m in held])
                for i in range(0, len(acked), 500):
                    chunk = acked[i : i + 500]
                    db.execute(f"DELETE FROM messages WHERE id IN ({','.join('?' * len(chunk))})", chunk)
                for key, value in kv.items():
                    write_kv(db, key, value)
        except sqlite3.Error as err:
            self._fail(err)
            return False
        self._held.clear()
        self._acked_undeleted.difference_update(acked)
        for key in kv:
            self._held_kv.pop(key, None)
        with contextlib.suppress(sqlite3.Error):
            self._count(self.db)
        metrics.STORE_HELD.set(0)
        if self.not_durable is not None:
            log.info("store_durable_again", committed=len(held), was=self.not_durable)
            self.not_durable = None
            metrics.STORE_DURABLE.set(1)
        for m in held:
            metrics.STORE_STORED.labels(m.kind).inc()
        metrics.STORE_DEPTH.set(self.depth)
        return True

    # -- keeping watch: writing again, the file still ours

    async def watch(self, stop: asyncio.Event, interval_s: float = WATCH_INTERVAL_S) -> None:
        """Every `interval_s`: commit what memory holds once writing works; notice a deleted or replaced file."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):
                    await stop.wait()
            if stop.is_set():
                return
            self.check()

    def check(self) -> None:
        """One round of `watch`."""
        if self._db is None:
            return
        reason = self._file_gone()
        if reason is not None:
            self._carry_over(reason)
        if self._owing:
            if self._commit_held():
                self._notify()

    def _file_gone(self) -> str | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return "deleted"
        except OSError:
            return None
        if (st.st_dev, st.st_ino) != self._identity:
            return "replaced"
        return None

    def _carry_over(self, reason: str) -> None:
        """Copy the open (unlinked or displaced) database into a new file at the path and switch to it."""
        tmp = self.path.with_name(self.path.name + ".carry")
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            tmp.unlink(missing_ok=True)
            dst = sqlite3.connect(tmp)
            try:
                self.db.backup(dst)
            finally:
                dst.close()
        except (sqlite3.Error, OSError) as err:
            # Cannot write a new file now: keep going on the old one (still open) and try again next round.
            self._fail(err)
            return
        old, self._db = self._db, None
        if old is not None:
            with contextlib.suppress(sqlite3.Error):
                old.close()
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            other = Path(str(self.path) + suffix)
            with contextlib.suppress(OSError):
                if reason == "replaced" and other.exists():
                    other.rename(Path(f"{self.path}.replaced-{stamp}{suffix}"))
                elif suffix:
                    other.unlink(missing_ok=True)  # the WAL files of a deleted database are stale
        try:
            os.replace(tmp, self.path)
            self._open_db()
        except (sqlite3.Error, OSError) as err:
            self._fail(err)
            # Keep a connection to whichever copy exists; the next round tries again (the identity is stale).
            fallback = self.path if self.path.exists() else tmp
            with contextlib.suppress(sqlite3.Error):
                self._db = sqlite3.connect(fallback, isolation_level=None, check_same_thread=False)
            return
        metrics.STORE_RECREATED.inc()
        self.incident = f"the store file was {reason} under the daemon; {self._depth} messages carried into a new file"
        log.error("store_file_recreated", reason=reason, messages=self._depth, path=str(self.path))
