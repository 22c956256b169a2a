"""Marlin's host protocol: numbered lines with checksums, a window of lines in flight, resends, and line parsers.

`MarlinLink` owns the byte stream of one serial connection: it resynchronises at open (the previous
session's answers may still be coming), frames commands as `N<n> <cmd>*<xor>`, keeps a history for
`Resend:` requests, writes at most `max_in_flight` lines ahead of their `ok`s, and hands every other line
to a callback. What those lines mean is the printer driver's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import serial

# Commands that may legitimately run for minutes before their `ok` (homing, probing, waiting for heat,
# for moves to finish, dwelling, PID tuning): exempt from the normal ok timeout.
# The word before the token of the marker line that ends the resynchronisation at open.
SYNC_WORD = "edge-agent-sync"
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


@dataclass
class _Pending:
    """One command on its way: queued, written (awaiting its `ok`), or rewound for a resend."""

    command: str
    future: asyncio.Future[list[str]] | None
    long: bool
    on_ok: Callable[[list[str]], None] | None = None
    number: int | None = None
    first_written: float | None = None
    response: list[str] = field(default_factory=list)


@dataclass
class _Sync:
    """The resynchronisation at open: everything is stale until the marker's echo, then its `ok` ends it."""

    token: str
    future: asyncio.Future[bool]
    seen: bool = False


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

    `handshake()` resynchronises after an open: `M110 N0` and a marker line with a fresh token, written
    together (the marker's answer is the only one that can be told from a previous session's); every line
    before the marker's echo belongs to a previous session and is ignored. Then `send()`/`submit()` queue
    commands, of which up to `max_in_flight` are written ahead of their `ok`s (Marlin answers in order, so
    an `ok` acknowledges the oldest line written). A `Resend: N` rewinds to line N and writes each line
    from there once more; a second request for the same line before any line from there is acknowledged
    is a duplicate and ignored (so a resent line garbled once more is recovered by the timeout's nudge).
    Every rejection carries an `ok` of its own, which acknowledges nothing.
    `wait` never makes the link send; `busy:` extends the timeout. When the port is lost or the printer
    stops answering (no `ok` within the timeout, twice, a nudge between), the link goes down once:
    `on_down(reason)` runs and every waiting or later `send()` raises ConnectionError with that reason.
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
        max_in_flight: int = 1,
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
        self.max_in_flight = max(1, max_in_flight)
        self._name = name
        self._count = count or (lambda kind: None)
        self._splitter = LineSplitter(max_line_bytes)
        # Enough history for every line that can be in flight, several times over.
        self._history_size = max(history_size, 8 * self.max_in_flight)
        self._history: OrderedDict[int, str] = OrderedDict()
        self._line_no = 0  # the last number given to a line
        self._new: deque[_Pending] = deque()  # queued, not numbered yet
        self._rewound: list[_Pending] = []  # numbered, to be written again (ascending)
        self._out: deque[_Pending] = deque()  # written, awaiting their ok (ascending)
        self._swallow = 0  # oks still to come for rejected lines: they acknowledge nothing
        # Lines written after a rejected one, before the resend request: the printer refuses each (another
        # request for the same line, with its ok) or drops it unread. They hold their place in the window
        # until then, or until a resent line is acknowledged (the printer answers in order).
        self._stale_tx = 0
        self._rewound_to: int | None = None  # the line of the last resend request acted on, until acknowledged
        self._deadline: float | None = None
        self._armed = asyncio.Event()
        self._nudged = False
        self._sync: _Sync | None = None
        self._synced = False
        self._task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.failure: str | None = None
        self.last_rx = time.monotonic()
        self.resends = 0  # resend requests received (duplicates included)
        self.lines_resent = 0  # lines written again (for a resend request or a nudge)
        self.skipped_lines = 0
        self.stale_lines = 0
        self.waits = 0
        self._log_garbage = RateLimitedLog(log, "serial_garbage_skipped")
        self._log_overlong = RateLimitedLog(log, "serial_overlong_line_skipped")

    @property
    def up(self) -> bool:
        return self.failure is None

    @property
    def in_flight(self) -> int:
        """Lines the printer has not answered yet (written ones and rejections still owing their ok)."""
        return len(self._out) + self._swallow + self._stale_tx

    def start(self) -> None:
        """Discard what the port buffered before us and start reading."""
        port = self._writer.transport.get_extra_info("serial")
        if port is not None:
            # Only what the OS buffered: what the printer still sends is sorted out by the handshake's marker.
            with contextlib.suppress(serial.SerialException, OSError, ValueError):
                port.reset_input_buffer()
        self._task = asyncio.create_task(self._read_loop(), name=f"serial-reader[{self._name}]")
        self._watchdog = asyncio.create_task(self._watch(), name=f"serial-watchdog[{self._name}]")

    # -- reading

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(4096)
                if not data:
                    self.down("the serial port closed")
                    return
                self.feed(data)
        except (serial.SerialException, OSError) as err:
            self.down(f"serial port lost: {err}")
        except Exception as err:  # a bug must not leave a half-alive link behind
            self.log.exception("serial_reader_failed")
            self.down(f"serial reader failed: {err!r}")

    def feed(self, data: bytes) -> None:
        """Handle received bytes: every complete line is understood, or logged and skipped."""
        before = self._splitter.overlong
        lines = self._splitter.feed(data)
        for _ in range(self._splitter.overlong - before):
            self.skipped_lines += 1
            self._count("overlong_line")
            self._log_overlong(limit_bytes=self._splitter.max_len, total=self._splitter.overlong)
        for raw in lines:
            if self.failure is not None:
                return
            self._dispatch(raw)

    def _dispatch(self, raw: bytes) -> None:
        text = decode_line(raw)
        if text is None:
            self.skipped_lines += 1
            self._count("garbage")
            self._log_garbage(reason="not UTF-8 or control characters", sample=raw[:32].hex())
            return
        if not text:
            return
        self.last_rx = time.monotonic()
        response = parse_response(text)
        if self._sync is not None and not self._sync.future.done():
            self._during_sync(self._sync, response)
            return
        if self._out and self._out[0].long and self._deadline is not None:
            # A long command's printer is alive as long as it talks (temperatures while heating).
            self._deadline = max(self._deadline, self.last_rx + self.long_timeout_s)
        kind = response.kind
        if kind == "ok":
            self._handle_ok(response.text)
        elif kind == "resend":
            self._handle_resend(response.number or 0, text)
        elif kind == "busy":
            if self._deadline is not None:
                self._deadline = max(self._deadline, self.last_rx + self._timeout_of(self._oldest()))
        elif kind == "wait":
            self.waits += 1  # the printer's queue is empty: a hint, never a reason to send
        else:
            if self._out and not (text.lower().startswith("error:") and is_comm_complaint(text)):
                self._out[0].response.append(text)
            self._deliver(text)

    def _during_sync(self, sync: _Sync, response: Response) -> None:
        if not sync.seen:
            if sync.token in response.text:
                sync.seen = True  # the marker's echo (or a complaint naming it): what follows is ours
            elif response.kind == "start":
                sync.future.set_result(False)  # the board just booted: say hello again now
            else:
                self.stale_lines += 1
            return
        if response.kind == "ok":
            sync.future.set_result(True)
        elif response.kind == "line":
            self._deliver(response.text)

    def _deliver(self, text: str) -> None:
        try:
            self._on_line(text)
        except Exception:  # a bug in one handler must not take the link down
            self.log.exception("serial_line_handler_failed", line=text[:120])

    def _handle_ok(self, rest: str) -> None:
        if self._swallow > 0:
            # The ok that closes a rejection: the rejected line's place in the printer's buffer is free.
            self._swallow -= 1
            if rest:
                self._deliver(rest)
            self._refresh_deadline()
            self._pump()
            return
        if not self._out:
            if rest:
                self._deliver(rest)
            self.log.debug("serial_unexpected_ok")
            return
        pending = self._out.popleft()
        self._nudged = False
        if self._rewound_to is not None and pending.number is not None and pending.number >= self._rewound_to:
            self._rewound_to = None  # the resend got through: a new request for that line is a new fault
            self._stale_tx = 0  # and whatever was written before it has been answered or dropped
        if rest:
            pending.response.append(rest)
            self._deliver(rest)
        self._refresh_deadline()
        if pending.on_ok is not None:
            try:
                pending.on_ok(pending.response)
            except Exception:
                self.log.exception("serial_ok_handler_failed", command=pending.command)
        if pending.future is not None and not pending.future.done():
            pending.future.set_result(pending.response)
        self._pump()

    def _handle_resend(self, number: int, text: str) -> None:
        self.resends += 1
        self._count("resend")
        if number > self._line_no:
            # The printer has every line we wrote (after M999, or a nudge for a line whose ok was lost):
            # nothing to write again, and the ok that follows is the line's own.
            self.log.debug("serial_resend_nothing_to_do", line=number, last_written=self._line_no)
            return
        if not (self._out or self._rewound or self._swallow):
            # Nothing of ours is in the printer: a leftover or a garbled line; the ok after it is unexpected.
            self.log.debug("serial_resend_unsolicited", line=number)
            return
        self._swallow += 1
        if number == self._rewound_to:
            self._stale_tx = max(0, self._stale_tx - 1)  # its place in the window now waits for this ok
            self.log.debug("serial_resend_duplicate_ignored", line=number)
            return
        if number not in self._history:
            self.down(f"printer asked to resend line {number}, which is no longer in the history")
            return
        self.log.debug("serial_resend", line=number, last_written=self._line_no)
        keep = deque(p for p in self._out if p.number is not None and p.number < number)
        again = {p.number: p for p in (*self._out, *self._rewound) if p.number is not None and p.number >= number}
        for n in range(number, self._line_no + 1):
            # Lines from there that were acknowledged already (an ok taken for theirs) go again too: the
            # printer says it has none of them.
            if n not in again and n in self._history:
                again[n] = _Pending(self._history[n], None, is_long(self._history[n]), number=n)
        self._stale_tx += sum(1 for p in self._out if p.number is not None and p.number > number)
        self._out = keep
        self._rewound = [again[n] for n in sorted(again)]
        self._rewound_to = number
        self._refresh_deadline()
        self._pump()

    # -- writing

    def _write(self, data: bytes) -> None:
        if self.failure is None:
            self._writer.write(data)

    def _pump(self) -> None:
        """Write what the window allows: lines to resend first, then new commands."""
        if not self._synced or self.failure is not None:
            return
        if not (self._out or self._swallow or self._rewound):
            self._stale_tx = 0  # everything of ours is answered: nothing stale can still hold a place
        while self.in_flight < self.max_in_flight:
            if self._rewound:
                pending = self._rewound.pop(0)
                self.lines_resent += 1
            else:
                while self._new and self._new[0].future is not None and self._new[0].future.done():
                    self._new.popleft()  # its sender gave up before it was written
                if not self._new:
                    return
                pending = self._new.popleft()
                self._line_no += 1
                pending.number = self._line_no
                self._history[pending.number] = pending.command
                while len(self._history) > self._history_size:
                    self._history.popitem(last=False)
            assert pending.number is not None
            self._write(frame(pending.number, pending.command))
            if pending.first_written is None:
                pending.first_written = time.monotonic()
            self._out.append(pending)
            if self._deadline is None:
                self._refresh_deadline()

    def _oldest(self) -> _Pending | None:
        if self._out:
            return self._out[0]
        return self._rewound[0] if self._rewound else None

    def _timeout_of(self, pending: _Pending | None) -> float:
        return self.long_timeout_s if pending is not None and pending.long else self.ok_timeout_s

    def _refresh_deadline(self) -> None:
        """A fresh deadline while the printer owes an answer; none while it owes nothing."""
        if self._out or self._swallow or self._rewound:
            self._deadline = time.monotonic() + self._timeout_of(self._oldest())
            self._armed.set()
        else:
            self._deadline = None

    async def _watch(self) -> None:
        while self.failure is None:
            deadline = self._deadline
            if deadline is None:
                self._armed.clear()
                await self._armed.wait()
                continue
            delay = deadline - time.monotonic()
            if delay > 0:
                await asyncio.sleep(min(delay, 0.25))
                continue
            self._on_timeout()

    def _on_timeout(self) -> None:
        oldest = self._oldest()
        if self._nudged or oldest is None:
            command = oldest.command if oldest is not None else "a rejected line"
            waited = time.monotonic() - (oldest.first_written or 0.0) if oldest is not None else 0.0
            self.down(f"printer stopped answering: no ok for {command!r} after {waited:.0f} s")
            return
        # One nudge: the ok (or the line) may have been lost. Writing the same numbered lines again is safe:
        # a printer that has them already asks for the line after them instead of running them twice.
        self._nudged = True
        self._count("ok_timeout")
        self.log.debug("serial_ok_timeout_nudge", line=oldest.number, command=oldest.command)
        self._rewound = sorted((*self._out, *self._rewound), key=lambda p: p.number or 0)
        self._out.clear()
        self._swallow = self._stale_tx = 0
        self._rewound_to = None
        self._refresh_deadline()
        self._pump()

    async def handshake(self, timeout_s: float, attempt_s: float = 2.0) -> None:
        """`M110 N0` and a marker with a fresh token, until the marker's echo and ok; numbering goes on from 1.

        Lines before the echo (the previous session's answers still coming, a boot banner) are ignored."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s
        self._write(b"\n")  # ends whatever partial line the printer may hold
        hello = "M110 N0"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.down(f"no answer to M110 within {timeout_s:g} s (is a printer on this port?)")
            token = secrets.token_hex(6)
            marker = f"M118 E1 {SYNC_WORD} {token}"
            fut: asyncio.Future[bool] = loop.create_future()
            self._sync = _Sync(token, fut)
            self._write(frame(0, hello) + frame(1, marker))
            await asyncio.wait([fut], timeout=min(attempt_s, remaining))
            self._sync = None
            if self.failure is not None:
                raise ConnectionError(self.failure)
            if fut.done() and fut.result():
                break
            if self.stale_lines:
                self.log.debug("serial_resync_retry", stale_lines=self.stale_lines)
        self.log.info("serial_resynchronised", lines_skipped=self.stale_lines)
        self._line_no = 1
        self._history.clear()
        self._history[0] = hello
        self._history[1] = marker
        self._synced = True
        self._pump()

    def submit(self, command: str, *, on_ok: Callable[[list[str]], None] | None = None) -> asyncio.Future[list[str]]:
        """Queue one command; the future of its answer (the lines before its `ok`). `on_ok` runs at the ok."""
        if self.failure is not None:
            raise ConnectionError(self.failure)
        fut: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._new.append(_Pending(command, fut, is_long(command), on_ok))
        self._pump()
        return fut

    async def send(self, command: str, *, on_ok: Callable[[list[str]], None] | None = None) -> list[str]:
        """Send one command and wait for its `ok`; the answer's lines. `on_ok` runs as the ok is read."""
        return await self.submit(command, on_ok=on_ok)

    # -- teardown

    def _fail_all(self, reason: str) -> None:
        pendings = [*self._out, *self._rewound, *self._new]
        self._out.clear()
        self._rewound.clear()
        self._new.clear()
        self._deadline = None
        self._armed.set()
        futures = [p.future for p in pendings] + [self._sync.future if self._sync else None]
        for fut in futures:
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError(reason))
                fut.add_done_callback(_retrieve)

    def down(self, reason: str) -> ConnectionError:
        """Take the link down once (idempotent); the error to raise."""
        if self.failure is None:
            self.failure = reason
            self._fail_all(reason)
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
        tasks = [t for t in (self._task, self._watchdog) if t is not None]
        self._task = self._watchdog = None
        if self.failure is None:
            self.failure = "closed"
            self._fail_all("closed")
        me = asyncio.current_task()
        for task in tasks:
            if task is not me:
                task.cancel()
        await asyncio.gather(*(t for t in tasks if t is not me), return_exceptions=True)
        self._abort()
        try:
            async with asyncio.timeout(5):
                await self._writer.wait_closed()
        except (Exception, TimeoutError):  # the port is gone either way
            pass


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
