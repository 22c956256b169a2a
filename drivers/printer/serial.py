"""Serial 3D printers (Marlin) over USB: temperatures, prints, status and print commands.

The line protocol (numbering, checksums, resends, timeouts) lives in `marlin.py`; what the printer's lines
mean in `reports.py`; the commands in `commands.py`. This module opens the port, identifies the printer,
sets up its reports (autoreport where the firmware has it, else polling) and streams the driver's events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import serial
import serial_asyncio_fast

from drivers.printer.commands import PrinterCommands
from drivers.printer.config import (
    BUILTIN_TAGS,
    KINDS,
    SerialPrinterCommand,
    SerialPrinterConnection,
    SerialPrinterTag,
    check_printer,
    validate_params,
)
from drivers.printer.lines import command_failure, parse_firmware
from drivers.printer.marlin import MarlinLink
from drivers.printer.reports import Down
from drivers.sdk import (
    CommandBase,
    ConnectionState,
    DriverContext,
    EquipmentConfig,
    Event,
    register_driver,
)

_CLOSED = object()


@register_driver
class SerialPrinterDriver(PrinterCommands):
    """A Marlin printer on a serial port, printing from its SD card or streamed from `gcode_dir`."""

    name = "serial_printer"
    connection_model = SerialPrinterConnection
    tag_model = SerialPrinterTag
    command_model = SerialPrinterCommand
    command_kinds = KINDS
    builtin_tags = BUILTIN_TAGS

    def __init__(self, equipment: EquipmentConfig, context: DriverContext) -> None:
        super().__init__(equipment, context)
        self._poller: asyncio.Task[None] | None = None
        # Per connection: whether the firmware reports temperatures and SD progress by itself.
        self._auto_temp = False
        self._auto_sd = False

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
        return check_printer(equipment)

    @classmethod
    def validate_command(
        cls, equipment: EquipmentConfig, command: CommandBase, params: dict[str, Any]
    ) -> dict[str, Any]:
        checked = validate_params(equipment, command, params)
        return checked if checked is not None else super().validate_command(equipment, command, params)

    # -- lifecycle

    async def connect(self) -> None:
        self._queue = asyncio.Queue()
        # First in the stream; a consumer only sees this queue once connect() has succeeded.
        self._queue.put_nowait(ConnectionState(True))
        self._ready = False
        self.jobs.forget_fact()
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
            if isinstance(item, Down):
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
