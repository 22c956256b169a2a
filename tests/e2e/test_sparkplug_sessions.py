"""The edge node's sessions end without losing or repeating anything: an outage longer than the history window
after a silent death, a clean stop (what the broker acknowledged leaves the store), heartbeats while the node
waits for its host (the store does not grow with them), and a reload that adds equipment (a new session
declares it)."""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import sqlite3
import time
from pathlib import Path

from test_sparkplug import Host, metric, spb_config
from test_sparkplug_blackhole import BlackHole

from peers import Broker, Daemon, Recorder, script_line, scripted_equipment, wait_until

STATE = "spBv1.0/STATE/scada-1"


def spb_rows(state: Path) -> list[bytes]:
    with contextlib.closing(sqlite3.connect(state / "store.sqlite")) as db:
        return [bytes(r[0]) for r in db.execute("SELECT payload FROM messages WHERE topic LIKE 'spBv1.0/%'")]


def temps(host: Host, alias: int | None, historical: bool | None = None) -> set[float]:
    return {
        m.double_value
        for s in host.of("DDATA", "mill-1")
        for m in s.payload.metrics
        if m.alias == alias and m.double_value is not None and (historical is None or m.is_historical == historical)
    }


def test_an_outage_longer_than_the_window_after_a_silent_death_loses_nothing(tmp_path: Path, broker: Broker) -> None:
    hole = BlackHole(broker.port)
    cfg, script = spb_config(tmp_path, hole.port)
    cfg.write_text(cfg.read_text().replace("keepalive_s = 5", "keepalive_s = 1"))  # window 2.5 s
    host = Host(broker.port)
    daemon = Daemon(cfg)
    try:
        daemon.start()
        wait_until(lambda: host.of("DBIRTH", "mill-1"), what="DBIRTH")
        alias = metric(host.of("DBIRTH", "mill-1")[0].payload, "temp").alias
        script_line(script, tag="temp", value=1.0)
        wait_until(lambda: 1.0 in temps(host, alias), what="a value before the death")
        hole.swallow()
        hole.refusing = True  # and no new connection either, for much longer than the window
        for i in range(2, 8):
            script_line(script, tag="temp", value=float(i))
        daemon.wait_log("sparkplug_down")
        time.sleep(6)  # the fault's length: more than twice the window (2.5 s) after the death was noticed
        hole.refusing = False
        wanted = {float(i) for i in range(2, 8)}
        wait_until(lambda: wanted <= temps(host, alias, historical=True), what="what went into the void, historical")
    finally:
        daemon.stop()
        host.close()
        hole.close()


def test_a_clean_stop_leaves_nothing_to_replay_twice(tmp_path: Path, broker: Broker) -> None:
    cfg, script = spb_config(tmp_path, broker.port)
    host = Host(broker.port)
    daemon = Daemon(cfg)
    try:
        daemon.start()
        wait_until(lambda: host.of("DBIRTH", "mill-1"), what="DBIRTH")
        alias = metric(host.of("DBIRTH", "mill-1")[0].payload, "temp").alias
        for v in (1.0, 2.0):
            script_line(script, tag="temp", value=v)
        wait_until(lambda: {1.0, 2.0} <= temps(host, alias), what="values")
        assert spb_rows(tmp_path / "state"), "kept for the window while running"
        assert daemon.stop() == 0
        assert spb_rows(tmp_path / "state") == [], "the NDEATH was acknowledged: what went before it is delivered"
        daemon = Daemon(cfg)
        daemon.start()
        wait_until(lambda: len(host.of("NBIRTH")) == 2, what="the next session")
        script_line(script, tag="temp", value=3.0)
        wait_until(lambda: 3.0 in temps(host, alias), what="a live value of the next session")
        assert not temps(host, alias, historical=True), "nothing replayed twice"
    finally:
        daemon.stop()
        host.close()


