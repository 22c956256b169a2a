"""A 3D printer through the daemon: a print started over MQTT completes its process in MPM."""

from __future__ import annotations

from pathlib import Path

from peers import Broker, Daemon, MpmPeer, PrinterPeer, Recorder, wait_until, write_config

R = "edge/test-site/cell-t"


def test_print_started_over_mqtt_completes_in_mpm(tmp_path: Path, broker: Broker) -> None:
    printer = PrinterPeer(tmp_path, files={"PROC-004.GCO": 6000, "CUBE.GCO": 4000}, print_rate_bytes_s=2000.0)
    mpm = MpmPeer()
    body = f"""
[mpm]
base_url = "{mpm.base_url}"

[[equipment]]
id = "printer-1"
type = "3d_printer"
driver = "serial_printer"
[equipment.connection]
serial_port = "{printer.port}"
poll_interval_s = 0.5
process_id_pattern = '^(PROC-\\d+)'
[[equipment.tags]]
name = "hotend_temp"
unit = "degC"
[[equipment.tags]]
name = "progress"
[[equipment.commands]]
name = "start_print"
kind = "start_print"
[[equipment.commands]]
name = "set_temperature"
kind = "set_temperature"
"""
    cfg = write_config(tmp_path, broker.port, body)
    rec = Recorder(broker.port, [f"{R}/#"])
    daemon = Daemon(cfg).start()
    try:

        def statuses() -> list[dict]:
            return [m.json for m in rec.select("printer-1/status")]

        rec.wait_for(lambda ms: [s for s in statuses() if s["status"] == "idle"], "printer idle")
        rec.publish(
            f"{R}/equipment/printer-1/cmd/start_print", {"request_id": "p1", "parameters": {"file": "PROC-004.GCO"}}
        )
        res = rec.wait_for(lambda ms: [m.json for m in ms if m.topic.endswith("start_print/result")], "start result")[0]
        assert res["success"] is True, res
        running = rec.wait_for(lambda ms: [s for s in statuses() if s["status"] == "running"], "running")[0]
        assert running["process_id"] == "PROC-004" and running["current_operation"] == "PROC-004.GCO"
        # a second start while printing is refused
        rec.publish(
            f"{R}/equipment/printer-1/cmd/start_print", {"request_id": "p2", "parameters": {"file": "CUBE.GCO"}}
        )
        res2 = rec.wait_for(
            lambda ms: [m.json for m in ms if m.topic.endswith("start_print/result") and m.json["request_id"] == "p2"]
        )[0]
        assert res2["success"] is False and res2["data"]["reason"] == "busy"
        rec.wait_for(
            lambda ms: (
                [s for s in statuses() if s["status"] == "idle" and any(x["status"] == "running" for x in statuses())]
                if statuses()[-1]["status"] == "idle"
                else None
            ),
            "idle after the print",
        )
        progress = [s["progress"] for s in statuses() if s["status"] == "running" and s["progress"] is not None]
        assert progress == sorted(progress) and progress[-1] >= 0.99, progress
        wait_until(
            lambda: mpm.call(mpm.emu.status_history, "PROC-004") == ["running", "completed"], what="MPM completed"
        )
        temps = [v for m in rec.select("printer-1/telemetry") for v in m.json["values"] if v["tag"] == "hotend_temp"]
        assert temps and temps[0]["unit"] == "degC"
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        rec.close()
        mpm.close()
        printer.close()
