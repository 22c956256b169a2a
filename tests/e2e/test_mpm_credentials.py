"""Refused MPM credentials through the running daemon: paused, kept, reported, delivered once accepted."""

from __future__ import annotations

import json
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peers import Broker, Daemon, MpmPeer, free_port, script_line, scripted_equipment, wait_until, write_config


@pytest.fixture
def mpm() -> Iterator[MpmPeer]:
    peer = MpmPeer(api_key="mpm-key-1")
    yield peer
    peer.close()


def result(n: int, pid: str) -> dict[str, Any]:
    return {"process_id": pid, "source": "test", "overall_score": 1.0, "measurements": [{"n": n}]}


def get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as resp:
        return json.loads(resp.read())


def test_refused_key_pauses_then_delivers_each_once_and_after_sighup(
    tmp_path: Path, broker: Broker, mpm: MpmPeer
) -> None:
    port = free_port()
    key_file = tmp_path / "mpm.key"
    key_file.write_text("mpm-key-1\n")
    script = tmp_path / "press.jsonl"
    body = f'[mpm]\nbase_url = "{mpm.base_url}"\napi_key_file = "mpm.key"\n' + scripted_equipment("press-1", script)
    cfg = write_config(tmp_path, broker.port, body, http=f'[http]\nlisten = "127.0.0.1:{port}"\n')

    def outbox_health() -> dict[str, Any]:
        return get(port, "/healthz")["components"]["outbox"]  # type: ignore[no-any-return]

    def stored_keys() -> list[str]:
        return sorted(r["idempotency_key"] for r in mpm.call(mpm.emu.results))

    mpm.call(mpm.emu.fail, 401, None)  # MPM refuses the key "for a while": until the test clears it
    daemon = Daemon(cfg).start()
    try:
        for i in range(6):
            script_line(script, op="quality", result=result(i, f"PROC-00{1 + i % 2}"), key=f"k-{i}")
        daemon.wait_log("outbox_credentials_refused", reason="credentials refused (401)")
        wait_until(lambda: sum(c["status"] == 401 for c in mpm.call(lambda: list(mpm.emu.calls))) >= 3, what="probes")
        assert outbox_health()["dead_letters"] == 0
        # accepted again: every result delivered exactly once, in order per process
        mpm.call(mpm.emu.clear_faults)
        wait_until(lambda: len(stored_keys()) >= 6, what="six results")
        daemon.wait_log("outbox_credentials_accepted")
        assert stored_keys() == [f"k-{i}" for i in range(6)]
        # the key is rotated on MPM's side: refused again, until SIGHUP with the new key file
        mpm.call(mpm.emu.set_api_key, "mpm-key-2")
        for i in range(6, 10):
            script_line(script, op="quality", result=result(i, f"PROC-00{1 + i % 2}"), key=f"k-{i}")
        daemon.wait_log("outbox_credentials_refused", count=2)
        down = outbox_health()
        assert len(stored_keys()) == 6 and down["dead_letters"] == 0
        key_file.write_text("mpm-key-2\n")
        daemon.send(signal.SIGHUP)
        daemon.wait_log("mpm_reconfigured")  # the same outbox, a client with the key read again
        wait_until(lambda: len(stored_keys()) >= 10, what="ten results")
        assert stored_keys() == sorted(f"k-{i}" for i in range(10))
        for pid in ("PROC-001", "PROC-002"):
            ns = [r["body"]["measurements"][0]["n"] for r in mpm.call(mpm.emu.results, pid)]
            assert ns == sorted(ns), "results of one process out of order"
        wait_until(lambda: outbox_health()["depth"] == 0, what="outbox empty")
        up = outbox_health()
        assert up["dead_letters"] == 0
        logs = daemon.logs()
        assert not [e for e in logs if e.get("event") == "outbox_dead_letter"]
        assert not [e for e in logs if "mpm-key-1" in json.dumps(e) or "mpm-key-2" in json.dumps(e)], "key logged"
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    assert down["status"] == "down" and down["reason"] == "credentials refused (401)", down
    assert up["status"] == "up" and up["reason"] is None, up
