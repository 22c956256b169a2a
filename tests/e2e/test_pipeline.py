"""The pipeline end to end: scripted driver -> monitor -> store -> mosquitto -> a subscriber."""

from __future__ import annotations

import math
import signal
from pathlib import Path

from peers import Broker, Daemon, Recorder, script_line, scripted_equipment, write_config

R = "edge/test-site/cell-t"


def seqs(msgs: list) -> list[int]:
    return [m.json["seq"] for m in msgs if m.topic.startswith(f"{R}/equipment/")]


def test_status_telemetry_alerts_and_lifecycle(tmp_path: Path, broker: Broker) -> None:
    script = tmp_path / "press.jsonl"
    cfg = write_config(tmp_path, broker.port, scripted_equipment("press-1", script))
    rec = Recorder(broker.port, [f"{R}/#"])
    daemon = Daemon(cfg).start()
    try:
        birth = rec.wait_for(lambda ms: [m for m in ms if m.topic == f"{R}/state" and m.json["online"]], "birth")[0]
        assert birth.json["agent_id"] == "cell-t" and birth.json["site"] == "test-site" and birth.json["session"]
        # connected, no status value yet: unknown
        rec.wait_for(
            lambda ms: [m for m in ms if m.topic.endswith("/status") and m.json["status"] == "unknown"], "unknown"
        )
        script_line(script, tag="state", value=1)
        script_line(script, tag="program", value="O1234")
        script_line(script, tag="job", value="JOB-7")
        script_line(script, tag="progress", value=0.25)
        running = rec.wait_for(
            lambda ms: [
                m
                for m in ms
                if m.topic.endswith("press-1/status")
                and m.json["status"] == "running"
                and m.json["process_id"] == "JOB-7"
                and m.json["progress"] == 0.25
            ],
            "running status",
        )[-1].json
        assert running["current_operation"] == "O1234" and running["type"] == "cnc_mill"
        assert running["timestamp"].endswith("Z")
        # integral float matches the map; unmapped value gives unknown with raw_status
        script_line(script, tag="state", value=2.0)
        rec.wait_for(
            lambda ms: [m for m in ms if m.topic.endswith("/status") and m.json["status"] == "paused"], "paused"
        )
        script_line(script, tag="state", value=42)
        unk = rec.wait_for(
            lambda ms: [m for m in ms if m.topic.endswith("/status") and m.json["metadata"].get("raw_status") == 42],
            "raw",
        )[-1].json
        assert unk["status"] == "unknown"
        # telemetry: deadband from the last reported value, no conflation, NaN as a string
        for v in (20.0, 20.3, 20.6, 21.0, 21.2, 21.7, float("nan"), 22.0):
            script_line(script, tag="temp", value=v)

        def temps(ms: list) -> list:
            return [
                v["value"] for m in ms if m.topic.endswith("/telemetry") for v in m.json["values"] if v["tag"] == "temp"
            ]

        rec.wait_for(lambda ms: temps(ms)[-1:] == [22.0], "temperature telemetry")
        got = [m for m in rec.select("/telemetry")]
        values = temps(got)
        assert values == [20.0, 20.6, 21.2, 21.7, "NaN", 22.0], values
        assert all(m.retain is False for m in got)
        tv = next(v for m in got for v in m.json["values"] if v["tag"] == "temp")
        assert tv["unit"] == "degC" and tv["quality"] == "good" and tv["ts"].endswith("Z")
        # a bad quality is always reported, even with the same value
        script_line(script, tag="temp", value=22.0, quality="bad")
        rec.wait_for(
            lambda ms: any(
                v["quality"] == "bad" for m in ms if m.topic.endswith("/telemetry") for v in m.json["values"]
            ),
            "bad quality",
        )
        # alerts: active then cleared, same id, threshold of each side
        script_line(script, tag="temp", value=85.0)
        script_line(script, tag="temp", value=78.0)
        script_line(script, tag="temp", value=74.0)
        alerts = rec.wait_for(
            lambda ms: [m.json for m in ms if m.topic.endswith("/alerts")] if len(rec.select("/alerts")) >= 2 else None,
            "alerts",
        )
        assert [a["state"] for a in alerts] == ["active", "cleared"]
        assert alerts[0]["alert_id"] == alerts[1]["alert_id"]
        assert alerts[0]["threshold"] == 80.0 and alerts[1]["threshold"] == 75.0
        assert (
            alerts[0]["severity"] == "critical"
            and alerts[0]["value"] == 85.0
            and alerts[0]["message"] == "Spindle overheating"
        )
        # seq strictly increasing across topics within the live and within the replayed stream (what was
        # stored before the first connect is replayed behind live traffic), no gap within the run
        every = [m for m in rec.select() if m.topic.startswith(f"{R}/equipment/")]
        for historical in (False, True):
            part = seqs([m for m in every if bool(m.json.get("is_historical")) == historical])
            assert part == sorted(part) and len(set(part)) == len(part)
        s = sorted(seqs(every))
        assert len(set(s)) == len(s)
        assert s == list(range(s[0], s[0] + len(s))), "gap in seq"
        # a retained status for late subscribers
        late = Recorder(broker.port, [f"{R}/equipment/+/status", f"{R}/state"], clean=True)
        try:
            retained = late.wait_for(lambda ms: [m for m in ms if m.topic.endswith("/status") and m.retain], "retained")
            assert retained[-1].json["status"] == "unknown"
            assert late.wait_for(lambda ms: [m for m in ms if m.topic == f"{R}/state" and m.retain])[-1].json["online"]
        finally:
            late.close()
        code = daemon.stop(signal.SIGTERM)
        assert code == 0
        off = rec.wait_for(
            lambda ms: [m for m in ms if m.topic == f"{R}/state" and not m.json["online"]], "offline state"
        )
        assert off[-1].json["session"] == birth.json["session"]
    finally:
        daemon.kill()
        rec.close()


