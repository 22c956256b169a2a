"""Commands over MQTT: declared ones run once, everything else is refused with a reason."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from peers import Broker, Daemon, Recorder, script_line, scripted_equipment, wait_until, write_config

R = "edge/test-site/cell-t"


def commands_run(script: Path) -> list[dict]:
    path = Path(str(script) + ".commands.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def result_for(rec: Recorder, request_id: str | None, count: int = 1) -> list[dict]:
    return rec.wait_for(
        lambda ms: (
            hits
            if len(
                hits := [m.json for m in ms if m.topic.endswith("/result") and m.json.get("request_id") == request_id]
            )
            >= count
            else None
        ),
        f"result for {request_id}",
    )


def test_commands_over_mqtt(tmp_path: Path, broker: Broker) -> None:
    script = tmp_path / "press.jsonl"
    down = tmp_path / "lathe.down"
    down.write_text("")
    body = scripted_equipment("press-1", script) + scripted_equipment(
        "lathe-1", tmp_path / "lathe.jsonl", down_file=down
    )
    cfg = write_config(tmp_path, broker.port, body)
    rec = Recorder(broker.port, [f"{R}/#", "replies/#"])
    daemon = Daemon(cfg).start()
    try:
        script_line(script, tag="state", value=0)
        rec.wait_for(lambda ms: [m for m in ms if m.topic.endswith("press-1/status") and m.json["status"] == "idle"])
        cmd = f"{R}/equipment/press-1/cmd"

        # a declared command: reaches the driver; result on .../result and on the MQTT 5 response topic
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "replies/hmi-1"
        props.CorrelationData = b"corr-42"
        rec.publish(f"{cmd}/set_speed", {"request_id": "r1", "parameters": {"value": 1200}}, properties=props)
        res = result_for(rec, "r1")[0]
        assert res["success"] is True and "seq" in res and res["timestamp"].endswith("Z")
        reply = rec.wait_for(lambda ms: [m for m in ms if m.topic == "replies/hmi-1"], "response topic")[0]
        assert reply.properties.CorrelationData == b"corr-42"
        assert reply.json["request_id"] == "r1" and reply.json["seq"] == res["seq"]
        assert commands_run(script) == [{"command": "set_speed", "params": {"value": 1200}}]

        # the same request_id again: not run again, the first result again
        rec.publish(f"{cmd}/set_speed", {"request_id": "r1", "parameters": {"value": 1200}})
        both = result_for(rec, "r1", 2)
        assert {k: v for k, v in both[1].items() if k != "seq"} == {k: v for k, v in both[0].items() if k != "seq"}
        assert len(commands_run(script)) == 1

        def refused(topic: str, payload: object, request_id: str | None, reason: str, **kw: object) -> dict:
            rec.publish(topic, payload if isinstance(payload, bytes) else json.dumps(payload).encode(), **kw)  # type: ignore[arg-type]
            hits = result_for(
                rec, request_id, 1 if request_id else len([m for m in rec.messages if m.topic == f"{topic}/result"]) + 1
            )
            got = [h for h in hits if h["data"].get("reason") == reason]
            assert got and got[-1]["success"] is False, hits
            return got[-1]

        r = refused(f"{cmd}/set_speed", {"request_id": "r2", "parameters": {"value": 99999}}, "r2", "out_of_range")
        assert "maximum" in r["message"]
        r = refused(f"{cmd}/set_speed", {"request_id": "r3", "parameters": {"value": "fast"}}, "r3", "bad_parameters")
        assert "number" in r["message"]
        r = refused(f"{cmd}/explode", {"request_id": "r4", "parameters": {}}, "r4", "unknown_command")
        assert "explode" in r["message"]
        r = refused(
            f"{R}/equipment/drill-9/cmd/set_speed",
            {"request_id": "r5", "parameters": {"value": 1}},
            "r5",
            "unknown_equipment",
        )
        assert "drill-9" in r["message"]
        r = refused(f"{cmd}/refused", {"request_id": "r6", "parameters": {"value": 1}}, "r6", "refused")
        assert "refused" in r["message"]
        r = refused(
            f"{R}/equipment/lathe-1/cmd/set_speed", {"request_id": "r7", "parameters": {"value": 1}}, "r7", "offline"
        )
        stale = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
        r = refused(
            f"{cmd}/set_speed", {"request_id": "r8", "parameters": {"value": 1}, "sent_at": stale}, "r8", "expired"
        )
        r = refused(f"{cmd}/set_speed", {"request_id": "r9", "parameters": {"value": 1}}, "r9", "expired", retain=True)
        rec.publish(f"{cmd}/set_speed", b"", retain=True)  # clear the retained request
        # malformed JSON and a missing request_id: a reply with request_id null
        rec.publish(f"{cmd}/set_speed", b"{not json")
        rec.wait_for(
            lambda ms: [m for m in ms if m.topic.endswith("/result") and m.json["request_id"] is None], "malformed"
        )
        rec.publish(f"{cmd}/set_speed", {"parameters": {"value": 1}})
        rec.wait_for(
            lambda ms: [m for m in ms if m.topic.endswith("/result") and "request_id is required" in m.json["message"]],
            "missing request_id",
        )
        # error state: only reset runs
        script_line(script, tag="state", value=3)
        rec.wait_for(lambda ms: [m for m in ms if m.topic.endswith("press-1/status") and m.json["status"] == "error"])
        refused(f"{cmd}/set_speed", {"request_id": "r10", "parameters": {"value": 5}}, "r10", "state")
        rec.publish(f"{cmd}/reset", {"request_id": "r11", "parameters": {}})
        assert result_for(rec, "r11")[0]["success"] is True
        # nothing refused reached the driver; the daemon still runs and answers
        assert [c["command"] for c in commands_run(script)] == ["set_speed", "refused", "reset"]
        rid = str(uuid.uuid4())
        rec.publish(f"{cmd}/reset", {"request_id": rid, "parameters": {}, "sent_at": datetime.now(UTC).isoformat()})
        assert result_for(rec, rid)[0]["success"] is True
        wait_until(lambda: daemon.proc is not None and daemon.proc.poll() is None)
        audit = [e for e in daemon.logs() if e.get("event") == "command"]
        assert len(audit) >= 12 and all("success" in e for e in audit)
        time.sleep(0)
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        rec.close()
