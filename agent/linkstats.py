"""Health per link (the broker, MPM, each driver): uptime ratio since start, durations, errors, last error.

One `LinkStats` per link, kept in `LINKS` by name (`broker`, `mpm`, `driver:<equipment_id>`). The code
that owns a link reports its transitions (`up`, `down`), its request or read durations (`observe`) and
its errors (`error`); /healthz (`report`) and /metrics (a collector in `agent.metrics`) read them. Pure
bookkeeping: no imports from the rest of the daemon, so anything may feed it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

ERROR_WINDOW_S = 300.0  # the error rate is errors per minute over this window
ERROR_TIMES_MAX = 10_000  # error times remembered for the rate; a flood beyond this is counted, not kept


def _wall() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LinkStats:
    """One link's up/down history since the daemon started, its durations and its errors."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._clock = clock
        self.started = clock()
        self.is_up: bool | None = None  # None until the link's first transition
        self.changed_at = self.started
        self.up_s = 0.0  # time spent up before `changed_at`
        self.errors_total = 0
        self._error_times: deque[float] = deque(maxlen=ERROR_TIMES_MAX)
        self.last_error: str | None = None
        self.last_error_at: str | None = None  # wall time (ISO 8601 UTC) of the last error
        self.last_error_ts: float | None = None  # the same as a Unix time, for /metrics
        self.count = 0  # durations observed
        self.sum_s = 0.0
        self.max_s = 0.0
        self.last_s: float | None = None

    def _set(self, up: bool, error: str | None = None) -> None:
        now = self._clock()
        if self.is_up:
            self.up_s += now - self.changed_at
        self.changed_at = now
        was, self.is_up = self.is_up, up
        for watcher in list(WATCHERS):
            watcher(self.name, up, was, error)

    def up(self) -> None:
        """The link is up (connected, answering)."""
        if self.is_up is not True:
            self._set(True)

    def down(self, error: str | None = None) -> None:
        """The link is down; `error` says why (also counted as an error)."""
        if error is not None:
            self.error(error)
        if self.is_up is not False:
            self._set(False, error)

    def follow(self, connected: bool, error: str | None) -> None:
        """Take a link's state as looked at (not told of each change): a new error while down is counted."""
        if connected:
            self.up()
        elif self.is_up or (error and error != self.last_error):  # not yet connected at start is no error
            self.down(error or "disconnected")

    def error(self, message: str) -> None:
        """One failure on the link (a failed request or read, a lost connection)."""
        now = self._clock()
        self.errors_total += 1
        self._error_times.append(now)
        self.last_error = message[:500]
        self.last_error_at = _wall()
        self.last_error_ts = time.time()

    def observe(self, seconds: float) -> None:
        """One request's or read's duration."""
        self.count += 1
        self.sum_s += seconds
        self.last_s = seconds
        if seconds > self.max_s:
            self.max_s = seconds

    def uptime_ratio(self) -> float:
        """The share of the time since start that the link was up (0 before it ever was)."""
        now = self._clock()
        total = now - self.started
        up = self.up_s + (now - self.changed_at if self.is_up else 0.0)
        if total <= 0:
            return 1.0 if self.is_up else 0.0
        return min(1.0, up / total)

    def errors_per_min(self) -> float:
        """Errors per minute over the last `ERROR_WINDOW_S`."""
        since = self._clock() - ERROR_WINDOW_S
        times = self._error_times
        while times and times[0] < since:
            times.popleft()
        span = min(ERROR_WINDOW_S, max(1.0, self._clock() - self.started))
        return round(len(times) * 60.0 / span, 3)

    def report(self) -> dict[str, Any]:
        """This link's part of /healthz."""
        return {
            "up": self.is_up,
            "uptime_ratio": round(self.uptime_ratio(), 4),
            "duration_s": {
                "count": self.count,
                "mean": round(self.sum_s / self.count, 6) if self.count else None,
                "max": round(self.max_s, 6) if self.count else None,
                "last": None if self.last_s is None else round(self.last_s, 6),
            },
            "errors_total": self.errors_total,
            "errors_per_min": self.errors_per_min(),
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }


LINKS: dict[str, LinkStats] = {}
# Called on every transition with (link name, up now, up before (None: never known), error): the live view.
Watcher = Callable[[str, bool, "bool | None", "str | None"], None]
WATCHERS: list[Watcher] = []


def watch(watcher: Watcher) -> Callable[[], None]:
    """Call `watcher` on every link's transitions; returns the call that stops it."""
    WATCHERS.append(watcher)
    return lambda: WATCHERS.remove(watcher) if watcher in WATCHERS else None


def link(name: str) -> LinkStats:
    """The stats of the link called `name`, created at its first use."""
    stats = LINKS.get(name)
    if stats is None:
        stats = LINKS[name] = LinkStats(name)
    return stats


def driver_link(equipment_id: str) -> LinkStats:
    """The stats of one equipment's driver link."""
    return link(f"driver:{equipment_id}")
