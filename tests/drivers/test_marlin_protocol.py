"""Marlin's host protocol to the letter, against the virtual printer on a socat pty pair: the resync at open,
resends (duplicates ignored), `wait` and `busy:`, the window of lines in flight, and prints streamed from
`gcode_dir`. The virtual printer is the oracle: it counts what it received, garbled and answered."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from test_serial_printer import Collector, Rig, printer_config, rig, run

from agent.config import ConfigError
from agent.errors import CommandError
from drivers.printer.serial import SerialPrinterDriver
from drivers.printer.sim import VirtualPrinter
from peers import until

__all__ = ["rig"]  # the fixture, shared with test_serial_printer

MOVE_COMMAND = '[[equipment.commands]]\nname = "move"\nkind = "gcode"\ngcode = "G1 X30 F1200"\n'


def write_moves(folder: Path, name: str, count: int) -> list[str]:
    """A G-code file of `count` short moves (with comments and blank lines to skip); its commands."""
    folder.mkdir(parents=True, exist_ok=True)
    moves = [f"G1 X{i % 97 * 0.1:.1f} Y{i % 89 * 0.1:.1f} F60000" for i in range(count)]
    text = "; a test part\n\n" + "".join(f"{m} ; move {i}\n" if i % 10 == 0 else f"{m}\n" for i, m in enumerate(moves))
    (folder / name).write_text(text)
    return moves


def moves_run(printer: VirtualPrinter) -> list[str]:
    return [c for c in printer.executed if c.startswith("G1 ")]


def heats_run(printer: VirtualPrinter) -> list[str]:
    return [c for c in printer.executed if c.startswith("M104 ")]


def stream_driver(rig: Rig, folder: Path, connection: str = "") -> SerialPrinterDriver:
    settings = f"gcode_dir = \"{folder}\"\nprocess_id_pattern = '^(JOB-\\d+)'\n{connection}"
    return rig.driver(connection=settings)


# ---- the connection: resync at open, resends, wait and busy ------------------------------------------


async def test_reopen_with_stale_output_resynchronises_on_the_marker(rig: Rig) -> None:
    # After the reopen the printer first answers the previous session's lines for 2.5 s (oks, line-number
    # complaints with resend requests, busy, wait): longer than one handshake attempt.
    printer = await rig.start(stale_after_reopen_s=2.5)
    driver = rig.driver()
    async with driver:
        for target in range(5):
            assert (await run(driver, "heat", heater="hotend", target=target)).success
    assert printer.stale_bursts == 0 and printer.last_n > 1
    async with driver:
        events = Collector(driver)
        await events.status("idle")
        assert printer.stale_bursts == 1
        assert driver.line_stats["stale_lines"] > 10  # the previous session's answers, all ignored
        assert driver.firmware is not None and driver.firmware.startswith("Marlin")
        assert driver.machine_type == "Virtual Printer"
        for target in range(10, 20):
            assert (await run(driver, "heat", heater="hotend", target=target)).success
        assert heats_run(printer) == [f"M104 S{t}" for t in (*range(5), *range(10, 20))]
        assert printer.executed.count("M115") == 2  # once per session
        assert printer.retransmitted == 0 and driver.line_stats["lines_resent"] == 0
        assert driver.line_stats["resends"] == 0  # the stale resend requests never reached the protocol
        assert all(f.status != "error" for f in events.facts()) and events.error is None
        await events.stop()


async def test_a_duplicate_resend_request_is_ignored(rig: Rig) -> None:
    # One line in 5 arrives garbled and the printer reports each twice (Error + Resend + ok, twice).
    printer = await rig.start(corrupt_every=5, duplicate_resends=True)
    driver = rig.driver()
    async with driver:
        events = Collector(driver)
        for target in range(60):
            assert (await run(driver, "heat", heater="hotend", target=target)).success
        assert heats_run(printer) == [f"M104 S{t}" for t in range(60)]  # each exactly once, in order
        assert printer.corrupted >= 12
        # Each garbled line written again exactly once, though each was asked for twice.
        assert printer.retransmitted == printer.corrupted
        assert driver.line_stats["lines_resent"] == printer.corrupted
        assert driver.line_stats["resends"] == 2 * printer.corrupted
        assert all(f.status != "error" for f in events.facts()) and events.error is None
        await events.stop()


async def test_wait_never_makes_the_driver_send(rig: Rig) -> None:
    # With autoreport the idle driver has nothing to say; the printer says `wait` every 0.1 s.
    printer = await rig.start(wait_when_idle_s=0.1)
    driver = rig.driver()
    async with driver:
        events = Collector(driver)
        await events.status("idle")
        printer.max_unanswered = 0  # the hello and the marker go together; from here one line at a time
        received, waits = printer.received, printer.waits_sent
        await until(lambda: printer.waits_sent >= waits + 10, "the printer to say wait ten times")
        await until(lambda: driver.line_stats["waits"] >= 10, "the driver to read them")
        assert printer.received == received  # not one line in answer to `wait`
        for target in range(5):
            assert (await run(driver, "heat", heater="bed", target=target)).success
        assert printer.max_unanswered == 1
        assert events.error is None
        await events.stop()


async def test_busy_during_a_long_move_extends_the_timeout(rig: Rig) -> None:
    # A 30 mm move at 20 mm/s takes 1.5 s, three times the ok timeout; the printer says busy every 0.2 s.
    printer = await rig.start(keepalive_s=0.2, wait_when_idle_s=0.1)
    driver = rig.driver(connection="ok_timeout_s = 0.5", extra=MOVE_COMMAND)
    async with driver:
        events = Collector(driver)
        received = printer.received
        assert (await run(driver, "move")).success
        assert printer.received == received + 1  # no nudge, no resend: busy kept the line alive
        assert moves_run(printer) == ["G1 X30 F1200"]
        assert driver.line_stats["resends"] == 0 and events.error is None
        await events.stop()


async def test_checksum_errors_recover_without_reconnect_and_are_no_error(rig: Rig) -> None:
    printer = await rig.start(corrupt_every=3)
    driver = rig.driver()
    async with driver:
        events = Collector(driver)
        hellos = printer.hellos
        for target in range(40):
            assert (await run(driver, "heat", heater="hotend", target=target)).success
        assert heats_run(printer) == [f"M104 S{t}" for t in range(40)]
        assert printer.corrupted >= 13 and printer.retransmitted == printer.corrupted
        assert printer.hellos == hellos  # no reconnect, no new handshake
        assert events.error is None and not events.ended
        statuses = {f.status for f in events.facts()}
        assert "error" not in statuses and statuses == {"idle"}
        await events.stop()


# ---- the window of lines in flight, with prints streamed from gcode_dir ---------------------------------


async def test_max_in_flight_1_never_sends_before_ok(rig: Rig, tmp_path: Path) -> None:
    moves = write_moves(tmp_path / "gcode", "JOB-1.gcode", 300)
    printer = await rig.start(corrupt_every=25, keepalive_s=0.2)
    driver = stream_driver(rig, tmp_path / "gcode")
    async with driver:
        events = Collector(driver)
        printer.max_unanswered = 0  # the hello and the marker go together; from here one line at a time
        result = await run(driver, "start", file="JOB-1.gcode")
        assert result.success and result.data == {"file": "JOB-1.gcode", "process_id": "JOB-1", "lines": 300}
        running = await events.status("running", current_operation="JOB-1.gcode", process_id="JOB-1")
        # Other commands go through the same line while the print streams.
        for target in range(10):
            assert (await run(driver, "heat", heater="bed", target=target)).success
        await events.status("idle", "idle after the print", after=running)
        assert moves_run(printer) == moves
        assert printer.max_unanswered == 1  # never a line written before the previous one's ok
        assert printer.retransmitted == printer.corrupted >= 12
        await events.stop()


async def test_max_in_flight_4_is_honoured(rig: Rig, tmp_path: Path) -> None:
    moves = write_moves(tmp_path / "gcode", "JOB-2.gcode", 400)
    printer = await rig.start(corrupt_every=40)
    driver = stream_driver(rig, tmp_path / "gcode", "max_in_flight = 4")
    async with driver:
        events = Collector(driver)
        printer.max_unanswered = 0
        assert (await run(driver, "start", file="JOB-2.gcode")).success
        running = await events.status("running", current_operation="JOB-2.gcode")
        await events.status("idle", "idle after the print", after=running)
        assert moves_run(printer) == moves  # each once, in order, despite the resends
        assert printer.max_unanswered == 4  # the window is used, and never exceeded
        assert printer.corrupted >= 10
        # A garbled line makes the printer refuse the lines behind it too: those are written again as well.
        assert printer.retransmitted >= printer.corrupted
        assert events.facts()[-1].metadata["last_print"]["outcome"] == "completed"
        assert all(f.status != "error" for f in events.facts()) and events.error is None
        await events.stop()


async def test_streamed_print_progress_and_status(rig: Rig, tmp_path: Path) -> None:
    moves = write_moves(tmp_path / "gcode", "JOB-3.gcode", 500)
    printer = await rig.start(files={"JOB-3.gcode": 1000})  # the same name on the SD card is not used
    driver = stream_driver(rig, tmp_path / "gcode")
    async with driver:
        events = Collector(driver)
        await events.status("idle")
        assert (await run(driver, "start", file="JOB-3.gcode")).success
        running = await events.status("running", current_operation="JOB-3.gcode", process_id="JOB-3")
        with pytest.raises(CommandError) as refused:
            await run(driver, "start", file="JOB-3.gcode")
        assert refused.value.http_status == 409
        idle = await events.status("idle", "idle after the print", after=running)
        assert idle.metadata["last_print"] == {
            "file": "JOB-3.gcode",
            "process_id": "JOB-3",
            "outcome": "completed",
            "progress": 1.0,
        }
        progress = events.readings("progress")
        assert progress == sorted(progress) and progress[0] == 0.0 and progress[-1] == 1.0 and len(progress) > 10
        assert moves_run(printer) == moves
        assert not any(c.startswith(("M23", "M24")) for c in printer.executed)  # not an SD print
        await events.stop()


async def test_streamed_print_pause_resume_and_cancel(rig: Rig, tmp_path: Path) -> None:
    folder = tmp_path / "gcode"
    write_moves(folder, "JOB-4.gcode", 3000)
    printer = await rig.start(move_speed_factor=0.02)  # each move takes some 10 ms
    driver = stream_driver(rig, folder)
    async with driver:
        events = Collector(driver)
        assert (await run(driver, "start", file="JOB-4.gcode")).success
        await until(lambda: len(moves_run(printer)) > 20, "some moves")
        assert (await run(driver, "pause")).success
        await events.status("paused", current_operation="JOB-4.gcode", process_id="JOB-4")
        await asyncio.sleep(0.1)  # the line in flight finishes
        done = len(moves_run(printer))
        await asyncio.sleep(0.5)
        assert len(moves_run(printer)) == done, "lines were sent while paused"
        assert (await run(driver, "resume")).success
        await until(lambda: len(moves_run(printer)) > done + 20, "moves after the resume")
        assert events.last_fact() is not None and events.last_fact().status == "running"  # type: ignore[union-attr]
        assert (await run(driver, "heat", heater="hotend", target=200)).success
        result = await run(driver, "cancel")
        assert result.success and result.data["method"] == "stream"
        idle = await until(lambda: (f := events.last_fact()) and f.status == "idle" and f, "idle after cancel")
        assert idle.metadata["last_print"]["outcome"] == "cancelled"
        stopped = len(moves_run(printer))
        await asyncio.sleep(0.3)
        assert len(moves_run(printer)) == stopped < 3000
        assert printer.hotend.target == 0 and printer.bed.target == 0
        await events.stop()


async def test_only_plain_files_inside_gcode_dir_are_streamed(rig: Rig, tmp_path: Path) -> None:
    folder = tmp_path / "gcode"
    write_moves(folder, "JOB-5.gcode", 3)
    outside = tmp_path / "secret.gcode"
    outside.write_text("G1 X1\n")
    os.symlink(outside, folder / "LINK.gcode")
    (folder / "NUMBERED.gcode").write_text("G28\nN5 G1 X1*12\n")
    (folder / "SUB").mkdir()
    printer = await rig.start(files={"CUBE.GCO": 100})
    driver = stream_driver(rig, folder)
    async with driver:
        events = Collector(driver)
        with pytest.raises(CommandError, match="leads out of the folder"):
            await run(driver, "start", file="LINK.gcode")
        with pytest.raises(CommandError, match="not a regular file"):
            await run(driver, "start", file="SUB")
        numbered = await run(driver, "start", file="NUMBERED.gcode")
        assert not numbered.success and numbered.data["reason"] == "bad_file" and "line 2" in numbered.message
        # A path is never joined to the folder: it is a name on the SD card, which has no such file.
        escaped = await run(driver, "start", file="../secret.gcode")
        assert not escaped.success and "cannot open" in escaped.message
        assert not any(c.startswith("G1") for c in printer.executed)
        # A name not in the folder is an SD print, as without gcode_dir.
        assert (await run(driver, "start", file="CUBE.GCO")).success
        running = await events.status("running", current_operation="CUBE.GCO")
        await events.status("idle", "idle after the SD print", after=running)
        await events.stop()


async def test_losing_the_line_mid_stream_fails_the_print(rig: Rig, tmp_path: Path) -> None:
    write_moves(tmp_path / "gcode", "JOB-6.gcode", 5000)
    printer = await rig.start(move_speed_factor=0.02)
    driver = stream_driver(rig, tmp_path / "gcode")
    async with driver:
        events = Collector(driver)
        assert (await run(driver, "start", file="JOB-6.gcode")).success
        await until(lambda: len(moves_run(printer)) > 10, "some moves")
        await rig.pair.stop()
        await until(lambda: events.ended, "the event stream to end")
        await events.stop()
    await rig.pair.start()
    async with driver:
        events = Collector(driver)
        error = await events.status("error", "the lost print as an error after the reconnect")
        assert error.error_message is not None and "JOB-6.gcode" in error.error_message
        assert error.metadata["last_print"]["outcome"] == "failed"
        assert (await run(driver, "reset")).success
        await until(lambda: (f := events.last_fact()) and f.status == "idle", "idle after reset")
        await events.stop()


def test_connection_settings_are_checked(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file.gcode"
    not_a_folder.write_text("G28\n")
    with pytest.raises(ConfigError, match=r"gcode_dir: .*is not a folder"):
        printer_config(tmp_path, tmp_path / "p.tty", connection=f'gcode_dir = "{not_a_folder}"')
    for bad in ("0", "33"):
        with pytest.raises(ConfigError, match="max_in_flight"):
            printer_config(tmp_path, tmp_path / "p.tty", connection=f"max_in_flight = {bad}")
    eq = printer_config(tmp_path, tmp_path / "p.tty", connection=f'gcode_dir = "{tmp_path}"\nmax_in_flight = 4')
    assert eq.connection.gcode_dir == tmp_path and eq.connection.max_in_flight == 4
