"""Faults of the MQTT path: broker outages, a SIGKILLed daemon, a corrupt store, reloads."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from pathlib import Path

from peers import Broker, Daemon, Received, Recorder, script_line, scripted_equipment, wait_until, write_config

R = "edge/test-site/cell-t"


def equipment_msgs(msgs: list[Received]) -> list[Received]:
    return [m for m in msgs if m.topic.startswith(f"{R}/equipment/")]


def check_complete_and_ordered(msgs: list[Received]) -> list[int]:
    """Every seq from the first to the last arrived; first arrivals are in increasing order within the live
    stream and within the replayed one (live traffic goes ahead of the replay); returns them sorted."""
    streams: dict[bool, list[int]] = {False: [], True: []}
    seen: set[int] = set()
    for m in equipment_msgs(msgs):
        seq = m.json["seq"]
        if seq not in seen:
            seen.add(seq)
            streams[bool(m.json.get("is_historical"))].append(seq)
    for historical, firsts in streams.items():
        assert firsts == sorted(firsts), f"{'replayed' if historical else 'live'} messages arrived out of order"
    return sorted(seen)


def temp_values(msgs: list[Received]) -> list[float]:
    return [v["value"] for m in msgs if m.topic.endswith("/telemetry") for v in m.json["values"] if v["tag"] == "temp"]


class Writer:
    """Appends a new temperature (always a reported change) every few milliseconds."""

    def __init__(self, script: Path) -> None:
        self.script = script
        self.n = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="writer")

    def run(self) -> None:
        while not self.stop.is_set():
            self.n += 1
            script_line(self.script, tag="temp", value=float(self.n))
            if self.n % 25 == 0:
                script_line(self.script, tag="state", value=(self.n // 25) % 2)
            self.stop.wait(0.01)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def test_broker_outage_loses_nothing(tmp_path: Path, broker: Broker) -> None:
    script = tmp_path / "press.jsonl"
    cfg = write_config(tmp_path, broker.port, scripted_equipment("press-1", script).replace("deadband = 0.5", ""))
    rec = Recorder(broker.port, [f"{R}/#"])
    daemon = Daemon(cfg).start()
    try:
        with Writer(script) as w:
            rec.wait_for(lambda ms: len(temp_values(ms)) > 20, "telemetry before the outage")
            broker.stop()
            time.sleep(5)  # the outage itself, not a wait for the system under test
            broker.start()
            rec.wait_for(lambda ms: any(m.json.get("is_historical") for m in equipment_msgs(ms)), "replayed messages")
            rec.wait_for(lambda ms: len(temp_values(ms)) > w.n // 2 + 20, "telemetry after the outage")
        last = float(w.n)
        rec.wait_for(lambda ms: last in temp_values(ms), "the last value")
        msgs = list(rec.messages)
        firsts = check_complete_and_ordered(msgs)
        assert firsts == list(range(firsts[0], firsts[-1] + 1)), "a QoS 1 message was lost"
        values = temp_values(msgs)
        assert sorted(set(values)) == [float(i) for i in range(1, w.n + 1)], "a telemetry value was lost"
        historical = [m for m in equipment_msgs(msgs) if m.json.get("is_historical")]
        assert historical and all(not m.retain for m in historical)
        # after the reconnect's birth: the current status first, retained, not historical, ahead of the backlog
        reborn = [i for i, m in enumerate(msgs) if m.topic == f"{R}/state" and m.json["online"]][1]
        after = equipment_msgs(msgs[reborn + 1 :])
        assert after[0].topic.endswith("/status") and after[0].retain and not after[0].json.get("is_historical")
        births = [m for m in msgs if m.topic == f"{R}/state" and m.json["online"]]
        assert len(births) >= 2 and len({b.json["session"] for b in births}) == 1
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        rec.close()


def stored_payloads(state_dir: Path) -> list[bytes]:
    db = sqlite3.connect(f"file:{state_dir / 'store.sqlite'}?mode=ro", uri=True)
    try:
        return [r[0] for r in db.execute("SELECT payload FROM messages ORDER BY id")]
    except sqlite3.Error:
        return []
    finally:
        db.close()


def test_sigkill_while_broker_down_then_restart(tmp_path: Path, broker: Broker) -> None:
    script = tmp_path / "press.jsonl"
    cfg = write_config(tmp_path, broker.port, scripted_equipment("press-1", script).replace("deadband = 0.5", ""))
    rec = Recorder(broker.port, [f"{R}/#"])
    daemon = Daemon(cfg).start()
    try:
        script_line(script, tag="state", value=1)
        rec.wait_for(lambda ms: [m for m in ms if m.topic.endswith("/status") and m.json["status"] == "running"])
        first_run = [m.json["seq"] for m in equipment_msgs(rec.messages)]
        broker.stop()
        for i in range(200):
            script_line(script, tag="temp", value=float(i))
        script_line(script, tag="state", value=0)
        wait_until(
            lambda: any(b'"value":199.0' in p for p in stored_payloads(tmp_path / "state")), what="stored backlog"
        )
        wait_until(
            lambda: any(b'"status":"idle"' in p for p in stored_payloads(tmp_path / "state")), what="stored status"
        )
        daemon.kill()
        broker.start()
        daemon = Daemon(cfg).start()
        rec.wait_for(lambda ms: 199.0 in temp_values(ms), "the backlog after the restart")
        rec.wait_for(lambda ms: [m for m in ms if m.topic.endswith("/status") and m.json["status"] == "idle"], "idle")
        msgs = list(rec.messages)
        assert sorted(set(temp_values(msgs))) == [float(i) for i in range(200)]
        seqs = [m.json["seq"] for m in equipment_msgs(msgs)]
        new = [s for s in seqs[len(first_run) :] if s not in set(first_run)]  # duplicates are allowed
        assert new and min(new) > max(first_run), "seq went back after the restart"
        # no reuse: the same seq never carries two different messages
        by_seq: dict[int, bytes] = {}
        for m in equipment_msgs(msgs):
            body = m.payload.replace(b',"is_historical":true', b"")
            assert by_seq.setdefault(m.json["seq"], body) == body, "a seq was reused"
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        rec.close()


def test_corrupt_store_is_set_aside(tmp_path: Path, broker: Broker) -> None:
    script = tmp_path / "press.jsonl"
    cfg = write_config(tmp_path, broker.port, scripted_equipment("press-1", script))
    rec = Recorder(broker.port, [f"{R}/#"])
    daemon = Daemon(cfg).start()
    try:
        script_line(script, tag="state", value=1)
        rec.wait_for(lambda ms: [m for m in ms if m.topic.endswith("/status") and m.json["status"] == "running"])
        assert daemon.stop() == 0
        before = max(m.json["seq"] for m in equipment_msgs(rec.messages))
        store = tmp_path / "state" / "store.sqlite"
        for suffix in ("-wal", "-shm"):
            Path(str(store) + suffix).unlink(missing_ok=True)
        store.write_bytes(b"this is not a database" * 100)
        daemon = Daemon(cfg).start()
        daemon.wait_log("store_corrupt_renamed")
        assert list((tmp_path / "state").glob("store.sqlite.corrupt-*"))
        script_line(script, tag="state", value=2)
        paused = rec.wait_for(
            lambda ms: [m for m in ms if m.topic.endswith("/status") and m.json["status"] == "paused"]
        )
        assert paused[-1].json["seq"] > before
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        rec.close()


def test_sighup_reload(tmp_path: Path, broker: Broker) -> None:
    script = tmp_path / "press.jsonl"
    body = scripted_equipment("press-1", script)
    cfg = write_config(tmp_path, broker.port, body)
    rec = Recorder(broker.port, [f"{R}/#"])
    daemon = Daemon(cfg).start()
    try:
        script_line(script, tag="temp", value=1.0)
        rec.wait_for(lambda ms: 1.0 in temp_values(ms))
        text = cfg.read_text()
        # a changed tag list: the temperature's unit changes and a new tag appears
        cfg.write_text(
            text.replace('unit = "degC"', 'unit = "K"') + '[[equipment.tags]]\nname = "flow"\nunit = "l/min"\n'
        )
        daemon.send(signal.SIGHUP)
        daemon.wait_log("reloaded")
        script_line(script, tag="temp", value=2.0)
        script_line(script, tag="flow", value=3.5)
        got = rec.wait_for(
            lambda ms: [v for m in ms if m.topic.endswith("/telemetry") for v in m.json["values"] if v["tag"] == "flow"]
        )
        assert got[0]["unit"] == "l/min"
        units = [
            v["unit"]
            for m in rec.messages
            if m.topic.endswith("/telemetry")
            for v in m.json["values"]
            if v["tag"] == "temp"
        ]
        assert units[-1] == "K"
        births = [m for m in rec.messages if m.topic == f"{R}/state" and m.json["online"]]
        assert len(births) == 1, "a reload that leaves [mqtt] alone keeps the MQTT session"
        # an invalid file is refused and the old config keeps running
        cfg.write_text(text.replace("[agent]", "[agent\n"))
        daemon.send(signal.SIGHUP)
        daemon.wait_log("reload_refused")
        script_line(script, tag="temp", value=3.0)
        rec.wait_for(lambda ms: 3.0 in temp_values(ms))
        assert len([m for m in rec.messages if m.topic == f"{R}/state" and m.json["online"]]) == 1
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        rec.close()
