"""What the virtual printer's G-codes do: the handshake, M115, temperatures, the SD card, moves, M999.

Part of the virtual printer (`sim.py`); it shares no code with the driver.
"""

from __future__ import annotations

import re
import time

from drivers.printer.sim_firmware import Firmware, param


class GcodeFirmware(Firmware):
    """The firmware's command handlers, one `_do_<code>` per G-code it knows."""

    async def _do_M110(self, args: str) -> None:
        self.hellos += 1
        self.say("ok")

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
        self.temp_interval = max(0.0, param(args, "S") or 0.0)
        self._next_temp = time.monotonic()
        self.say("ok")

    async def _do_M27(self, args: str) -> None:
        interval = param(args, "S")
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
        pos = param(args, "S")
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
        self.hotend.target = max(0.0, param(args, "S") or 0.0)
        self.say("ok")

    async def _do_M140(self, args: str) -> None:
        self.bed.target = max(0.0, param(args, "S") or 0.0)
        self.say("ok")

    async def _do_M109(self, args: str) -> None:
        self.hotend.target = max(0.0, param(args, "S") or param(args, "R") or 0.0)
        await self._wait_heat(self.hotend)
        self.say("ok")

    async def _do_M190(self, args: str) -> None:
        self.bed.target = max(0.0, param(args, "S") or param(args, "R") or 0.0)
        await self._wait_heat(self.bed)
        self.say("ok")

    async def _do_G0(self, args: str) -> None:
        await self._do_G1(args)

    async def _do_G1(self, args: str) -> None:
        """A move: it takes its distance over the feed rate (scaled), saying busy if that is long."""
        feed = param(args, "F")
        if feed is not None and feed > 0:
            self._feed_mm_s = feed / 60.0
        squared = 0.0
        for axis, now in self._axes.items():
            value = param(args, axis)
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
            value = param(args, axis)
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
        ms = param(args, "P")
        s = param(args, "S")
        await self._busy((ms or 0.0) / 1000 + (s or 0.0))
        self.say("ok")

    async def _do_M999(self, args: str) -> None:
        self.stopped = None
        # Marlin flushes its queue and asks for the line after M999, then acknowledges.
        self.say(f"Resend: {self.last_n + 1}", "ok")
