"""Prints streamed by the host: a file in `gcode_dir` sent line by line over the numbered, checksummed link.

The file is read whole and checked before the print starts; the lines then go out at most
`max_in_flight` ahead of their `ok`s, and progress is the share of lines the printer acknowledged.
Pausing holds the next line back (the printer finishes the few it has).
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from drivers.printer.lines import gcode_lines, line_problem
from drivers.printer.marlin import MarlinLink
from drivers.sdk import CommandError
from drivers.sdk.printer import PrintJob, fraction

# A streamed file is read whole before the print starts; a bigger one is refused.
MAX_GCODE_BYTES = 64 * 1024 * 1024
# Progress of a streamed print is reported in steps of this much (and at the end).
PROGRESS_STEP = 0.005


@dataclass
class Stream:
    """A print streamed from `gcode_dir`: its lines, how many the printer acknowledged, the pause gate."""

    job: PrintJob
    lines: list[str]
    go: asyncio.Event
    acked: int = 0
    task: asyncio.Task[None] | None = None

    async def send(
        self, link: MarlinLink, max_in_flight: int, current: Callable[[], bool], on_progress: Callable[[float], None]
    ) -> None:
        """Send the lines while the job is `current()`; `on_progress` with the job's new progress, in steps.

        Returns when every line is acknowledged or the job stopped being current; a lost link raises."""
        job = self.job
        total = len(self.lines)
        waiting: deque[asyncio.Future[list[str]]] = deque()

        def acked(answer: list[str]) -> None:
            self.acked += 1
            if not current():
                return
            progress = fraction(self.acked, total)
            if self.acked == total or progress - (job.progress or 0.0) >= PROGRESS_STEP:
                job.progress = progress
                on_progress(progress)

        for line in self.lines:
            await self.go.wait()
            if not current():
                return  # cancelled, or the printer stopped with an error
            while len(waiting) >= max_in_flight:
                await waiting.popleft()
            waiting.append(link.submit(line, on_ok=acked))
        while waiting:
            await waiting.popleft()


def gcode_path(folder: Path | None, file: str) -> Path | None:
    """The file in `folder` that `file` names, or None for an SD print (no folder, a path, no such file).

    Raises CommandError for an entry there that is no regular file inside the folder (a link out of it)."""
    if folder is None or file in (".", "..") or any(c in file for c in "/\\\0"):
        return None
    candidate = folder / file
    try:
        os.lstat(candidate)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise CommandError(f"cannot read {file!r} in gcode_dir: {err.strerror}", "bad_parameters") from None
    try:
        real = candidate.resolve(strict=True)
        inside = real.parent == folder.resolve(strict=True)
        regular = stat.S_ISREG(real.stat().st_mode)
    except OSError:
        inside = regular = False
    if not inside:
        raise CommandError(f"{file!r} in gcode_dir leads out of the folder; it is not printed", "bad_parameters")
    if not regular:
        raise CommandError(f"{file!r} in gcode_dir is not a regular file", "bad_parameters")
    return candidate


def read_gcode(path: Path) -> list[str]:
    """The commands of a G-code file to stream; ValueError naming the first line that cannot be sent."""
    with path.open("rb") as f:
        data = f.read(MAX_GCODE_BYTES + 1)
    if len(data) > MAX_GCODE_BYTES:
        raise ValueError(f"larger than {MAX_GCODE_BYTES} bytes")
    lines: list[str] = []
    for number, raw in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
        for line in gcode_lines(raw):
            if (problem := line_problem(line)) is not None:
                raise ValueError(f"line {number} ({line[:40]!r}): {problem}")
            lines.append(line)
    if not lines:
        raise ValueError("no G-code commands in it")
    return lines
