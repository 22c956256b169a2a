"""The MPM outbox on a really full filesystem (a small tmpfs), against the MPM emulator over HTTP.

Process level: the outbox, process sync and MPM client as the daemon wires them, with the disk filled
and emptied by the test at exact points of a status sequence (tests/e2e/test_mpm_full_disk.py runs
the same through the daemon).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from agent.model import EquipmentStatus
from agent.mpm import MPMClient
from agent.outbox import Outbox
from agent.process_sync import ProcessSync
from agent.simulate.mpm_emulator import MPMEmulator
from agent.sqlite_file import open_durable, transaction
from fs import fill, tmpfs
from peers import GUARD_S, until

API_KEY = "full-disk-key"
CLIENT_OPTIONS: dict[str, Any] = {"backoff_base_s": 0.005, "backoff_max_s": 0.02, "max_retries": 1}
OUTBOX_FAST: dict[str, Any] = {"backoff_base_s": 0.01, "backoff_max_s": 0.1}
EID = "printer-1"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (tests/fs.py: skipped without root, except under CI=true)."""
    with tmpfs(tmp_path / "small", size_mib=2) as mnt:
        yield mnt


def st(status: str, pid: str | None = None) -> EquipmentStatus:
    return EquipmentStatus(EID, "3d_printer", status, process_id=pid)


async def test_status_sequence_survives_a_full_disk_in_order(
    small_fs: Path, emulator: MPMEmulator, client: MPMClient
) -> None:
    with structlog.testing.capture_logs() as logs:
        box = Outbox(small_fs / "outbox.sqlite", client, **OUTBOX_FAST)
        sync = ProcessSync(box)
        async with box:
            sync.on_status(EID, st("running", "PROC-001"))
            assert await box.wait_idle(GUARD_S)
            assert emulator.status_history("PROC-001") == ["running"]
            filler = fill(small_fs)
            # running -> paused -> running -> idle while nothing can be written: none of it raises or is lost
            sync.on_status(EID, st("paused", "PROC-001"))
            sync.on_status(EID, st("running", "PROC-001"))
            sync.on_status(EID, st("idle"))
            health = box.health()
            assert health["status"] == "degraded", health
            assert "database or disk is full" in health["reason"] and health["held_in_memory"] == 3
            assert box.depth() == 3 and not await box.wait_idle(0.3)
            # a quality result is not held: its source keeps it (the real error, never "cannot rollback")
            with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
                box.enqueue_quality("PROC-001", EID, {"process_id": "PROC-001", "n": 1}, "q-full")
            assert emulator.status_history("PROC-001") == ["running"]
            # space returns: committed, then sent in order
            filler.unlink()
            await until(lambda: len(emulator.status_history("PROC-001")) == 4, what="four updates")
            assert await box.wait_idle(GUARD_S)
            assert box.health()["status"] == "up" and box.health()["held_in_memory"] == 0
        assert emulator.status_history("PROC-001") == ["running", "paused", "running", "completed"]
        # the held state was committed with the updates: a restart knows the process is closed
        box = Outbox(small_fs / "outbox.sqlite", client, **OUTBOX_FAST)
        assert ProcessSync(box).open_process(EID) is None and box.depth() == 0
        box.close()
    failed = [e for e in logs if e["event"] == "outbox_write_failed"]
    assert len(failed) == 1 and failed[0]["error"] == "database or disk is full", failed
    assert [e for e in logs if e["event"] == "outbox_write_recovered"]
    assert not [e for e in logs if "cannot rollback" in repr(e)], "the real SQLite error was hidden"


async def test_open_on_a_full_disk_keeps_the_backlog(small_fs: Path, emulator: MPMEmulator, client: MPMClient) -> None:
    """A full disk is not corruption: the file is never set aside and its backlog is delivered later."""
    path = small_fs / "outbox.sqlite"
    box = Outbox(path, client, **OUTBOX_FAST)
    box.enqueue_quality("PROC-002", EID, {"process_id": "PROC-002", "n": 1}, "q-1")
    box.close()
    filler = fill(small_fs)
    with structlog.testing.capture_logs() as logs:
        # Without its WAL files SQLite cannot even open it: the real error, the file left where it is.
        with pytest.raises(sqlite3.OperationalError, match=r"disk I/O error|database or disk is full"):
            Outbox(path, client, **OUTBOX_FAST)
        assert not list(small_fs.glob("*.corrupt-*"))
        # With them (as after a crash; here another connection keeps them) it opens, degraded, and
        # delivers once space returns.
        filler.unlink()
        keeper = sqlite3.connect(path)
        keeper.execute("SELECT COUNT(*) FROM items").fetchone()
        filler = fill(small_fs)
        box = Outbox(path, client, **OUTBOX_FAST)
        assert box.depth() == 1 and box.health()["status"] == "degraded"
        async with box:
            filler.unlink()
            assert await box.wait_idle(GUARD_S)
            assert box.health()["status"] == "up"
        keeper.close()
    assert [r["idempotency_key"] for r in emulator.results("PROC-002")] == ["q-1"]
    assert not [e for e in logs if e["event"] == "outbox_corrupt_renamed"]
    assert not list(small_fs.glob("*.corrupt-*"))


def test_transaction_names_the_real_error(small_fs: Path) -> None:
    """The one transaction helper: a write on a full disk raises SQLite's error, never "cannot rollback"."""
    db = open_durable(small_fs / "t.sqlite", "CREATE TABLE IF NOT EXISTS t (v BLOB);", what="test")
    filler = fill(small_fs)
    with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
        with transaction(db) as tx:
            for _ in range(64):
                tx.execute("INSERT INTO t VALUES (?)", (b"x" * 8192,))
    assert not db.in_transaction
    filler.unlink()
    with transaction(db) as tx:
        tx.execute("INSERT INTO t VALUES (?)", (b"y",))
    assert db.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 1
    db.close()
