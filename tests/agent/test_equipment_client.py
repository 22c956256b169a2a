"""The Python API: EquipmentClient drives the scripted driver through every method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import scripted_driver  # noqa: F401  (registers the "scripted" driver)
from agent.equipment import EquipmentClient, EquipmentStatus
from agent.errors import ConfigError
from peers import script_line, until


def config(script: Path, down: Path | None = None) -> dict[str, Any]:
    conn: dict[str, Any] = {"script": str(script)}
    if down is not None:
        conn["down_file"] = str(down)
    return {
        "driver": "scripted",
        "connection": conn,
        "status": {"tag": "state", "map": {"0": "idle", "1": "running"}, "process_id_tag": "job"},
        "tags": [{"name": "state"}, {"name": "job"}, {"name": "temp", "unit": "degC"}, {"name": "sp"}],
        "commands": [{"name": "set_sp", "kind": "write", "tag": "sp", "min": 0, "max": 100}],
    }


async def test_every_method(tmp_path: Path) -> None:
    script = tmp_path / "m.jsonl"
    client = EquipmentClient("cnc_mill", "mill-1", config(script), state_dir=tmp_path / "state", reconnect_max_s=0.5)
    assert not client.is_connected and not client.is_monitoring
    with pytest.raises(ConnectionError):
        await client.get_equipment_status()
    with pytest.raises(ConnectionError):
        await client.send_command("set_sp", {"value": 1})
    with pytest.raises(ConnectionError):
        await client.start_monitoring()
    async with client as eq:
        assert eq.is_connected
        seen: list[EquipmentStatus] = []
        async_seen: list[str] = []

        async def async_cb(status: EquipmentStatus) -> None:
            async_seen.append(status.status)

        eq.register_status_callback(seen.append)
        eq.register_status_callback(async_cb)
        script_line(script, tag="state", value=1)
        script_line(script, tag="job", value="P-1")
        script_line(script, tag="temp", value=21.5)
        reading = await eq.read_sensor_data("temp")
        assert reading["value"] == 21.5 and reading["unit"] == "degC" and reading["quality"] == "good"
        for i in range(50):
            script_line(script, tag="temp", value=30.0 + i)
        await until(lambda: eq._monitor.equipment["mill-1"].values["temp"].value == 79.0)
        # Nothing publishes telemetry here, so none is kept waiting for a flush that never comes.
        assert eq._monitor.equipment["mill-1"].pending == []
        await until(lambda: any(s.status == "running" and s.process_id == "P-1" for s in seen))
        status = await eq.get_equipment_status()
        assert status.status == "running" and status.process_id == "P-1", status.error_message
        assert EquipmentStatus.from_dict(status.to_dict()).to_dict() == status.to_dict()
        with pytest.raises(ValueError):
            await eq.read_sensor_data("nope")
        ok = await eq.send_command("set_sp", {"value": 42})
        assert ok["success"] is True
        bad = await eq.send_command("set_sp", {"value": 420})
        assert bad["success"] is False and bad["data"]["reason"] == "out_of_range"
        unknown = await eq.send_command("nope", {})
        assert unknown["success"] is False and unknown["data"]["reason"] == "unknown_command"
        await eq.start_monitoring(update_interval=0.05)
        assert eq.is_monitoring
        with pytest.raises(RuntimeError):
            await eq.start_monitoring()
        n = len(seen)
        await until(lambda: len(seen) >= n + 2)
        await eq.stop_monitoring()
        assert not eq.is_monitoring
        assert "running" in async_seen
    assert not client.is_connected
    with pytest.raises(ConnectionError):
        await client.read_sensor_data("temp")


async def test_connect_failure_and_bad_config(tmp_path: Path) -> None:
    down = tmp_path / "down"
    down.write_text("")
    client = EquipmentClient("cnc_mill", "mill-2", config(tmp_path / "x.jsonl", down))
    with pytest.raises(ConnectionError):
        await client.connect()
    assert not client.is_connected
    client.close_tmp()
    bad = config(tmp_path / "x.jsonl")
    bad["commands"][0]["tag"] = "missing"
    with pytest.raises(ConfigError) as info:
        EquipmentClient("cnc_mill", "mill-3", bad)
    assert "equipment[mill-3].commands[0].tag: unknown tag 'missing'" in str(info.value)


async def test_link_lost_then_back(tmp_path: Path) -> None:
    script = tmp_path / "m.jsonl"
    client = EquipmentClient("cnc_mill", "mill-4", config(script), state_dir=tmp_path / "s", reconnect_max_s=0.2)
    async with client as eq:
        script_line(script, tag="state", value=0)
        await until(lambda: eq._monitor.equipment["mill-4"].status.status == "idle")
        script_line(script, op="disconnect", error="cable pulled")
        await until(lambda: eq._monitor.equipment["mill-4"].status.status == "offline")
        assert (await eq.get_equipment_status()).error_message == "cable pulled"
        offline = await eq.send_command("set_sp", {"value": 1})
        assert offline["success"] is False and offline["data"]["reason"] == "offline"
        script_line(script, tag="state", value=1)
        await until(lambda: eq._monitor.equipment["mill-4"].status.status == "running")
