"""When the monitor flushes telemetry: on arrival, paced by telemetry_interval_s, on a clock the test moves."""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

from agent.config import parse_config
from agent.equipment import _MemorySink
from agent.model import Reading
from agent.monitor import FLUSH_BURST, FLUSH_SLACK, Monitor
from peers import scripted_equipment, write_config

INTERVAL = 0.1


class Clock:
    """The few loop methods the monitor's pacer uses, on a clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 0.0
        self._due: list[tuple[float, int, _Timer]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_soon(self, fn: Callable[[], None]) -> _Timer:
        return self.call_at(self.now, fn)

    def call_at(self, when: float, fn: Callable[[], None]) -> _Timer:
        timer = _Timer(fn)
        heapq.heappush(self._due, (when, next(self._order), timer))
        return timer

    def advance(self, to: float) -> None:
        """Run every callback due up to `to`, each at its own time."""
        while self._due and self._due[0][0] <= to:
            when, _, timer = heapq.heappop(self._due)
            self.now = max(self.now, when)
            if not timer.cancelled:
                timer.fn()
        self.now = max(self.now, to)


class _Timer:
    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Flushes(_MemorySink):
    """Records when each telemetry message was written, and the values in it."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.times: list[float] = []
        self.sizes: list[int] = []

    def append_encoded(self, items: Iterable[tuple[str, str, str, int, bool]]) -> None:
        for _, _, body, _, _ in items:
            self.times.append(self.clock.now)
            self.sizes.append(body.count('"tag"'))


def monitor(tmp_path: Path) -> tuple[Monitor, Clock, Flushes]:
    path = write_config(tmp_path, 1883, scripted_equipment("m1", tmp_path / "script.jsonl"))
    text = path.read_text().replace("telemetry_interval_s = 0.1", f"telemetry_interval_s = {INTERVAL}")
    cfg = parse_config(text, path)
    clock = Clock()
    sink = Flushes(clock)
    mon = Monitor(cfg, sink)
    mon._loop = clock  # type: ignore[assignment]  # what run() does with the running loop
    mon._time = clock.time
    return mon, clock, sink


def deliver(mon: Monitor, clock: Clock, at: float, values: int = 1) -> None:
    """A driver handing over `values` new readings at once, at time `at`."""
    clock.advance(at)
    for i in range(values):
        mon.on_reading("m1", Reading("temp", at * 1000 + i, datetime.now(UTC)))


def test_a_delivery_after_a_quiet_spell_is_flushed_at_once(tmp_path: Path) -> None:
    mon, clock, sink = monitor(tmp_path)
    deliver(mon, clock, 5.0, values=3)
    clock.advance(5.0)
    assert sink.times == [5.0] and sink.sizes == [3]
    deliver(mon, clock, 9.0)
    clock.advance(9.0)
    assert sink.times == [5.0, 9.0]


def test_many_deliveries_per_interval_make_one_message_per_interval(tmp_path: Path) -> None:
    mon, clock, sink = monitor(tmp_path)
    t, deliveries = 1.0, 0
    while t < 11.0:
        deliver(mon, clock, t, values=5)
        deliveries += 1
        t += INTERVAL / 10 * random.uniform(0.5, 1.5)
    clock.advance(12.0)
    gaps = [b - a for a, b in itertools.pairwise(sink.times)]
    # Once the pacer has seen the source deliver more than once per flush: one message per interval.
    assert min(gaps[2:]) >= INTERVAL - 1e-9
    assert 95 <= len(sink.times) <= 103  # ten seconds at one message per interval
    assert sum(sink.sizes) == 5 * deliveries  # nothing lost
    assert all(size >= 5 for size in sink.sizes)


def test_a_source_beating_at_the_interval_is_never_held_back_for_long(tmp_path: Path) -> None:
    mon, clock, sink = monitor(tmp_path)
    rng = random.Random(7)
    waits: list[float] = []
    t = 1.0
    for beat in range(300):
        late = 0.03 if beat == 100 else 0.0  # one delivery far out of step
        at = t + late + rng.uniform(-0.005, 0.005)
        deliver(mon, clock, at)
        clock.advance(at + INTERVAL / 2)
        waits.append(sink.times[-1] - at)
        t += INTERVAL
    assert len(sink.times) == 300  # one message per delivery
    # Neither jitter nor one late delivery (and the early-looking one after it) holds a delivery back.
    assert max(waits) == 0.0
    # Over any stretch, no more than (1 + FLUSH_SLACK) messages per interval, plus the burst.
    for i in range(0, 290, 10):
        window = [t for t in sink.times if sink.times[i] <= t < sink.times[i] + 1.0]
        assert len(window) <= (1 + FLUSH_SLACK) * 1.0 / INTERVAL + FLUSH_BURST


def test_deliveries_slower_than_the_interval_are_all_flushed_at_once(tmp_path: Path) -> None:
    mon, clock, sink = monitor(tmp_path)
    times = [1.0 + 0.25 * i + random.uniform(0, 0.02) for i in range(40)]
    for at in times:
        deliver(mon, clock, at, values=2)
        clock.advance(at)
    assert sink.times == times


def test_a_source_delivering_faster_than_the_pacer_allows_is_batched(tmp_path: Path) -> None:
    mon, clock, sink = monitor(tmp_path)
    # Single deliveries at 1.6 per interval: more than the slack lets through one by one.
    at, deliveries = 1.0, 0
    while at < 21.0:
        deliver(mon, clock, at)
        deliveries += 1
        at += INTERVAL / 1.6
    clock.advance(22.0)
    assert sum(sink.sizes) == deliveries
    assert len(sink.times) <= (1 + FLUSH_SLACK) * 20.0 / INTERVAL + FLUSH_BURST
    assert len(sink.times) < deliveries


def test_a_large_delivery_is_one_delivery_however_long_it_takes(tmp_path: Path) -> None:
    # A poll of thousands of values, handed over without yielding to the loop, at the interval's beat:
    # each is flushed on arrival, not mistaken for many deliveries and batched.
    mon, clock, sink = monitor(tmp_path)
    times = [1.0 + INTERVAL * i for i in range(20)]
    for at in times:
        deliver(mon, clock, at, values=3000)
        clock.advance(at)
    assert sink.times == [t for t in times for _ in range(3)]  # 3,000 values: three messages of 1,000
    assert sink.sizes == [1000] * 60
