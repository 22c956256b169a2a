"""`edge-agent test` against the built-in simulators: the shipped config reads clean and shows its payloads;
one wrong OPC UA node and one wrong Modbus register make it fail, naming both."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli import cli
from test_shipped_config import shipped_copy

from peers import ROOT, TESTS, free_port, wait_until


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def simulated(tmp_path: Path) -> Iterator[Path]:
    """The shipped agent.toml on free ports, its simulators running; nothing listens on its broker port."""
    cfg, ports = shipped_copy(tmp_path, free_port())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    log = tmp_path / "simulate.log"
    with open(log, "wb") as out:
        sim = subprocess.Popen(
            [sys.executable, "-m", "agent", "simulate", "--config", str(cfg)],
            stdout=out,
            stderr=out,
            env=env,
            cwd=tmp_path,
        )
    try:
        wait_until(lambda: (tmp_path / "state" / "printer-1.tty").exists(), what="printer simulator up")
        for name in ("opcua", "modbus"):
            wait_until(lambda name=name: listening(ports[name]), what=f"{name} simulator listening")
        yield cfg
    finally:
        sim.send_signal(signal.SIGTERM)
        try:
            sim.wait(timeout=30)
        except subprocess.TimeoutExpired:
            sim.kill()
            sim.wait()


def test_dry_run_of_the_shipped_config(simulated: Path) -> None:
    out = cli("test", "--config", str(simulated), cwd=simulated.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK: every tag read" in out.stdout
    root = "edge/demo-plant/cell-1/equipment"
    for eid in ("hybrid-1", "plc-1", "printer-1"):
        assert f"{root}/{eid}/telemetry " in out.stdout, eid
        assert f"{root}/{eid}/status (retained) " in out.stdout, eid
    assert "spindle_temp" in out.stdout and "(good)" in out.stdout
    assert "status: " in out.stdout


def test_dry_run_names_a_wrong_node_and_a_wrong_register(simulated: Path) -> None:
    text = simulated.read_text()
    text = text.replace('node = "ns=2;s=Machine.PartCount"', 'node = "ns=2;s=Machine.NoSuchNode"')
    text = text.replace('name = "error_code"\naddress = 1\n', 'name = "error_code"\naddress = 60000\n')
    assert "NoSuchNode" in text and "address = 60000" in text
    simulated.write_text(text)
    out = cli("test", "--config", str(simulated), cwd=simulated.parent)
    assert out.returncode == 1, out.stdout + out.stderr
    bad = [line for line in out.stdout.splitlines() if line.startswith("BAD ")]
    assert "BAD hybrid-1.part_count: BadNodeIdUnknown" in bad, out.stdout
    assert any(line.startswith("BAD plc-1.error_code: ILLEGAL_DATA_ADDRESS") for line in bad), out.stdout
    assert len(bad) == 2, bad


def test_dry_run_publishes_nothing_and_reports_unreachable(tmp_path: Path) -> None:
    """Nothing listens: the equipment is named as unreachable, exit 1."""
    cfg, _ = shipped_copy(tmp_path, free_port())
    out = cli("test", "--config", str(cfg), "--equipment", "plc-1", "--timeout", "5", cwd=tmp_path)
    assert out.returncode == 1
    assert "BAD plc-1: unreachable" in out.stdout, out.stdout
    assert "hybrid-1" not in out.stdout
