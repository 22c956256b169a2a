"""Telemetry: values encoded once as they arrive, written in batches, and when those batches go (the pacer)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from agent import metrics
from agent.model import iso, utcnow
from agent.monitor_state import EquipmentState
from agent.ratelimit import TokenBucket
from agent.store_rows import Encoded
from agent.topics import Topics
from drivers.sdk.jsonio import value_text

MAX_VALUES_PER_MESSAGE = 1000
# Telemetry pacing (see TelemetryPacer.schedule): how much faster than one per interval the flushes of a
# source delivering about once per interval may go, and how many may go back to back.
FLUSH_SLACK = 0.25
FLUSH_BURST = 2.0


def encode_value(value: Any) -> str:
    """A value as strict JSON text (NaN and infinities as strings), fast for the common scalars."""
    return value_text(value)


def tag_json(tag: str) -> str:
    """A tag name as JSON text."""
    # Configured tag names are identifiers ([A-Za-z0-9_-]); only a driver's own odd name needs escaping.
    return f'"{tag}"' if tag.isidentifier() or tag.replace("-", "_").isidentifier() else value_text(tag)


def take_batches(equipment: Iterable[EquipmentState], topics: Topics, qos: int) -> tuple[list[Encoded], int]:
    """Every equipment's waiting values as telemetry messages (emptying the waits), and how many values."""
    batch: list[Encoded] = []
    count = 0
    for st in equipment:
        if not st.pending:
            continue
        pending, st.pending = st.pending, []
        count += len(pending)
        metrics.TELEMETRY_VALUES.labels(st.cfg.id).inc(len(pending))
        topic = topics.equipment(st.cfg.id, "telemetry")
        head = f'{{"equipment_id":{value_text(st.cfg.id)},"timestamp":"{iso(utcnow())}","values":['
        for i in range(0, len(pending), MAX_VALUES_PER_MESSAGE):
            body = head + ",".join(pending[i : i + MAX_VALUES_PER_MESSAGE]) + "]"
            batch.append(("telemetry", topic, body, qos, False))
    return batch, count


class TelemetryPacer:
    """Calls `flush` when telemetry that started to wait is due (see `schedule`), on `loop`'s clock.

    Without a loop (the Python API's direct calls) nothing is scheduled: the owner flushes itself.
    """

    def __init__(self, flush: Callable[[], object], interval_s: Callable[[], float]) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.handle: asyncio.Handle | None = None
        self._flush = flush
        self._interval_s = interval_s
        self._flushed_at = -math.inf
        self._turned = False  # the event loop has turned since the values now waiting started to arrive
        self._batch_spread = False  # so they came in more than one delivery
        self._last_spread = False  # so did the last flush's
        self._bucket: TokenBucket | None = None

    def waiting(self) -> None:
        """A value has started to wait (on the hot path: one check when a flush is scheduled already)."""
        if self.handle is None:
            if self.loop is not None:
                self.schedule()
        elif self._turned:
            self._batch_spread = True

    def schedule(self) -> None:
        """Schedule the flush of telemetry that has just started to wait (the first value since a flush).

        A flush is a callback, so it runs once the driver has handed over all it had (a whole
        notification or poll), not in the middle. When it runs depends on how the sources deliver:
        - values that arrived in several deliveries before the last flush (a source delivering more
          often than telemetry_interval_s): one interval after the last flush, so such sources are
          batched into one message per interval;
        - otherwise (a source delivering about once per interval, or slower): at once, as long as a
          token bucket allows it. It refills at (1 + FLUSH_SLACK) tokens per interval and holds
          FLUSH_BURST, so a delivery that comes early after a late one is not held back; a bucket
          refilled at exactly one token per interval would, for a source beating at the interval,
          hold every delivery back by whatever delay it once had, for good.
        """
        loop = self.loop
        assert loop is not None
        # A driver hands over a delivery without yielding to the loop: what arrives after it turned is another.
        self._turned = False
        loop.call_soon(self._mark_turn)
        interval = self._interval_s()
        if interval <= 0:
            self.handle = loop.call_soon(self._due)
            return
        if self._last_spread:
            self.handle = loop.call_at(max(loop.time(), self._flushed_at + interval), self._due)
            return
        bucket = self._tokens(interval)
        if bucket.tokens >= 1.0:
            self.handle = loop.call_soon(self._due)
        else:
            wait = bucket.wait_s()
            self.handle = loop.call_at(loop.time() + wait, self._due)

    def cancel(self) -> None:
        """Drop the scheduled flush (the owner flushes what waits itself)."""
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _mark_turn(self) -> None:
        self._turned = True

    def _now(self) -> float:
        assert self.loop is not None
        return self.loop.time()

    def _tokens(self, interval: float) -> TokenBucket:
        """The bucket, refilling at the interval configured now."""
        rate = (1.0 + FLUSH_SLACK) / interval
        if self._bucket is None:
            self._bucket = TokenBucket(rate, FLUSH_BURST, clock=self._now)
        else:
            self._bucket.rate = rate
        return self._bucket

    def _due(self) -> None:
        self.handle = None
        self._last_spread, self._batch_spread = self._batch_spread, False
        if self.loop is not None:
            self._flushed_at = self.loop.time()
            interval = self._interval_s()
            if interval > 0:
                self._tokens(interval).spend()
        self._flush()


class Stamps:
    """`iso(ts)` for values' source timestamps, formatting the date and time once per second: sources give
    each value its own stamp, often the same object for a whole delivery."""

    __slots__ = ("_last", "_prefix", "_second", "_text")

    def __init__(self) -> None:
        self._last: datetime | None = None
        self._text = ""
        self._second: tuple[int, int, int, int, int, int] | None = None
        self._prefix = ""

    def text(self, ts: datetime) -> str:
        if ts is self._last:
            return self._text
        self._last = ts
        if ts.tzinfo is not UTC:
            self._text = iso(ts)
            return self._text
        second = (ts.year, ts.month, ts.day, ts.hour, ts.minute, ts.second)
        if second != self._second:
            self._second = second
            self._prefix = f"{ts.year:04d}" + ts.strftime("-%m-%dT%H:%M:%S.")
        self._text = f"{self._prefix}{ts.microsecond // 1000:03d}Z"
        return self._text
