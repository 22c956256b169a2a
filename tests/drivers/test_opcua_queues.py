"""OPC UA server-side queues: derived sizes, per-tag overrides, overflow flags, one delivery per response.

Against a real asyncua server on a free loopback port (the simulated machine). The asyncua server revises
every sampling interval to the publishing interval and still queues every write, so what arrives shows
the queue size the driver asked for.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
import structlog.testing
from hypothesis import given
from hypothesis import strategies as st
from test_opcua import Collector, equipment

from agent.metrics import REGISTRY
from agent.model import Event, Reading
from drivers.base import DriverContext
from drivers.opcua import (
    EXCEPTION_SAMPLING_MS,
    MAX_QUEUE_SIZE,
    MIN_QUEUE_SIZE,
    STATUS_QUEUE_SIZE,
    OpcUaDriver,
    derived_queue_size,
)
from drivers.opcua.sim import NS_SPINDLE, MachineServer
from peers import free_port, until

TAGS = f"""
[[equipment.tags]]
name = "state"
node = "ns=2;s=Machine.State"
[[equipment.tags]]
name = "progress"
node = "ns=2;s=Machine.Progress"
[[equipment.tags]]
name = "temp"
node = "nsu={NS_SPINDLE};s=Spindle.Temp"
[[equipment.tags]]
name = "program"
node = "ns=2;s=Machine.Program"
queue_size = 2
[[equipment.tags]]
name = "speed"
node = "ns=2;s=Machine.SpindleSpeed"
sampling_interval_ms = 20
"""

# The status code of a value after which the server's queue overflowed: Good, InfoType DataValue, Overflow.
OVERFLOWED = 0x480


@pytest.fixture
async def machine() -> AsyncIterator[MachineServer]:
    server = MachineServer(port=free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# ---- the derivation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("publishing", "sampling", "size"),
    [
        (100, 100, 11),  # the asyncua server: one interval plus a second late
        (100, 50, 22),
        (100, 10, 110),
        (100, 0, 110),  # on change, at no rate the server tells: EXCEPTION_SAMPLING_MS
        (100, None, 110),
        (100, float("nan"), 110),
        (100, -1, 11),  # -1: the publishing interval
        (100, 250, 5),
        (1000, 1000, 2),  # one more interval late
        (5000, 5000, 2),
        (10000, 60000, 2),  # sampled less often than published: still two
        (100, 1, MAX_QUEUE_SIZE),  # 1,100 samples: bounded
        (50, 50, 21),
    ],
)
def test_derived_queue_size(publishing: float, sampling: float | None, size: int) -> None:
    assert derived_queue_size(publishing, sampling) == size


@given(
    publishing=st.floats(min_value=0.01, max_value=1e7, allow_nan=False),
    sampling=st.floats(min_value=0.01, max_value=1e7, allow_nan=False),
)
def test_derived_queue_size_is_bounded_and_covers_an_interval(publishing: float, sampling: float) -> None:
    size = derived_queue_size(publishing, sampling)
    assert MIN_QUEUE_SIZE <= size <= MAX_QUEUE_SIZE
    # Every sample of two publishing intervals fits, unless that passes the bound.
    assert size >= min(MAX_QUEUE_SIZE, math.ceil(2 * publishing / sampling))
    # Sampled faster, never a shorter queue.
    assert derived_queue_size(publishing, sampling / 2) >= size
    assert derived_queue_size(publishing, 0) == derived_queue_size(publishing, EXCEPTION_SAMPLING_MS)


# ---- against the server ----------------------------------------------------------------------------


async def test_queue_sizes_derived_from_revised_intervals_and_overrides(tmp_path: Path, machine: MachineServer) -> None:
    eq = equipment(tmp_path, machine.endpoint, connection="publishing_interval_ms = 500\n", tags=TAGS)
    async with OpcUaDriver(eq, DriverContext(tmp_path)) as d:
        assert d.publishing_ms == 500
        # 500 ms sampled every 500 ms (revised from 0): 3; the status tag at least 10; `queue_size` as
        # given; `sampling_interval_ms = 20` asked 75 at first, the server revised it to 500: 3 after a resize.
        assert d.queue_sizes == {"state": STATUS_QUEUE_SIZE, "progress": 3, "temp": 3, "program": 2, "speed": 3}
        sub = d.subscription
        assert sub is not None
        assert {data.client_handle: data.queuesize for data in sub._monitored_items.values()} == {
            h: d.queue_sizes[t.name] for h, t in d.handles.items()
        }
        # The client-side bound holds two responses of every queue at once.
        assert d.queue_maxsize >= 2 * sum(d.queue_sizes.values())


async def test_every_change_in_a_publishing_interval_arrives_in_order(tmp_path: Path, machine: MachineServer) -> None:
    # The finding: a plain tag kept only the newest change per publishing interval. Now the queue
    # (200 ms sampled every 200 ms: 6) holds five changes made inside one interval; the tag with
    # `queue_size = 2` keeps its newest two, still in order.
    eq = equipment(tmp_path, machine.endpoint, connection="publishing_interval_ms = 200\n", tags=TAGS)
    async with OpcUaDriver(eq, DriverContext(tmp_path)) as d:
        got = Collector(d.events())
        try:
            await got.wait(lambda: bool(got.readings("temp")) and bool(got.readings("program")), "initial values")
            for i in range(5):
                await machine.set("Spindle.Temp", 30.0 + i)
                await machine.set("Machine.Program", f"P{i}")
            await got.wait(lambda: got.values("temp")[-1:] == [34.0], "the last temp")
            await got.wait(lambda: got.values("program")[-1:] == ["P4"], "the last program")
            assert got.values("temp")[1:] == [30.0, 31.0, 32.0, 33.0, 34.0]
            assert got.values("program")[1:] == ["P3", "P4"]
            assert d.dropped == 0 and d.overflows == 0
        finally:
            await got.stop()


class QuickOverflowDriver(OpcUaDriver):
    """The driver with a short quiet period before overflow counts as ended."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.overflow_quiet_s = 0.3


