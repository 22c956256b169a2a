"""A new driver is one package plus one registry line; a plant module written to the old interface still loads.

`tests/example_driver` is a complete driver that imports `drivers.sdk` only. These tests load it the way a
plant would (`[agent] driver_modules`), with no other edit anywhere, and see it through the daemon on MQTT.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.config import AgentConfig, load_config
from drivers.sdk import DriverContext, PollingDriver, Reading
from drivers.sdk.registry import get_driver, get_simulator, known_drivers
from example_driver.sim import Thermometer
from peers import Broker, Daemon, Recorder, scripted_equipment, wait_until, write_config
from test_boundary import imports_of

R = "edge/test-site/cell-t"
EXAMPLE = Path(__file__).resolve().parent.parent / "example_driver"


def thermometer(directory: Path) -> str:
    return f"""
[[equipment]]
id = "oven-1"
type = "sensor"
driver = "thermometer"
[equipment.connection]
directory = "{directory}"
poll_interval_ms = 50
[equipment.status]
tag = "mode"
map = {{ "0" = "idle", "1" = "running" }}
[[equipment.tags]]
name = "mode"
file = "mode"
[[equipment.tags]]
name = "temperature"
file = "temp"
scale = 0.001
unit = "degC"
"""


def example_config(tmp: Path, broker_port: int, body: str) -> Path:
    """The test daemon's config with the example package as its only plant driver module."""
    path = write_config(tmp, broker_port, body)
    path.write_text(
        path.read_text().replace('driver_modules = ["scripted_driver"]', 'driver_modules = ["example_driver"]')
    )
    return path


def statuses(rec: Recorder) -> list[str]:
    return [m.json["status"] for m in rec.select("/status", contains="oven-1")]


def temperatures(rec: Recorder) -> list[object]:
    return [v["value"] for m in rec.select("/telemetry") for v in m.json["values"] if v["tag"] == "temperature"]


def test_the_example_driver_imports_only_the_sdk() -> None:
    targets = {imp.target for path in EXAMPLE.glob("*.py") for imp in imports_of(f"example_driver.{path.stem}", path)}
    assert targets, "the walk found no import of the SDK"
    assert all(t == "drivers.sdk" or t.startswith("drivers.sdk.") for t in targets), sorted(targets)
    sim = {imp.target for imp in imports_of("example_driver.sim", EXAMPLE / "sim.py")}
    assert sim == {"drivers.sdk"}


def test_a_new_driver_package_runs_in_the_daemon(tmp_path: Path, broker: Broker) -> None:
    sensor = Thermometer(tmp_path / "hwmon")
    sensor.set("temp", 21500)
    sensor.set("mode", 1)
    cfg = example_config(tmp_path, broker.port, thermometer(sensor.directory))
    rec = Recorder(broker.port, [f"{R}/#"])
    daemon = Daemon(cfg)
    try:
        daemon.start()
        wait_until(lambda: "running" in statuses(rec), what="oven-1 running")
        wait_until(lambda: 21.5 in temperatures(rec), what="the temperature in telemetry")
        sensor.set("temp", 23250)
        sensor.set("mode", 0)
        wait_until(lambda: 23.25 in temperatures(rec), what="the new temperature")
        wait_until(lambda: statuses(rec)[-1:] == ["idle"], what="oven-1 idle")
        # The sensor's folder goes away: the device is gone.
        for f in sensor.directory.iterdir():
            f.unlink()
        sensor.directory.rmdir()
        wait_until(lambda: statuses(rec)[-1:] == ["offline"], what="oven-1 offline")
    finally:
        daemon.stop()
        rec.close()


async def test_the_simulator_serves_what_the_driver_reads(tmp_path: Path) -> None:
    config = load(tmp_path / "agent.toml", "example_driver", thermometer(tmp_path / "hwmon"))
    eq = config.equipment[0]
    simulate = get_simulator("thermometer")
    assert simulate is not None
    task = asyncio.create_task(simulate(eq, tmp_path / "state"))
    try:
        await asyncio.to_thread(wait_until, lambda: (tmp_path / "hwmon" / "mode").exists(), what="the simulator")
        driver = get_driver("thermometer")(eq, DriverContext(state_dir=tmp_path))
        assert isinstance(driver, PollingDriver)
        async with driver:
            readings = await driver.read_once()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    by_tag = {r.tag: r for r in readings if isinstance(r, Reading)}
    assert set(by_tag) == {"mode", "temperature"}
    assert by_tag["mode"].value in (0, 1)
    assert 15.0 <= by_tag["temperature"].value <= 30.0
    assert all(r.quality == "good" for r in by_tag.values())


def load(path: Path, module: str, body: str) -> AgentConfig:
    """A config naming `module` in driver_modules, loaded as the daemon loads it."""
    path.write_text(
        f"""
[agent]
id = "cell-t"
site = "test-site"
state_dir = "state"
driver_modules = ["{module}"]
[mqtt]
url = "mqtt://127.0.0.1:1883"
{body}
"""
    )
    return load_config(path)


def test_a_plant_module_written_to_the_old_interface_still_loads(tmp_path: Path) -> None:
    # tests/scripted_driver.py is such a module: it imports the pre-SDK paths.
    old = {imp.target for imp in imports_of("scripted_driver", Path(__file__).parent.parent / "scripted_driver.py")}
    assert {"drivers.base", "drivers.registry", "agent.config", "agent.model"} <= old, sorted(old)
    config = load(tmp_path / "agent.toml", "scripted_driver", scripted_equipment("m-1", tmp_path / "script.jsonl"))
    import scripted_driver

    assert "scripted" in known_drivers()
    assert get_driver("scripted") is scripted_driver.ScriptedDriver
    assert isinstance(config.equipment[0].connection, scripted_driver.ScriptedConnection)
