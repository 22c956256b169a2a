"""Marlin's line vocabulary: framing (`N<n> <cmd>*<xor>`), command codes, and parsers for what firmware says.

Pure functions, a byte splitter and a rate-limited log for line noise, no I/O: the link
(`drivers.printer.marlin`) and the driver use them.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

# The word before the token of the marker line that ends the resynchronisation at open.
SYNC_WORD = "edge-agent-sync"
# Commands that may legitimately run for minutes before their `ok` (homing, probing, waiting for heat,
# for moves to finish, dwelling, PID tuning): exempt from the normal ok timeout.
LONG_COMMANDS = frozenset({"G28", "G29", "M109", "M190", "M191", "M400", "G4", "M303"})

_CODE = re.compile(r"^([GMT])0*(\d+)", re.IGNORECASE)
_RESEND = re.compile(r"^(?:resend|rs)\s*:?\s*N?\s*(\d{1,9})(?!\d)", re.IGNORECASE)
_BUSY = re.compile(r"(?:^|echo:)\s*busy:", re.IGNORECASE)
_TEMP_LINE = re.compile(r"^\s*(?:ok\s+)?T\d*\s*:", re.IGNORECASE)
_TEMP_FIELD = re.compile(r"(?<![A-Za-z@])([TB]\d*)\s*:\s*(-?\d+(?:\.\d+)?)(?:\s*/\s*(-?\d+(?:\.\d+)?))?")
_SD_PROGRESS = re.compile(r"SD printing byte\s+(\d{1,15})\s*/\s*(\d{1,15})(?!\d)", re.IGNORECASE)
_FIRMWARE_NAME = re.compile(r"FIRMWARE_NAME:\s*(.*?)(?=\s+[A-Z_]+:|$)")
_MACHINE_TYPE = re.compile(r"MACHINE_TYPE:\s*(.*?)(?=\s+[A-Z_]+:|$)")
_CAP = re.compile(r"^Cap:\s*([A-Za-z0-9_]+)\s*:\s*([01])\s*$")
_CURRENT_FILE = re.compile(r"^Current file:\s*(\S+)", re.IGNORECASE)
_LINE_NUMBER = re.compile(r"[Nn]\d")
# Complaints about the transfer itself (Marlin, Prusa, Repetier wording): always followed by a resend.
_COMM_COMPLAINT = re.compile(
    r"checksum|line\s*number|last\s+line|expected\s+line|no\s+line\s+number|format\s+error|resend",
    re.IGNORECASE,
)
# Failures announced outside an `Error:` prefix (kill and thermal protection messages).
_FATAL_TEXT = re.compile(
    r"thermal\s+runaway|heating\s+failed|maxtemp|mintemp|kill\(\)\s+called|kill\s+caused|printer\s+halted",
    re.IGNORECASE,
)
# `Error:` lines that concern one command only and do not stop the printer.
_BENIGN_ERROR = re.compile(r"unknown\s+command|no\s+media|open\s+failed|cold\s+extrusion", re.IGNORECASE)


def checksum(text: str) -> int:
    """Marlin's line checksum: the XOR of every byte of `N<n> <cmd>`."""
    value = 0
    for byte in text.encode("ascii"):
        value ^= byte
    return value


def frame(number: int, command: str) -> bytes:
    """One numbered, checksummed line as it goes on the wire."""
    body = f"N{number} {command}"
    return f"{body}*{checksum(body)}\n".encode("ascii")


def command_code(command: str) -> str:
    """`G28`, `M109`... of a G-code line, normalised (`g04 P1` -> `G4`); '' for anything else."""
    m = _CODE.match(command.strip())
    return f"{m.group(1).upper()}{int(m.group(2))}" if m else ""


def gcode_lines(text: str) -> list[str]:
    """The commands of a G-code text: comments and blank lines dropped, one command per line."""
    out = []
    for raw in text.splitlines():
        line = raw.split(";", 1)[0].strip()
        if line:
            out.append(line)
    return out


def is_long(command: str) -> bool:
    """Whether a command is exempt from the normal ok timeout."""
    return command_code(command) in LONG_COMMANDS


def parse_temperatures(line: str) -> dict[str, tuple[float, float | None]] | None:
    """`T:210.0 /210.0 B:60.0 /60.0 @:0` -> {"T": (210.0, 210.0), "B": (60.0, 60.0)}; None if no report."""
    if not _TEMP_LINE.match(line):
        return None
    found: dict[str, tuple[float, float | None]] = {}
    for m in _TEMP_FIELD.finditer(line):
        target = float(m.group(3)) if m.group(3) is not None else None
        found.setdefault(m.group(1).upper(), (float(m.group(2)), target))
    return found or None


def parse_sd_progress(line: str) -> tuple[int, int] | None:
    """`SD printing byte 123/4567` -> (123, 4567)."""
    m = _SD_PROGRESS.search(line)
    return (int(m.group(1)), int(m.group(2))) if m else None


