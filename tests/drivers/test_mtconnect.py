"""The MTConnect driver against the simulated agent: status, values, conditions as alerts, and the stream
kept whole across agent restarts, a wrapped buffer and driver restarts."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.config import AgentConfig, EquipmentConfig, parse_config
from agent.equipment import _MemorySink
from agent.errors import ConfigError
from agent.monitor import Monitor
from drivers.mtconnect.driver import MTConnectDriver
from drivers.mtconnect.sim import Lathe, lathe_agent
from drivers.mtconnect.sim_agent import SimAgent
from drivers.sdk import Checkpoint, CountingMetrics, DeviceAlerts, DriverContext, Event, Reading, StatusFact
from peers import until

TAGS = """
[[equipment.tags]]
name = "x"
item = "Xact"
unit = "mm"
[[equipment.tags]]
name = "line"
item = "line"
[[equipment.tags]]
name = "execution"
item = "execution"
[[equipment.tags]]
name = "spindle"
item = "Srpm"
unit = "rpm"
"""


def config(tmp_path: Path, url: str, extra: str = "", tags: str = TAGS, **conn: Any) -> AgentConfig:
    """A validated config with one MTConnect equipment `lathe-1`."""
    conn = {"url": url, "poll_interval_ms": 20, "timeout_s": 5, **conn}
    lines = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in conn.items())
    text = f"""
[agent]
id = "t"
site = "s"
state_dir = "state"

