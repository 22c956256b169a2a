"""Commands over MQTT: declared ones run once, everything else is refused with a reason."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
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


# ---- issue 17: hostile requests are answered, never crash or go silent -----------------------------------


@contextmanager
def idle_press(tmp_path: Path, broker: Broker) -> Iterator[tuple[Daemon, Recorder, Path]]:
    """A daemon with press-1 idle and a recorder on the agent's topics and `replies/#`."""
    script = tmp_path / "press.jsonl"
    cfg = write_config(tmp_path, broker.port, scripted_equipment("press-1", script))
    rec = Recorder(broker.port, [f"{R}/#", "replies/#"])
    daemon = Daemon(cfg).start()
    try:
        script_line(script, tag="state", value=0)
        rec.wait_for(lambda ms: [m for m in ms if m.topic.endswith("press-1/status") and m.json["status"] == "idle"])
        yield daemon, rec, script
        text = daemon.log_path.read_text(errors="replace")
        assert "never retrieved" not in text and "RecursionError" not in text
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        rec.close()


def reply_props(topic: str, correlation: bytes) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = topic
    props.CorrelationData = correlation
    return props


def test_deeply_nested_parameters_are_refused_and_the_next_command_runs(tmp_path: Path, broker: Broker) -> None:
    with idle_press(tmp_path, broker) as (_, rec, script):
        cmd = f"{R}/equipment/press-1/cmd/set_speed"
        deep = b'{"request_id": "deep", "parameters": ' + b'{"a":' * 10_000 + b"1" + b"}" * 10_000 + b"}"
        rec.publish(cmd, deep, properties=reply_props("replies/deep", b"corr-deep"))
        # Refused at the gate, before the request_id could be read: the correlation data identifies it.
        reply = rec.wait_for(lambda ms: [m for m in ms if m.topic == "replies/deep"], "reply to the deep request")[0]
        assert reply.properties.CorrelationData == b"corr-deep"
        assert reply.json["success"] is False and reply.json["data"]["reason"] == "too_deep", reply.json
        assert "64" in reply.json["message"]
        same = rec.wait_for(lambda ms: [m for m in ms if m.topic == f"{cmd}/result"], "result")[0]
        assert same.json["seq"] == reply.json["seq"] and same.json["request_id"] is None
        rid = str(uuid.uuid4())
        rec.publish(cmd, {"request_id": rid, "parameters": {"value": 7}})
        assert result_for(rec, rid)[0]["success"] is True
        assert commands_run(script) == [{"command": "set_speed", "params": {"value": 7}}]


def test_sent_at_far_in_the_future_is_refused_as_clock_skew(tmp_path: Path, broker: Broker) -> None:
    with idle_press(tmp_path, broker) as (_, rec, script):
        cmd = f"{R}/equipment/press-1/cmd/set_speed"
        rec.publish(cmd, {"request_id": "future", "parameters": {"value": 1}, "sent_at": "2999-01-01T00:00:00Z"})
        res = result_for(rec, "future")[0]
        assert res["success"] is False and res["data"]["reason"] == "clock_skew", res
        assert "command_max_age_s" in res["message"]
        rec.publish(cmd, {"request_id": "badtime", "parameters": {"value": 1}, "sent_at": "yesterday"})
        res = result_for(rec, "badtime")[0]
        assert res["success"] is False and res["data"]["reason"] == "malformed" and "yesterday" in res["message"]
        # a little ahead (within command_max_age_s) is ordinary clock jitter: it runs
        soon = (datetime.now(UTC) + timedelta(seconds=5)).isoformat()
        rec.publish(cmd, {"request_id": "soon", "parameters": {"value": 2}, "sent_at": soon})
        assert result_for(rec, "soon")[0]["success"] is True
        assert commands_run(script) == [{"command": "set_speed", "params": {"value": 2}}]


def test_a_response_topic_under_the_agent_root_is_not_used(tmp_path: Path, broker: Broker) -> None:
    with idle_press(tmp_path, broker) as (daemon, rec, _):
        status_topic = f"{R}/equipment/press-1/status"
        before = [m.json for m in rec.select(status_topic)]
        cmd = f"{R}/equipment/press-1/cmd/set_speed"
        rec.publish(
            cmd, {"request_id": "hijack", "parameters": {"value": 3}}, properties=reply_props(status_topic, b"c")
        )
        res = result_for(rec, "hijack")[0]
        assert res["success"] is True
        refusals = daemon.wait_log("command_response_topic_refused", request_id="hijack")
        assert len(refusals) == 1 and refusals[0]["response_topic"] == status_topic
        # the next command's result comes after anything the first could have sent: nothing went to status
        rid = str(uuid.uuid4())
        rec.publish(cmd, {"request_id": rid, "parameters": {"value": 4}})
        result_for(rec, rid)
        assert [m.json for m in rec.select(status_topic)] == before
        assert all("request_id" not in m for m in before)
        # the retained status a new subscriber gets is still the status object
        fresh = Recorder(broker.port, [status_topic], clean=True)
        try:
            retained = fresh.wait_for(lambda ms: ms, "retained status")[0]
            assert retained.retain and retained.json["status"] == "idle" and "request_id" not in retained.json
        finally:
            fresh.close()
        assert len([e for e in daemon.logs() if e.get("event") == "command_response_topic_refused"]) == 1
