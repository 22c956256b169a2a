"""The serial printer driver against the virtual Marlin printer on a socat pty pair."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError, EquipmentConfig, parse_config
from agent.errors import CommandError
from agent.model import ConnectionState, Event, Reading, StatusFact
from drivers.base import DriverContext
from drivers.printer.lines import (
    LineSplitter,
    command_code,
    firmware_error,
    frame,
    gcode_lines,
    parse_firmware,
    parse_sd_progress,
    parse_temperatures,
)
from drivers.printer.serial import SerialPrinterDriver
from drivers.printer.sim import VirtualPrinter, simulate
from peers import GUARD_S, AsyncSocatPair, until

NO_AUTOREPORT = {"AUTOREPORT_TEMP": False, "AUTOREPORT_SD_STATUS": False, "SDCARD": True, "EMERGENCY_PARSER": True}


# ---- helpers ----------------------------------------------------------------------------------------


class Collector:
    """Consumes a driver's events in a task; remembers them and the error that ended the stream."""

    def __init__(self, driver: SerialPrinterDriver) -> None:
        self.events: list[Event] = []
        self.error: BaseException | None = None
        self.ended = False
        self.task = asyncio.create_task(self._run(driver))

    async def _run(self, driver: SerialPrinterDriver) -> None:
        try:
            async for event in driver.events():
                self.events.append(event)
        except ConnectionError as err:
            self.error = err
        finally:
            self.ended = True

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    def facts(self) -> list[StatusFact]:
        return [e for e in self.events if isinstance(e, StatusFact)]

    def readings(self, tag: str) -> list[Any]:
        return [e.value for e in self.events if isinstance(e, Reading) and e.tag == tag]

    def last_fact(self) -> StatusFact | None:
        facts = self.facts()
        return facts[-1] if facts else None

    async def status(self, status: str, what: str = "", after: StatusFact | None = None, **fields: Any) -> StatusFact:
        """The first status fact with these fields (only those after `after`, when given)."""

        def match() -> StatusFact | None:
            facts = self.facts()
            if after is not None:
                facts = facts[next(i for i, f in enumerate(facts) if f is after) + 1 :]
            for fact in facts:
                if fact.status == status and all(getattr(fact, k) == v for k, v in fields.items()):
                    return fact
            return None

        fact: StatusFact = await until(match, what or f"status {status} {fields}")
        return fact

    async def reading(self, tag: str, predicate: Callable[[Any], bool], what: str) -> Any:
        return await until(lambda: next((v for v in self.readings(tag) if predicate(v)), None), what)


def printer_config(tmp_path: Path, port: Path, connection: str = "", extra: str = "") -> EquipmentConfig:
    settings = {"poll_interval_s": "1", "ok_timeout_s": "5"}
    for line in connection.splitlines():
        if line.strip():
            key, value = line.split("=", 1)
            settings[key.strip()] = value.strip()
    connection = "\n".join(f"{k} = {v}" for k, v in settings.items())
    text = f"""
[agent]
id = "cell-1"
site = "plant"
state_dir = "{tmp_path / "state"}"

[[equipment]]
id = "printer-1"
type = "3d_printer"
driver = "serial_printer"
[equipment.connection]
serial_port = "{port}"
{connection}
[[equipment.tags]]
name = "hotend_temp"
unit = "degC"
[[equipment.commands]]
name = "start"
kind = "start_print"
[[equipment.commands]]
name = "pause"
kind = "pause"
[[equipment.commands]]
name = "resume"
kind = "resume"
[[equipment.commands]]
name = "cancel"
kind = "cancel"
[[equipment.commands]]
name = "reset"
kind = "reset"
[[equipment.commands]]
name = "heat"
kind = "set_temperature"
[[equipment.commands]]
name = "home"
kind = "gcode"
gcode = \"\"\"
G28 ; home all axes
M117 homed
\"\"\"
{extra}
"""
    cfg = parse_config(text, tmp_path / "agent.toml")
    return cfg.equipment[0]


async def run(driver: SerialPrinterDriver, name: str, **params: Any) -> Any:
    """Validate and send a declared command, as the router does."""
    command = driver.equipment.command(name)
    checked = SerialPrinterDriver.validate_command(driver.equipment, command, params)
    return await driver.send_command(command, checked)


