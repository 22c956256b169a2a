"""The shipped agent.toml on the built-in simulators: every equipment comes alive on MQTT."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from peers import ROOT, TESTS, Broker, Daemon, Recorder, free_port, wait_until

R = "edge/demo-plant/cell-1"


def shipped_copy(tmp: Path, broker_port: int) -> tuple[Path, dict[str, int]]:
    """agent.toml copied into `tmp` with every port rewritten to a free one (paths are relative already)."""
    text = (ROOT / "agent.toml").read_text()
    ports = {name: free_port() for name in ("opcua", "modbus", "mpm", "http", "mtconnect")}
    text = text.replace("mqtt://127.0.0.1:1883", f"mqtt://127.0.0.1:{broker_port}")
    text = text.replace("opc.tcp://127.0.0.1:4840", f"opc.tcp://127.0.0.1:{ports['opcua']}")
    text = re.sub(r"^port = 5020$", f"port = {ports['modbus']}", text, flags=re.M)
    text = text.replace("127.0.0.1:8780", f"127.0.0.1:{ports['mpm']}")
    text = text.replace("127.0.0.1:8710", f"127.0.0.1:{ports['http']}")
    text = text.replace("http://127.0.0.1:5000", f"http://127.0.0.1:{ports['mtconnect']}")
    text = text.replace("reconnect_max_s = 10", "reconnect_max_s = 1")
    values = "\n".join(line.split("#")[0] for line in text.splitlines())
    assert not re.search(r"\b(1883|4840|5020|8780|8710|5000)\b", values), "a default port left in the copy"
    path = tmp / "agent.toml"
    path.write_text(text)
    return path, ports


def test_shipped_config_on_simulators(tmp_path: Path, broker: Broker) -> None:
    cfg, ports = shipped_copy(tmp_path, broker.port)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT)])
    sim_log = open(tmp_path / "simulate.log", "wb")
    sim = subprocess.Popen(
        [sys.executable, "-m", "agent", "simulate", "--config", str(cfg)],
        stdout=sim_log,
        stderr=sim_log,
        env=env,
        cwd=tmp_path,
    )
    sim_log.close()
    rec = Recorder(broker.port, [f"{R}/#"])
    daemon = Daemon(cfg)
    try:
        wait_until(lambda: "simulating" in (tmp_path / "simulate.log").read_text(), what="simulators up")
        daemon.start()
        equipment = [m.group(1) for m in re.finditer(r'^id = "([^"]+)"', cfg.read_text(), re.M)][1:]
        assert equipment, "the shipped config has equipment"

        def alive(eid: str) -> bool:
            statuses = [m.json for m in rec.select(f"/equipment/{eid}/status")]
            return any(s["status"] not in ("offline", "unknown") for s in statuses)

        for eid in equipment:
            rec.wait_for(lambda ms, eid=eid: alive(eid), f"{eid} alive")
        # telemetry from every equipment that has tags
        for eid in equipment:
            if "file_drop" in cfg.read_text().split(f'id = "{eid}"')[1].split("[[equipment]]")[0]:
                continue
            rec.wait_for(lambda ms, eid=eid: rec.select(f"/equipment/{eid}/telemetry"), f"{eid} telemetry")
        # inspection reports from the CMM reach MPM and are published as delivered
        rec.wait_for(
            lambda ms: [m for m in rec.select("cmm-1/quality") if m.json["mpm_delivery"] == "delivered"],
            "a delivered report",
        )
        # the local API answers with the same equipment
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/api/v1/equipment", timeout=30) as resp:
            listed = {e["equipment_id"] for e in json.loads(resp.read())["equipment"]}
        assert listed == set(equipment)
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        rec.close()
        sim.send_signal(signal.SIGTERM)
        try:
            sim.wait(timeout=30)
        except subprocess.TimeoutExpired:
            sim.kill()
            sim.wait()
    assert sim.returncode == 0, (tmp_path / "simulate.log").read_text()[-3000:]
