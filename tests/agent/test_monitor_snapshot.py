"""One delivery, one derivation: what a driver hands over before the loop turns is applied whole."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from test_monitor_pacing import Clock

from agent.config import parse_config
from agent.equipment import _MemorySink
from agent.model import ConnectionState, Reading, StatusFact
from agent.monitor import Monitor
from peers import scripted_equipment, write_config


class Messages(_MemorySink):
    """Keeps every status and alert payload the monitor appends."""

    def __init__(self) -> None:
        super().__init__()
        self.status: list[dict[str, Any]] = []
        self.alerts: list[dict[str, Any]] = []

    def append(self, kind: str, topic: str, payload: dict[str, Any], *args: Any, **kwargs: Any) -> int:
        if kind == "status":
            self.status.append(dict(payload))
        elif kind == "alert":
            self.alerts.append(dict(payload))
        return super().append(kind, topic, payload)


def monitor(tmp_path: Path) -> tuple[Monitor, Clock, Messages]:
    path = write_config(tmp_path, 1883, scripted_equipment("m1", tmp_path / "script.jsonl"))
    cfg = parse_config(path.read_text(), path)
    clock = Clock()
    sink = Messages()
    mon = Monitor(cfg, sink)
    mon._loop = clock  # type: ignore[assignment]  # what run() does with the running loop
    mon._time = clock.time
    mon.on_connection("m1", ConnectionState(True))
    clock.advance(1.0)
    sink.status.clear()
    return mon, clock, sink


def deliver(mon: Monitor, clock: Clock, *values: tuple[str, Any]) -> None:
    """Readings handed over in one go; the loop turns afterwards."""
    now = datetime.now(UTC)
    for tag, value in values:
        mon.on_reading("m1", Reading(tag, value, now))
    clock.advance(clock.now + 0.01)


def brief(sink: Messages) -> list[tuple[Any, ...]]:
    return [(s["status"], s["current_operation"], s["progress"], s["process_id"]) for s in sink.status]


def test_one_delivery_one_status_and_the_alert_carries_the_job(tmp_path: Path) -> None:
    mon, clock, sink = monitor(tmp_path)
    deliver(mon, clock, ("temp", 95.0), ("state", 1), ("program", "O1"), ("progress", 0.5), ("job", "J-1"))
    assert brief(sink) == [("running", "O1", 0.5, "J-1")]
    assert [(a["state"], a["process_id"]) for a in sink.alerts] == [("active", "J-1")]


def test_a_status_tag_twice_in_one_delivery_keeps_every_transition(tmp_path: Path) -> None:
    mon, clock, sink = monitor(tmp_path)
    deliver(mon, clock, ("state", 1), ("job", "J-1"), ("state", 0), ("state", 1), ("job", "J-2"))
    assert [s[0] for s in brief(sink)] == ["running", "idle", "running"]
    assert brief(sink)[-1][3] == "J-2"


def test_every_status_fact_is_published(tmp_path: Path) -> None:
    mon, clock, sink = monitor(tmp_path)
    mon.on_fact("m1", StatusFact("running", current_operation="a.gcode", process_id="a"))
    mon.on_fact("m1", StatusFact("idle"))
    clock.advance(clock.now + 0.01)
    assert [s["status"] for s in sink.status] == ["running", "idle"]


def test_connect_and_first_read_in_one_turn_make_one_status(tmp_path: Path) -> None:
    mon, clock, sink = monitor(tmp_path)
    mon.on_connection("m1", ConnectionState(False, "gone"))
    clock.advance(clock.now + 0.01)
    sink.status.clear()
    mon.on_connection("m1", ConnectionState(True))
    deliver(mon, clock, ("state", 0), ("job", "J-3"))
    assert brief(sink) == [("idle", None, None, "J-3")]
