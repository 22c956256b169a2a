"""MPM through the running daemon: quality results exactly once, process status in order, load_process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers import Broker, Daemon, MpmPeer, Recorder, script_line, scripted_equipment, wait_until, write_config

R = "edge/test-site/cell-t"


@pytest.fixture
def mpm() -> Iterator[MpmPeer]:
    peer = MpmPeer()
    yield peer
    peer.close()


def config(tmp: Path, broker: Broker, mpm: MpmPeer, script: Path) -> Path:
    body = scripted_equipment(
        "press-1",
        script,
        extra='[[equipment.commands]]\nname = "load_process"\nkind = "load_process"\n',
    ).replace(
        '[[equipment.tags]]\nname = "state"',
        '[equipment.parameters]\nlaser_power = "set_speed"\nscan_speed = "set_speed"\n'
        '[[equipment.tags]]\nname = "state"',
        1,
    )
    mpm_section = f'[mpm]\nbase_url = "{mpm.base_url}"\nauth = "none"\nrate_limit_per_minute = 100000\n'
    return write_config(tmp, broker.port, mpm_section + body)


def result(n: int, pid: str = "PROC-001") -> dict:
    return {
        "process_id": pid,
        "source": "test",
        "overall_score": 1.0,
        "quality_scores": {"dimensional": 1.0},
        "defects": [],
        "measurements": [{"n": n}],
        "timestamp": "2026-11-27T10:00:00.000Z",
    }


def test_quality_results_exactly_once_through_outage_and_sigkill(tmp_path: Path, broker: Broker, mpm: MpmPeer) -> None:
    script = tmp_path / "press.jsonl"
    cfg = config(tmp_path, broker, mpm, script)
    rec = Recorder(broker.port, [f"{R}/equipment/+/quality"])
    mpm.call(mpm.emu.fail, 503, None)  # MPM down until told otherwise
    daemon = Daemon(cfg).start()
    try:
        for i in range(10):
            script_line(script, op="quality", result=result(i, f"PROC-00{1 + i % 2}"), key=f"key-{i}")
        pending = rec.wait_for(lambda ms: ms if len(ms) >= 10 else None, "pending quality messages")
        assert all(m.json["mpm_delivery"] == "pending" for m in pending)
        # all ten are in the outbox; MPM has none; the daemon dies
        wait_until(lambda: any(c["status"] == 503 for c in mpm.call(lambda: list(mpm.emu.calls))), what="attempts")
        daemon.kill()
        mpm.call(mpm.emu.clear_faults)
        daemon = Daemon(cfg).start()
        wait_until(lambda: len(mpm.call(mpm.emu.results)) >= 10, what="results stored")
        delivered = rec.wait_for(
            lambda ms: d if len(d := [m for m in ms if m.json["mpm_delivery"] == "delivered"]) >= 10 else None,
            "delivered",
        )
        stored = mpm.call(mpm.emu.results)
        assert sorted(r["idempotency_key"] for r in stored) == sorted(f"key-{i}" for i in range(10))
        for pid in ("PROC-001", "PROC-002"):
            ns = [r["body"]["measurements"][0]["n"] for r in stored if r["process_id"] == pid]
            assert ns == sorted(ns), "results of one process out of order"
        assert {m.json["idempotency_key"] for m in delivered} == {f"key-{i}" for i in range(10)}
        # the same report again: not sent again, reported as a duplicate
        script_line(script, op="quality", result=result(3, "PROC-002"), key="key-3")
        dup = rec.wait_for(lambda ms: [m for m in ms if m.json.get("duplicate")], "duplicate")
        assert dup[0].json["mpm_delivery"] == "delivered"
        # a rejected result is reported and the next ones still go
        mpm.call(mpm.emu.reject_next, 1, 400)
        script_line(script, op="quality", result=result(20, "PROC-003"), key="key-20")
        script_line(script, op="quality", result=result(21, "PROC-003"), key="key-21")
        rejected = rec.wait_for(lambda ms: [m for m in ms if m.json["mpm_delivery"] == "rejected"], "rejected")
        assert rejected[0].json["idempotency_key"] == "key-20"
        wait_until(
            lambda: [r for r in mpm.call(mpm.emu.results) if r["idempotency_key"] == "key-21"], what="next result"
        )
        assert len(mpm.call(mpm.emu.results)) == 11
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        rec.close()


def test_status_sync_and_load_process(tmp_path: Path, broker: Broker, mpm: MpmPeer) -> None:
    script = tmp_path / "press.jsonl"
    cfg = config(tmp_path, broker, mpm, script)
    rec = Recorder(broker.port, [f"{R}/equipment/+/cmd/+/result", f"{R}/equipment/+/status"])
    daemon = Daemon(cfg).start()
    try:
        script_line(script, tag="state", value=0)
        rec.wait_for(lambda ms: [m for m in ms if m.topic.endswith("/status") and m.json["status"] == "idle"])
        # load_process: every mapped parameter validated, then written
        mpm.call(lambda: mpm.emu.processes["PROC-001"]["parameters"].update({"laser_power": 200, "scan_speed": 1200}))
        rec.publish(
            f"{R}/equipment/press-1/cmd/load_process", {"request_id": "l1", "parameters": {"process_id": "PROC-001"}}
        )
        res = rec.wait_for(
            lambda ms: [m.json for m in ms if m.topic.endswith("/result") and m.json["request_id"] == "l1"]
        )[0]
        assert res["success"] is True, res
        assert {w["parameter"] for w in res["data"]["written"]} == {"laser_power", "scan_speed"}
        written = [json.loads(line) for line in Path(str(script) + ".commands.jsonl").read_text().splitlines()]
        assert [w["params"]["value"] for w in written] == [200, 1200]
        # one value out of range: nothing written
        mpm.call(lambda: mpm.emu.processes["PROC-002"]["parameters"].update({"laser_power": 100, "scan_speed": 99999}))
        rec.publish(
            f"{R}/equipment/press-1/cmd/load_process", {"request_id": "l2", "parameters": {"process_id": "PROC-002"}}
        )
        res = rec.wait_for(
            lambda ms: [m.json for m in ms if m.topic.endswith("/result") and m.json["request_id"] == "l2"]
        )[0]
        assert res["success"] is False and "scan_speed" in res["message"]
        assert len(Path(str(script) + ".commands.jsonl").read_text().splitlines()) == 2
        # running, paused, running, completed, in order, for the job
        script_line(script, tag="job", value="PROC-001")
        script_line(script, tag="state", value=1)
        rec.wait_for(lambda ms: [m for m in ms if m.topic.endswith("/status") and m.json["status"] == "running"])
        rec.publish(
            f"{R}/equipment/press-1/cmd/load_process", {"request_id": "l3", "parameters": {"process_id": "PROC-001"}}
        )
        res = rec.wait_for(
            lambda ms: [m.json for m in ms if m.topic.endswith("/result") and m.json["request_id"] == "l3"]
        )[0]
        assert res["success"] is False and res["data"]["reason"] == "busy"
        script_line(script, tag="state", value=2)
        rec.wait_for(lambda ms: [m for m in ms if m.topic.endswith("/status") and m.json["status"] == "paused"])
        script_line(script, tag="state", value=1)
        script_line(script, op="disconnect", error="cable pulled")
        rec.wait_for(lambda ms: [m for m in ms if m.topic.endswith("/status") and m.json["status"] == "offline"])
        script_line(script, tag="job", value="")
        script_line(script, tag="state", value=0)
        wait_until(lambda: mpm.call(mpm.emu.status_history, "PROC-001")[-1:] == ["completed"], what="completed")
        assert mpm.call(mpm.emu.status_history, "PROC-001") == ["running", "paused", "running", "completed"]
        # error gives failed
        script_line(script, tag="job", value="PROC-002")
        script_line(script, tag="state", value=1)
        script_line(script, tag="state", value=3)
        wait_until(lambda: mpm.call(mpm.emu.status_history, "PROC-002") == ["running", "failed"], what="failed")
        updates = mpm.call(mpm.emu.status_updates, "PROC-001")
        assert all(u.get("idempotency_key") for u in updates), updates
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        rec.close()


def test_dead_letters_over_http(tmp_path: Path, broker: Broker, mpm: MpmPeer) -> None:
    import urllib.error
    import urllib.request

    from peers import free_port

    port = free_port()
    (tmp_path / "admin.key").write_text("admin-key-1\n")
    (tmp_path / "viewer.key").write_text("viewer-key-1\n")
    http = (
        f'[http]\nlisten = "127.0.0.1:{port}"\n'
        '[[http.api_keys]]\nname = "admin"\nkey_file = "admin.key"\nrole = "admin"\n'
        '[[http.api_keys]]\nname = "viewer"\nkey_file = "viewer.key"\nrole = "viewer"\n'
    )
    script = tmp_path / "press.jsonl"
    body = f'[mpm]\nbase_url = "{mpm.base_url}"\nauth = "none"\n' + scripted_equipment("press-1", script)
    cfg = write_config(tmp_path, broker.port, body, http=http)

    def call(method: str, path: str, key: str) -> tuple[int, dict]:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
        req.add_header("X-API-Key", key)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    daemon = Daemon(cfg).start()
    try:
        mpm.call(mpm.emu.reject_next, 2, 400)
        script_line(script, op="quality", result=result(1, "PROC-001"), key="dl-1")
        script_line(script, op="quality", result=result(2, "PROC-002"), key="dl-2")

        def two_dead() -> list[dict] | None:
            letters = call("GET", "/api/v1/dead-letters", "admin-key-1")[1]["dead_letters"]
            return letters if len(letters) == 2 else None

        dead = wait_until(two_dead, what="two dead letters")
        by_key = {d["idempotency_key"]: d for d in dead}
        one = by_key["dl-1"]
        assert one["kind"] == "quality_result" and one["status_code"] == 400 and one["process_id"] == "PROC-001"
        assert one["equipment_id"] == "press-1" and one["reason"] and one["body"]["measurements"] == [{"n": 1}]
        assert call("POST", f"/api/v1/dead-letters/{one['id']}/retry", "viewer-key-1")[0] == 403
        assert call("POST", f"/api/v1/dead-letters/{one['id']}/retry", "admin-key-1")[0] == 200
        wait_until(lambda: [r for r in mpm.call(mpm.emu.results) if r["idempotency_key"] == "dl-1"], what="retried")
        two = by_key["dl-2"]
        assert call("DELETE", f"/api/v1/dead-letters/{two['id']}", "admin-key-1")[0] == 200
        assert call("DELETE", f"/api/v1/dead-letters/{two['id']}", "admin-key-1")[0] == 404
        assert call("GET", "/api/v1/dead-letters", "admin-key-1")[1]["dead_letters"] == []
        health = call("GET", "/healthz", "viewer-key-1")[1]
        assert health["components"]["outbox"]["dead_letters"] == 0
        assert daemon.stop() == 0
    finally:
        daemon.kill()
