"""Modbus through the daemon: values by exception stay fresh, changes are published, the device goes away."""

from __future__ import annotations

from pathlib import Path

from peers import Broker, Daemon, ModbusPeer, Recorder, free_port, metric_total, wait_until, write_config

R = "edge/test-site/cell-t"


def equipment(port: int) -> str:
    return f"""
[[equipment]]
id = "plc-1"
type = "plc"
driver = "modbus"
[equipment.connection]
host = "127.0.0.1"
port = {port}
poll_interval_ms = 100
timeout_s = 1.0
[equipment.status]
tag = "state"
map = {{ "0" = "idle", "1" = "running" }}
[[equipment.tags]]
name = "state"
address = 0
[[equipment.tags]]
name = "count"
address = 1
type = "uint32"
[[equipment.tags]]
name = "pressure"
address = 40
scale = 0.1
unit = "bar"
"""


def values(rec: Recorder) -> list[tuple[str, object]]:
    return [(v["tag"], v["value"]) for m in rec.select("/telemetry") for v in m.json["values"]]


def test_unchanged_values_stay_fresh_and_changes_are_published(tmp_path: Path, broker: Broker) -> None:
    plc = ModbusPeer({"holding": [(0, 64)]})
    plc.call(plc.sim.set_registers, "holding", 0, [1, 0, 7])
    plc.call(plc.sim.set_registers, "holding", 40, [123])
    http = free_port()
    cfg = write_config(tmp_path, broker.port, equipment(plc.port), http=f'[http]\nlisten = "127.0.0.1:{http}"\n')
    rec = Recorder(broker.port, [f"{R}/#"])
    daemon = Daemon(cfg)
    try:
        daemon.start()
        rec.wait_for(lambda ms: [m for m in ms if m.topic.endswith("/status") and m.json["status"] == "running"])
        wait_until(lambda: len(values(rec)) == 3, what="the first poll's values")
        assert sorted(values(rec)) == [("count", 7), ("pressure", 12.3), ("state", 1)]
        # Nothing changes for many times the stale limit (3 polls): the status stays running, not stale,
        # and no telemetry repeats the unchanged values.
        reads = block_reads(http)
        wait_until(lambda: block_reads(http) >= reads + 2 * 20, what="20 more polls (two blocks each)")
        statuses = [m.json["status"] for m in rec.select("/status")]
        since = statuses.index("running")
        assert statuses[since:] == ["running"], statuses
        assert len(values(rec)) == 3
        # One register changes: its new value is published (the block it shares goes through the deadband).
        plc.call(plc.sim.set_registers, "holding", 40, [150])
        wait_until(lambda: ("pressure", 15.0) in values(rec), what="the changed pressure")
        assert sorted(values(rec)) == [("count", 7), ("pressure", 12.3), ("pressure", 15.0), ("state", 1)]
        # The device goes away: offline.
        plc.close()
        rec.wait_for(lambda ms: [m for m in ms if m.topic.endswith("/status") and m.json["status"] == "offline"])
    finally:
        daemon.stop()
        rec.close()
        if plc.thread.is_alive():
            plc.close()


def block_reads(http_port: int) -> float:
    """Blocks the daemon has read from the device, from its metrics: a count, not a clock."""
    return metric_total(http_port, "edge_agent_driver_reads_total", equipment_id="plc-1")
