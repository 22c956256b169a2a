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
auth = "none"

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


def test_streamed_print_after_a_replug_with_garbled_lines_completes_in_mpm(tmp_path: Path, broker: Broker) -> None:
    """A 2,000-line print streamed from gcode_dir through a line that garbles one line in 50 (each reported
    twice), after the cable was replugged while the driver polled an idle printer that then went on
    answering the previous session for a while."""
    gcode = tmp_path / "gcode"
    gcode.mkdir()
    moves = [f"G1 X{i % 97 * 0.1:.1f} Y{i % 89 * 0.1:.1f} F60000" for i in range(2000)]
    (gcode / "PROC-005.gcode").write_text("; part PROC-005\n" + "\n".join(moves) + "\n")
    printer = PrinterPeer(
        tmp_path,
        capabilities={"SDCARD": True, "EMERGENCY_PARSER": True},  # no autoreport: the driver polls
        corrupt_every=50,
        duplicate_resends=True,
        stale_after_reopen_s=2.5,
        move_speed_factor=20.0,
    )
    sim = printer.printer
    mpm = MpmPeer()
    body = f"""
[mpm]
base_url = "{mpm.base_url}"
auth = "none"

[[equipment]]
id = "printer-1"
type = "3d_printer"
driver = "serial_printer"
[equipment.connection]
serial_port = "{printer.port}"
poll_interval_s = 0.3
process_id_pattern = '^(PROC-\\d+)'
gcode_dir = "{gcode}"
[[equipment.tags]]
name = "progress"
[[equipment.commands]]
name = "start_print"
kind = "start_print"
"""
    cfg = write_config(tmp_path, broker.port, body)
    rec = Recorder(broker.port, [f"{R}/#"])
    daemon = Daemon(cfg).start()
    try:

        def statuses() -> list[dict]:
            return [m.json for m in rec.select("printer-1/status")]

        rec.wait_for(lambda ms: [s for s in statuses() if s["status"] == "idle"], "printer idle")
        # Replug the cable while the driver polls the idle printer (M105, M27 every 0.3 s).
        wait_until(lambda: sim.last_n > 10, what="some polls on the first connection")
        printer.pair.stop()
        printer.pair.start()
        wait_until(lambda: sim.stale_bursts == 1, what="the hello after the replug")
        rec.wait_for(
            lambda ms: (s := statuses()) and any(x["status"] == "offline" for x in s) and s[-1]["status"] == "idle",
            "idle again after the replug",
        )
        resync = daemon.wait_log("serial_resynchronised", count=2)[-1]
        assert resync["lines_skipped"] > 10, resync  # the previous session's answers, ignored
        hellos = sim.hellos
        rec.publish(
            f"{R}/equipment/printer-1/cmd/start_print", {"request_id": "s1", "parameters": {"file": "PROC-005.gcode"}}
        )
        res = rec.wait_for(lambda ms: [m.json for m in ms if m.topic.endswith("start_print/result")], "start result")[0]
        assert res["success"] is True and res["data"]["lines"] == 2000, res
        running = rec.wait_for(lambda ms: [s for s in statuses() if s["status"] == "running"], "running")[0]
        assert running["process_id"] == "PROC-005" and running["current_operation"] == "PROC-005.gcode"
        wait_until(
            lambda: mpm.call(mpm.emu.status_history, "PROC-005") == ["running", "completed"],
            timeout=120,
            what="MPM: running, then completed",
        )
        last = statuses()[-1]
        assert last["status"] == "idle" and last["metadata"]["last_print"]["outcome"] == "completed"
        assert all(s["status"] != "error" for s in statuses())
        assert [c for c in sim.executed if c.startswith("G1 ")] == moves  # every line once, in order
        assert sim.hellos == hellos  # no reconnect during the print: every fault was mended on the line
        # Resends sent equal the corruptions injected, counted by the printer since the session's hello.
        # Margin: none at a quiet moment; the wait only lets the one line the idle poll may have in flight
        # (window 1) get its answer, so a garbled poll line is matched by its resend.
        assert sim.epoch_corrupted >= 2000 // 50
        wait_until(lambda: sim.epoch_retransmitted == sim.epoch_corrupted, what="each garbled line resent once")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        rec.close()
        mpm.close()
        printer.close()
