"""One delivery, one derivation: the values of one publish response or one poll make one status, and an
alert raised by them carries the process id of the same snapshot. /healthz last_success is the last read."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from peers import GUARD_S, Broker, Daemon, ModbusPeer, OpcUaPeer, Recorder, free_port, wait_until, write_config

R = "edge/test-site/cell-t"

ALERT = """
[[equipment.alerts]]
tag = "temp"
above = 80.0
clear_below = 75.0
severity = "critical"
"""


def opcua_equipment(endpoint: str) -> str:
    # A long publishing interval: the test's four writes, a few milliseconds apart, land in one publish.
    return f"""
[[equipment]]
id = "mill-1"
type = "cnc_mill"
driver = "opcua"
[equipment.connection]
endpoint = "{endpoint}"
publishing_interval_ms = 1000
[equipment.status]
tag = "state"
map = {{ "0" = "idle", "1" = "running", "2" = "paused", "3" = "error" }}
progress_tag = "progress"
operation_tag = "program"
process_id_tag = "job"
[[equipment.tags]]
name = "state"
node = "ns=2;s=Machine.State"
[[equipment.tags]]
name = "progress"
node = "ns=2;s=Machine.Progress"
[[equipment.tags]]
name = "program"
node = "ns=2;s=Machine.Program"
[[equipment.tags]]
name = "job"
node = "ns=2;s=Machine.JobId"
[[equipment.tags]]
name = "temp"
node = "nsu=urn:edge-agent:sim:spindle;s=Spindle.Temp"
{ALERT}"""


def connected_statuses(rec: Recorder, eid: str) -> list[dict[str, Any]]:
    """Status messages after the link came up (offline and the connect's unknown left out)."""
    return [m.json for m in rec.select(f"{eid}/status") if m.json["status"] not in ("offline", "unknown")]


def test_opcua_one_publish_one_status_and_alert_with_the_job(tmp_path: Path, broker: Broker) -> None:
    opc = OpcUaPeer()
    s = opc.server

    async def machine(state: int, program: str, progress: float, job: str, temp: float | None = None) -> None:
        await s.set("Machine.State", state)
        await s.set("Machine.Program", program)
        await s.set("Machine.Progress", progress)
        await s.set("Machine.JobId", job)
        if temp is not None:
            await s.set("Spindle.Temp", temp)

    # Before the daemon connects: its first notification carries all of it, the alert included.
    opc.run(machine(1, "O1001", 0.25, "JOB-9", temp=95.0))
    cfg = write_config(tmp_path, broker.port, opcua_equipment(s.endpoint))
    rec = Recorder(broker.port, [f"{R}/#"])
    daemon = Daemon(cfg).start()
    try:
        alert = rec.wait_for(lambda ms: rec.select("mill-1/alerts"), "the alert from the first notification")[0].json
        assert alert["state"] == "active" and alert["process_id"] == "JOB-9"
        first = rec.wait_for(lambda ms: connected_statuses(rec, "mill-1"), "the first status")
        assert len(first) == 1, first
        assert (first[0]["status"], first[0]["current_operation"], first[0]["progress"], first[0]["process_id"]) == (
            "running",
            "O1001",
            0.25,
            "JOB-9",
        )
        # One publish carrying state, progress, operation and job: exactly one status message with all four.
        opc.run(machine(2, "O2002", 0.5, "JOB-10"))
        rec.wait_for(lambda ms: len(connected_statuses(rec, "mill-1")) >= 2, "the paused status")
        daemon.stop()
        after = connected_statuses(rec, "mill-1")[1:]
        assert len(after) == 1, after
        assert (after[0]["status"], after[0]["current_operation"], after[0]["progress"], after[0]["process_id"]) == (
            "paused",
            "O2002",
            0.5,
            "JOB-10",
        )
    finally:
        daemon.kill()
        rec.close()
        opc.close()


def modbus_equipment(port: int) -> str:
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
map = {{ "0" = "idle", "1" = "running", "2" = "paused" }}
progress_tag = "progress"
operation_tag = "program"
process_id_tag = "job"
[[equipment.tags]]
name = "state"
address = 0
[[equipment.tags]]
name = "progress"
address = 1
scale = 0.001
[[equipment.tags]]
name = "job"
address = 2
type = "uint32"
[[equipment.tags]]
name = "program"
address = 4
type = "string"
length = 4
[[equipment.tags]]
name = "temp"
address = 8
scale = 0.1
{ALERT}"""


def words(text: str, length: int) -> list[int]:
    raw = text.encode().ljust(2 * length, b"\0")
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


def healthz(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=GUARD_S) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def test_modbus_one_poll_one_status_and_last_success_advances(tmp_path: Path, broker: Broker) -> None:
    plc = ModbusPeer({"holding": [(0, 16)]})
    # running, 250 per mille, job 4711, program "P100", 95.0 degC: all read by the first poll
    plc.call(plc.sim.set_registers, "holding", 0, [1, 250, 0, 4711, *words("P100", 4), 950])
    http = free_port()
    cfg = write_config(tmp_path, broker.port, modbus_equipment(plc.port), http=f'[http]\nlisten = "127.0.0.1:{http}"\n')
    rec = Recorder(broker.port, [f"{R}/#"])
    daemon = Daemon(cfg).start()
    try:
        alert = rec.wait_for(lambda ms: rec.select("plc-1/alerts"), "the alert from the first poll")[0].json
        assert alert["process_id"] == "4711"
        first = rec.wait_for(lambda ms: connected_statuses(rec, "plc-1"), "the first status")
        assert len(first) == 1
        assert (first[0]["status"], first[0]["progress"], first[0]["process_id"], first[0]["current_operation"]) == (
            "running",
            0.25,
            "4711",
            "P100",
        )
        # A static PLC: every poll is a good read, so last_success moves on although nothing changes.
        stamps: list[str | None] = []

        def advanced() -> bool:
            stamps.append(healthz(http)["components"]["drivers"]["plc-1"]["last_success"])
            return len(set(stamps) - {None}) >= 4

        wait_until(advanced, what="last_success advancing with the polls")
        assert [s for s in stamps if s] == sorted(s for s in stamps if s)
        # One poll carrying state, progress, job and program: one status message holding all four.
        plc.call(plc.sim.set_registers, "holding", 0, [2, 500, 0, 4712, *words("P200", 4)])
        rec.wait_for(lambda ms: len(connected_statuses(rec, "plc-1")) >= 2, "the paused status")
        daemon.stop()
        after = connected_statuses(rec, "plc-1")[1:]
        assert len(after) == 1, after
        assert (after[0]["status"], after[0]["progress"], after[0]["process_id"], after[0]["current_operation"]) == (
            "paused",
            0.5,
            "4712",
            "P200",
        )
    finally:
        daemon.kill()
        rec.close()
        plc.close()
