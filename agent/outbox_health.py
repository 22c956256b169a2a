"""MPM as the outbox sees it: reachable, unreachable (failures from several lanes in a row) or refusing
the credentials, with the backoff that spaces the probes while it is down and the outbox's part of
/healthz."""

from __future__ import annotations

import time
from typing import Any

import structlog

from agent.metrics import MPM_CREDENTIALS_REFUSED
from agent.mpm_models import CredentialsRefused
from agent.mpm_retry import retry_delay

log = structlog.get_logger("edge_agent.outbox")


class MpmHealth:
    """Whole-MPM health, to stop hammering a dead MPM from every lane at once."""

    def __init__(self, backoff_base_s: float, backoff_max_s: float) -> None:
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.failures = 0  # failures of MPM as a whole in a row; while any, one lane probes at a time
        self.probe_after = 0.0
        self.refused: CredentialsRefused | None = None  # refused credentials pause every lane
        self.refused_count = 0
        self.last_error: str | None = None
        self._failing_lanes: set[str] = set()
        self._down = False
        self._down_since: float | None = None

    def backoff(self, attempts: int, retry_after: float | None) -> float:
        """The wait after `attempts` failures in a row (the MPM retry policy, Retry-After up to an hour)."""
        return retry_delay(self.backoff_base_s, self.backoff_max_s, max(0, attempts - 1), retry_after)

    def answered(self, pending: int) -> bool:
        """MPM answered an item; True when it had been backing off (back to full concurrency now)."""
        self._failing_lanes.clear()
        was_failing = bool(self.failures)
        self.failures = 0
        if self.refused is not None:
            self.refused = None
            log.info("outbox_credentials_accepted", pending=pending)
        if self._down:
            self._down = False
            log.info("outbox_mpm_reachable", pending=pending)
        self._down_since = None
        self.last_error = None
        return was_failing

    def credentials_refused(self, err: CredentialsRefused, process_id: str, pending: int) -> None:
        """MPM refuses the credentials: every lane pauses and one item probes on a capped backoff."""
        self.refused_count += 1
        MPM_CREDENTIALS_REFUSED.labels(str(err.status_code)).inc()
        changed = self.refused is None or self.refused.status_code != err.status_code
        self.refused = err
        self.last_error = str(err)
        if self._down_since is None:
            self._down_since = time.monotonic()
        self._global_failure(None)
        if changed:
            log.error(
                "outbox_credentials_refused",
                status_code=err.status_code,
                reason=err.reason,
                error=str(err),
                process_id=process_id,
                pending=pending,
            )

    def lane_failed(self, process_id: str, err: Exception, retry_after: float | None, pending: int) -> None:
        """One lane's attempt failed; failures across several lanes in a row mean MPM is down."""
        if len(self._failing_lanes) < 4:
            self._failing_lanes.add(process_id)
        # One stuck process is that process's problem; failures from two or more in a row mean MPM is down.
        if len(self._failing_lanes) >= 2:
            self._global_failure(retry_after)
            if not self._down:
                self._down = True
                if self._down_since is None:
                    self._down_since = time.monotonic()
                log.warning("outbox_mpm_unreachable", error=str(err), pending=pending)

    def _global_failure(self, retry_after: float | None) -> None:
        self.failures += 1
        self.probe_after = time.monotonic() + self.backoff(self.failures, retry_after)

    def report(
        self, *, write_error: Exception | None, file: str, depth: int, held: int, dead: int | None
    ) -> dict[str, Any]:
        """The outbox's part of /healthz: MPM `down` (credentials refused, unreachable), `degraded` (the
        disk refuses writes; updates held in memory) or `up`, with the reason and the backlog."""
        status, reason = "up", None
        error = self.last_error
        if self.refused is not None:
            status, reason, error = "down", self.refused.reason, str(self.refused)
        elif self._down:
            status, reason = "down", "unreachable"
        elif write_error is not None:
            status, reason = "degraded", f"cannot write {file}: {write_error}"
        since = self._down_since if status == "down" else None
        return {
            "status": status,
            "reason": reason,
            "error": error if status != "up" else None,
            "depth": depth,
            "held_in_memory": held,
            "dead_letters": dead,
            "down_for_s": None if since is None else round(time.monotonic() - since, 1),
            "write_error": None if write_error is None else str(write_error),
        }