def leftover_tasks() -> list[asyncio.Task[Any]]:
    """Tasks still alive that are neither this test nor the virtual printer."""
    return [
        t
        for t in asyncio.all_tasks()
        if t is not asyncio.current_task() and not t.get_name().startswith("printer-sim") and not t.done()
    ]


# ---- fixtures ---------------------------------------------------------------------------------------


class Rig:
    def __init__(self, pair: AsyncSocatPair, tmp_path: Path) -> None:
        self.pair = pair
        self.tmp_path = tmp_path
        self.printer: VirtualPrinter | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self, **printer_options: Any) -> VirtualPrinter:
        printer_options.setdefault("seed", 1)
        self.printer = VirtualPrinter(**printer_options)
        self.task = asyncio.create_task(self.printer.serve_path(self.pair.a), name="printer-sim-serve")
        await until(self.printer.attached.is_set, "the virtual printer on its pty")
        return self.printer

    def driver(self, connection: str = "", extra: str = "") -> SerialPrinterDriver:
        eq = printer_config(self.tmp_path, self.pair.b, connection, extra)
        return SerialPrinterDriver(eq, DriverContext(self.tmp_path / "state"))


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    pair = AsyncSocatPair(tmp_path)
    await pair.start()
    rig = Rig(pair, tmp_path)
    try:
        yield rig
    finally:
        if rig.task is not None:
            rig.task.cancel()
            await asyncio.gather(rig.task, return_exceptions=True)
        await pair.stop()


# ---- tests ------------------------------------------------------------------------------------------


async def test_handshake_identity_and_temperatures(rig: Rig) -> None:
    printer = await rig.start()
    driver = rig.driver()
    async with driver:
        events = Collector(driver)
        assert driver.firmware is not None and driver.firmware.startswith("Marlin")
        assert driver.machine_type == "Virtual Printer"
        assert driver.capabilities["AUTOREPORT_TEMP"] and driver.capabilities["AUTOREPORT_SD_STATUS"]
        # The handshake: hello, the resync marker (the driver's own token), then the identification.
        assert printer.executed[0] == "M110 N0" and printer.executed[1].startswith("M118 E1 edge-agent-sync ")
        assert printer.executed[2] == "M115"
        assert "M155 S1" in printer.executed and "M27 S1" in printer.executed

        idle = await events.status("idle")
        assert isinstance(events.events[0], ConnectionState) and events.events[0].connected
        assert idle.metadata["firmware"] == driver.firmware
        assert "AUTOREPORT_TEMP" in idle.metadata["capabilities"]

        assert (await run(driver, "heat", heater="hotend", target=60)).success
        assert (await run(driver, "heat", heater="bed", target=40.5)).success
        await events.reading("hotend_target", lambda v: v == 60.0, "hotend target 60 reported")
        await events.reading("bed_target", lambda v: v == 40.5, "bed target 40.5 reported")
        await events.reading("hotend_temp", lambda v: v > 30.0, "hotend heating up")
        await events.reading("bed_temp", lambda v: v > 22.0, "bed heating up")
        assert printer.hotend.target == 60.0 and printer.bed.target == 40.5

        result = await run(driver, "home")
        assert result.success and result.data["lines_done"] == 2
        assert printer.executed[-2:] == ["G28", "M117 homed"]
        await events.stop()
    assert leftover_tasks() == []


