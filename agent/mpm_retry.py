"""The MPM retry policy, the one place for it: which answers are retried, how long to wait, and the pace.

The client retries a transient answer a few times inside one call; the outbox retries an item without
end across calls. Both wait the same way: a capped jittered exponential backoff that honours the
server's Retry-After within a bound.
"""

from __future__ import annotations

import asyncio
from datetime import UTC
from email.utils import parsedate_to_datetime

from agent.model import utcnow
from agent.ratelimit import TokenBucket
from agent.reconnect import jittered

# The contract's transient answers; every other 4xx is final.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# Answers that refuse the agent's credentials: a configuration fault, never a verdict on one item.
AUTH_STATUSES = frozenset({401, 403})


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - utcnow()).total_seconds())


def retry_delay(
    base_s: float, cap_s: float, attempt: int, server_s: float | None = None, server_cap_s: float = 3600.0
) -> float:
    """The wait before retry number `attempt` (from 0): jittered backoff, at least the server's Retry-After
    (`server_s`, honoured up to `server_cap_s`)."""
    delay = jittered(base_s, cap_s, attempt)
    if server_s is not None:
        delay = max(delay, min(float(server_s), server_cap_s))
    return delay


class _TokenBucket:
    """Allows `rate_per_minute` requests a minute with a burst of one second's worth; callers queue."""

    def __init__(self, rate_per_minute: int) -> None:
        rate = rate_per_minute / 60.0
        self._bucket = TokenBucket(rate, rate)
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                if self._bucket.take():
                    return
                await asyncio.sleep(self._bucket.wait_s())
