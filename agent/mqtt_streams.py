"""What the MQTT sink reads from the store: two ordered streams (live, newer than the connect, and the
replayed backlog), and the replay's pace (`replay_max_per_s`)."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

from agent import metrics
from agent.linkstats import link
from agent.ratelimit import TokenBucket
from agent.store import Lane, Store, StoredMessage

FETCH = 1000  # messages read ahead from the store at a time


class Stream:
    """One ordered stream read ahead from the store: ids after `cursor`, up to `upto` when bounded, of one
    connection's `lane` (all messages without one)."""

    __slots__ = ("ahead", "cursor", "done", "lane", "upto")

    def __init__(self, lane: Lane | None = None) -> None:
        self.lane = lane
        self.ahead: collections.deque[StoredMessage] = collections.deque()
        self.cursor = 0
        self.upto: int | None = None
        self.done = True

    def reset(self, cursor: int, upto: int | None) -> None:
        self.ahead.clear()
        self.cursor = cursor
        self.upto = upto
        self.done = upto is not None and cursor >= upto

    def next(self, store: Store) -> StoredMessage | None:
        """The next message of the stream, or None when there is none now."""
        if not self.ahead:
            if self.done or (self.upto is None and self.cursor >= store.last_id):
                return None
            # Read ahead in large batches: one query per FETCH messages, not one per acknowledgement.
            found, through = store.fetch_through(self.cursor, FETCH, self.upto, self.lane)
            self.ahead.extend(found)
            # Past the other lane's messages too when the batch was short: they are not scanned again.
            self.cursor = max(self.cursor, through)
            if not self.ahead:
                if self.upto is not None:
                    self.done = True
                return None
        return self.ahead.popleft()

    def pending(self, store: Store) -> bool:
        """Whether a message of the stream is there now (read ahead, not taken)."""
        msg = self.next(store)
        if msg is None:
            return False
        self.ahead.appendleft(msg)
        return True


class ReplayPace:
    """Whether one more replayed message may go now; when not, `wake` is called once it may."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._bucket: TokenBucket | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self, rate_per_s: float) -> None:
        """Pace a new replay at `rate_per_s` (0: unpaced), with a burst of a tenth of a second's worth."""
        self._bucket = TokenBucket(rate_per_s, burst=max(1.0, rate_per_s / 10)) if rate_per_s > 0 else None

    def lift(self) -> None:
        """No pace from now on (what only memory holds must go before the stop)."""
        self._bucket = None

    def allows(self, loop: asyncio.AbstractEventLoop | None) -> bool:
        """Whether the pace allows one more replayed message now; if not, wake when it will."""
        if self._bucket is None or self._bucket.take():
            return True
        if self._timer is None and loop is not None:
            self._timer = loop.call_later(self._bucket.wait_s(), self._paced_wake)
        return False

    def _paced_wake(self) -> None:
        self._timer = None
        self._wake()

    def stop(self) -> None:
        """Cancel a pending wake-up (the session ended)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class AckProbe:
    """The broker's request duration: one QoS 1 message in flight at a time is timed from publish to PUBACK
    (timing every message would cost a clock read and a dict entry each, for the same figure)."""

    def __init__(self) -> None:
        self._mid: int | None = None
        self._at = 0.0

    def sent(self, mid: int) -> None:
        if self._mid is None:
            self._mid, self._at = mid, time.monotonic()

    def acked(self, mid: int) -> None:
        if mid == self._mid:
            seconds = time.monotonic() - self._at
            self._mid = None
            metrics.MQTT_ACK_SECONDS.observe(seconds)
            link("broker").observe(seconds)

    def reset(self) -> None:
        self._mid = None