async def test_print_to_completion_with_process_id(rig: Rig) -> None:
    printer = await rig.start(files={"JOB-1234.GCO": 8_000, "CUBE.GCO": 100}, print_rate_bytes_s=2_000)
    driver = rig.driver(connection="process_id_pattern = 'JOB-(\\d+)'")
    async with driver:
        events = Collector(driver)
        await events.status("idle")
        result = await run(driver, "start", file="JOB-1234.GCO")
        assert result.success, result.message
        assert result.data == {"file": "JOB-1234.GCO", "process_id": "1234"}
        running = await events.status("running", current_operation="JOB-1234.GCO", process_id="1234")
        assert running.error_message is None
        assert running.progress == 0.0

        with pytest.raises(CommandError) as refused:
            await run(driver, "start", file="CUBE.GCO")
        assert refused.value.http_status == 409 and "printing JOB-1234.GCO" in str(refused.value)

        await events.reading("progress", lambda v: v == 1.0, "progress to reach 1.0")
        progress = events.readings("progress")
        assert progress == sorted(progress) and len(set(progress)) >= 3, progress
        await events.status("idle", "idle after the print", after=running, current_operation=None)
        statuses = [f.status for f in events.facts()]
        assert statuses[0] == "idle" and statuses[-1] == "idle" and "running" in statuses
        assert "error" not in statuses
        done = [f for f in events.facts() if f.status == "running"][-1]
        assert done.progress == 1.0
        last = events.facts()[-1].metadata["last_print"]
        assert last == {"file": "JOB-1234.GCO", "process_id": "1234", "outcome": "completed", "progress": 1.0}
        assert printer.executed.count("M23 JOB-1234.GCO") == 1 and "M24" in printer.executed

        # A file the card does not have is the printer's refusal, not an exception.
        missing = await run(driver, "start", file="NOPE.GCO")
        assert not missing.success and "NOPE.GCO" in missing.message
        await events.stop()


async def test_polling_when_the_firmware_has_no_autoreport(rig: Rig) -> None:
    printer = await rig.start(capabilities=NO_AUTOREPORT, files={"PART.GCODE": 3_000}, print_rate_bytes_s=3_000)
    driver = rig.driver(connection="poll_interval_s = 0.2")
    async with driver:
        events = Collector(driver)
        assert not driver.capabilities.get("AUTOREPORT_TEMP")
        await events.reading("hotend_temp", lambda v: v > 0, "a polled temperature")
        assert (await run(driver, "start", file="PART.GCODE")).success
        running = await events.status("running", current_operation="PART.GCODE", process_id="PART")
        await events.reading("progress", lambda v: v == 1.0, "polled progress to reach 1.0")
        await events.status("idle", "idle after the print", after=running, current_operation=None)
        assert "M155 S1" not in printer.executed and printer.executed.count("M105") >= 2
        await events.stop()


async def test_resends_run_every_command_exactly_once(rig: Rig) -> None:
    printer = await rig.start(reject_rate=0.02, seed=11)
    driver = rig.driver()
    expected = []
    async with driver:
        events = Collector(driver)
        for i in range(150):
            heater, code = ("hotend", "M104") if i % 2 == 0 else ("bed", "M140")
            target = float(i % 100)
            result = await run(driver, "heat", heater=heater, target=target)
            assert result.success, result.message
            expected.append(f"{code} S{target:g}")
        home = await run(driver, "home")
        assert home.success
        expected += ["G28", "M117 homed"]
        ran = [c for c in printer.executed if c.split()[0] in ("M104", "M140", "G28", "M117")]
        assert ran == expected
        assert printer.rejected >= 2, "the seed should make the printer reject some lines"
        assert driver.line_stats["resends"] >= printer.rejected - 1
        assert all(f.status != "error" for f in events.facts())
        assert events.error is None
        await events.stop()


async def test_thermal_runaway_is_an_error_until_reset(rig: Rig) -> None:
    printer = await rig.start(files={"LONG.GCO": 1_000_000}, print_rate_bytes_s=1_000)
    driver = rig.driver()
    async with driver:
        events = Collector(driver)
        assert (await run(driver, "heat", heater="hotend", target=200)).success
        assert (await run(driver, "start", file="LONG.GCO")).success
        await events.status("running")
        printer.inject_thermal_runaway()
        error = await events.status("error", "the error status")
        assert error.error_message is not None and "Thermal Runaway" in error.error_message
        assert printer.hotend.target == 0

        for name, params in (("heat", {"heater": "bed", "target": 50}), ("start", {"file": "LONG.GCO"}), ("pause", {})):
            with pytest.raises(CommandError) as refused:
                await run(driver, name, **params)
            assert refused.value.http_status == 409 and "Thermal Runaway" in str(refused.value)

        result = await run(driver, "reset")
        assert result.success and "Thermal Runaway" in result.message
        cleared = await until(lambda: (f := events.last_fact()) and f.status == "idle" and f, "idle after reset")
        assert cleared.error_message is None
        assert (await run(driver, "heat", heater="bed", target=50)).success
        assert printer.bed.target == 50
        await events.stop()