async def test_overflow_flags_are_counted_and_transitions_logged_once(tmp_path: Path, machine: MachineServer) -> None:
    eq = equipment(tmp_path, machine.endpoint, connection="publishing_interval_ms = 50\n", tags=TAGS)
    metric = {"equipment_id": "mill-1", "kind": "server_overflow"}
    before = REGISTRY.get_sample_value("edge_agent_driver_errors_total", metric) or 0.0
    with structlog.testing.capture_logs() as logs:
        d = QuickOverflowDriver(eq, DriverContext(tmp_path))
        await d.connect()
        got = Collector(d.events())
        try:
            await got.wait(lambda: bool(got.readings("temp")), "initial values")
            # The server says values were lost before these: counted, one warning naming the tag.
            for i in range(3):
                await machine.set("Spindle.Temp", 40.0 + i, status=OVERFLOWED)
                await until(lambda i=i: got.values("temp")[-1:] == [40.0 + i], "a flagged value")
            assert d.overflows == 3 and d.overflowing
            assert [r.quality for r in got.readings("temp")[-3:]] == ["good"] * 3
            # Unflagged values for longer than the quiet period: overflow ended, logged once.
            for i in range(8):
                await machine.set("Spindle.Temp", 50.0 + i)
                await asyncio.sleep(0.1)
            await until(lambda: not d.overflowing, "overflow ended")
            # A new episode is a new transition.
            await machine.set("Machine.Progress", 0.5, status=OVERFLOWED)
            await until(lambda: d.overflows == 4, "a second overflow")
            assert REGISTRY.get_sample_value("edge_agent_driver_errors_total", metric) == before + 4
        finally:
            await got.stop()
            await d.close()
    events = [(e["event"], e.get("tags")) for e in logs if e["event"].startswith("server_queue_overflow")]
    assert events == [
        ("server_queue_overflow", ["temp"]),
        ("server_queue_overflow_ended", None),
        ("server_queue_overflow", ["progress"]),
    ]
    first = next(e for e in logs if e["event"] == "server_queue_overflow")
    assert first["queue_sizes"] == {"temp": d.queue_sizes["temp"]} and first["log_level"] == "warning"


# ---- one delivery per publish response -------------------------------------------------------------


class Turns:
    """Counts event loop iterations: a callback that schedules itself again on every turn."""

    def __init__(self) -> None:
        self.n = 0
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.n += 1
        self._handle = self._loop.call_soon(self._tick)

    def stop(self) -> None:
        self._handle.cancel()


BAD_TAGS = (
    TAGS
    + """
[[equipment.tags]]
name = "missing"
node = "ns=2;s=Machine.Nothing"
[[equipment.tags]]
name = "nowhere"
node = "nsu=urn:nobody;s=X"
"""
)


async def test_initial_values_and_each_response_are_handed_over_in_one_loop_turn(
    tmp_path: Path, machine: MachineServer
) -> None:
    eq = equipment(tmp_path, machine.endpoint, connection="publishing_interval_ms = 100\n", tags=BAD_TAGS)
    d = OpcUaDriver(eq, DriverContext(tmp_path))
    responses: list[int] = []  # values per publish response, in arrival order
    count = d._counters.on_notification

    def counting(subscription_id: int | None, values: int) -> None:
        count(subscription_id, values)
        if values:
            responses.append(values)

    d._counters.on_notification = counting  # type: ignore[method-assign]
    async with d:
        turns = Turns()
        seen: list[tuple[int, Event]] = []  # (loop turn, event)
        stream = cast(AsyncGenerator[Event, None], d.events())

        async def consume() -> None:
            async for ev in stream:
                seen.append((turns.n, ev))

        task = asyncio.create_task(consume())
        try:
            # The initial notification's five values and the two unavailable tags' bad readings: one turn.
            await until(lambda: len(seen) >= 7, "initial values and bad readings")
            assert len({turn for turn, _ in seen[:7]}) == 1
            assert {ev.tag for _, ev in seen[:7] if isinstance(ev, Reading) and ev.quality == "bad"} == {
                "missing",
                "nowhere",
            }
            # Many values per response, each response handed over before the loop turns again.
            for round_ in range(6):
                for sid in ("Spindle.Temp", "Machine.Progress", "Machine.SpindleSpeed"):
                    await machine.set(sid, round_ + 1.0)
                await asyncio.sleep(0.03)
            await until(lambda: sum(responses) == 6 * 3 + 5, "every change")
            await until(lambda: len(seen) == 7 + 6 * 3, "every change handed over")
            at = 2  # the responses' readings follow the two bad readings
            for n in responses:
                assert len({turn for turn, _ in seen[at : at + n]}) == 1, (responses, seen)
                at += n
        finally:
            turns.stop()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await stream.aclose()
