"""Primary Host awareness: with `primary_host_id`, the edge node is born only while the host's retained
STATE says online; a host going offline ends the node's session (NDEATH with its bdSeq, a new connection
that waits); data produced while it is offline waits in the store, survives a restart, and arrives as
historical."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

from test_sparkplug import Host, metric, spb_config
from test_uns import stored

from peers import Broker, Daemon, script_line, wait_until

STATE = "spBv1.0/STATE/scada-1"


def health(cfg: Path) -> Any:
    port = re.search(r'listen = "127.0.0.1:(\d+)"', cfg.read_text())
    assert port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/healthz", timeout=10) as resp:
        return json.loads(resp.read())


def test_data_produced_while_the_primary_host_is_offline_arrives_as_historical(tmp_path: Path, broker: Broker) -> None:
    cfg, script = spb_config(tmp_path, broker.port)
    cfg.write_text(cfg.read_text().replace('group_id = "plant-a"', 'group_id = "plant-a"\nprimary_host_id = "scada-1"'))
    host = Host(broker.port)

    def state(online: bool, stamp: int) -> None:
        host.client.publish(
            STATE, json.dumps({"online": online, "timestamp": stamp}), qos=1, retain=True
        ).wait_for_publish(10)

    state(False, 1)
    daemon = Daemon(cfg)
    try:
        daemon.start()
        script_line(script, tag="temp", value=1.0)
        wait_until(lambda: any(b'"value":1.0' in p for p in stored(tmp_path / "state")), what="held in the store")
        assert not host.of("NBIRTH"), "not born while the primary host is offline"
        state(True, 2)
        wait_until(lambda: host.of("NBIRTH") and host.of("DBIRTH", "mill-1"), what="births once the host is online")
        alias = metric(host.of("DBIRTH", "mill-1")[0].payload, "temp").alias

        def temps(historical: bool) -> set[float | None]:
            return {
                m.double_value
                for s in host.of("DDATA", "mill-1")
                for m in s.payload.metrics
                if m.alias == alias and bool(m.is_historical) == historical
            }

        wait_until(lambda: 1.0 in temps(True), what="the value held while offline, as historical")
        script_line(script, tag="temp", value=2.0)
        wait_until(lambda: 2.0 in temps(False), what="a live value")
        first = metric(host.of("NBIRTH")[0].payload, "bdSeq").long_value or 0
        state(False, 3)
        daemon.wait_log("sparkplug_host_offline")
        # The session ends with the NDEATH of its bdSeq; the node connects again and waits, unborn.
        wait_until(lambda: host.of("NDEATH"), what="the NDEATH when the host went offline")
        assert (metric(host.of("NDEATH")[0].payload, "bdSeq").long_value or 0) == first
        wait_until(lambda: health(cfg)["components"]["sparkplug"]["status"] == "waiting_for_host", what="waiting")
        assert health(cfg)["components"]["sparkplug"]["error"] == "primary host scada-1 not online"
        for v in (3.0, 4.0):
            script_line(script, tag="temp", value=v)
        wait_until(lambda: any(b'"value":4.0' in p for p in stored(tmp_path / "state")), what="held in the store")
        state(True, 1)  # stale: older than the last STATE taken, ignored
        state(True, 4)
        wait_until(lambda: {3.0, 4.0} <= temps(True), what="values of the second outage, as historical")
        assert len(host.of("NBIRTH")) == 2, "born again when the host came back"
        assert (metric(host.of("NBIRTH")[1].payload, "bdSeq").long_value or 0) == first + 1, "a new session"
        assert {3.0, 4.0}.isdisjoint(temps(False))
    finally:
        daemon.stop()
        host.close()


def test_data_waiting_for_the_host_survives_a_kill(tmp_path: Path, broker: Broker) -> None:
    cfg, script = spb_config(tmp_path, broker.port)
    cfg.write_text(cfg.read_text().replace('group_id = "plant-a"', 'group_id = "plant-a"\nprimary_host_id = "scada-1"'))
    host = Host(broker.port)
    host.client.publish(STATE, json.dumps({"online": False, "timestamp": 1}), qos=1, retain=True).wait_for_publish(10)
    daemon = Daemon(cfg)
    try:
        daemon.start()
        for v in (1.0, 2.0, 3.0):
            script_line(script, tag="temp", value=v)
        wait_until(lambda: any(b'"value":3.0' in p for p in stored(tmp_path / "state")), what="held in the store")
        daemon.kill()
        host.client.publish(STATE, json.dumps({"online": True, "timestamp": 2}), qos=1, retain=True).wait_for_publish(
            10
        )
        daemon = Daemon(cfg)
        daemon.start()
        wait_until(lambda: host.of("DBIRTH", "mill-1"), what="births once the host is online")
        alias = metric(host.of("DBIRTH", "mill-1")[0].payload, "temp").alias

        def historical() -> set[float | None]:
            return {
                m.double_value
                for s in host.of("DDATA", "mill-1")
                for m in s.payload.metrics
                if m.alias == alias and m.is_historical
            }

        wait_until(lambda: historical() >= {1.0, 2.0, 3.0}, what="what waited before the kill, as historical")
    finally:
        daemon.stop()
        host.close()