async def test_checksum_complaints_are_not_errors(rig: Rig) -> None:
    printer = await rig.start(reject_rate=0.3, seed=5)
    driver = rig.driver()
    async with driver:
        events = Collector(driver)
        for target in range(20):
            assert (await run(driver, "heat", heater="hotend", target=target)).success
        assert printer.rejected > 0
        assert [c for c in printer.executed if c.startswith("M104")] == [f"M104 S{t}" for t in range(20)]
        assert all(f.status != "error" for f in events.facts())
        await events.stop()


async def test_pause_resume_and_cancel(rig: Rig) -> None:
    printer = await rig.start(files={"LONG.GCO": 1_000_000}, print_rate_bytes_s=2_000)
    driver = rig.driver()
    async with driver:
        events = Collector(driver)
        with pytest.raises(CommandError):
            await run(driver, "resume")  # nothing is paused: M24 would start a print
        assert (await run(driver, "start", file="LONG.GCO")).success
        await events.status("running")
        assert (await run(driver, "pause")).success
        await events.status("paused", current_operation="LONG.GCO", process_id="LONG")
        assert printer.paused
        seen = len(events.readings("progress"))
        await until(lambda: len(events.readings("progress")) >= seen + 2, "progress reports while paused")
        assert events.last_fact() is not None and events.last_fact().status == "paused"  # type: ignore[union-attr]
        assert (await run(driver, "resume")).success
        await until(lambda: (f := events.last_fact()) and f.status == "running", "running again")
        assert (await run(driver, "heat", heater="hotend", target=210)).success
        result = await run(driver, "cancel")
        assert result.success and result.data["method"] == "M524"
        idle = await until(lambda: (f := events.last_fact()) and f.status == "idle" and f, "idle after cancel")
        assert idle.metadata["last_print"]["outcome"] == "cancelled"
        assert not printer.printing and printer.hotend.target == 0 and printer.bed.target == 0
        await events.stop()


async def test_cancel_without_m524_rewinds_and_stays_idle(rig: Rig) -> None:
    printer = await rig.start(files={"LONG.GCO": 1_000_000}, print_rate_bytes_s=2_000, m524=False)
    driver = rig.driver()
    async with driver:
        events = Collector(driver)
        assert (await run(driver, "start", file="LONG.GCO")).success
        await events.status("running")
        result = await run(driver, "cancel")
        assert result.success and result.data["method"] == "M25+M26"
        assert printer.executed[-4:] == ["M25", "M26 S0", "M104 S0", "M140 S0"]
        await until(lambda: (f := events.last_fact()) and f.status == "idle", "idle after cancel")
        # The rewound file still reports "SD printing byte 0/..." but nothing moves: still idle.
        reports = len(events.events)
        await until(lambda: len(events.events) > reports + 8, "more reports")
        assert events.last_fact() is not None and events.last_fact().status == "idle"  # type: ignore[union-attr]
        await events.stop()


async def test_busy_extends_the_timeout_and_long_commands_are_exempt(rig: Rig) -> None:
    # M117 takes 1.5 s but says busy: every 0.2 s; G4 is silent but a long command.
    printer = await rig.start(slow_commands={"M117": 1.5}, keepalive_s=0.2)
    driver = rig.driver(
        connection="ok_timeout_s = 0.5\nlong_command_timeout_s = 10",
        extra='[[equipment.commands]]\nname = "dwell"\nkind = "gcode"\ngcode = "G4 P1500"\n',
    )
    async with driver:
        events = Collector(driver)
        assert (await run(driver, "home")).success  # G28 then the slow M117
        printer.keepalive_s = 100.0
        assert (await run(driver, "dwell")).success
        assert printer.executed[-3:] == ["G28", "M117 homed", "G4 P1500"]
        assert events.error is None
        await events.stop()


