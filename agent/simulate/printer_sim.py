"""A virtual Marlin 3D printer that speaks the host protocol over a pty.

It answers the handshake and M115 (with `Cap:` lines), heats towards its targets, prints files from a
virtual SD card with progress, runs streamed moves in simulated time, checks line numbers and checksums
(asking for resends), and can be told to fail: a thermal runaway, a rate of lines rejected as garbled
(or one line in N, optionally reported twice), garbage on the wire, a board reset, silence, `wait` while
idle, or the previous session's answers still coming after the host reopened the line. `simulate()`
serves it on a pty of its own, linked at the configured `serial_port`; tests can put it on one end of a
`socat` pty pair with `serve_path()`. It shares no code with the driver: it is the driver's oracle.

Faults leave the printer in Marlin's "stopped" state, which M999 clears (a real Marlin may instead halt
until power-cycled after some faults; the host sees the same error lines either way).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import re
import time
import tty
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.config import EquipmentConfig

log = structlog.get_logger("edge_agent.simulate.printer")

# Named after the MPM emulator's processes, so that a print there completes its process.
DEFAULT_FILES = {"PROC-004.GCO": 120_000, "PROC-005.GCO": 240_000, "CUBE.GCO": 60_000, "CALIB.GCO": 20_000}
DEFAULT_CAPABILITIES = {
    "SERIAL_XON_XOFF": False,
    "BINARY_FILE_TRANSFER": False,
    "EEPROM": True,
    "AUTOREPORT_TEMP": True,
    "AUTOREPORT_SD_STATUS": True,
    "PROGRESS": False,
    "PRINT_JOB": True,
    "AUTOLEVEL": False,
    "Z_PROBE": False,
    "LEVELING_DATA": False,
    "SOFTWARE_POWER": False,
    "TOGGLE_LIGHTS": False,
    "CASE_LIGHT_BRIGHTNESS": False,
    "EMERGENCY_PARSER": True,
    "HOST_ACTION_COMMANDS": False,
    "PROMPT_SUPPORT": False,
    "SDCARD": True,
    "EXTENDED_M20": False,
    "THERMAL_PROTECTION": True,
}
STOPPED_MESSAGE = (
    "Printer stopped due to errors. Fix the error and use M999 to restart."
    " (Temperature is reset. Set it after restarting)"
)
# Commands a stopped Marlin still answers.
_ALLOWED_WHEN_STOPPED = frozenset({"M110", "M115", "M105", "M155", "M27", "M20", "M21", "M999"})
_NUMBERED = re.compile(r"^N(\d+)\s*(.*?)\s*(?:\*(\d+))?\s*$")
_CODE = re.compile(r"^([GMT])0*(\d+)", re.IGNORECASE)
_MAX_INPUT_LINE = 256
_MAX_OUTPUT_BACKLOG = 64 * 1024


def _checksum(text: str) -> int:
    value = 0
    for byte in text.encode("ascii", "replace"):
        value ^= byte
    return value


def _code(command: str) -> str:
    m = _CODE.match(command)
    return f"{m.group(1).upper()}{int(m.group(2))}" if m else command.split(" ", 1)[0].upper()


def _param(args: str, letter: str) -> float | None:
    m = re.search(rf"(?:^|\s){letter}\s*(-?\d+(?:\.\d+)?)", args, re.IGNORECASE)
    return float(m.group(1)) if m else None


@dataclass
class Heater:
    """A heater: temperature moves towards the target (or ambient when off)."""

    temp: float
    target: float = 0.0

    def step(self, dt: float, ambient: float, heat_rate: float, cool_rate: float) -> None:
        goal = self.target if self.target > 0 else ambient
        if self.temp < goal:
            self.temp = min(goal, self.temp + heat_rate * dt)
        else:
            self.temp = max(goal, self.temp - cool_rate * dt)

    def power(self) -> int:
        return 127 if self.target > 0 and self.temp < self.target - 0.5 else 0


class VirtualPrinter:
    """A Marlin printer with one hotend, a bed and an SD card; serve it with `serve_path` or `serve_fd`."""

    def __init__(
        self,
        *,
        files: dict[str, int] | None = None,
        print_rate_bytes_s: float = 2_000.0,
        ambient_c: float = 21.0,
        heat_rate_c_s: float = 8.0,
        cool_rate_c_s: float = 3.0,
        capabilities: dict[str, bool] | None = None,
        m524: bool = True,
        reject_rate: float = 0.0,
        garbage_rate: float = 0.0,
        keepalive_s: float = 2.0,
        home_s: float = 1.0,
        slow_commands: dict[str, float] | None = None,
        firmware_name: str = "Marlin 2.1.2.1 (edge-agent virtual printer)",
        seed: int | None = None,
        tick_s: float = 0.1,
        corrupt_every: int = 0,
        duplicate_resends: bool = False,
        stale_after_reopen_s: float = 0.0,
        wait_when_idle_s: float = 0.0,
        move_speed_factor: float = 1.0,
    ) -> None:
        self.files = dict(DEFAULT_FILES if files is None else files)
        self.print_rate = print_rate_bytes_s
        self.ambient = ambient_c
        self.heat_rate = heat_rate_c_s
        self.cool_rate = cool_rate_c_s
        self.capabilities = dict(DEFAULT_CAPABILITIES if capabilities is None else capabilities)
        self.m524 = m524
        self.reject_rate = reject_rate
        self.garbage_rate = garbage_rate
        self.keepalive_s = keepalive_s
        self.home_s = home_s
        self.slow_commands = dict(slow_commands or {})
        self.firmware_name = firmware_name
        self.tick_s = tick_s
        self.rng = random.Random(seed)
        # One numbered line in `corrupt_every` arrives garbled; `duplicate_resends` reports each garbled line
        # twice, as Marlin often does.
        self.corrupt_every = corrupt_every
        self.duplicate_resends = duplicate_resends
        # A hello (M110) while the previous session's numbering runs: its answers go on for this long first.
        self.stale_after_reopen_s = stale_after_reopen_s
        self.wait_when_idle_s = wait_when_idle_s
        # Streamed moves take distance / feed rate, divided by this.
        self.move_speed_factor = move_speed_factor
        # Observable by tests.
        self.executed: list[str] = []
        self.received = 0
        self.rejected = 0
        self.corrupted = 0  # lines garbled on purpose (corrupt_every or reject_rate)
        self.retransmitted = 0  # numbered lines received again (a number not above the highest seen)
        self.epoch_corrupted = 0  # the same two, since the last M110 (a session's own count)
        self.epoch_retransmitted = 0
        self.hellos = 0
        self.stale_bursts = 0
        self.waits_sent = 0
        self.max_unanswered = 0  # most lines received at once and not yet answered with their `ok`
        self.moves = 0
        self.attached = asyncio.Event()
        # Machine state.
        self.hotend = Heater(ambient_c)
        self.bed = Heater(ambient_c)
        self.selected: str | None = None
        self.printing = False
        self.paused = False
        self.position = 0.0
        self.stopped: str | None = None
        self.frozen = False
        self.oks_to_lose = 0
        self._booting_until = 0.0
        self.last_n = 0
        self.temp_interval = 0.0
        self.sd_interval = 0.0
        self._next_temp = 0.0
        self._next_sd = 0.0
        self._highest_seen = 0
        self._previous_last_n = 0
        self._relative = False
        self._numbered_seen = 0
        self._unanswered = 0
        self._last_input = time.monotonic()
        self._next_wait = 0.0
        self._busy_now = False
        self._axes = {"X": 0.0, "Y": 0.0, "Z": 0.0, "E": 0.0}
        self._feed_mm_s = 50.0
        self._fd: int | None = None
        self._outbuf = bytearray()
        self._inbuf = bytearray()
        self._lines: asyncio.Queue[str] = asyncio.Queue()
        self._lost: asyncio.Event = asyncio.Event()

    # -- serving

    async def serve_path(self, path: str | os.PathLike[str]) -> None:
        """Serve on the tty at `path` (one end of a socat pair); reopen it whenever it goes away."""
        async with self._running():
            while True:
                try:
                    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                with contextlib.suppress(OSError):
                    tty.setraw(fd)
                try:
                    await self._attach(fd)
                finally:
                    os.close(fd)
                await asyncio.sleep(0.05)

    async def serve_fd(self, fd: int) -> None:
        """Serve on an open pty master (whose slave stays open elsewhere, so it never reads EIO)."""
        async with self._running():
            while True:
                await self._attach(fd)
                await asyncio.sleep(0.2)  # no peer on the other side for now: look again shortly

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        tasks = [
            asyncio.create_task(self._physics(), name="printer-sim-physics"),
            asyncio.create_task(self._executor(), name="printer-sim-executor"),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _attach(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        self._fd = fd
        self._outbuf.clear()
        self._inbuf.clear()
        self._lost = asyncio.Event()
        loop.add_reader(fd, self._on_readable)
        self.attached.set()
        try:
            await self._lost.wait()
        finally:
            self.attached.clear()
            loop.remove_reader(fd)
            loop.remove_writer(fd)
            self._fd = None

    def _on_readable(self) -> None:
        if self._fd is None:
            return
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            self._lost.set()
            return
        if not data:
            self._lost.set()
            return
        if self.frozen or time.monotonic() < self._booting_until:
            return  # a hung or booting board hears nothing
        self._inbuf += data
        while (i := self._inbuf.find(b"\n")) >= 0:
            raw = bytes(self._inbuf[:i]).strip(b"\r ")
            del self._inbuf[: i + 1]
            if raw:
                self._last_input = time.monotonic()
                self._unanswered += 1
                self.max_unanswered = max(self.max_unanswered, self._unanswered)
                self._lines.put_nowait(raw.decode("ascii", "replace"))
        if len(self._inbuf) > _MAX_INPUT_LINE:
            self._inbuf.clear()

    def _send_bytes(self, data: bytes) -> None:
        if self._fd is None:
            return  # a printer talks into the void when nobody listens
        if self._outbuf:
            # Nobody is reading: drop like a UART would rather than buffer without bound.
            if len(self._outbuf) < _MAX_OUTPUT_BACKLOG:
                self._outbuf += data
            return
        try:
            n = os.write(self._fd, data)
        except BlockingIOError:
            n = 0
        except OSError as err:
            if err.errno != errno.EAGAIN:
                self._lost.set()
                return
            n = 0
        if n < len(data):
            self._outbuf += data[n:]
            asyncio.get_running_loop().add_writer(self._fd, self._flush)

    def _flush(self) -> None:
        if self._fd is None:
            return
        try:
            n = os.write(self._fd, self._outbuf)
        except BlockingIOError:
            return
        except OSError:
            self._lost.set()
            return
        del self._outbuf[:n]
        if not self._outbuf:
            asyncio.get_running_loop().remove_writer(self._fd)

    def say(self, *lines: str) -> None:
        """Write lines to the host (dropped while frozen or unattached)."""
        if self.frozen:
            return
        for line in lines:
            if line == "ok" and self.oks_to_lose > 0:
                self.oks_to_lose -= 1
                continue
            if self.garbage_rate and self.rng.random() < self.garbage_rate:
                self.inject_garbage("bytes")
            self._send_bytes(line.encode("utf-8") + b"\n")

    # -- fault injection

    def inject_thermal_runaway(self, heater: str = "hotend") -> None:
        """Thermal protection trips: error lines, print aborted, heaters off, stopped until M999."""
        heater_id = "0" if heater == "hotend" else "bed"
        self._stop(f"Thermal Runaway, system stopped! Heater_ID: {heater_id}")

    def inject_garbage(self, kind: str = "bytes") -> None:
        """Line noise: `bytes` (random binary), `overlong` (a line of 5000 bytes), `non_utf8`."""
        if kind == "bytes":
            noise = bytes(self.rng.choice([b for b in range(256) if b not in (10, 13)]) for _ in range(24))
            self._send_bytes(noise + b"\n")
        elif kind == "overlong":
            self._send_bytes(b"echo:" + b"X" * 5000 + b"\n")
        elif kind == "non_utf8":
            self._send_bytes(b"echo:\xff\xfe\xc3\x28 bad bytes\n")
        else:
            raise ValueError(f"unknown garbage kind {kind!r}")

    def reset_board(self, boot_s: float = 0.0) -> None:
        """The board resets (DTR, watchdog): the print is lost; after `boot_s` deaf seconds it says `start`."""
        self._abort_print()
        self.hotend.target = self.bed.target = 0.0
        self.stopped = None
        self.last_n = 0
        self.temp_interval = self.sd_interval = 0.0
        if boot_s > 0:
            self._booting_until = time.monotonic() + boot_s
            asyncio.get_running_loop().call_later(boot_s, self._announce_start)
        else:
            self._announce_start()

    def _announce_start(self) -> None:
        self.say("start", f"echo:{self.firmware_name}", "echo: Last Updated: virtual", "echo:SD card ok")

    def lose_oks(self, count: int = 1) -> None:
        """Swallow the next `count` acknowledgements, as a noisy line might."""
        self.oks_to_lose += count

    def panel_print(self, name: str) -> None:
        """Start printing a file from the printer's own panel, without the host."""
        if name not in self.files:
            raise KeyError(name)
        self.selected = name
        self.position = 0.0
        self.printing = True
        self.paused = False

    def freeze(self) -> None:
        """Stop answering anything (a hung firmware) until `thaw()`."""
        self.frozen = True

    def thaw(self) -> None:
        self.frozen = False

    def _stop(self, message: str) -> None:
        self._abort_print()
        self.hotend.target = self.bed.target = 0.0
        self.stopped = message
        self.say(f"Error:{message}", f"Error:{STOPPED_MESSAGE}")

    def _abort_print(self) -> None:
        self.printing = self.paused = False
        self.selected = None
        self.position = 0.0

    # -- time passing

    async def _physics(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.tick_s)
            now = time.monotonic()
            dt, last = now - last, now
            self.hotend.step(dt, self.ambient, self.heat_rate, self.cool_rate)
            self.bed.step(dt, self.ambient, self.heat_rate / 2, self.cool_rate / 2)
            if self.printing and not self.paused and self.selected is not None:
                size = self.files[self.selected]
                self.position = min(float(size), self.position + self.print_rate * dt)
                if self.position >= size:
                    self.printing = False
                    self.selected = None
                    self.position = 0.0
                    self.say("Done printing file")
            if self.temp_interval and now >= self._next_temp:
                self._next_temp = now + self.temp_interval
                self.say(" " + self._temperatures())
            if self.sd_interval and now >= self._next_sd:
                self._next_sd = now + self.sd_interval
                self.say(self._sd_status())
            if self._waiting_idle(now):
                self._next_wait = now + self.wait_when_idle_s
                self.waits_sent += 1
                self.say("wait")

    def _waiting_idle(self, now: float) -> bool:
        """Marlin says `wait` when its queue is empty and no line came for a while."""
        return (
            self.wait_when_idle_s > 0
            and not self._busy_now
            and self._lines.empty()
            and now - self._last_input >= self.wait_when_idle_s
            and now >= self._next_wait
        )

    def _temperatures(self) -> str:
        h, b = self.hotend, self.bed
        return f"T:{h.temp:.2f} /{h.target:.2f} B:{b.temp:.2f} /{b.target:.2f} @:{h.power()} B@:{b.power()}"

    def _sd_status(self) -> str:
        if self.selected is not None and self.printing:
            return f"SD printing byte {int(self.position)}/{self.files[self.selected]}"
        return "Not SD printing"

    # -- the command interpreter

    async def _executor(self) -> None:
        while True:
            line = await self._lines.get()
            if self.frozen:
                continue
            self.received += 1
            self._busy_now = True
            try:
                command = self._accept(line)
                if command is not None:
                    await self._execute(command)
            finally:
                # Every line gets exactly one `ok` (its answer or its rejection's), so it is answered now.
                self._busy_now = False
                self._unanswered = max(0, self._unanswered - 1)

    def _accept(self, line: str) -> str | None:
        """Check line number and checksum; the command to run, or None after asking for a resend."""
        if not line.startswith("N"):
            return line
        m = _NUMBERED.match(line)
        if m is None:
            self._reject(f"Format error, Last Line: {self.last_n}")
            return None
        number, body, given = int(m.group(1)), m.group(2), m.group(3)
        hello = _code(body) == "M110"
        if not hello:
            if number <= self._highest_seen:
                self.retransmitted += 1
                self.epoch_retransmitted += 1
            self._highest_seen = max(self._highest_seen, number)
        if given is None:
            self._reject(f"No Checksum with line number, Last Line: {self.last_n}")
            return None
        if _checksum(line[: line.rindex("*")]) != int(given):
            self._reject(f"checksum mismatch, Last Line: {self.last_n}")
            return None
        self._numbered_seen += 1
        garbled = self.corrupt_every > 0 and self._numbered_seen % self.corrupt_every == 0
        if garbled or (self.reject_rate and self.rng.random() < self.reject_rate):
            # As if a byte had been garbled on the wire.
            self.corrupted += 1
            self.epoch_corrupted += 1
            self._reject(f"checksum mismatch, Last Line: {self.last_n}", twice=self.duplicate_resends)
            return None
        if hello:
            self._previous_last_n = self.last_n
            new = _param(body[4:], "N")
            self.last_n = int(new) if new is not None else number
            self._highest_seen = self.last_n
            self.epoch_corrupted = self.epoch_retransmitted = 0
        elif number != self.last_n + 1:
            self._reject(f"Line Number is not Last Line Number+1, Last Line: {self.last_n}")
            return None
        else:
            self.last_n = number
        return body

    def _reject(self, message: str, *, twice: bool = False) -> None:
        self.rejected += 1
        for _ in range(2 if twice else 1):
            self.say(f"Error:{message}", f"Resend: {self.last_n + 1}", "ok")

    async def _execute(self, command: str) -> None:
        code = _code(command)
        args = command[len(command.split(" ", 1)[0]) :].strip()
        if code == "M110" and self.stale_after_reopen_s > 0 and self._previous_last_n > 1:
            await self._answer_previous_session(self._previous_last_n)
        if self.stopped is not None and code not in _ALLOWED_WHEN_STOPPED:
            self.say(f"Error:{STOPPED_MESSAGE}", "ok")
            return
        self.executed.append(command)
        if code in self.slow_commands:
            await self._busy(self.slow_commands[code])
        handler = getattr(self, f"_do_{code}", None)
        if handler is not None:
            await handler(args)
        elif code in ("G90", "G91", "M82", "M83", "M84", "M18", "M106", "M107", "M117", "M400"):
            self._relative = code == "G91" if code in ("G90", "G91") else self._relative
            self.say("ok")
        else:
            self.say(f'echo:Unknown command: "{command}"', "ok")

    async def _busy(self, seconds: float) -> None:
        """Work for a while, saying `busy:` as Marlin's host keepalive does."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, self.keepalive_s))
            if time.monotonic() < end:
                self.say("echo:busy: processing")

    async def _wait_heat(self, heater: Heater) -> None:
        end = time.monotonic() + 300
        while abs(heater.temp - heater.target) > 1.0 and heater.target > 0 and time.monotonic() < end:
            if self.stopped is not None:
                return
            await asyncio.sleep(min(1.0, self.keepalive_s))
            self.say(f" {self._temperatures()} W:?")

    async def _do_M110(self, args: str) -> None:
        self.hellos += 1
        self.say("ok")

    async def _answer_previous_session(self, last_n: int) -> None:
        """Before a new session's hello: the old session's lines, still in the buffers, get their answers."""
        self.stale_bursts += 1
        end = time.monotonic() + self.stale_after_reopen_s
        n = last_n
        while time.monotonic() < end:
            n += 1
            self.say(
                "ok",
                f"Error:Line Number is not Last Line Number+1, Last Line: {last_n}",
                f"Resend: {last_n + 1}",
                "ok",
                "echo:busy: processing",
                f"ok T:{self.hotend.temp:.2f} /{self.hotend.target:.2f}",
                "wait",
            )
            await asyncio.sleep(0.05)

    async def _do_M118(self, args: str) -> None:
        text = args
        prefix = ""
        while m := re.match(r"^([AEP])(\d)\s*", text):
            if m.group(1) == "E" and m.group(2) == "1":
                prefix = "echo:"
            text = text[m.end() :]
        self.say(prefix + text, "ok")

    async def _do_M115(self, args: str) -> None:
        self.say(
            f"FIRMWARE_NAME:{self.firmware_name} SOURCE_CODE_URL:local PROTOCOL_VERSION:1.0 "
            "MACHINE_TYPE:Virtual Printer EXTRUDER_COUNT:1 UUID:00000000-0000-4000-8000-000000000001"
        )
        self.say(*(f"Cap:{name}:{int(on)}" for name, on in self.capabilities.items()))
        self.say("ok")

    async def _do_M105(self, args: str) -> None:
        self.say(f"ok {self._temperatures()}")

    async def _do_M155(self, args: str) -> None:
        if not self.capabilities.get("AUTOREPORT_TEMP"):
            self.say('echo:Unknown command: "M155"', "ok")
            return
        self.temp_interval = max(0.0, _param(args, "S") or 0.0)
        self._next_temp = time.monotonic()
        self.say("ok")

    async def _do_M27(self, args: str) -> None:
        interval = _param(args, "S")
        if interval is not None:
            if self.capabilities.get("AUTOREPORT_SD_STATUS"):
                self.sd_interval = max(0.0, interval)
                self._next_sd = time.monotonic()
        elif re.search(r"(?:^|\s)C\b", args, re.IGNORECASE):
            self.say(f"Current file: {self.selected} {self.selected}" if self.selected else "Current file: (no file)")
        else:
            self.say(self._sd_status())
        self.say("ok")

    async def _do_M20(self, args: str) -> None:
        self.say("Begin file list", *(f"{name} {size}" for name, size in self.files.items()), "End file list", "ok")

    async def _do_M21(self, args: str) -> None:
        self.say("echo:SD card ok", "ok")

    async def _do_M23(self, args: str) -> None:
        name = args.strip()
        if name in self.files:
            self.printing = self.paused = False
            self.selected = name
            self.position = 0.0
            size = self.files[name]
            self.say(f"echo:Now fresh file: {name}", f"File opened: {name} Size: {size}", "File selected", "ok")
        else:
            self.say(f"echo:open failed, File: {name}.", "ok")

    async def _do_M24(self, args: str) -> None:
        if self.selected is not None:
            self.printing = True
            self.paused = False
        self.say("ok")

    async def _do_M25(self, args: str) -> None:
        if self.printing:
            self.paused = True
        self.say("ok")

    async def _do_M26(self, args: str) -> None:
        pos = _param(args, "S")
        if pos is not None and self.selected is not None:
            self.position = max(0.0, min(pos, float(self.files[self.selected])))
        self.say("ok")

    async def _do_M524(self, args: str) -> None:
        if not self.m524:
            self.say('echo:Unknown command: "M524"', "ok")
            return
        self._abort_print()
        self.say("ok")

    async def _do_M104(self, args: str) -> None:
        self.hotend.target = max(0.0, _param(args, "S") or 0.0)
        self.say("ok")

    async def _do_M140(self, args: str) -> None:
        self.bed.target = max(0.0, _param(args, "S") or 0.0)
        self.say("ok")

    async def _do_M109(self, args: str) -> None:
        self.hotend.target = max(0.0, _param(args, "S") or _param(args, "R") or 0.0)
        await self._wait_heat(self.hotend)
        self.say("ok")

    async def _do_M190(self, args: str) -> None:
        self.bed.target = max(0.0, _param(args, "S") or _param(args, "R") or 0.0)
        await self._wait_heat(self.bed)
        self.say("ok")

    async def _do_G0(self, args: str) -> None:
        await self._do_G1(args)

    async def _do_G1(self, args: str) -> None:
        """A move: it takes its distance over the feed rate (scaled), saying busy if that is long."""
        feed = _param(args, "F")
        if feed is not None and feed > 0:
            self._feed_mm_s = feed / 60.0
        squared = 0.0
        for axis, now in self._axes.items():
            value = _param(args, axis)
            if value is None:
                continue
            target = now + value if self._relative else value
            if axis != "E":
                squared += (target - now) ** 2
            self._axes[axis] = target
        self.moves += 1
        seconds = squared**0.5 / self._feed_mm_s / self.move_speed_factor
        if seconds > 0:
            await self._busy(seconds)
        self.say("ok")

    async def _do_G92(self, args: str) -> None:
        for axis in self._axes:
            value = _param(args, axis)
            if value is not None:
                self._axes[axis] = value
        self.say("ok")

    async def _do_G28(self, args: str) -> None:
        await self._busy(self.home_s)
        self.say("ok")

    async def _do_G29(self, args: str) -> None:
        await self._busy(self.home_s * 2)
        self.say("ok")

    async def _do_G4(self, args: str) -> None:
        ms = _param(args, "P")
        s = _param(args, "S")
        await self._busy((ms or 0.0) / 1000 + (s or 0.0))
        self.say("ok")

    async def _do_M999(self, args: str) -> None:
        self.stopped = None
        # Marlin flushes its queue and asks for the line after M999, then acknowledges.
        self.say(f"Resend: {self.last_n + 1}", "ok")


def _open_linked_pty(link: Path) -> tuple[int, int, str]:
    """A new pty (master, slave, slave name) with `link` made a symlink to its slave."""
    if link.exists() and not link.is_symlink():
        raise FileExistsError(f"{link} exists and is not a symlink; refusing to replace it with the virtual printer")
    master, slave = os.openpty()
    # The slave stays open in the simulator so that the master never reads EIO while no driver has it open.
    tty.setraw(slave)
    os.set_blocking(master, False)
    name = os.ttyname(slave)
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(name, tmp)
    os.replace(tmp, link)
    return master, slave, name


def _remove_link(link: Path, name: str) -> None:
    with contextlib.suppress(OSError):
        if os.readlink(link) == name:
            link.unlink()


async def simulate(equipment: EquipmentConfig, state_dir: Path) -> None:
    """Serve a virtual printer on a new pty whose name is linked at the equipment's `serial_port`."""
    link = Path(equipment.connection.serial_port)
    master, slave, name = _open_linked_pty(link)
    log.info("printer_simulator_ready", equipment_id=equipment.id, port=str(link), pty=name)
    try:
        await VirtualPrinter().serve_fd(master)
    finally:
        _remove_link(link, name)
        os.close(master)
        os.close(slave)
