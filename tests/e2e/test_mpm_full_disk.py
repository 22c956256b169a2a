"""Process status to MPM through the running daemon while its state_dir is a really full filesystem."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fs import fill, tmpfs
from peers import Broker, Daemon, MpmPeer, free_port, script_line, scripted_equipment, wait_until, write_config


@pytest.fixture
def mpm() -> Iterator[MpmPeer]:
    peer = MpmPeer()
    yield peer
    peer.close()


@pytest.fixture
def state_fs(tmp_path: Path) -> Iterator[Path]:
    """`state_dir` of write_config's daemon as a 4 MiB tmpfs (tests/fs.py: skipped without root, except
    under CI=true)."""
    with tmpfs(tmp_path / "state", size_mib=4) as mnt:
        yield mnt


def test_status_sequence_reaches_mpm_in_order_after_a_full_disk(
    tmp_path: Path, state_fs: Path, broker: Broker, mpm: MpmPeer
) -> None:
    port = free_port()
    script = tmp_path / "press.jsonl"
    body = f'[mpm]\nbase_url = "{mpm.base_url}"\nauth = "none"\n' + scripted_equipment("press-1", script)
    cfg = write_config(tmp_path, broker.port, body, http=f'[http]\nlisten = "127.0.0.1:{port}"\n')

    def history() -> list[str]:
        return mpm.call(mpm.emu.status_history, "PROC-001")  # type: ignore[no-any-return]

    def outbox_health() -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as resp:
            return json.loads(resp.read())["components"]["outbox"]  # type: ignore[no-any-return]

    daemon = Daemon(cfg).start()
    try:
        script_line(script, tag="state", value=0)
        daemon.wait_log("status_changed", status="idle")
        script_line(script, tag="job", value="PROC-001")
        script_line(script, tag="state", value=1)
        wait_until(lambda: history() == ["running"], what="running in MPM")
        filler = fill(state_fs)
        for value, status, n in ((2, "paused", 1), (1, "running", 2), (0, "idle", 2)):
            if status == "idle":
                script_line(script, tag="job", value="")
            script_line(script, tag="state", value=value)
            daemon.wait_log("status_changed", count=n, status=status)
        failed = daemon.wait_log("outbox_write_failed")
        assert failed[0]["error"] == "database or disk is full", failed
        assert history() == ["running"], "sent although nothing could be committed"
        full = outbox_health()
        filler.unlink()
        wait_until(lambda: len(history()) >= 4, what="four updates in MPM")
        assert history() == ["running", "paused", "running", "completed"]
        daemon.wait_log("outbox_write_recovered")
        wait_until(lambda: outbox_health()["depth"] == 0, what="outbox empty")
        logs = daemon.logs()
        assert not [e for e in logs if "cannot rollback" in json.dumps(e)], "the real SQLite error was hidden"
        assert not [e for e in logs if e.get("event") == "status_listener_failed"]
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    assert full["status"] == "degraded" and "database or disk is full" in full["reason"], full
    assert full["held_in_memory"] == 3, full
