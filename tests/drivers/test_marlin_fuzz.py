"""Fuzzing what a Marlin printer sends back: every line is understood, or logged and skipped; the reader
never raises and the link stays up."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import serial_asyncio_fast
import structlog
from hypothesis import given
from hypothesis import strategies as st
from test_serial_printer import printer_config

from drivers.base import DriverContext
from drivers.printer.lines import (
    command_failure,
    decode_line,
    firmware_error,
    is_comm_complaint,
    parse_firmware,
    parse_response,
    parse_sd_progress,
    parse_temperatures,
)
from drivers.printer.marlin import MarlinLink
from drivers.printer.serial import SerialPrinterDriver
from drivers.sdk.printer import PrintJob as _Job

# Pieces of real firmware lines, so that the fuzzer reaches the parsers' deeper branches.
FRAGMENTS = [
    "ok",
    "ok T:",
    "Resend:",
    "rs N",
    "Error:",
    "!!",
    "fatal:",
    "echo:",
    "busy: processing",
    "wait",
    "start",
    "T:",
    " /",
    "B:",
    "@:",
    "SD printing byte ",
    "/",
    "Done printing file",
    "Not SD printing",
    "//action:paused",
    "//action:resumed",
    "checksum mismatch, Last Line: ",
    "Line Number is not Last Line Number+1",
    "Thermal Runaway",
    "MAXTEMP",
    "Unknown command",
    "FIRMWARE_NAME:",
    "MACHINE_TYPE:",
    "Cap:EEPROM:1",
    "Current file: ",
    "edge-agent-sync ",
]
numbers = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.integers(0, 9).map(lambda n: "9" * (n * 900 + 1)),  # up to thousands of digits
)
pieces = st.one_of(st.sampled_from(FRAGMENTS), numbers, st.text(max_size=20))
lines = st.one_of(
    st.lists(pieces, max_size=12).map("".join),
    st.text(),
    st.binary(max_size=300).map(lambda b: b.decode("utf-8", "replace")),
    st.text(min_size=1, max_size=3).map(lambda t: t * 3000),  # very long
)


@given(lines)
def test_every_line_parser_takes_any_text(line: str) -> None:
    response = parse_response(line)
    assert response.kind in ("ok", "resend", "busy", "wait", "start", "line")
    if response.kind == "resend":
        assert response.number is not None and response.number >= 0
    parse_temperatures(line)
    parse_sd_progress(line)
    firmware_error(line)
    is_comm_complaint(line)
    command_failure([line])
    parse_firmware([line, line])


@given(st.binary(max_size=400))
def test_decode_line_takes_any_bytes(raw: bytes) -> None:
    text = decode_line(raw)
    assert text is None or (text == text.strip() and "\n" not in text)


async def test_the_reader_never_raises_on_any_bytes() -> None:
    """Bytes as the printer might send them, through the link's reader (splitter, decoder, dispatch)."""
    master, slave = os.openpty()
    reader, writer = await serial_asyncio_fast.open_serial_connection(url=os.ttyname(slave), baudrate=115200)
    seen: list[str] = []
    downs: list[str] = []
    link = MarlinLink(
        reader,
        writer,
        on_line=seen.append,
        on_down=downs.append,
        log=structlog.get_logger("test"),
        ok_timeout_s=5,
        long_timeout_s=5,
        max_line_bytes=256,
    )
    try:
        chunks = st.one_of(
            st.binary(max_size=600),
            lines.map(lambda t: (t + "\n").encode("utf-8", "surrogatepass")),
        )

        @given(st.lists(chunks, max_size=8))
        def feed(data: list[bytes]) -> None:
            for chunk in data:
                link.feed(chunk)
            assert link.up, link.failure

        feed()
        assert downs == []
    finally:
        await link.close()
        os.close(master)
        os.close(slave)


async def test_the_drivers_line_handler_never_raises(tmp_path: Path) -> None:
    """The driver's meaning of each line, while printing: understood or ignored, never an exception."""
    eq = printer_config(tmp_path, tmp_path / "p.tty")
    driver = SerialPrinterDriver(eq, DriverContext(tmp_path / "state"))
    driver._ready = True
    drained: list[Any] = []

    @given(st.lists(lines, max_size=6))
    def handle(batch: list[str]) -> None:
        driver._job = _Job(file="JOB.GCO", process_id="JOB")
        driver._error = None
        for line in batch:
            driver._on_line(line)
        while not driver._queue.empty():
            drained.append(driver._queue.get_nowait())

    handle()
    if driver._file_query is not None:
        await asyncio.gather(driver._file_query, return_exceptions=True)
