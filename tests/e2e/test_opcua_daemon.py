"""OPC UA through the daemon: status from the state node, security refusals, a server restart."""

from __future__ import annotations

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
        # a non-status tag has queue_size 1 (latest value): let the 85 arrive before it drops again
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
