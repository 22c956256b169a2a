"""The Unified Namespace profile (`[mqtt] profiles = ["uns"]`): `<location>/<equipment>/<class>/<tag>`, one
JSON message per value, a retained status per equipment, a retained metadata message per tag, durable
through the store across a broker outage, beside today's contract or instead of it."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
from pathlib import Path

from peers import Broker, Daemon, Recorder, script_line, scripted_equipment, wait_until, write_config

R = "edge/test-site/cell-t"
LOC = "acme/plant-1/machining/line-2/cell-3"
U = f"{LOC}/mill-1"


def uns_config(tmp: Path, port: int, profiles: str) -> tuple[Path, Path]:
    script = tmp / "script.jsonl"
    script.touch()
    eq = scripted_equipment("mill-1", script).replace('driver = "scripted"', f'driver = "scripted"\nlocation = "{LOC}"')
    return write_config(tmp, port, eq, mqtt_extra=f"profiles = {profiles}"), script


def values(rec: Recorder, tag: str) -> list[object]:
    return [m.json["value"] for m in rec.select(f"{U}/telemetry/{tag}")]


def test_uns_topics_payloads_and_retained_messages_for_a_late_subscriber(tmp_path: Path, broker: Broker) -> None:
    cfg, script = uns_config(tmp_path, broker.port, '["uns"]')
    rec = Recorder(broker.port, ["#"])
    daemon = Daemon(cfg)
    try:
        daemon.start()
        script_line(script, tag="state", value=1)
        script_line(script, tag="temp", value=21.5)
        wait_until(lambda: values(rec, "temp") == [21.5], what="temp on the UNS")
        msg = rec.select(f"{U}/telemetry/temp")[0]
        body = msg.json
        assert body["value"] == 21.5 and body["unit"] == "degC" and body["quality"] == "good"
        assert body["timestamp"].endswith("Z") or "+" in body["timestamp"]
        assert not msg.retain
        wait_until(lambda: any(m.json["status"] == "running" for m in rec.select(f"{U}/status")), what="status")
        # Live statuses are retained; one replayed from before the connect is historical and never retained.
        assert all(m.retain != bool(m.json.get("is_historical")) for m in rec.select(f"{U}/status"))
        # Only the UNS profile: nothing under today's root.
        assert not [m for m in rec.messages if m.topic.startswith(R)]
        late = Recorder(broker.port, [f"{LOC}/#"], clean=True)
        try:
            late.wait_for(lambda ms: any(m.topic == f"{U}/status" and m.json["status"] == "running" for m in ms))
            late.wait_for(lambda ms: {m.topic for m in ms} >= {f"{U}/metadata/temp", f"{U}/metadata/state"})
            meta = late.select(f"{U}/metadata/temp")[0]
            assert meta.retain and meta.json["unit"] == "degC" and meta.json["topic"] == f"{U}/telemetry/temp"
            assert not late.select("/telemetry/temp"), "values are not retained"
        finally:
            late.close()
    finally:
        daemon.stop()
        rec.close()


def edge_values(rec: Recorder, tag: str) -> list[object]:
    return [
        v["value"] for m in rec.select(f"{R}/equipment/mill-1/telemetry") for v in m.json["values"] if v["tag"] == tag
    ]


def stored(state: Path) -> list[bytes]:
    with contextlib.closing(sqlite3.connect(state / "store.sqlite")) as db:
        return [bytes(r[0]) for r in db.execute("SELECT payload FROM messages")]


def test_uns_beside_today_is_complete_across_a_broker_outage(tmp_path: Path, broker: Broker) -> None:
    cfg, script = uns_config(tmp_path, broker.port, '["edge-agent", "uns"]')
    rec = Recorder(broker.port, ["#"], client_id="uns-outage")
    daemon = Daemon(cfg)
    try:
        daemon.start()
        script_line(script, tag="temp", value=1.0)
        wait_until(lambda: values(rec, "temp") == [1.0], what="first value")
        broker.stop()
        for i in range(2, 12):
            script_line(script, tag="temp", value=float(i))
        wait_until(lambda: sum(b'"value":11.0' in p for p in stored(tmp_path / "state")) == 2, what="both stored")
        broker.start()
        wanted = [float(i) for i in range(1, 12)]
        wait_until(lambda: sorted(set(values(rec, "temp"))) == wanted, what="every UNS value")  # type: ignore[type-var]
        wait_until(lambda: sorted(set(edge_values(rec, "temp"))) == wanted, what="every value of today's stream")  # type: ignore[type-var]
        replayed = [m for m in rec.select(f"{U}/telemetry/temp") if m.json.get("is_historical")]
        assert replayed and all(not m.retain for m in replayed), "the outage's values are replayed as historical"
    finally:
        daemon.stop()
        rec.close()


def test_a_reload_clears_the_metadata_of_removed_equipment(tmp_path: Path, broker: Broker) -> None:
    cfg, _ = uns_config(tmp_path, broker.port, '["uns"]')
    script2 = tmp_path / "script2.jsonl"
    script2.touch()
    second = scripted_equipment("mill-2", script2).replace(
        'driver = "scripted"', f'driver = "scripted"\nlocation = "{LOC}"'
    )
    cfg.write_text(cfg.read_text() + second)
    daemon = Daemon(cfg)
    try:
        daemon.start()
        first = Recorder(broker.port, [f"{LOC}/+/metadata/#"], clean=True)
        first.wait_for(lambda ms: any(m.topic == f"{LOC}/mill-2/metadata/temp" for m in ms), "mill-2's metadata")
        first.close()
        cfg.write_text(cfg.read_text().replace(second, ""))
        daemon.send(signal.SIGHUP)
        daemon.wait_log("reloaded")
        late = Recorder(broker.port, [f"{LOC}/+/metadata/#"], clean=True)
        try:
            late.wait_for(lambda ms: any(m.topic == f"{U}/metadata/temp" for m in ms), "mill-1's metadata")
            assert not [m for m in late.messages if "/mill-2/" in m.topic and m.payload], "no retained metadata left"
        finally:
            late.close()
    finally:
        daemon.stop()