def test_heartbeats_while_waiting_for_the_host_do_not_grow_the_store(tmp_path: Path, broker: Broker) -> None:
    cfg, script = spb_config(tmp_path, broker.port)
    text = cfg.read_text().replace('group_id = "plant-a"', 'group_id = "plant-a"\nprimary_host_id = "scada-1"')
    text = text.replace('profiles = ["sparkplug"]', 'profiles = ["edge-agent", "sparkplug"]')
    cfg.write_text(text.replace("status_heartbeat_s = 60", "status_heartbeat_s = 0.2"))
    host = Host(broker.port)
    host.client.publish(STATE, json.dumps({"online": False, "timestamp": 1}), qos=1, retain=True).wait_for_publish(10)
    rec = Recorder(broker.port, ["edge/test-site/cell-t/equipment/mill-1/status"])
    daemon = Daemon(cfg)
    try:
        daemon.start()
        script_line(script, tag="state", value=1)
        changed = lambda: any(b'"running"' in p for p in spb_rows(tmp_path / "state"))  # noqa: E731
        wait_until(changed, what="the status change stored")
        rec.wait_for(lambda ms: len(ms) > 15, "heartbeats on today's status topic")
        fields = ("status", "current_operation", "progress", "error_message", "process_id")
        rows = [json.loads(p)["status"] for p in spb_rows(tmp_path / "state") if b'"status":{' in p]
        kept = [tuple(r.get(f) for f in fields) for r in rows]
        assert all(a != b for a, b in itertools.pairwise(kept)), f"only changes are kept: {kept}"
        assert len(kept) <= 4, f"the changes (offline, connected, running), not every heartbeat: {kept}"
    finally:
        daemon.stop()
        host.close()
        rec.close()


def test_reloads_start_a_session_only_when_the_births_change(tmp_path: Path, broker: Broker) -> None:
    cfg, script = spb_config(tmp_path, broker.port)
    host = Host(broker.port)
    daemon = Daemon(cfg)
    try:
        daemon.start()
        wait_until(lambda: host.of("NBIRTH"), what="NBIRTH")
        # A change the births do not carry (the equipment's name): the session goes on.
        cfg.write_text(cfg.read_text().replace('id = "mill-1"', 'id = "mill-1"\nname = "Mill one"'))
        daemon.send(signal.SIGHUP)
        daemon.wait_log("reloaded")
        script_line(script, tag="temp", value=5.0)
        wait_until(lambda: host.of("DDATA", "mill-1"), what="data after the reload")
        assert len(host.of("NBIRTH")) == 1 and not host.of("NDEATH")
        # Two equipment added by two SIGHUPs in a row: one reload at a time, one edge node connection.
        scripts = [tmp_path / "script2.jsonl", tmp_path / "script3.jsonl"]
        for i, extra in enumerate(scripts, start=2):
            extra.touch()
            cfg.write_text(cfg.read_text() + scripted_equipment(f"mill-{i}", extra))
            daemon.send(signal.SIGHUP)
        daemon.wait_log("reloaded", count=3)
        wait_until(lambda: host.of("DBIRTH", "mill-3"), what="the last device born")
        alias = metric(host.of("DBIRTH", "mill-3")[-1].payload, "temp").alias
        script_line(scripts[1], tag="temp", value=9.0)

        def got() -> bool:
            return any(
                m.alias == alias and m.double_value == 9.0
                for s in host.of("DDATA", "mill-3")
                for m in s.payload.metrics
            )

        wait_until(got, what="the new device's data")
        assert daemon.stop() == 0
        births = [metric(s.payload, "bdSeq").long_value for s in host.of("NBIRTH")]
        deaths = [metric(s.payload, "bdSeq").long_value for s in host.of("NDEATH")]
        assert births == deaths, "every session ended once, none overlapped another"
        assert births == sorted(set(births)), "each session its own bdSeq, counted once"
    finally:
        daemon.stop()
        host.close()
