"""A virtual Marlin 3D printer that speaks the host protocol over a pty.

It answers the handshake and M115 (with `Cap:` lines), heats towards its targets, prints files from a
virtual SD card with progress, runs streamed moves in simulated time, checks line numbers and checksums
(asking for resends), and can be told to fail: a thermal runaway, a rate of lines rejected as garbled
(or one line in N, optionally reported twice), garbage on the wire, a board reset, silence, `wait` while
idle, or the previous session's answers still coming after the host reopened the line. `simulate()`
serves it on a pty of its own, linked at the configured `serial_port`; tests can put it on one end of a
`socat` pty pair with `serve_path()`. It shares no code with the driver: it is the driver's oracle.
The firmware is in `sim_firmware.py` (taking lines) and `sim_gcode.py` (running them); this module serves
it on a tty, injects faults and lets time pass.

Faults leave the printer in Marlin's "stopped" state, which M999 clears (a real Marlin may instead halt
until power-cycled after some faults; the host sees the same error lines either way).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
import tty
from collections.abc import AsyncIterator
from pathlib import Path

import structlog

from drivers.printer.sim_firmware import DEFAULT_CAPABILITIES, DEFAULT_FILES, STOPPED_MESSAGE
from drivers.printer.sim_gcode import GcodeFirmware
from drivers.sdk import EquipmentConfig

__all__ = ["DEFAULT_CAPABILITIES", "DEFAULT_FILES", "STOPPED_MESSAGE", "VirtualPrinter", "simulate"]

log = structlog.get_logger("edge_agent.simulate.printer")

_MAX_INPUT_LINE = 256
_MAX_OUTPUT_BACKLOG = 64 * 1024


class VirtualPrinter(GcodeFirmware):
    """A Marlin printer with one hotend, a bed and an SD card; serve it with `serve_path` or `serve_fd`."""

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