async def test_a_board_that_resets_on_open_is_handshaken(rig: Rig) -> None:
    # As an Arduino-style board does when the port opens: deaf while booting, then `start`.
    printer = await rig.start()
    driver = rig.driver()
    printer.reset_board(boot_s=2.5)
    async with driver:
        events = Collector(driver)
        await events.status("idle")
        assert (await run(driver, "heat", heater="bed", target=30)).success
        assert printer.executed[0] == "M110 N0" and printer.executed.count("M115") == 1
        assert events.error is None
        await events.stop()


async def test_a_lost_ok_is_recovered_without_running_twice(rig: Rig) -> None:
    printer = await rig.start()
    driver = rig.driver(connection="ok_timeout_s = 0.5")
    async with driver:
        events = Collector(driver)
        for target in (10, 20, 30):
            printer.lose_oks(1)
            assert (await run(driver, "heat", heater="hotend", target=target)).success
        assert (await run(driver, "heat", heater="hotend", target=40)).success
        assert [c for c in printer.executed if c.startswith("M104")] == ["M104 S10", "M104 S20", "M104 S30", "M104 S40"]
        assert events.error is None and all(f.status != "error" for f in events.facts())
        await events.stop()


async def test_a_print_started_at_the_printer_is_followed(rig: Rig) -> None:
    printer = await rig.start(files={"JOB-77.GCO": 6_000}, print_rate_bytes_s=2_000)
    driver = rig.driver(connection="process_id_pattern = 'JOB-(\\d+)'")
    async with driver:
        events = Collector(driver)
        await events.status("idle")
        printer.panel_print("JOB-77.GCO")
        running = await events.status("running", "the panel's print", current_operation="JOB-77.GCO", process_id="77")
        await events.status("idle", "idle after the panel's print", after=running, current_operation=None)
        assert events.facts()[-1].status == "idle"
        await events.stop()


async def test_port_lost_mid_print_then_reconnect(rig: Rig) -> None:
    printer = await rig.start(files={"LONG.GCO": 200_000}, print_rate_bytes_s=5_000)
    driver = rig.driver(connection="process_id_pattern = '^(L\\w+)\\.'")
    async with driver:
        events = Collector(driver)
        assert (await run(driver, "start", file="LONG.GCO")).success
        await events.reading("progress", lambda v: v > 0, "progress before the cable is pulled")
        await rig.pair.stop()
        await until(lambda: events.ended, "the event stream to end")
        assert isinstance(events.error, ConnectionError)
        with pytest.raises(ConnectionError):
            await run(driver, "pause")
        await events.stop()
    assert leftover_tasks() == []

    # While unplugged, the supervisor's retries fail cleanly.
    with pytest.raises(ConnectionError, match="cannot open serial port"):
        async with driver:
            pass

    await rig.pair.start()
    deadline = time.monotonic() + GUARD_S
    while True:  # the supervisor's retry loop
        try:
            await driver.__aenter__()
            break
        except ConnectionError:
            assert time.monotonic() < deadline, "no reconnect"
            await asyncio.sleep(0.1)
    try:
        events = Collector(driver)
        running = await events.status("running", "the print seen again after the reconnect")
        assert running.current_operation == "LONG.GCO" and running.process_id == "LONG"
        assert printer.executed.count("M110 N0") >= 2  # handshaken again
        printer.print_rate = 100_000
        await events.status("idle", "the print to finish after the reconnect", after=running)
        await events.stop()
    finally:
        await driver.__aexit__(None, None, None)
    assert leftover_tasks() == []


async def test_board_reset_during_print_is_an_error(rig: Rig) -> None:
    printer = await rig.start(files={"LONG.GCO": 1_000_000}, print_rate_bytes_s=1_000)
    driver = rig.driver()
    async with driver:
        events = Collector(driver)
        assert (await run(driver, "start", file="LONG.GCO")).success
        await events.status("running")
        printer.reset_board()
        await until(lambda: events.ended, "the link to drop on the printer's restart")
        error = await events.status("error")
        assert error.error_message is not None and "restarted" in error.error_message
        await events.stop()
    async with driver:
        events = Collector(driver)
        await events.status("error", "the error kept across the reconnect")
        assert (await run(driver, "reset")).success
        await until(lambda: (f := events.last_fact()) and f.status == "idle", "idle after reset")
        await events.stop()


