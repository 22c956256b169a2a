"""The virtual printer's firmware: its state, and how it takes lines (numbers, checksums, resends, stops).

Part of the virtual printer (`sim.py`); it shares no code with the driver.
"""

from __future__ import annotations

import abc
import asyncio
import random
import re
import time
from dataclasses import dataclass

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


def _checksum(text: str) -> int:
    value = 0
    for byte in text.encode("ascii", "replace"):
        value ^= byte
    return value


def _code(command: str) -> str:
    m = _CODE.match(command)
    return f"{m.group(1).upper()}{int(m.group(2))}" if m else command.split(" ", 1)[0].upper()


def param(args: str, letter: str) -> float | None:
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


class Firmware(abc.ABC):
    """The firmware's state and its line discipline: line numbers, checksums, resends, the stopped state.

    `say()` writes to the host (the port side, `VirtualPrinter`); `_do_<code>` handlers run the commands."""

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
        self._lines: asyncio.Queue[str] = asyncio.Queue()  # lines received, for the executor
        # The port side (`VirtualPrinter` serves it).
        self._fd: int | None = None
        self._outbuf = bytearray()
        self._inbuf = bytearray()
        self._lost: asyncio.Event = asyncio.Event()

    @abc.abstractmethod
    def say(self, *lines: str) -> None:
        """Write lines to the host (the port side, `VirtualPrinter`, does)."""

    def _stop(self, message: str) -> None:
        self._abort_print()
        self.hotend.target = self.bed.target = 0.0
        self.stopped = message
        self.say(f"Error:{message}", f"Error:{STOPPED_MESSAGE}")

    def _abort_print(self) -> None:
        self.printing = self.paused = False
        self.selected = None
        self.position = 0.0

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
            new = param(body[4:], "N")
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
