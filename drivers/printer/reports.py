"""What a Marlin printer's lines mean: temperatures, SD progress, prints ending, errors, a board reset.

`PrinterReports` is the serial printer driver's first layer: it keeps what the printer is doing (the job,
an error) across reconnects, since an SD print goes on without the host, and turns the printer's reports
into readings and status facts. Commands (`commands.py`) and the connection (`serial.py`) build on it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from drivers.printer.config import SerialPrinterConnection
from drivers.printer.lines import (
    current_file,
    firmware_error,
    is_comm_complaint,
    parse_sd_progress,
    parse_temperatures,
)
from drivers.printer.marlin import MarlinLink
from drivers.printer.stream import Stream
from drivers.sdk import Driver, DriverContext, EquipmentConfig, Reading, utcnow
from drivers.sdk.printer import Outcome, PrintJob, PrintState, fraction


class Down:
    """Queue marker: the link went down."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class PrinterReports(Driver):
    """The printer's state as its lines tell it, and the events that state yields."""

    def __init__(self, equipment: EquipmentConfig, context: DriverContext) -> None:
        super().__init__(equipment, context)
        self.conn: SerialPrinterConnection = equipment.connection
        self.log = self.log.bind(port=str(self.conn.serial_port))
        self._link: MarlinLink | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._file_query: asyncio.Task[None] | None = None
        self._stream: Stream | None = None
        self._ready = False
        # What the printer is doing; kept across reconnects (an SD print goes on without the host).
        self.jobs = PrintState(self.conn.process_id_pattern, self.log)
        self._last_sd_position: int | None = None
        # Per connection.
        self.firmware: str | None = None
        self.machine_type: str | None = None
        self.capabilities: dict[str, bool] = {}

    @property
    def _job(self) -> PrintJob | None:
        return self.jobs.job

    @_job.setter
    def _job(self, job: PrintJob | None) -> None:
        self.jobs.job = job

    @property
    def _error(self) -> str | None:
        return self.jobs.error

    @_error.setter
    def _error(self, error: str | None) -> None:
        self.jobs.error = error

    async def _sync_state(self, link: MarlinLink) -> None:
        """Learn what the printer is doing now (it may have printed on while we were away)."""
        if self._job is not None and self._job.streamed:
            return  # the driver's own stream: the SD card knows nothing of it
        file = current_file(await link.send("M27 C"))
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
            job = self.jobs.new_job(file)
        job.position = position
        job.progress = fraction(position, total)
        self._job = job
        self._last_sd_position = position

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
            self.metrics.read(values=len(readings))
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
                self._job = job = PrintJob(file=None, process_id=None)
                self._query_file()
            else:
                return
        elif job.paused and job.position is not None and position > job.position:
            job.paused = False  # resumed at the printer
        job.position = position
        job.progress = fraction(position, total)
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
            self.metrics.error("firmware")
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

    def _end_job(self, outcome: Outcome) -> PrintJob:
        """Forget the current print, remembering how it ended."""
        job = self.jobs.end(outcome)
        stream = self._stream
        if stream is not None and stream.job is job:
            stream.go.set()  # a paused stream wakes up to see that its job is over
        return job

    def _on_down(self, reason: str) -> None:
        if self._ready:  # a failed connect is the supervisor's to log (once), not every retry's
            self.log.info("serial_link_down", reason=reason)
        self._ready = False
        self._put(Down(reason))

    def _query_file(self) -> None:
        if self._file_query is not None and not self._file_query.done():
            return

        async def query() -> None:
            link = self._link
            if link is None:
                return
            try:
                file = current_file(await link.send("M27 C"))
            except ConnectionError:
                return
            if self._job is not None and self._job.file is None and file is not None:
                self._job.file = file
                self._job.process_id = self.jobs.process_id(file)
                self._emit_status()

        self._file_query = asyncio.create_task(query(), name=f"printer-file[{self.equipment.id}]")

    # -- status

    def _emit_status(self) -> None:
        if not self._ready:
            return  # connect() reports the status it found once the printer is known
        fact = self.jobs.fact(
            {
                "firmware": self.firmware,
                "machine_type": self.machine_type,
                "capabilities": sorted(k for k, v in self.capabilities.items() if v),
            }
        )
        if fact is not None:
            self._put(fact)

    def _put(self, item: Any) -> None:
        self._queue.put_nowait(item)

    def _count_error(self, kind: str) -> None:
        self.metrics.error(kind)