def test_last_will_on_sigkill(tmp_path: Path, broker: Broker) -> None:
    cfg = write_config(tmp_path, broker.port)
    rec = Recorder(broker.port, [f"{R}/state"])
    daemon = Daemon(cfg).start()
    try:
        rec.wait_for(lambda ms: [m for m in ms if m.json["online"]], "birth")
        daemon.kill()
        will = rec.wait_for(lambda ms: [m for m in ms if not m.json["online"]], "last will")
        assert will[-1].json["agent_id"] == "cell-t"
    finally:
        daemon.kill()
        rec.close()


def test_nan_json_is_strict(tmp_path: Path, broker: Broker) -> None:
    script = tmp_path / "s.jsonl"
    cfg = write_config(tmp_path, broker.port, scripted_equipment("m1", script))
    rec = Recorder(broker.port, [f"{R}/equipment/+/telemetry"])
    daemon = Daemon(cfg).start()
    try:
        script_line(script, tag="setpoint", value=float("inf"))
        script_line(script, tag="temp", value=float("-inf"))
        msgs = rec.wait_for(lambda ms: ms if sum(len(m.json["values"]) for m in ms) >= 2 else None)
        raw = b"".join(m.payload for m in msgs)
        assert b"Infinity" in raw and b'"Infinity"' in raw and b'"-Infinity"' in raw
        assert not math.isnan(0.0)
    finally:
        daemon.stop()
        rec.close()


def test_heartbeat_stale_and_rebirth(tmp_path: Path, broker: Broker) -> None:
    script = tmp_path / "s.jsonl"
    body = scripted_equipment("m1", script).replace('driver = "scripted"', 'driver = "scripted"\nstale_after_s = 0.5')
    cfg = write_config(tmp_path, broker.port, body, mqtt_extra="").read_text()
    cfg = cfg.replace("status_heartbeat_s = 60", "status_heartbeat_s = 0.3")
    path = tmp_path / "agent.toml"
    path.write_text(cfg)
    rec = Recorder(broker.port, [f"{R}/#"])
    daemon = Daemon(path).start()
    try:
        script_line(script, tag="state", value=1)
        rec.wait_for(lambda ms: [m for m in ms if m.topic.endswith("/status") and m.json["status"] == "running"])
        # no status-tag value for longer than stale_after_s: unknown, marked stale
        stale = rec.wait_for(
            lambda ms: [m for m in ms if m.topic.endswith("/status") and m.json["metadata"].get("stale")], "stale"
        )
        assert stale[-1].json["status"] == "unknown"
        # heartbeats: the same status republished, with new seq
        rec.wait_for(
            lambda ms: len([m for m in ms if m.topic.endswith("/status") and m.json["status"] == "unknown"]) >= 3
        )
        script_line(script, tag="state", value=0)
        rec.wait_for(lambda ms: [m for m in ms if m.topic.endswith("/status") and m.json["status"] == "idle"])
        births = len([m for m in rec.messages if m.topic == f"{R}/state"])
        rec.publish(f"{R}/cmd/rebirth", b"")
        rec.wait_for(lambda ms: len([m for m in ms if m.topic == f"{R}/state"]) > births, "rebirth")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        rec.close()


def test_alert_clear_after_restart_repeats_the_id(tmp_path: Path, broker: Broker) -> None:
    script = tmp_path / "s.jsonl"
    cfg = write_config(tmp_path, broker.port, scripted_equipment("m1", script))
    rec = Recorder(broker.port, [f"{R}/equipment/+/alerts"])
    daemon = Daemon(cfg).start()
    try:
        script_line(script, tag="temp", value=90.0)
        active = rec.wait_for(lambda ms: ms, "active alert")[0].json
        assert active["state"] == "active"
        daemon.kill()  # no clean stop: the alert's state must already be durable
        daemon = Daemon(cfg).start()
        script_line(script, tag="temp", value=60.0)
        cleared = rec.wait_for(lambda ms: [m.json for m in ms if m.json["state"] == "cleared"], "cleared")[0]
        assert cleared["alert_id"] == active["alert_id"] and cleared["threshold"] == 75.0
        # the active alert may be delivered again from the store (at least once), never as a new alert
        assert {m.json["alert_id"] for m in rec.messages} == {active["alert_id"]}
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        rec.close()


def test_a_poison_value_costs_only_itself(tmp_path: Path, broker: Broker) -> None:
    script = tmp_path / "press.jsonl"
    cfg = write_config(tmp_path, broker.port, scripted_equipment("press-1", script))
    rec = Recorder(broker.port, [f"{R}/#"])
    daemon = Daemon(cfg).start()
    try:
        script_line(script, tag="temp", value=20.0)
        for _ in range(3):
            script_line(script, op="deep", tag="temp", depth=100_000)  # too deep for any encoder
        script_line(script, tag="temp", value=30.0)
        values = rec.wait_for(
            lambda ms: (
                v := [x for m in ms if m.topic.endswith("/telemetry") for x in m.json["values"] if x["tag"] == "temp"]
            )
            and v[-1]["value"] == 30.0
            and v,
            "the value after the poison",
        )
        assert [(x["value"], x["quality"]) for x in values] == [(20.0, "good"), (None, "bad"), (30.0, "good")]
        logs = daemon.logs()
        assert len([e for e in logs if e.get("event") == "input_rejected"]) == 1
        assert not [e for e in logs if e.get("event") in ("driver_down", "driver_failed")]
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        rec.close()