async def test_garbage_overlong_and_non_utf8_are_skipped(rig: Rig) -> None:
    printer = await rig.start(garbage_rate=0.05)
    driver = rig.driver(connection="max_line_bytes = 200")
    async with driver:
        events = Collector(driver)
        for i in range(30):
            printer.inject_garbage(("bytes", "overlong", "non_utf8")[i % 3])
            assert (await run(driver, "heat", heater="bed", target=float(i))).success
        assert [c for c in printer.executed if c.startswith("M140")] == [f"M140 S{i}" for i in range(30)]
        assert driver.line_stats["skipped_lines"] >= 30
        count = len(events.readings("hotend_temp"))
        await until(lambda: len(events.readings("hotend_temp")) > count + 1, "readings after the garbage")
        assert events.error is None and not events.ended
        await events.stop()


async def test_a_printer_that_stops_answering_goes_offline(rig: Rig) -> None:
    printer = await rig.start()
    driver = rig.driver(connection="ok_timeout_s = 0.5")
    async with driver:
        events = Collector(driver)
        await events.status("idle")
        printer.freeze()
        with pytest.raises(ConnectionError, match="stopped answering"):
            await run(driver, "heat", heater="hotend", target=100)
        await until(lambda: events.ended, "the event stream to end")
        assert isinstance(events.error, ConnectionError) and "stopped answering" in str(events.error)
        await events.stop()
    assert leftover_tasks() == []


async def test_no_printer_on_the_port(rig: Rig, tmp_path: Path) -> None:
    # Nobody serves the other end of the pair: the handshake gives up with a reason.
    driver = rig.driver(connection="handshake_timeout_s = 0.5")
    with pytest.raises(ConnectionError, match="M110"):
        async with driver:
            pass
    missing = SerialPrinterDriver(printer_config(tmp_path, tmp_path / "nothing.tty"), DriverContext(tmp_path))
    with pytest.raises(ConnectionError, match=r"nothing\.tty"):
        async with missing:
            pass
    assert leftover_tasks() == []


def test_parameters_are_validated(tmp_path: Path) -> None:
    eq = printer_config(tmp_path, tmp_path / "p.tty", connection="max_hotend_temp = 250")

    def check(name: str, **params: Any) -> dict[str, Any]:
        return SerialPrinterDriver.validate_command(eq, eq.command(name), params)

    assert check("heat", heater="hotend", target=250) == {"heater": "hotend", "target": 250}
    assert check("start", file="CUBE.GCO") == {"file": "CUBE.GCO"}
    assert check("pause") == {}
    cases: list[tuple[tuple[str, dict[str, Any]], str, str]] = [
        (("heat", {"heater": "chamber", "target": 40}), "bad_parameters", "unknown heater 'chamber'"),
        (("heat", {"heater": "hotend", "target": 251}), "out_of_range", "above the limit 250"),
        (("heat", {"heater": "bed", "target": 121}), "out_of_range", "above the limit 120"),
        (("heat", {"heater": "bed", "target": -5}), "out_of_range", "below the minimum"),
        (("heat", {"heater": "bed", "target": "hot"}), "bad_parameters", "must be a number"),
        (("heat", {"heater": "bed"}), "bad_parameters", "must be a number"),
        (("start", {}), "bad_parameters", "'file'"),
        (("start", {"file": "A.GCO*12"}), "bad_parameters", "characters"),
        (("start", {"file": "A.GCO", "speed": 2}), "bad_parameters", "unknown parameter"),
        (("home", {"x": 1}), "bad_parameters", "takes no parameters"),
    ]
    for (name, params), reason, text in cases:
        with pytest.raises(CommandError) as err:
            check(name, **params)
        assert err.value.reason == reason and text in str(err.value), (name, params, str(err.value))


