"""The per-equipment metrics handle the core gives every driver: drivers count, the core labels.

A driver calls `self.metrics.read(...)`, `.error(kind)`, ...; it never names a Prometheus metric or label.
Without a core (a driver's own unit tests) the handle only counts in memory.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Protocol


class DriverMetrics(Protocol):
    """What a driver may count about its equipment."""

    def read(self, values: int = 0, seconds: float | None = None) -> None:
        """A successful read, poll or notification carrying `values` values, taking `seconds`."""

    def values(self, count: int) -> None:
        """Values received, where they are not counted with a read."""

    def request(self, seconds: float) -> None:
        """How long a request, poll or command took, where it is not itself a read."""

    def error(self, kind: str, count: int = 1) -> None:
        """Errors of one kind (a bad value, a failed request)."""

    def dropped(self, count: int) -> None:
        """Notifications a queue had to drop."""

    def skipped_ticks(self, count: int) -> None:
        """Polls skipped because one overran."""


class CountingMetrics:
    """A handle that counts in memory: the default without a core, and handy in tests."""

    def __init__(self, equipment_id: str = "") -> None:
        self.equipment_id = equipment_id
        self.counts: Counter[str] = Counter()

    def read(self, values: int = 0, seconds: float | None = None) -> None:
        self.counts["reads"] += 1
        self.counts["values"] += values

    def values(self, count: int) -> None:
        self.counts["values"] += count

    def request(self, seconds: float) -> None:
        self.counts["requests"] += 1

    def error(self, kind: str, count: int = 1) -> None:
        self.counts[f"error:{kind}"] += count

    def dropped(self, count: int) -> None:
        self.counts["dropped"] += count

    def skipped_ticks(self, count: int) -> None:
        self.counts["skipped_ticks"] += count


_factory: Callable[[str], DriverMetrics] = CountingMetrics


def set_metrics_factory(factory: Callable[[str], DriverMetrics]) -> None:
    """The core installs how handles are made (Prometheus, labelled by equipment)."""
    global _factory
    _factory = factory


def metrics_for(equipment_id: str) -> DriverMetrics:
    """A handle for one equipment."""
    return _factory(equipment_id)
