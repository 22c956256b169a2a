"""Marlin's host protocol over one serial connection: resynchronisation, numbered lines, resends, timeouts.

`MarlinLink` owns the byte stream of one serial connection: it resynchronises at open (the previous
session's answers may still be coming), frames commands as `N<n> <cmd>*<xor>`, writes what its `Window`
lets through (at most `max_in_flight` lines ahead of their `ok`s, `Resend:` requests answered from the
history), and hands every other line to a callback. What those lines mean is the printer driver's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import serial

from drivers.printer.lines import (
    SYNC_WORD,
    LineSplitter,
    RateLimitedLog,
    Response,
    decode_line,
    frame,
    is_comm_complaint,
    is_long,
    parse_response,
)
from drivers.printer.window import Pending, Window, fail_future


@dataclass
class _Sync:
    """The resynchronisation at open: everything is stale until the marker's echo, then its `ok` ends it."""

    token: str
    future: asyncio.Future[bool]
    seen: bool = False


class MarlinLink:
    """One serial connection speaking Marlin's numbered-line protocol.

    `handshake()` resynchronises after an open: `M110 N0` and a marker line with a fresh token, written
    together (the marker's answer is the only one that can be told from a previous session's); every line
    before the marker's echo belongs to a previous session and is ignored. Then `send()`/`submit()` queue
    commands, written as the `Window` allows (resends included). `wait` never makes the link send; `busy:`
    extends the timeout. When the port is lost or the printer stops answering (no `ok` within the timeout,
    twice, a nudge between), the link goes down once: `on_down(reason)` runs and every waiting or later
    `send()` raises ConnectionError with that reason.
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
        self._name = name
        self._count = count or (lambda kind: None)
        self._splitter = LineSplitter(max_line_bytes)
        self._window = Window(max_in_flight, history_size)
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
        self.skipped_lines = 0
        self.stale_lines = 0
        self.waits = 0
        self._log_garbage = RateLimitedLog(log, "serial_garbage_skipped")
        self._log_overlong = RateLimitedLog(log, "serial_overlong_line_skipped")

    @property
    def up(self) -> bool:
        return self.failure is None

    @property
    def max_in_flight(self) -> int:
        return self._window.max_in_flight

    @property
    def in_flight(self) -> int:
        """Lines the printer has not answered yet (written ones and rejections still owing their ok)."""
        return self._window.in_flight

    @property
    def lines_resent(self) -> int:
        """Lines written again (for a resend request or a nudge)."""
        return self._window.lines_resent

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
        waiting = self._window.waiting
        if waiting is not None and waiting.long and self._deadline is not None:
            # A long command's printer is alive as long as it talks (temperatures while heating).
            self._deadline = max(self._deadline, self.last_rx + self.long_timeout_s)
        kind = response.kind
        if kind == "ok":
            self._handle_ok(response.text)
        elif kind == "resend":
            self._handle_resend(response.number or 0)
        elif kind == "busy":
            if self._deadline is not None:
                self._deadline = max(self._deadline, self.last_rx + self._timeout_of(self._window.oldest()))
        elif kind == "wait":
            self.waits += 1  # the printer's queue is empty: a hint, never a reason to send
        else:
            if waiting is not None and not (text.lower().startswith("error:") and is_comm_complaint(text)):
                waiting.response.append(text)
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
        if self._window.close_rejection():
            if rest:
                self._deliver(rest)
            self._refresh_deadline()
            self._pump()
            return
        pending = self._window.acknowledge()
        if pending is None:
            if rest:
                self._deliver(rest)
            self.log.debug("serial_unexpected_ok")
            return
        self._nudged = False
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

    def _handle_resend(self, number: int) -> None:
        self.resends += 1
        self._count("resend")
        outcome = self._window.resend(number)
        if outcome == "beyond":
            self.log.debug("serial_resend_nothing_to_do", line=number, last_written=self._window.last_number)
        elif outcome == "unsolicited":
            self.log.debug("serial_resend_unsolicited", line=number)
        elif outcome == "duplicate":
            self.log.debug("serial_resend_duplicate_ignored", line=number)
        elif outcome == "lost":
            self.down(f"printer asked to resend line {number}, which is no longer in the history")
        else:
            self.log.debug("serial_resend", line=number, last_written=self._window.last_number)
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
        while (pending := self._window.take()) is not None:
            assert pending.number is not None
            self._write(frame(pending.number, pending.command))
            if pending.first_written is None:
                pending.first_written = time.monotonic()
            if self._deadline is None:
                self._refresh_deadline()

    def _timeout_of(self, pending: Pending | None) -> float:
        return self.long_timeout_s if pending is not None and pending.long else self.ok_timeout_s

    def _refresh_deadline(self) -> None:
        """A fresh deadline while the printer owes an answer; none while it owes nothing."""
        if self._window.owed:
            self._deadline = time.monotonic() + self._timeout_of(self._window.oldest())
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
        oldest = self._window.oldest()
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
        self._window.rewind_all()
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
        self._window.restart(hello, marker)
        self._synced = True
        self._pump()

    def submit(self, command: str, *, on_ok: Callable[[list[str]], None] | None = None) -> asyncio.Future[list[str]]:
        """Queue one command; the future of its answer (the lines before its `ok`). `on_ok` runs at the ok."""
        if self.failure is not None:
            raise ConnectionError(self.failure)
        fut: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._window.queue(Pending(command, fut, is_long(command), on_ok))
        self._pump()
        return fut

    async def send(self, command: str, *, on_ok: Callable[[list[str]], None] | None = None) -> list[str]:
        """Send one command and wait for its `ok`; the answer's lines. `on_ok` runs as the ok is read."""
        return await self.submit(command, on_ok=on_ok)

    # -- teardown

    def _fail_all(self, reason: str) -> None:
        self._window.fail_all(reason)
        self._deadline = None
        self._armed.set()
        if self._sync is not None:
            fail_future(self._sync.future, ConnectionError(reason))

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