[[equipment]]
id = "lathe-1"
type = "cnc_lathe"
driver = "mtconnect"
{extra}
[equipment.connection]
{lines}
{tags}
"""
    return parse_config(text, tmp_path / "agent.toml")


def equipment(tmp_path: Path, url: str, extra: str = "", tags: str = TAGS, **conn: Any) -> EquipmentConfig:
    return config(tmp_path, url, extra, tags, **conn).equipment[0]


class Messages(_MemorySink):
    """Keeps every status and alert payload the monitor appends."""

    def __init__(self) -> None:
        super().__init__()
        self.status: list[dict[str, Any]] = []
        self.alerts: list[dict[str, Any]] = []

    def append(self, kind: str, topic: str, payload: dict[str, Any], *args: Any, **kwargs: Any) -> int:
        {"status": self.status, "alert": self.alerts}.get(kind, []).append(dict(payload))
        return super().append(kind, topic, payload)


class Run:
    """A driver streaming into a list (and optionally a monitor) in a task."""

    def __init__(self, eq: EquipmentConfig, state: Path, monitor: Monitor | None = None) -> None:
        self.metrics = CountingMetrics()
        self.driver = MTConnectDriver(eq, DriverContext(state_dir=state, metrics=self.metrics))
        self.events: list[Event] = []
        self.monitor = monitor
        self.task: asyncio.Task[None] | None = None

    async def _go(self) -> None:
        async with self.driver:
            async for ev in self.driver.events():
                if isinstance(ev, Checkpoint):
                    ev.done.set_result(True)  # as the pipeline does once what came before is stored
                    continue
                self.events.append(ev)
                if self.monitor is not None:
                    self.monitor.on_event("lathe-1", ev)

    async def __aenter__(self) -> Run:
        self.task = asyncio.create_task(self._go())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    def values(self, tag: str) -> list[Any]:
        return [e.value for e in self.events if isinstance(e, Reading) and e.tag == tag and e.quality == "good"]

    def statuses(self) -> list[str]:
        return [e.status for e in self.events if isinstance(e, StatusFact)]


@pytest.fixture
async def agent() -> AsyncIterator[SimAgent]:
    sim = lathe_agent(buffer_size=4096)
    await sim.start()
    yield sim
    await sim.stop()


async def steps(lathe: Lathe, run: Run, n: int) -> None:
    """Advance the machine `n` steps, each read by the driver before the next."""
    for _ in range(n):
        lathe.step()
        await until(lambda t=lathe.agent.next_seq: run.driver.cursor.next == t, "the driver to read the step")


async def test_status_follows_the_execution_states(agent: SimAgent, tmp_path: Path) -> None:
    lathe = Lathe(agent, seed=1)
    async with Run(equipment(tmp_path, agent_url(agent)), tmp_path / "state") as run:
        await until(lambda: run.statuses(), "a first status")
        await steps(lathe, run, 16 * 3)
    facts = [e for e in run.events if isinstance(e, StatusFact)]
    seen = [f.metadata.get("execution") for f in facts]
    by_state = {f.metadata.get("execution"): f.status for f in facts if f.status != "error"}
    assert by_state == {"READY": "idle", "ACTIVE": "running", "FEED_HOLD": "paused", "PROGRAM_COMPLETED": "idle"}
    assert seen.index("ACTIVE") < seen.index("FEED_HOLD")
    # the Fault of the third cycle's feed hold is an error with its message; the program is the operation
    errors = [f for f in facts if f.status == "error"]
    assert errors and errors[0].error_message == "Chuck pressure low"
    assert {f.current_operation for f in facts} == {"O1000"}
    assert facts[0].process_id == "P-00001" and facts[-1].process_id == "P-00003"
    assert facts[0].metadata["controller_mode"] == "AUTOMATIC"


async def test_values_are_typed_by_category_and_unavailable_is_bad(agent: SimAgent, tmp_path: Path) -> None:
    lathe = Lathe(agent, seed=2)
    async with Run(equipment(tmp_path, agent_url(agent)), tmp_path / "state") as run:
        await steps(lathe, run, 6)
        agent.add("Xact", "UNAVAILABLE")
        agent.add("avail", "UNAVAILABLE")
        await until(lambda: run.statuses()[-1:] == ["offline"], "offline on UNAVAILABLE availability")
    x = [e for e in run.events if isinstance(e, Reading) and e.tag == "x"]
    assert all(isinstance(r.value, float) for r in x if r.quality == "good")  # a SAMPLE is a number
    assert (x[-1].value, x[-1].quality) == (None, "bad")
    assert run.values("line") == [1, 2, 3]  # an EVENT that reads as a number is one
    assert run.values("execution")[:2] == ["READY", "ACTIVE"]  # and text otherwise
    assert all(isinstance(v, float) for v in run.values("spindle"))


async def test_a_fault_raises_and_clears_one_alert_with_the_same_id(agent: SimAgent, tmp_path: Path) -> None:
    cfg = config(tmp_path, agent_url(agent))
    eq = cfg.equipment[0]
    sink = Messages()
    mon = Monitor(cfg, sink)
    lathe = Lathe(agent, seed=3)
    async with Run(eq, tmp_path / "state", mon) as run:
        await until(lambda: run.statuses(), "a first status")
        await steps(lathe, run, 16 * 3)
    faults = [a for a in sink.alerts if a["tag"] == "system_cond"]
    assert [(a["state"], a["severity"], a["value"], a["message"]) for a in faults] == [
        ("active", "critical", "E100", "Chuck pressure low"),
        ("cleared", "critical", "E100", "Chuck pressure low"),
    ]
    assert faults[0]["alert_id"] == faults[1]["alert_id"]
    warnings = [a for a in sink.alerts if a["tag"] == "spindle_temp_cond"]
    assert [(a["state"], a["severity"], a["value"]) for a in warnings] == [
        ("active", "warning", "TW1"),
        ("cleared", "warning", "TW1"),
    ]
    assert warnings[0]["alert_id"] == warnings[1]["alert_id"] != faults[0]["alert_id"]
    assert "error" in [s["status"] for s in sink.status]


async def test_an_agent_restart_is_resynced_without_duplicates(agent: SimAgent, tmp_path: Path) -> None:
    lathe = Lathe(agent, seed=4)
    with capture_logs() as logs:
        async with Run(equipment(tmp_path, agent_url(agent)), tmp_path / "state") as run:
            await steps(lathe, run, 8)
            old = agent.instance_id
            lathe.restart_agent()
            assert agent.instance_id != old
            await until(lambda: run.driver.cursor.instance_id == agent.instance_id, "the new instance")
            await steps(lathe, run, 12)
    assert next(e for e in logs if e["event"] == "agent_restarted")["previous"] == old
    lines = run.values("line")
    assert lines == list(range(1, lines[-1] + 1)) and lines[-1] > 5  # nothing twice, nothing left out
    # line is UNAVAILABLE before the machine first runs, and again after the agent restarted: bad, not a repeat
    assert [e.quality for e in run.events if isinstance(e, Reading) and e.tag == "line"].count("bad") == 2


async def test_a_restarted_driver_resumes_from_the_saved_sequence(agent: SimAgent, tmp_path: Path) -> None:
    eq = equipment(tmp_path, agent_url(agent))
    lathe = Lathe(agent, seed=5)
    async with Run(eq, tmp_path / "state") as first:
        await steps(lathe, first, 6)
    for _ in range(6):
        lathe.step()  # while the driver is away
    agent.requests.clear()
    with capture_logs() as logs:
        async with Run(eq, tmp_path / "state") as second:
            await steps(lathe, second, 4)
    assert any(e["event"] == "stream_resumed" for e in logs)
    assert second.driver.lost == 0
    # the state is taken from where it stopped, values only from the samples after it: no repeat, no gap
    assert agent.requests[1].startswith("current?at=")
    assert first.values("line") + second.values("line") == list(range(1, lathe.line + 1))
    assert second.statuses()[0] == "running"


async def test_a_wrapped_buffer_logs_and_counts_the_lost_range(tmp_path: Path) -> None:
    agent = lathe_agent(buffer_size=64)
    await agent.start()
    try:
        eq = equipment(tmp_path, agent_url(agent))
        lathe = Lathe(agent, seed=6)
        async with Run(eq, tmp_path / "state") as first:
            await steps(lathe, first, 4)
        saved = first.driver.cursor.next
        assert saved is not None
        for _ in range(40):
            lathe.step()
        assert agent.first_seq > saved
        with capture_logs() as logs:
            async with Run(eq, tmp_path / "state") as second:
                await until(lambda: second.values("line"), "values after the resync")
                await steps(lathe, second, 16)
        lost = [e for e in logs if e["event"] == "observations_lost"]
        assert [(e["first"], e["last"], e["count"]) for e in lost] == [
            (saved, agent_first(lost), agent_first(lost) - saved + 1)
        ]
        assert second.driver.lost == lost[0]["count"] == second.metrics.counts["dropped"]
        assert second.metrics.counts["error:buffer_wrapped"] == 1
        assert second.values("line")[-1] > first.values("line")[-1] + 16
    finally:
        await agent.stop()


async def test_a_buffer_wrapping_between_polls_is_counted_too(tmp_path: Path) -> None:
    agent = lathe_agent(buffer_size=32)
    await agent.start()
    try:
        lathe = Lathe(agent, seed=7)
        driver = MTConnectDriver(equipment(tmp_path, agent_url(agent)), DriverContext(state_dir=tmp_path / "state"))
        async with driver:
            await driver._start()
            cursor = driver.cursor.next
            assert cursor is not None
            for _ in range(20):
                lathe.step()
            with capture_logs() as logs:
                events, more = await driver._sample()  # OUT_OF_RANGE: resynced from /current
            assert driver.cursor.next == agent.next_seq and not more
        lost = [e for e in logs if e["event"] == "observations_lost"]
        assert [(e["first"], e["last"]) for e in lost] == [(cursor, agent.first_seq - 1)]
        assert [r.value for r in events if isinstance(r, Reading) and r.tag == "line"] == [lathe.line]
    finally:
        await agent.stop()


def on_disk(path: Path) -> tuple[str, int]:
    data = json.loads(path.read_text())
    return data["instance_id"], data["next"]


def agent_first(lost: list[dict[str, Any]]) -> int:
    return int(lost[0]["last"])


def agent_url(agent: SimAgent) -> str:
    return f"http://127.0.0.1:{agent.port}"


def test_declared_commands_are_refused_at_check_config(tmp_path: Path) -> None:
    cmd = '[[equipment.commands]]\nname = "cycle_start"\nkind = "load_process"\n'
    with pytest.raises(ConfigError, match="MTConnect is read-only"):
        equipment(tmp_path, "http://127.0.0.1:5000", tags=TAGS + cmd)


async def test_a_tag_naming_no_data_item_is_reported(agent: SimAgent, tmp_path: Path) -> None:
    tags = TAGS + '[[equipment.tags]]\nname = "ghost"\nitem = "nope"\n'
    with capture_logs() as logs:
        async with Run(equipment(tmp_path, agent_url(agent), tags=tags), tmp_path / "state") as run:
            await until(lambda: run.statuses(), "a first status")
    assert any(e["event"] == "tag_item_unknown" and e["tag"] == "ghost" for e in logs)


def test_device_alerts_survive_a_monitor_restart_and_change_in_place(tmp_path: Path) -> None:
    """The core side of DeviceAlerts: the whole set per source, ids kept in the store's state."""
    cfg = config(tmp_path, "http://127.0.0.1:5000")
    sink = Messages()
    ts = datetime.now(UTC)
    first = Monitor(cfg, sink)
    first.on_event("lathe-1", DeviceAlerts("sys", {"E1": ("warning", "low")}, ts))
    first.on_event("lathe-1", DeviceAlerts("sys", {"E1": ("warning", "low")}, ts))  # as it was: nothing new
    first.on_event("lathe-1", DeviceAlerts("sys", {"E1": ("critical", "lower")}, ts))  # same alert, now worse
    second = Monitor(cfg, sink)  # a restarted daemon: the same store
    second.on_event("lathe-1", DeviceAlerts("sys", {}, ts))
    second.on_event("lathe-1", DeviceAlerts("sys", {}, ts))
    assert [(a["state"], a["severity"], a["value"], a["message"]) for a in sink.alerts] == [
        ("active", "warning", "E1", "low"),
        ("active", "critical", "E1", "lower"),
        ("cleared", "critical", "E1", "lower"),
    ]
    assert len({a["alert_id"] for a in sink.alerts}) == 1
    assert sink.state == {}


