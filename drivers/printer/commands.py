"""The serial printer's commands: start, pause, resume and cancel prints, reset, heater targets, fixed G-code.

The driver refuses what the printer's state does not allow. A print runs from the printer's SD card, or,
for a file in `gcode_dir`, is streamed by the driver (`stream.py`). Cancel of an SD print uses M524 when
the firmware has it; otherwise it pauses the SD print and rewinds it (M25, M26 S0), which is how firmware
without M524 abandons a print; a streamed print simply stops being sent. Either way heaters go off.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from drivers.printer.config import HEATERS
from drivers.printer.lines import command_failure, gcode_lines
from drivers.printer.marlin import MarlinLink
from drivers.printer.reports import PrinterReports
from drivers.printer.stream import Stream, gcode_path, read_gcode
from drivers.sdk import CommandBase, CommandError, CommandResult, DriverContext, EquipmentConfig, Reading, utcnow
from drivers.sdk.printer import PrintJob


class PrinterCommands(PrinterReports):
    """Commands on top of the printer's state; one at a time."""

    def __init__(self, equipment: EquipmentConfig, context: DriverContext) -> None:
        super().__init__(equipment, context)
        self._command_lock = asyncio.Lock()
        self._m524: bool | None = None  # whether the firmware has M524, once a cancel has asked

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
                self.metrics.request(time.monotonic() - started)

    async def _cmd_start_print(self, link: MarlinLink, command: CommandBase, params: dict[str, Any]) -> CommandResult:
        file = params["file"]
        if self._job is not None:
            state = "paused" if self._job.paused else "printing"
            what = self._job.file or "an SD file"
            raise CommandError(f"cannot start {file!r}: the printer is {state} {what}", "busy", 409)
        path = gcode_path(self.conn.gcode_dir, file)
        if path is not None:
            return await self._start_stream(link, file, path)
        lines = await link.send(f"M23 {file}")
        failure = command_failure(lines)
        if failure is not None:
            where = " (it is not in gcode_dir either)" if self.conn.gcode_dir is not None else ""
            return CommandResult(False, f"the printer cannot open {file!r}{where}: {failure}", {"reason": "device"})
        job = self.jobs.new_job(file, progress=0.0, position=0)

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
        return await self._pause_sd(link, job, True)

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
        return await self._pause_sd(link, job, False)

    async def _pause_sd(self, link: MarlinLink, job: PrintJob, pause: bool) -> CommandResult:
        """Pause (M25) or resume (M24) an SD print; the job changes as the printer acknowledges."""
        verb = "pause" if pause else "resume"

        def acknowledged(answer: list[str]) -> None:
            if self._job is job and command_failure(answer) is None:
                job.paused = pause
                if pause:
                    # The printer may have moved on a little since its last report: the first report after
                    # the pause is the baseline for noticing a resume at the printer.
                    job.position = None
                self._emit_status()

        failure = command_failure(await link.send("M25" if pause else "M24", on_ok=acknowledged))
        if failure is not None:
            return CommandResult(False, f"the printer refused to {verb}: {failure}", {"reason": "device"})
        return CommandResult(True, f"{verb}d {job.file}")

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

    async def _start_stream(self, link: MarlinLink, file: str, path: Path) -> CommandResult:
        try:
            lines = await asyncio.to_thread(read_gcode, path)
        except (OSError, ValueError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            return CommandResult(False, f"cannot print {file!r}: {reason}", {"reason": "bad_file"})
        job = self.jobs.new_job(file, progress=0.0, position=0, streamed=True)
        stream = Stream(job, lines, asyncio.Event())
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

    async def _run_stream(self, link: MarlinLink, stream: Stream) -> None:
        """Send the file's lines, at most `max_in_flight` unanswered; progress = lines acknowledged / lines."""
        job = stream.job

        def progressed(progress: float) -> None:
            self._put(Reading("progress", progress, utcnow()))
            self._emit_status()

        try:
            await stream.send(link, self.conn.max_in_flight, lambda: self._job is job, progressed)
        except ConnectionError as err:
            if self._job is job:
                self._error = self._error or f"the serial line was lost during the print of {job.file}: {err}"
                self.log.warning("print_stream_lost", file=job.file, lines_done=stream.acked, lines=len(stream.lines))
                self._end_job("failed")
            return
        finally:
            if self._stream is stream:
                self._stream = None
        if self._job is job:
            self._end_job("completed")
            self.log.info("print_finished", file=job.file, process_id=job.process_id, streamed=True)
            self._emit_status()

    async def _stop_stream(self, stream: Stream) -> None:
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