def test_config_problems_are_reported(tmp_path: Path) -> None:
    bad = {
        "gcode needs text": ('[[equipment.commands]]\nname = "g"\nkind = "gcode"\n', "needs a gcode text"),
        "no line numbers": ('[[equipment.commands]]\nname = "g"\nkind = "gcode"\ngcode = "M110 N5"\n', "numbering"),
        "unknown tag": ('[[equipment.tags]]\nname = "chamber_temp"\n', "unknown printer tag"),
        "gcode on another kind": ('[[equipment.commands]]\nname = "p2"\nkind = "pause"\ngcode = "M25"\n', "only kind"),
    }
    for label, (extra, text) in bad.items():
        with pytest.raises(ConfigError) as err:
            printer_config(tmp_path, tmp_path / "p.tty", extra=extra)
        assert text in str(err.value), (label, str(err.value))
    with pytest.raises(ConfigError, match="process_id_pattern"):
        printer_config(tmp_path, tmp_path / "p.tty", connection='process_id_pattern = "(unclosed"')


async def test_simulate_links_the_configured_port(tmp_path: Path) -> None:
    eq = printer_config(tmp_path, tmp_path / "state" / "printer-1.tty")
    port = Path(eq.connection.serial_port)
    sim = asyncio.create_task(simulate(eq, tmp_path / "state"), name="printer-sim-main")
    try:
        await until(port.exists, "the simulator's port link")
        assert port.is_symlink()
        for _ in range(2):  # the simulated port survives the driver closing and reopening it
            driver = SerialPrinterDriver(eq, DriverContext(tmp_path / "state"))
            async with driver:
                events = Collector(driver)
                await events.status("idle")
                await events.reading("hotend_temp", lambda v: v > 0, "temperatures from the simulator")
                await events.stop()
    finally:
        sim.cancel()
        await asyncio.gather(sim, return_exceptions=True)
    assert not port.exists() and not port.is_symlink()


def test_line_parsers() -> None:
    assert frame(0, "M110 N0") == b"N0 M110 N0*125\n"  # the well-known hello
    assert command_code("g04 P100") == "G4" and command_code("M0109 S200") == "M109" and command_code(";x") == ""
    assert gcode_lines("G28 ; home\n\n  ; only a comment\nM117 hi") == ["G28", "M117 hi"]
    assert parse_temperatures("ok T:210.5 /210.0 B:60.0 /60.0 @:0 B@:0") == {"T": (210.5, 210.0), "B": (60.0, 60.0)}
    assert parse_temperatures(" T0:200.0 /200.0 T1:25.0 /0.0 B:55.0 /60.0") == {
        "T0": (200.0, 200.0),
        "T1": (25.0, 0.0),
        "B": (55.0, 60.0),
    }
    assert parse_temperatures("T:150.23 E:0 W:?") == {"T": (150.23, None)}
    assert parse_temperatures("echo:busy: processing") is None
    assert parse_sd_progress("SD printing byte 123/4567") == (123, 4567)
    name, machine, caps = parse_firmware(
        [
            "FIRMWARE_NAME:Marlin 2.1.2 (Jan 1 2024) SOURCE_CODE_URL:x PROTOCOL_VERSION:1.0 MACHINE_TYPE:Ender 3",
            "Cap:EEPROM:1",
        ]
    )
    assert (name, machine, caps) == ("Marlin 2.1.2 (Jan 1 2024)", "Ender 3", {"EEPROM": True})
    for noise in (
        "Error:checksum mismatch, Last Line: 7",
        "Error:Line Number is not Last Line Number+1, Last Line: 7",
        "Error:No Checksum with line number, Last Line: 7",
        'echo:Unknown command: "M9999"',
        "ok",
        "T:20 /0",
    ):
        assert firmware_error(noise) is None, noise
    runaway = "Thermal Runaway, system stopped! Heater_ID: 0"
    assert firmware_error(f"Error:{runaway}") == runaway
    assert firmware_error("Error:MAXTEMP triggered, system stopped! Heater_ID: bed") is not None
    assert firmware_error("!! Heating failed") == "Heating failed"
    assert firmware_error("fatal: Emergency stop") == "Emergency stop"
    assert firmware_error("echo:KILL caused by KILL button/pin") == "KILL caused by KILL button/pin"
    splitter = LineSplitter(10)
    assert splitter.feed(b"ok\nabcdefghijklmnop") == [b"ok"]
    assert splitter.feed(b"qrst\r\nT:1\n") == [b"T:1"] and splitter.overlong == 1