def parse_firmware(lines: list[str]) -> tuple[str | None, str | None, dict[str, bool]]:
    """From an M115 answer: firmware name, machine type and the `Cap:` capabilities."""
    name = machine = None
    caps: dict[str, bool] = {}
    for line in lines:
        if name is None and (m := _FIRMWARE_NAME.search(line)):
            name = m.group(1).strip() or None
            if mt := _MACHINE_TYPE.search(line):
                machine = mt.group(1).strip() or None
        elif m := _CAP.match(line):
            caps[m.group(1).upper()] = m.group(2) == "1"
    return name, machine, caps


def current_file(lines: list[str]) -> str | None:
    """The file named by an `M27 C` answer (`Current file: NAME.GCO ...`); None for `(no file)`."""
    for line in lines:
        if m := _CURRENT_FILE.match(line):
            return None if m.group(1).startswith("(") else m.group(1)
    return None


def line_problem(line: str) -> str | None:
    """Why a G-code line cannot be sent as it is (the link numbers and checksums lines itself), or None."""
    if not line.isascii() or "*" in line:
        return "only ASCII and no '*' (the checksum mark)"
    if command_code(line) == "M110" or _LINE_NUMBER.match(line):
        return "line numbering belongs to the driver"
    return None


@dataclass(frozen=True)
class Response:
    """One line from the firmware, classified: `ok` (text = what follows it), `resend` (number), `busy`,
    `wait`, `start` (the board booted), or any other `line`."""

    kind: str
    text: str = ""
    number: int | None = None


def decode_line(raw: bytes) -> str | None:
    """A received line as text (stripped), or None for garbage: not UTF-8, or control characters in it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any(ord(c) < 32 and c != "\t" for c in text):
        return None
    return text.strip()


def parse_response(line: str) -> Response:
    """Classify one firmware line; never raises (anything not protocol is a plain `line`)."""
    text = line.strip()
    lower = text.lower()
    if text[:2].lower() == "ok" and (len(text) == 2 or text[2] in " \t:"):
        return Response("ok", text[2:].lstrip(" \t:"))
    if m := _RESEND.match(text):
        return Response("resend", text, int(m.group(1)))
    if _BUSY.search(text):
        return Response("busy", text)
    if lower == "wait":
        return Response("wait", text)
    if lower == "start":
        return Response("start", text)
    return Response("line", text)


def is_comm_complaint(line: str) -> bool:
    """An `Error:` about a garbled or misnumbered line: transfer noise the resend repairs."""
    return bool(_COMM_COMPLAINT.search(line))


def firmware_error(line: str) -> str | None:
    """The message of a firmware error or kill line, or None for anything else (transfer noise included)."""
    text = line.strip()
    lower = text.lower()
    for prefix in ("error:", "!!", "fatal:"):
        if lower.startswith(prefix):
            message = text[len(prefix) :].strip() or text
            if is_comm_complaint(message) or _BENIGN_ERROR.search(message):
                return None
            return message
    if _FATAL_TEXT.search(text):
        return text.removeprefix("echo:").strip()
    return None


def command_failure(lines: list[str]) -> str | None:
    """Why a command's answer says it failed (an unknown command, a refused file), or None."""
    for line in lines:
        lower = line.lower()
        if "unknown command" in lower or "open failed" in lower or "no media" in lower:
            return line.removeprefix("echo:").strip()
        if lower.startswith(("error:", "!!", "fatal:")) and not is_comm_complaint(line):
            return line.strip()
    return None


class LineSplitter:
    """Bytes in, complete lines out; a line longer than `max_len` is dropped whole and counted."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.overlong = 0
        self._buf = bytearray()
        self._discarding = False

    def reset(self) -> None:
        """Forget a partial line."""
        self._buf.clear()
        self._discarding = False

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the lines they completed (without line ends)."""
        self._buf += data
        out: list[bytes] = []
        while True:
            i = self._buf.find(b"\n")
            if i < 0:
                if len(self._buf) > self.max_len:
                    if not self._discarding:
                        self.overlong += 1
                        self._discarding = True
                    self._buf.clear()
                return out
            line = bytes(self._buf[:i]).rstrip(b"\r")
            del self._buf[: i + 1]
            if self._discarding:
                self._discarding = False
                continue
            if len(line) > self.max_len:
                self.overlong += 1
                continue
            out.append(line)


class RateLimitedLog:
    """Log a recurring nuisance at most once per interval, with how many were suppressed."""

    def __init__(self, log: Any, event: str, interval_s: float = 60.0) -> None:
        self._log = log
        self._event = event
        self._interval = interval_s
        self._last = -interval_s
        self._suppressed = 0

    def __call__(self, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._log.warning(self._event, suppressed=self._suppressed, **fields)
            self._last = now
            self._suppressed = 0
        else:
            self._suppressed += 1