async def test_the_position_is_saved_only_once_the_pipeline_has_stored_what_came_before(
    agent: SimAgent, tmp_path: Path
) -> None:
    eq = equipment(tmp_path, agent_url(agent))
    lathe = Lathe(agent, seed=8)
    driver = MTConnectDriver(eq, DriverContext(state_dir=tmp_path / "state"))
    held: list[Checkpoint] = []
    async with driver:
        stream = driver.events()
        while not held:
            ev = await anext(stream)
            if isinstance(ev, Checkpoint):
                held.append(ev)
        first = driver.cursor.position()
        lathe.step()
        while len(held) < 2:
            ev = await anext(stream)
            if isinstance(ev, Checkpoint):
                held.append(ev)
        assert not driver.cursor.path.exists()  # nothing confirmed: nothing saved
        held[0].done.set_result(True)
        lathe.step()
        await anext(stream)  # the next poll saves what is confirmed, not more
        assert on_disk(driver.cursor.path) == first
        await stream.aclose()
        held[1].done.set_result(True)  # confirmed after the driver closed: saved then
        await asyncio.sleep(0)
    assert driver.cursor.saved is not None and first is not None
    assert on_disk(driver.cursor.path) == driver.cursor.saved
    assert first[1] < driver.cursor.saved[1] < agent.next_seq  # the second poll's position, not the third's


