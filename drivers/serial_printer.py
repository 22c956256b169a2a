"""Serial 3D printers (Marlin) over USB: temperatures, prints, status and print commands.

The line protocol (numbering, checksums, resends, timeouts) lives in `drivers.marlin`; this module
knows what the printer's lines mean. The driver keeps the printer's state itself (what is printing,
paused, or failed) from its own commands and the printer's reports, and refuses what the state does
not allow. A print runs from the printer's SD card, or, for a file in `gcode_dir`, is streamed by the
driver line by line through the same numbered, checksummed protocol. Cancel of an SD print uses M524
when the firmware has it; otherwise it pauses the SD print and rewinds it (M25, M26 S0), which is how
firmware without M524 abandons a print; a streamed print simply stops being sent. Either way heaters go off.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import stat
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import serial
import serial_asyncio_fast
from pydantic import Field, field_validator

from agent.config import CommandBase, EquipmentConfig, Model, TagBase
from agent.errors import CommandError
from agent.metrics import DRIVER_ERRORS, DRIVER_LATENCY, DRIVER_READS, DRIVER_VALUES
from agent.model import CommandResult, ConnectionState, Event, Reading, StatusFact, utcnow
from drivers.base import Driver, DriverContext, refuse_unknown
from drivers.marlin import (
    MarlinLink,
    command_code,
    command_failure,
    firmware_error,
    gcode_lines,
    is_comm_complaint,
    parse_firmware,
    parse_sd_progress,
    parse_temperatures,
)
from drivers.registry import register_driver

BUILTIN_TAGS = frozenset({"hotend_temp", "hotend_target", "bed_temp", "bed_target", "progress"})
KINDS = frozenset({"start_print", "pause", "resume", "cancel", "reset", "set_temperature", "gcode"})
HEATERS = {"hotend": "M104", "bed": "M140"}
_CURRENT_FILE = re.compile(r"^Current file:\s*(\S+)", re.IGNORECASE)
# A streamed file is read whole before the print starts; a bigger one is refused.
MAX_GCODE_BYTES = 64 * 1024 * 1024
# Progress of a streamed print is reported in steps of this much (and at the end).
_STREAM_PROGRESS_STEP = 0.005


class SerialPrinterConnection(Model):
    """`[equipment.connection]` of a serial printer."""

    serial_port: Path
    baudrate: int = Field(115200, gt=0)
    flavor: Literal["marlin"] = "marlin"
    poll_interval_s: float = Field(2.0, gt=0)
    max_hotend_temp: float = Field(280.0, gt=0)
    max_bed_temp: float = Field(120.0, gt=0)
    process_id_pattern: str | None = None
    ok_timeout_s: float = Field(10.0, gt=0)
    long_command_timeout_s: float = Field(300.0, gt=0)
    handshake_timeout_s: float = Field(20.0, gt=0)
    max_line_bytes: int = Field(1024, ge=96)
    max_in_flight: int = Field(1, ge=1, le=32)
    gcode_dir: Path | None = None

    @field_validator("process_id_pattern")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as err:
                raise ValueError(f"not a valid regular expression: {err}") from None
        return v


class SerialPrinterTag(TagBase):
    """A printer tag: one of the built-in names, declared only to give it a unit or deadband."""


class SerialPrinterCommand(CommandBase):
    """A printer command: a built-in kind, or `gcode` with a fixed text."""

    gcode: str | None = None


@dataclass
class _Job:
    """The SD print the printer is working on."""

    file: str | None
    process_id: str | None
    paused: bool = False
    progress: float | None = None
    position: int | None = None
    streamed: bool = False


@dataclass
class _Stream:
    """A print streamed from `gcode_dir`: its lines, how many the printer acknowledged, the pause gate."""

    job: _Job
    lines: list[str]
    go: asyncio.Event
    acked: int = 0
    task: asyncio.Task[None] | None = None


class _Down:
    """Queue marker: the link went down."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


_CLOSED = object()


