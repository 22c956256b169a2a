"""A token bucket: a steady rate with a bounded burst (the replay pace after an outage, the telemetry pacer)."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """`rate_per_s` tokens a second, holding at most `burst`; `take` spends one when there is one."""

    def __init__(self, rate_per_s: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate_per_s
        self.burst = max(1.0, burst)
        self._clock = clock
        self._tokens = self.burst
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self) -> bool:
        """Spend a token if one is there."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    @property
    def tokens(self) -> float:
        """The tokens there now."""
        self._refill()
        return self._tokens

    def spend(self) -> None:
        """Spend a token whether or not one is there (never below none): for a use that was already due."""
        self._refill()
        self._tokens = max(0.0, self._tokens - 1.0)

    def wait_s(self) -> float:
        """Seconds until the next token."""
        self._refill()
        return max(0.0, (1.0 - self._tokens) / self.rate)
