"""The one reconnect policy: jittered exponential backoff capped by `reconnect_max_s`, transitions logged once."""

from __future__ import annotations

import random
import ssl
from typing import Any


def jittered(base_s: float, cap_s: float, attempt: int) -> float:
    """The delay before retry number `attempt` (from 0): uniform in [d / 2, d] for d = min(cap, base * 2^attempt)."""
    ceiling = min(cap_s, base_s * (2 ** min(attempt, 60)))
    return random.uniform(ceiling / 2, ceiling)


class Backoff:
    """Full-jitter exponential backoff: the n-th delay is uniform in [base*2^n / 2, base*2^n], capped."""

    def __init__(self, cap_s: float, base_s: float = 0.5) -> None:
        self.cap_s = cap_s
        self.base_s = min(base_s, cap_s)
        self.attempt = 0

    def next(self) -> float:
        """The delay before the next attempt."""
        delay = jittered(self.base_s, self.cap_s, self.attempt)
        self.attempt = min(self.attempt + 1, 30)
        return delay

    def reset(self) -> None:
        """After a success: start from the base delay again."""
        self.attempt = 0


class Transitions:
    """Logs a link going down and coming back once each, not once per failed attempt."""

    def __init__(self, log: Any, what: str) -> None:
        self.log = log
        self.what = what
        self.up: bool | None = None
        self.failures = 0

    def mark_up(self, **fields: Any) -> None:
        """The link is up; logged if it was down or unknown."""
        if self.up is not True:
            self.log.info(f"{self.what}_up", attempts=self.failures, **fields)
        self.up = True
        self.failures = 0

    def mark_down(self, error: str, **fields: Any) -> None:
        """An attempt failed or the link broke; logged on the first failure only."""
        self.failures += 1
        if self.up is not False:
            self.log.warning(f"{self.what}_down", error=error, **fields)
        self.up = False


def describe(err: BaseException) -> str:
    """A short, secret-free description of a connection error."""
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {err.verify_message}"
    if isinstance(err, ssl.SSLError):
        return f"TLS error: {err.reason or err}"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, TimeoutError):
        return "timed out"
    text = str(err) or type(err).__name__
    return text