@register_driver
class SerialPrinterDriver(Driver):
    """A Marlin printer on a serial port, printing from its SD card."""

    name = "serial_printer"
    connection_model = SerialPrinterConnection
    tag_model = SerialPrinterTag
    command_model = SerialPrinterCommand
    command_kinds = KINDS
    builtin_tags = BUILTIN_TAGS

    def __init__(self, equipment: EquipmentConfig, context: DriverContext) -> None:
        super().__init__(equipment, context)
        self.conn: SerialPrinterConnection = equipment.connection
        self.log = self.log.bind(port=str(self.conn.serial_port))
        self._link: MarlinLink | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._poller: asyncio.Task[None] | None = None
        self._file_query: asyncio.Task[None] | None = None
        self._stream: _Stream | None = None
        self._command_lock = asyncio.Lock()
        self._ready = False
        # What the printer is doing; kept across reconnects (an SD print goes on without the host).
        self._job: _Job | None = None
        self._error: str | None = None
        self._last_sd_position: int | None = None
        self._last_fact: tuple[Any, ...] | None = None
        self._last_print: dict[str, Any] | None = None
        # Per connection.
        self.firmware: str | None = None
        self.machine_type: str | None = None
        self.capabilities: dict[str, bool] = {}
        self._auto_temp = False
        self._auto_sd = False
        self._m524: bool | None = None

    @property
    def line_stats(self) -> dict[str, int]:
        """Resend requests, lines written again, skipped (garbled, overlong) and stale lines, on this connection."""
        link = self._link
        if link is None:
            return {}
        return {
            "resends": link.resends,
            "lines_resent": link.lines_resent,
            "skipped_lines": link.skipped_lines,
            "stale_lines": link.stale_lines,
            "waits": link.waits,
        }

    # -- config hooks

    @classmethod
    def check_equipment(cls, equipment: EquipmentConfig) -> list[tuple[tuple[str | int, ...], str]]:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        folder = equipment.connection.gcode_dir
        if folder is not None and folder.exists() and not folder.is_dir():
            problems.append((("connection", "gcode_dir"), f"{folder} is not a folder"))
        for j, tag in enumerate(equipment.tags):
            if tag.name not in BUILTIN_TAGS:
                known = ", ".join(sorted(BUILTIN_TAGS))
                problems.append((("tags", j, "name"), f"unknown printer tag {tag.name!r} (a printer reports {known})"))
        for j, cmd in enumerate(equipment.commands):
            where = ("commands", j, "gcode")
            if cmd.kind != "gcode":
                if cmd.gcode is not None:
                    problems.append((where, 'only kind = "gcode" takes a gcode text'))
                continue
            lines = gcode_lines(cmd.gcode or "")
            if not lines:
                problems.append((where, 'kind = "gcode" needs a gcode text with at least one command'))
            for line in lines:
                if (problem := _line_problem(line)) is not None:
                    problems.append((where, f"line {line!r}: {problem}"))
        return problems

    @classmethod
    def validate_command(
        cls, equipment: EquipmentConfig, command: CommandBase, params: dict[str, Any]
    ) -> dict[str, Any]:
        name = command.name

        def bad(message: str, reason: str = "bad_parameters") -> CommandError:
            return CommandError(f"command {name!r}: {message}", reason)

        if command.kind == "start_print":
            refuse_unknown(name, params, {"file"})
            file = params.get("file")
            if not isinstance(file, str) or not file.strip():
                raise bad("parameter 'file' (a file name from the SD listing) is required")
            file = file.strip()
            if not file.isascii() or any(c in file for c in "*;") or any(ord(c) < 32 for c in file):
                raise bad(f"file name {file!r} has characters a printer cannot take")
            return {"file": file}
        if command.kind == "set_temperature":
            refuse_unknown(name, params, {"heater", "target"})
            heater = params.get("heater")
            if heater not in HEATERS:
                raise bad(f"unknown heater {heater!r} (hotend or bed)")
            target = params.get("target")
            if isinstance(target, bool) or not isinstance(target, (int, float)):
                raise bad("parameter 'target' must be a number of degrees C")
            if not math.isfinite(target):
                raise bad("parameter 'target' must be finite")
            conn: SerialPrinterConnection = equipment.connection
            limit = conn.max_hotend_temp if heater == "hotend" else conn.max_bed_temp
            if command.max is not None:
                limit = min(limit, command.max)
            low = max(0.0, command.min) if command.min is not None else 0.0
            if target > limit:
                raise bad(f"{heater} target {target:g} is above the limit {limit:g}", "out_of_range")
            if target < low:
                raise bad(f"{heater} target {target:g} is below the minimum {low:g}", "out_of_range")
            return {"heater": heater, "target": target}
        return super().validate_command(equipment, command, params)

    # -- lifecycle

    async def connect(self) -> None:
        self._queue = asyncio.Queue()
        # First in the stream; a consumer only sees this queue once connect() has succeeded.
        self._queue.put_nowait(ConnectionState(True))
        self._ready = False
        self._last_fact = None
        self._m524 = None
        port = str(self.conn.serial_port)
        try:
            reader, writer = await serial_asyncio_fast.open_serial_connection(url=port, baudrate=self.conn.baudrate)
        except (serial.SerialException, OSError, ValueError) as err:
            raise ConnectionError(f"cannot open serial port {port}: {err}") from err
        link = MarlinLink(
            reader,
            writer,
            on_line=self._on_line,
            on_down=self._on_down,
            log=self.log,
            ok_timeout_s=self.conn.ok_timeout_s,
            long_timeout_s=self.conn.long_command_timeout_s,
            max_line_bytes=self.conn.max_line_bytes,
            max_in_flight=self.conn.max_in_flight,
            name=self.equipment.id,
            count=self._count_error,
        )
        self._link = link
        link.start()
        try:
            await link.handshake(self.conn.handshake_timeout_s)
            await self._identify(link)
            await self._setup_reporting(link)
            await self._sync_state(link)
        except BaseException:
            self._link = None
            await link.close()
            raise
        self._ready = True
        self._poller = asyncio.create_task(self._poll_loop(link), name=f"printer-poll[{self.equipment.id}]")
        self._emit_status()

    async def close(self) -> None:
        self._ready = False
        stream = self._stream
        if stream is not None:
            await self._stop_stream(stream)
            if self._job is stream.job:
                # The printer runs out of lines: the print is lost with the connection.
                self._error = self._error or f"the agent closed the line during the print of {stream.job.file}"
                self._end_job("failed")
        for task in (self._poller, self._file_query):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._poller = self._file_query = None
        link, self._link = self._link, None
        if link is not None:
            await link.close()
        self._put(_CLOSED)

    async def events(self) -> AsyncIterator[Event]:
        queue = self._queue
        while True:
            item = await queue.get()
            if isinstance(item, _Down):
                raise ConnectionError(item.reason)
            if item is _CLOSED:
                return
            yield item

    # -- connecting

    async def _identify(self, link: MarlinLink) -> None:
        lines = await link.send("M115")
        self.firmware, self.machine_type, self.capabilities = parse_firmware(lines)
        self.log.info(
            "printer_identified",
            firmware=self.firmware,
            machine_type=self.machine_type,
            capabilities=sorted(k for k, v in self.capabilities.items() if v),
        )

    async def _setup_reporting(self, link: MarlinLink) -> None:
        # Marlin takes whole seconds (1..60); 0 would switch autoreport off.
        interval = max(1, min(60, round(self.conn.poll_interval_s)))
        self._auto_temp = self.capabilities.get("AUTOREPORT_TEMP", False)
        if self._auto_temp and command_failure(await link.send(f"M155 S{interval}")):
            self._auto_temp = False
        self._auto_sd = self.capabilities.get("AUTOREPORT_SD_STATUS", False)
        if self._auto_sd and command_failure(await link.send(f"M27 S{interval}")):
            self._auto_sd = False

    async def _sync_state(self, link: MarlinLink) -> None:
        """Learn what the printer is doing now (it may have printed on while we were away)."""
        if self._job is not None and self._job.streamed:
            return  # the driver's own stream: the SD card knows nothing of it
        file = _current_file(await link.send("M27 C"))
        progress = None
        for line in await link.send("M27"):
            progress = parse_sd_progress(line) or progress
        if progress is None or progress[1] <= 0:
            if self._job is not None:
                self._end_job("ended")  # it finished or was stopped while we were away
            self._last_sd_position = None
            return
        position, total = progress
        job = self._job
        if job is None or (file is not None and job.file != file):
            job = _Job(file=file, process_id=self._process_id(file))
        job.position = position
        job.progress = _fraction(position, total)
        self._job = job
        self._last_sd_position = position

    # -- the poll loop: temperatures and SD progress where the firmware does not report them itself

    async def _poll_loop(self, link: MarlinLink) -> None:
        interval = self.conn.poll_interval_s
        # With autoreport a silent printer is only noticed by asking it something.
        quiet_limit = max(3 * interval, self.conn.ok_timeout_s)
        try:
            while link.up:
                await asyncio.sleep(interval)
                if not self._auto_temp or time.monotonic() - link.last_rx > quiet_limit:
                    await link.send("M105")
                if not self._auto_sd and self.capabilities.get("SDCARD", True):
                    await link.send("M27")
        except ConnectionError:
            return  # the link has reported itself down

    # -- lines from the printer

    def _on_line(self, line: str) -> None:
        temps = parse_temperatures(line)
        if temps is not None:
            self._on_temperatures(temps)
            return
        message = firmware_error(line)
        if message is not None:
            self._on_firmware_error(message)
            return
        lower = line.lower()
        if lower.startswith("error:") and is_comm_complaint(line):
            self.log.debug("printer_transfer_complaint", line=line)
            return
        if lower == "start":
            self._on_board_reset()
            return
        if not self._ready:
            return  # SD state during connect is read by _sync_state
        if (sd := parse_sd_progress(line)) is not None:
            self._on_sd_progress(*sd)
        elif "done printing file" in lower:
            self._on_print_done()
        elif "not sd printing" in lower:
            self._on_not_printing()
        elif lower.startswith("//action:"):
            self._on_host_action(lower.removeprefix("//action:").strip())

    def _on_temperatures(self, temps: dict[str, tuple[float, float | None]]) -> None:
        now = utcnow()
        readings = []
        for key, tag in ((("T", "T0"), "hotend"), (("B",), "bed")):
            value = next((temps[k] for k in key if k in temps), None)
            if value is None:
                continue
            readings.append(Reading(f"{tag}_temp", value[0], now))
            if value[1] is not None:
                readings.append(Reading(f"{tag}_target", value[1], now))
        if readings:
            DRIVER_READS.labels(self.equipment.id).inc()
            DRIVER_VALUES.labels(self.equipment.id).inc(len(readings))
            for r in readings:
                self._put(r)

    def _on_sd_progress(self, position: int, total: int) -> None:
        previous, self._last_sd_position = self._last_sd_position, position
        job = self._job
        if job is not None and job.streamed:
            return
        if job is None:
            # A print we did not start (the printer's own panel): believe it once the position moves.
            if self._error is None and previous is not None and position > previous:
                self._job = job = _Job(file=None, process_id=None)
                self._query_file()
            else:
                return
        elif job.paused and job.position is not None and position > job.position:
            job.paused = False  # resumed at the printer
        job.position = position
        job.progress = _fraction(position, total)
        self._put(Reading("progress", job.progress, utcnow()))
        self._emit_status()

    def _on_print_done(self) -> None:
        self._last_sd_position = None
        job = self._job
        if job is None or job.streamed:
            return
        job.progress = 1.0
        job.paused = False
        self._put(Reading("progress", 1.0, utcnow()))
        self._emit_status()
        self._end_job("completed")
        self.log.info("print_finished", file=job.file, process_id=job.process_id)
        self._emit_status()

    def _on_not_printing(self) -> None:
        self._last_sd_position = None
        if self._job is not None and not self._job.streamed:
            job = self._end_job("failed" if self._error is not None else "ended")
            self.log.info("print_ended", file=job.file, process_id=job.process_id, progress=job.progress)
            self._emit_status()

    def _on_host_action(self, action: str) -> None:
        if self._job is None:
            return
        if action.startswith("paused"):
            self._job.paused = True
        elif action.startswith("resumed"):
            self._job.paused = False
        self._emit_status()

    def _on_firmware_error(self, message: str) -> None:
        if self._error is None:
            # Keep the first message: it names the cause; the ones after it ("printer halted") do not.
            self._error = message
            self.log.warning("printer_error", message=message)
            DRIVER_ERRORS.labels(self.equipment.id, "firmware").inc()
            if self._job is not None and self._job.streamed:
                self._end_job("failed")  # a stopped printer takes no more lines: the stream ends
            self._emit_status()

    def _on_board_reset(self) -> None:
        if not self._ready:
            self.log.info("printer_restarted_on_connect")
            return
        if self._job is not None:
            if self._error is None:
                self._on_firmware_error(f"printer restarted during the print of {self._job.file or 'an SD file'}")
            self._end_job("failed")
        if self._link is not None:
            self._link.down("the printer restarted (its board reset)")

    def _end_job(self, outcome: str) -> _Job:
        """Forget the current print, remembering how it ended (`completed`, `cancelled`, `failed`, `ended`)."""
        job = self._job
        assert job is not None
        self._job = None
        stream = self._stream
        if stream is not None and stream.job is job:
            stream.go.set()  # a paused stream wakes up to see that its job is over
        self._last_print = {
            "file": job.file,
            "process_id": job.process_id,
            "outcome": outcome,
            "progress": job.progress,
        }
        return job

    def _on_down(self, reason: str) -> None:
        if self._ready:  # a failed connect is the supervisor's to log (once), not every retry's
            self.log.info("serial_link_down", reason=reason)
        self._ready = False
        self._put(_Down(reason))

    def _query_file(self) -> None:
        if self._file_query is not None and not self._file_query.done():
            return

        async def query() -> None:
            link = self._link
            if link is None:
                return
            try:
                file = _current_file(await link.send("M27 C"))
            except ConnectionError:
                return
            if self._job is not None and self._job.file is None and file is not None:
                self._job.file = file
                self._job.process_id = self._process_id(file)
                self._emit_status()

        self._file_query = asyncio.create_task(query(), name=f"printer-file[{self.equipment.id}]")

    # -- status

    def _status(self) -> str:
        if self._error is not None:
            return "error"
        if self._job is None:
            return "idle"
        return "paused" if self._job.paused else "running"

    def _emit_status(self) -> None:
        if not self._ready:
            return  # connect() reports the status it found once the printer is known
        job = self._job
        fact = StatusFact(
            status=self._status(),
            current_operation=job.file if job else None,
            progress=job.progress if job else None,
            error_message=self._error,
            process_id=job.process_id if job else None,
            metadata={
                "firmware": self.firmware,
                "machine_type": self.machine_type,
                "capabilities": sorted(k for k, v in self.capabilities.items() if v),
                "last_print": self._last_print,
            },
        )
        key = (fact.status, fact.current_operation, fact.progress, fact.error_message, fact.process_id)
        if key != self._last_fact:
            self._last_fact = key
            self._put(fact)

    def _process_id(self, file: str | None) -> str | None:
        """The process id a file name carries: `process_id_pattern`'s first group or match, else the stem."""
        if not file:
            return None
        name = file.rsplit("/", 1)[-1]
        pattern = self.conn.process_id_pattern
        if pattern is None:
            return name.rsplit(".", 1)[0] if "." in name[1:] else name
        m = re.search(pattern, name)
        if m is None:
            self.log.warning("process_id_not_found", file=file, pattern=pattern)
            return None
        return m.group(1) if m.re.groups and m.group(1) is not None else m.group(0)

    def _put(self, item: Any) -> None:
        self._queue.put_nowait(item)

    def _count_error(self, kind: str) -> None:
        DRIVER_ERRORS.labels(self.equipment.id, kind).inc()

    # -- commands

    async def send_command(self, command: CommandBase, params: dict[str, Any]) -> CommandResult:
        link = self._link
        if link is None or not link.up or not self._ready:
            raise ConnectionError(f"printer {self.equipment.id} is not connected")
        kind = command.kind
        started = time.monotonic()
        async with self._command_lock:
            if self._error is not None and kind != "reset":
                raise CommandError(
                    f"printer {self.equipment.id} is in error ({self._error}); only a reset is allowed", "state", 409
                )
            try:
                handler: Callable[[MarlinLink, CommandBase, dict[str, Any]], Any] = getattr(self, f"_cmd_{kind}")
                result: CommandResult = await handler(link, command, params)
                return result
            finally:
                DRIVER_LATENCY.labels(self.equipment.id).observe(time.monotonic() - started)

    async def _cmd_start_print(self, link: MarlinLink, command: CommandBase, params: dict[str, Any]) -> CommandResult:
        file = params["file"]
        if self._job is not None:
            state = "paused" if self._job.paused else "printing"
            what = self._job.file or "an SD file"
            raise CommandError(f"cannot start {file!r}: the printer is {state} {what}", "busy", 409)
        path = self._gcode_path(file)
        if path is not None:
            return await self._start_stream(link, file, path)
        lines = await link.send(f"M23 {file}")
        failure = command_failure(lines)
        if failure is not None:
            where = " (it is not in gcode_dir either)" if self.conn.gcode_dir is not None else ""
            return CommandResult(False, f"the printer cannot open {file!r}{where}: {failure}", {"reason": "device"})
        job = _Job(file=file, process_id=self._process_id(file), progress=0.0, position=0)

        def started(answer: list[str]) -> None:
            if command_failure(answer) is None:
                self._job = job
                self._last_sd_position = 0
                self._put(Reading("progress", 0.0, utcnow()))
                self._emit_status()

        failure = command_failure(await link.send("M24", on_ok=started))
        if failure is not None:
            return CommandResult(False, f"the printer did not start {file!r}: {failure}", {"reason": "device"})
        self.log.info("print_started", file=file, process_id=job.process_id)
        return CommandResult(True, f"printing {file}", {"file": file, "process_id": job.process_id})

    async def _cmd_pause(self, link: MarlinLink, command: CommandBase, params: dict[str, Any]) -> CommandResult:
        job = self._job
        if job is None:
            raise CommandError("nothing to pause: the printer is not printing", "state", 409)
        if job.paused:
            return CommandResult(True, f"{job.file} is already paused")
        if self._stream is not None and self._stream.job is job:
            # No more lines go out; the printer finishes the few it has.
            self._stream.go.clear()
            job.paused = True
            self._emit_status()
            return CommandResult(True, f"paused {job.file}")

        def paused(answer: list[str]) -> None:
            if self._job is job and command_failure(answer) is None:
                job.paused = True
                # The printer may have moved on a little since its last report: the first report after
                # the pause is the baseline for noticing a resume at the printer.
                job.position = None
                self._emit_status()

        failure = command_failure(await link.send("M25", on_ok=paused))
        if failure is not None:
            return CommandResult(False, f"the printer refused to pause: {failure}", {"reason": "device"})
        return CommandResult(True, f"paused {job.file}")

    async def _cmd_resume(self, link: MarlinLink, command: CommandBase, params: dict[str, Any]) -> CommandResult:
        job = self._job
        # M24 on an idle printer would start whatever file is selected: only a paused print resumes.
        if job is None or not job.paused:
            raise CommandError("nothing to resume: no print is paused", "state", 409)
        if self._stream is not None and self._stream.job is job:
            job.paused = False
            self._stream.go.set()
            self._emit_status()
            return CommandResult(True, f"resumed {job.file}")

        def resumed(answer: list[str]) -> None:
            if self._job is job and command_failure(answer) is None:
                job.paused = False
                self._emit_status()

        failure = command_failure(await link.send("M24", on_ok=resumed))
        if failure is not None:
            return CommandResult(False, f"the printer refused to resume: {failure}", {"reason": "device"})
        return CommandResult(True, f"resumed {job.file}")

    async def _cmd_cancel(self, link: MarlinLink, command: CommandBase, params: dict[str, Any]) -> CommandResult:
        job = self._job
        stream = self._stream
        if job is not None and stream is not None and stream.job is job:
            await self._stop_stream(stream)
            if self._job is job:
                self._end_job("cancelled")
                self._emit_status()
            for heater in HEATERS.values():
                await link.send(f"{heater} S0")
            self.log.info("print_cancelled", file=job.file, process_id=job.process_id, method="stream")
            return CommandResult(
                True, f"cancelled {job.file}; heaters off", {"method": "stream", "lines_done": stream.acked}
            )

        def cancelled(answer: list[str]) -> None:
            if command_failure(answer) is None and job is not None and self._job is job:
                self._end_job("cancelled")
                self._emit_status()

        method = "M524"
        if self._m524 is not False:
            answer = await link.send("M524", on_ok=cancelled)
            self._m524 = not any("unknown command" in line.lower() for line in answer)
        if not self._m524:
            method = "M25+M26"
            await link.send("M25")
            await link.send("M26 S0", on_ok=cancelled)
        for heater in HEATERS.values():
            await link.send(f"{heater} S0")
        if job is not None:
            self.log.info("print_cancelled", file=job.file, process_id=job.process_id, method=method)
        what = f"cancelled {job.file}" if job is not None else "no print in progress"
        return CommandResult(True, f"{what}; heaters off", {"method": method})

    async def _cmd_reset(self, link: MarlinLink, command: CommandBase, params: dict[str, Any]) -> CommandResult:
        error = self._error
        try:
            answer = await link.send("M999")
        except ConnectionError:
            # A printer that does not take M999 gets a reconnect instead (the supervisor's handshake).
            self._error = None
            raise
        failure = command_failure(answer)
        if failure is not None:
            return CommandResult(False, f"the printer refused the reset: {failure}", {"reason": "device"})
        self._error = None
        await self._sync_state(link)
        self._emit_status()
        if error is not None:
            self.log.info("printer_error_cleared", message=error)
        return CommandResult(True, "reset" + (f" (cleared: {error})" if error else ""))

    # -- prints streamed from gcode_dir

    def _gcode_path(self, file: str) -> Path | None:
        """The file in `gcode_dir` that `file` names, or None for an SD print (no folder, a path, no such file).

        Raises CommandError for an entry there that is no regular file inside the folder (a link out of it)."""
        folder = self.conn.gcode_dir
        if folder is None or file in (".", "..") or any(c in file for c in "/\\\0"):
            return None
        candidate = folder / file
        try:
            os.lstat(candidate)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise CommandError(f"cannot read {file!r} in gcode_dir: {err.strerror}", "bad_parameters") from None
        try:
            real = candidate.resolve(strict=True)
            inside = real.parent == folder.resolve(strict=True)
            regular = stat.S_ISREG(real.stat().st_mode)
        except OSError:
            inside = regular = False
        if not inside:
            raise CommandError(f"{file!r} in gcode_dir leads out of the folder; it is not printed", "bad_parameters")
        if not regular:
            raise CommandError(f"{file!r} in gcode_dir is not a regular file", "bad_parameters")
        return candidate

    async def _start_stream(self, link: MarlinLink, file: str, path: Path) -> CommandResult:
        try:
            lines = await asyncio.to_thread(_read_gcode, path)
        except (OSError, ValueError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            return CommandResult(False, f"cannot print {file!r}: {reason}", {"reason": "bad_file"})
        job = _Job(file=file, process_id=self._process_id(file), progress=0.0, position=0, streamed=True)
        stream = _Stream(job, lines, asyncio.Event())
        stream.go.set()
        self._job = job
        self._stream = stream
        self._put(Reading("progress", 0.0, utcnow()))
        self._emit_status()
        stream.task = asyncio.create_task(self._run_stream(link, stream), name=f"printer-stream[{self.equipment.id}]")
        self.log.info("print_started", file=file, process_id=job.process_id, streamed=True, lines=len(lines))
        return CommandResult(
            True, f"printing {file}", {"file": file, "process_id": job.process_id, "lines": len(lines)}
        )

    async def _run_stream(self, link: MarlinLink, stream: _Stream) -> None:
        """Send the file's lines, at most `max_in_flight` unanswered; progress = lines acknowledged / lines."""
        job = stream.job
        total = len(stream.lines)
        waiting: deque[asyncio.Future[list[str]]] = deque()

        def acked(answer: list[str]) -> None:
            stream.acked += 1
            if self._job is not job:
                return
            progress = _fraction(stream.acked, total)
            if stream.acked == total or progress - (job.progress or 0.0) >= _STREAM_PROGRESS_STEP:
                job.progress = progress
                self._put(Reading("progress", progress, utcnow()))
                self._emit_status()

        try:
            for line in stream.lines:
                await stream.go.wait()
                if self._job is not job:
                    return  # cancelled, or the printer stopped with an error
                while len(waiting) >= self.conn.max_in_flight:
                    await waiting.popleft()
                waiting.append(link.submit(line, on_ok=acked))
            while waiting:
                await waiting.popleft()
        except ConnectionError as err:
            if self._job is job:
                self._error = self._error or f"the serial line was lost during the print of {job.file}: {err}"
                self.log.warning("print_stream_lost", file=job.file, lines_done=stream.acked, lines=total)
                self._end_job("failed")
            return
        finally:
            if self._stream is stream:
                self._stream = None
        if self._job is job:
            self._end_job("completed")
            self.log.info("print_finished", file=job.file, process_id=job.process_id, streamed=True)
            self._emit_status()

    async def _stop_stream(self, stream: _Stream) -> None:
        task = stream.task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._stream is stream:
            self._stream = None

    async def _cmd_set_temperature(
        self, link: MarlinLink, command: CommandBase, params: dict[str, Any]
    ) -> CommandResult:
        heater, target = params["heater"], params["target"]
        failure = command_failure(await link.send(f"{HEATERS[heater]} S{target:g}"))
        if failure is not None:
            return CommandResult(False, f"the printer refused the {heater} target: {failure}", {"reason": "device"})
        return CommandResult(True, f"{heater} target {target:g} degC", {"heater": heater, "target": target})

    async def _cmd_gcode(self, link: MarlinLink, command: CommandBase, params: dict[str, Any]) -> CommandResult:
        text = getattr(command, "gcode", None) or ""
        answer: list[str] = []
        lines = gcode_lines(text)
        for i, line in enumerate(lines):
            reply = await link.send(line)
            answer.extend(reply)
            failure = command_failure(reply)
            if failure is not None:
                data = {"reason": "device", "lines_done": i, "response": answer[-50:]}
                return CommandResult(False, f"line {i + 1} ({line!r}) failed: {failure}", data)
        return CommandResult(True, f"{len(lines)} line(s) done", {"lines_done": len(lines), "response": answer[-50:]})


def _line_problem(line: str) -> str | None:
    """Why a G-code line cannot be sent as it is (the driver numbers and checksums lines itself), or None."""
    if not line.isascii() or "*" in line:
        return "only ASCII and no '*' (the checksum mark)"
    if command_code(line) == "M110" or re.match(r"[Nn]\d", line):
        return "line numbering belongs to the driver"
    return None


def _read_gcode(path: Path) -> list[str]:
    """The commands of a G-code file to stream; ValueError naming the first line that cannot be sent."""
    with path.open("rb") as f:
        data = f.read(MAX_GCODE_BYTES + 1)
    if len(data) > MAX_GCODE_BYTES:
        raise ValueError(f"larger than {MAX_GCODE_BYTES} bytes")
    lines: list[str] = []
    for number, raw in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
        for line in gcode_lines(raw):
            if (problem := _line_problem(line)) is not None:
                raise ValueError(f"line {number} ({line[:40]!r}): {problem}")
            lines.append(line)
    if not lines:
        raise ValueError("no G-code commands in it")
    return lines


def _current_file(lines: list[str]) -> str | None:
    """The file named by an `M27 C` answer (`Current file: NAME.GCO ...`); None for `(no file)`."""
    for line in lines:
        if m := _CURRENT_FILE.match(line):
            return None if m.group(1).startswith("(") else m.group(1)
    return None


def _fraction(position: int, total: int) -> float:
    if total <= 0:
        return 0.0
    return round(min(1.0, max(0.0, position / total)), 4)
