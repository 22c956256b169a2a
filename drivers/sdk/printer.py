"""What a print job is, for every printer driver (serial today, network printers later).

A job is a file being printed, the process id its name carries (`process_id_pattern`), its progress, and
whether it is paused. `PrintState` keeps the job, the printer's error and how the last print ended, and
turns them into the `StatusFact` the driver yields: `error` while an error stands, `idle` without a job,
else `running` or `paused`. A job ends `completed`, `cancelled`, `failed` or `ended` (stopped while the
driver was not looking); the outcome is kept as `last_print` in the fact's metadata.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from drivers.sdk.events import StatusFact

Outcome = Literal["completed", "cancelled", "failed", "ended"]


@dataclass
class PrintJob:
    """The print a printer is working on; `streamed` when the driver feeds it rather than the printer's storage."""

    file: str | None
    process_id: str | None
    paused: bool = False
    progress: float | None = None
    position: int | None = None
    streamed: bool = False


def fraction(done: int, total: int) -> float:
    """Progress as a fraction in [0, 1], rounded to 4 places; 0 for an unknown total."""
    if total <= 0:
        return 0.0
    return round(min(1.0, max(0.0, done / total)), 4)


def process_id_of(file: str | None, pattern: str | None, log: Any) -> str | None:
    """The process id a file name carries: `pattern`'s first group or match, else the name's stem.

    A name the pattern does not match has none (logged as `process_id_not_found`)."""
    if not file:
        return None
    name = file.rsplit("/", 1)[-1]
    if pattern is None:
        return name.rsplit(".", 1)[0] if "." in name[1:] else name
    m = re.search(pattern, name)
    if m is None:
        log.warning("process_id_not_found", file=file, pattern=pattern)
        return None
    return m.group(1) if m.re.groups and m.group(1) is not None else m.group(0)


class PrintState:
    """A printer's job, error and last print as its driver knows them, and the status facts they make."""

    def __init__(self, process_id_pattern: str | None, log: Any) -> None:
        self.process_id_pattern = process_id_pattern
        self.log = log
        self.job: PrintJob | None = None
        self.error: str | None = None
        self.last_print: dict[str, Any] | None = None
        self._last_fact: tuple[Any, ...] | None = None

    def new_job(self, file: str | None, **fields: Any) -> PrintJob:
        """A job for `file` (not yet the current one), its process id taken from the name."""
        return PrintJob(file=file, process_id=self.process_id(file), **fields)

    def process_id(self, file: str | None) -> str | None:
        return process_id_of(file, self.process_id_pattern, self.log)

    @property
    def status(self) -> str:
        if self.error is not None:
            return "error"
        if self.job is None:
            return "idle"
        return "paused" if self.job.paused else "running"

    def end(self, outcome: Outcome) -> PrintJob:
        """Forget the current job, remembering how it ended; the job."""
        job = self.job
        assert job is not None
        self.job = None
        self.last_print = {
            "file": job.file,
            "process_id": job.process_id,
            "outcome": outcome,
            "progress": job.progress,
        }
        return job

    def forget_fact(self) -> None:
        """The next fact is new whatever it says (a new connection reports its status afresh)."""
        self._last_fact = None

    def fact(self, metadata: dict[str, Any]) -> StatusFact | None:
        """The status as a fact with `metadata` (and `last_print`), or None when it says what the last one did."""
        job = self.job
        fact = StatusFact(
            status=self.status,
            current_operation=job.file if job else None,
            progress=job.progress if job else None,
            error_message=self.error,
            process_id=job.process_id if job else None,
            metadata={**metadata, "last_print": self.last_print},
        )
        key = (fact.status, fact.current_operation, fact.progress, fact.error_message, fact.process_id)
        if key == self._last_fact:
            return None
        self._last_fact = key
        return fact
