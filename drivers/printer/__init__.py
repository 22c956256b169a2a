"""Serial 3D printers (Marlin): the host protocol, the driver and a virtual printer to test it against.

`marlin` (with `lines` and `window`) speaks Marlin's numbered-line protocol; `serial` is the
`serial_printer` driver (its models in `config`, its reports and commands in `reports` and `commands`,
host-streamed prints in `stream`); `sim` is the virtual printer, which shares no code with the rest.
What a print job is (file, process id, progress, status) is the SDK's (`drivers.sdk.printer`).
"""

from __future__ import annotations

from drivers.printer.config import (
    BUILTIN_TAGS,
    HEATERS,
    KINDS,
    SerialPrinterCommand,
    SerialPrinterConnection,
    SerialPrinterTag,
)
from drivers.printer.lines import (
    LONG_COMMANDS,
    SYNC_WORD,
    LineSplitter,
    RateLimitedLog,
    Response,
    checksum,
    command_code,
    command_failure,
    current_file,
    decode_line,
    firmware_error,
    frame,
    gcode_lines,
    is_comm_complaint,
    is_long,
    line_problem,
    parse_firmware,
    parse_response,
    parse_sd_progress,
    parse_temperatures,
)
from drivers.printer.marlin import MarlinLink
from drivers.printer.serial import SerialPrinterDriver
from drivers.printer.stream import MAX_GCODE_BYTES

__all__ = [
    "BUILTIN_TAGS",
    "HEATERS",
    "KINDS",
    "LONG_COMMANDS",
    "MAX_GCODE_BYTES",
    "SYNC_WORD",
    "LineSplitter",
    "MarlinLink",
    "RateLimitedLog",
    "Response",
    "SerialPrinterCommand",
    "SerialPrinterConnection",
    "SerialPrinterDriver",
    "SerialPrinterTag",
    "checksum",
    "command_code",
    "command_failure",
    "current_file",
    "decode_line",
    "firmware_error",
    "frame",
    "gcode_lines",
    "is_comm_complaint",
    "is_long",
    "line_problem",
    "parse_firmware",
    "parse_response",
    "parse_sd_progress",
    "parse_temperatures",
]
