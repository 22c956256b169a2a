"""Marlin's host protocol: numbered lines with checksums, one line in flight, resends, and line parsers.

`MarlinLink` owns the byte stream of one serial connection: it frames commands as `N<n> <cmd>*<xor>`,
keeps a short history for `Resend:` requests, sends the next line only after the previous one's `ok`,
and hands every other line to a callback. What those lines mean is the printer driver's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import serial

# Commands that may legitimately run for minutes before their `ok` (homing, probing, waiting for heat,
# for moves to finish, dwelling, PID tuning): exempt from the normal ok timeout.
LONG_COMMANDS = frozenset({"G28", "G29", "M109", "M190", "M191", "M400", "G4", "M303"})

_CODE = re.compile(r"^([GMT])0*(\d+)", re.IGNORECASE)
_RESEND = re.compile(r"^(?:resend|rs)\s*:?\s*N?\s*(\d+)", re.IGNORECASE)
_BUSY = re.compile(r"(?:^|echo:)\s*busy:", re.IGNORECASE)
_TEMP_LINE = re.compile(r"^\s*(?:ok\s+)?T\d*\s*:", re.IGNORECASE)
_TEMP_FIELD = re.compile(r"(?<![A-Za-z@])([TB]\d*)\s*:\s*(-?\d+(?:\.\d+)?)(?:\s*/\s*(-?\d+(?:\.\d+)?))?")
_SD_PROGRESS = re.compile(r"SD printing byte\s+(\d+)\s*/\s*(\d+)", re.IGNORECASE)
_FIRMWARE_NAME = re.compile(r"FIRMWARE_NAME:\s*(.*?)(?=\s+[A-Z_]+:|$)")
_MACHINE_TYPE = re.compile(r"MACHINE_TYPE:\s*(.*?)(?=\s+[A-Z_]+:|$)")
_CAP = re.compile(r"^Cap:\s*([A-Za-z0-9_]+)\s*:\s*([01])\s*$")
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


@dataclass
class _Pending:
    """The one line in flight."""

    number: int
    command: str
    future: asyncio.Future[list[str]]
    long: bool
    deadline: float
    on_ok: Callable[[list[str]], None] | None = None
    response: list[str] = field(default_factory=list)


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


class MarlinLink:
    """One serial connection speaking Marlin's numbered-line protocol.

    `send()` runs one command at a time and returns the lines the printer answered before its `ok`;
    every line that is not protocol (ok, Resend, busy) also goes to `on_line`. When the port is lost or
    the printer stops answering, the link goes down once: `on_down(reason)` is called and every waiting
    or later `send()` raises ConnectionError with that reason.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        on_line: Callable[[str], None],
        on_down: Callable[[str], None],
        log: Any,
        ok_timeout_s: float,
        long_timeout_s: float,
        max_line_bytes: int,
        history_size: int = 64,
        name: str = "serial",
        count: Callable[[str], None] | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._on_line = on_line
        self._on_down = on_down
        self.log = log
        self.ok_timeout_s = ok_timeout_s
        self.long_timeout_s = long_timeout_s
        self._name = name
        self._count = count or (lambda kind: None)
        self._splitter = LineSplitter(max_line_bytes)
        self._history: OrderedDict[int, bytes] = OrderedDict()
        self._history_size = history_size
        self._lock = asyncio.Lock()
        self._line_no = 0
        self._pending: _Pending | None = None
        self._resend: deque[int] = deque()
        self._hello: asyncio.Future[bool] | None = None
        self._hello_rejected = False
        self._task: asyncio.Task[None] | None = None
        self.failure: str | None = None
        self.last_rx = time.monotonic()
        self.resends = 0
        self.skipped_lines = 0
        self._log_garbage = RateLimitedLog(log, "serial_garbage_skipped")
        self._log_overlong = RateLimitedLog(log, "serial_overlong_line_skipped")

    @property
    def up(self) -> bool:
        return self.failure is None

    def start(self) -> None:
        """Discard what the port buffered before us and start reading."""
        port = self._writer.transport.get_extra_info("serial")
        if port is not None:
            # A stale line or two left in the buffer is harmless: the handshake waits for its own ok.
            with contextlib.suppress(serial.SerialException, OSError, ValueError):
                port.reset_input_buffer()
        self._task = asyncio.create_task(self._read_loop(), name=f"serial-reader[{self._name}]")

    # -- reading

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(4096)
                if not data:
                    self.down("the serial port closed")
                    return
                before = self._splitter.overlong
                lines = self._splitter.feed(data)
                for _ in range(self._splitter.overlong - before):
                    self.skipped_lines += 1
                    self._count("overlong_line")
                    self._log_overlong(limit_bytes=self._splitter.max_len, total=self._splitter.overlong)
                for raw in lines:
                    self._dispatch(raw)
        except (serial.SerialException, OSError) as err:
            self.down(f"serial port lost: {err}")
        except Exception as err:  # a bug must not leave a half-alive link behind
            self.log.exception("serial_reader_failed")
            self.down(f"serial reader failed: {err!r}")

    def _dispatch(self, raw: bytes) -> None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.skipped_lines += 1
            self._count("garbage")
            self._log_garbage(reason="not UTF-8", sample=raw[:32].hex())
            return
        if any(ord(c) < 32 and c != "\t" for c in text):
            self.skipped_lines += 1
            self._count("garbage")
            self._log_garbage(reason="control characters", sample=raw[:32].hex())
            return
        text = text.strip()
        if not text:
            return
        self.last_rx = time.monotonic()
        pending = self._pending
        if pending is not None and pending.long:
            # A long command's printer is alive as long as it talks (temperatures while heating).
            pending.deadline = max(pending.deadline, self.last_rx + self.long_timeout_s)
        lower = text.lower()
        if lower == "ok" or (lower.startswith("ok") and text[2] in " \t:"):
            rest = text[2:].lstrip(" \t:")
            if rest:
                if pending is not None:
                    pending.response.append(rest)
                self._deliver(rest)
            self._handle_ok()
            return
        if m := _RESEND.match(text):
            self._handle_resend(int(m.group(1)))
            return
        if _BUSY.search(text):
            if pending is not None:
                pending.deadline = max(pending.deadline, self.last_rx + self.ok_timeout_s)
            return
        if pending is not None:
            pending.response.append(text)
        elif self._hello is not None and lower == "start" and not self._hello.done():
            self._hello.set_result(False)  # the board just booted: say hello again now
        self._deliver(text)

    def _deliver(self, text: str) -> None:
        try:
            self._on_line(text)
        except Exception:  # a bug in one handler must not take the link down
            self.log.exception("serial_line_handler_failed", line=text[:120])

    def _handle_ok(self) -> None:
        hello = self._hello
        if hello is not None:
            if not hello.done():
                hello.set_result(not self._hello_rejected)
            self._hello_rejected = False
            return
        pending = self._pending
        if pending is None:
            self.log.debug("serial_unexpected_ok")
            return
        if self._resend:
            self._write(self._history[self._resend.popleft()])
            pending.deadline = max(pending.deadline, time.monotonic() + self.ok_timeout_s)
            return
        self._pending = None
        if pending.on_ok is not None:
            try:
                pending.on_ok(pending.response)
            except Exception:
                self.log.exception("serial_ok_handler_failed", command=pending.command)
        if not pending.future.done():
            pending.future.set_result(pending.response)

    def _handle_resend(self, number: int) -> None:
        self.resends += 1
        self._count("resend")
        if self._hello is not None:
            self._hello_rejected = True
            return
        pending = self._pending
        if pending is None:
            self.log.debug("serial_resend_ignored", line=number)
            return
        # A request beyond the line in flight means the printer has it already (a duplicate or M999).
        number = min(number, pending.number + 1)
        if number <= pending.number and number not in self._history:
            self.down(f"printer asked to resend line {number}, which is no longer in the history")
            return
        self.log.debug("serial_resend", line=number, in_flight=pending.number)
        self._resend = deque(range(number, pending.number + 1))

    # -- writing

    def _write(self, data: bytes) -> None:
        if self.failure is None:
            self._writer.write(data)

    async def handshake(self, timeout_s: float, attempt_s: float = 2.0) -> None:
        """`M110 N0` until the printer's first clean `ok`; numbering then restarts at line 1."""
        hello_line = frame(0, "M110 N0")
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s
        writes = 0
        self._write(b"\n")  # ends whatever partial line the printer may hold
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.down(f"no answer to M110 within {timeout_s:g} s (is a printer on this port?)")
            fut: asyncio.Future[bool] = loop.create_future()
            self._hello = fut
            self._hello_rejected = False
            self._write(hello_line)
            writes += 1
            await asyncio.wait([fut], timeout=min(attempt_s, remaining))
            self._hello = None
            if self.failure is not None:
                raise ConnectionError(self.failure)
            if fut.done() and fut.result():
                break
        if writes > 1:
            # The oks of earlier hellos, if they were only slow, follow at once: let them pass while
            # nothing is in flight so they cannot be taken for the next command's ok.
            await asyncio.sleep(min(attempt_s / 4, 0.5))
        self._line_no = 0
        self._history.clear()
        self._history[0] = hello_line

    async def send(self, command: str, *, on_ok: Callable[[list[str]], None] | None = None) -> list[str]:
        """Send one command, wait for its `ok`; the answer's lines. `on_ok` runs as the ok is read."""
        async with self._lock:
            if self.failure is not None:
                raise ConnectionError(self.failure)
            self._line_no += 1
            number = self._line_no
            data = frame(number, command)
            self._history[number] = data
            while len(self._history) > self._history_size:
                self._history.popitem(last=False)
            long = is_long(command)
            fut: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
            now = time.monotonic()
            pending = _Pending(
                number, command, fut, long, now + (self.long_timeout_s if long else self.ok_timeout_s), on_ok
            )
            self._pending = pending
            self._resend.clear()
            try:
                self._write(data)
                nudged = False
                while not fut.done():
                    delay = pending.deadline - time.monotonic()
                    if delay > 0:
                        await asyncio.wait([fut], timeout=delay)
                        continue
                    if nudged:
                        waited = time.monotonic() - now
                        raise self.down(f"printer stopped answering: no ok for {command!r} after {waited:.0f} s")
                    # One nudge: the ok may have been lost. Re-sending the same numbered line is safe: a
                    # printer that has it already answers with a resend of the next line, not a rerun.
                    nudged = True
                    self._count("ok_timeout")
                    self.log.debug("serial_ok_timeout_nudge", line=number, command=command)
                    again = self._resend.popleft() if self._resend else number
                    self._write(self._history[again])
                    pending.deadline = time.monotonic() + self.ok_timeout_s
                return fut.result()
            finally:
                if self._pending is pending:
                    self._pending = None
                    self._resend.clear()

    # -- teardown

    def down(self, reason: str) -> ConnectionError:
        """Take the link down once (idempotent); the error to raise."""
        if self.failure is None:
            self.failure = reason
            pending, self._pending = self._pending, None
            for fut in (pending.future if pending else None, self._hello):
                if fut is not None and not fut.done():
                    fut.set_exception(ConnectionError(reason))
                    fut.add_done_callback(_retrieve)
            self._abort()
            self._on_down(reason)
        return ConnectionError(self.failure)

    def _abort(self) -> None:
        # A transport that closed itself after a read error must not be aborted again: that would run
        # the library's connection-lost path twice.
        transport = self._writer.transport
        if not transport.is_closing():
            transport.abort()

    async def close(self) -> None:
        """Stop reading and release the port; never raises."""
        task, self._task = self._task, None
        if self.failure is None:
            self.failure = "closed"
            pending, self._pending = self._pending, None
            if pending is not None and not pending.future.done():
                pending.future.set_exception(ConnectionError("closed"))
                pending.future.add_done_callback(_retrieve)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._abort()
        try:
            async with asyncio.timeout(5):
                await self._writer.wait_closed()
        except (Exception, TimeoutError):  # the port is gone either way
            pass


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
