"""OPC UA through the daemon: status from the state node, security refusals, a server restart."""

from __future__ import annotations

import random
import time
from pathlib import Path

from peers import Broker, Daemon, OpcUaPeer, Recorder, wait_until, write_config

R = "edge/test-site/cell-t"


def equipment(endpoint: str, extra: str = "") -> str:
    return f"""
[[equipment]]
id = "mill-1"
type = "cnc_mill"
driver = "opcua"
[equipment.connection]
endpoint = "{endpoint}"
publishing_interval_ms = 50
{extra}
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
unit = "degC"
deadband = 0.5
[[equipment.alerts]]
tag = "temp"
above = 80.0
clear_below = 75.0
severity = "critical"
"""


def test_status_alerts_and_server_restart(tmp_path: Path, broker: Broker) -> None:
    opc = OpcUaPeer()
    cfg = write_config(tmp_path, broker.port, equipment(opc.server.endpoint))
    rec = Recorder(broker.port, [f"{R}/#"])
    daemon = Daemon(cfg).start()
    try:

        def statuses() -> list[dict]:
            return [m.json for m in rec.select("mill-1/status")]

        rec.wait_for(lambda ms: [s for s in statuses() if s["status"] == "idle"], "idle")
        s = opc.server
        opc.run(s.set("Machine.JobId", "JOB-42"))
        opc.run(s.set("Machine.Program", "O1001"))
        opc.run(s.set("Machine.Progress", 0.4))
        opc.run(s.set("Machine.State", 1))
        running = rec.wait_for(lambda ms: [x for x in statuses() if x["status"] == "running" and x["progress"] == 0.4])
        assert running[-1]["process_id"] == "JOB-42" and running[-1]["current_operation"] == "O1001"
        for state, name in ((2, "paused"), (3, "error"), (0, "idle")):
            opc.run(s.set("Machine.State", state))
            rec.wait_for(lambda ms, n=name: statuses()[-1]["status"] == n, name)
        # telemetry carries the server's source timestamp; the alert fires and clears
        opc.run(s.set("Spindle.Temp", 85.0))
        # the alert fires on the 85 before the value drops again
        rec.wait_for(lambda ms: rec.select("/alerts"), "alert active")
        opc.run(s.set("Spindle.Temp", 70.0))
        alerts = rec.wait_for(lambda ms: a if len(a := [m.json for m in rec.select("/alerts")]) >= 2 else None)
        assert [a["state"] for a in alerts] == ["active", "cleared"] and alerts[0]["alert_id"] == alerts[1]["alert_id"]
        # the server goes away for 5 s and comes back on the same port
        opc.run(s.stop())
        rec.wait_for(lambda ms: statuses()[-1]["status"] == "offline", "offline")
        assert statuses()[-1]["error_message"]
        time.sleep(5)  # the outage itself
        opc.run(s.start())
        opc.run(s.set("Machine.State", 1))
        rec.wait_for(lambda ms: statuses()[-1]["status"] == "running", "running again after the restart")
        opc.run(s.set("Spindle.Temp", 90.0))
        rec.wait_for(lambda ms: len(rec.select("/alerts")) >= 3, "data flows again")
        downs = [e for e in daemon.logs() if e.get("event") == "driver_down"]
        assert len(downs) == 1, downs
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        rec.close()
        opc.close()


def test_wrong_password_is_offline_with_a_reason_and_retried(tmp_path: Path, broker: Broker) -> None:
    opc = OpcUaPeer(users={"operator": "right-password"})
    (tmp_path / "pw").write_text("wrong-password\n")
    extra = 'username = "operator"\npassword_file = "pw"\n'
    cfg = write_config(tmp_path, broker.port, equipment(opc.server.endpoint, extra))
    cfg.write_text(cfg.read_text().replace('log_level = "info"', 'log_level = "debug"'))
    rec = Recorder(broker.port, [f"{R}/#"])
    daemon = Daemon(cfg).start()
    try:
        offline = rec.wait_for(
            lambda ms: [
                m.json
                for m in rec.select("mill-1/status")
                if m.json["status"] == "offline"
                and m.json["error_message"]
                and "connecting" not in m.json["error_message"]
            ],
            "offline with a reason",
        )
        assert "BadUserAccessDenied" in offline[-1]["error_message"]
        assert "wrong-password" not in daemon.log_path.read_text()
        # retried with backoff (reconnect_max_s = 1): more attempts, one log line for the transition
        wait_until(
            lambda: len([e for e in daemon.logs() if e.get("event") == "driver_attempt_failed"]) >= 3, what="retries"
        )
        assert len([e for e in daemon.logs() if e.get("event") == "driver_down"]) == 1
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        rec.close()
        opc.close()


def test_every_change_of_200_variables_at_10_hz_reaches_the_broker_in_order(tmp_path: Path, broker: Broker) -> None:
    # No per-tag settings, the shipped publishing interval (100 ms): each variable changes ten times a
    # second, at another point of the period every round (so now and then twice in one publishing
    # interval), and every change must arrive, none conflated (the old default, a queue of one, lost some).
    count, rounds = 200, 40
    opc = OpcUaPeer(counters=count)
    tags = "".join(f'[[equipment.tags]]\nname = "c{i}"\nnode = "ns=2;s=Counter.{i}"\n' for i in range(count))
    body = f"""
[[equipment]]
id = "line-1"
type = "plc"
driver = "opcua"
[equipment.connection]
endpoint = "{opc.server.endpoint}"
publishing_interval_ms = 100
{tags}"""
    cfg = write_config(tmp_path, broker.port, body)
    rec = Recorder(broker.port, [f"{R}/equipment/line-1/telemetry"])
    daemon = Daemon(cfg).start()
    try:

        def values() -> dict[str, list[float]]:
            out: dict[str, list[float]] = {f"c{i}": [] for i in range(count)}
            for message in sorted((m.json for m in rec.select("/telemetry")), key=lambda j: j["seq"]):
                for v in message["values"]:
                    out[v["tag"]].append(v["value"])
            return out

        rec.wait_for(lambda ms: all(values().values()), "every initial value")
        writes = opc.run(opc.server.ramp(10.0, rounds, rng=random.Random(18)))
        assert writes == count * rounds
        expected = [0.0] + [float(r) for r in range(1, rounds + 1)]
        rec.wait_for(lambda ms: all(v[-1:] == [float(rounds)] for v in values().values()), "every last value")
        got = values()
        wrong = {tag: v for tag, v in got.items() if v != expected}
        assert not wrong, (
            f"{len(wrong)} of {count} variables lost or reordered changes, e.g. {next(iter(wrong.items()))}"
        )
        events = {e.get("event") for e in daemon.logs()}
        assert not events & {"server_queue_overflow", "notifications_dropped"}
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        rec.close()
        opc.close()