def test_a_checkpoint_resolves_once_the_telemetry_before_it_is_flushed(tmp_path: Path) -> None:
    cfg = config(tmp_path, "http://127.0.0.1:5000")
    mon = Monitor(cfg, Messages())
    loop = asyncio.new_event_loop()
    try:
        idle = Checkpoint(loop.create_future())
        mon.on_event("lathe-1", idle)
        assert idle.done.done()  # nothing waits: stored already
        mon.on_event("lathe-1", Reading("x", 1.5, datetime.now(UTC)))
        waiting = Checkpoint(loop.create_future())
        mon.on_event("lathe-1", waiting)
        assert not waiting.done.done()
        mon.flush()
        assert waiting.done.result() is True
    finally:
        loop.close()


async def test_a_status_tag_in_the_config_replaces_the_standard_vocabulary(agent: SimAgent, tmp_path: Path) -> None:
    status = '[equipment.status]\ntag = "execution"\nmap = { "ACTIVE" = "running", "READY" = "maintenance" }\n'
    lathe = Lathe(agent, seed=9)
    async with Run(equipment(tmp_path, agent_url(agent), tags=TAGS + status), tmp_path / "state") as run:
        await steps(lathe, run, 5)
    assert run.statuses() == []  # the monitor maps the tag, as for any driver
    assert run.values("execution")[:2] == ["READY", "ACTIVE"]


async def test_a_reconnect_in_the_same_daemon_goes_on_from_what_it_handed_on(agent: SimAgent, tmp_path: Path) -> None:
    """The file lags until the pipeline confirms; a driver reconnecting meanwhile must not read again."""
    eq = equipment(tmp_path, agent_url(agent))
    lathe = Lathe(agent, seed=10)
    first = MTConnectDriver(eq, DriverContext(state_dir=tmp_path / "state"))
    values: list[Any] = []
    async with first:
        stream = first.events()
        while not isinstance(await anext(stream), Checkpoint):
            pass  # the state from /current
        for _ in range(6):
            lathe.step()
        while True:
            ev = await anext(stream)  # checkpoints never confirmed: nothing saved
            if isinstance(ev, Reading) and ev.tag == "line" and ev.quality == "good":
                values.append(ev.value)
            if isinstance(ev, Checkpoint) and first.cursor.next == agent.next_seq:
                break
        await stream.aclose()
    assert not first.cursor.path.exists()
    for _ in range(4):
        lathe.step()
    with capture_logs() as logs:
        async with Run(eq, tmp_path / "state") as second:
            await steps(lathe, second, 2)
    assert any(e["event"] == "stream_resumed" for e in logs)
    assert values + second.values("line") == list(range(1, lathe.line + 1))
