"""The UNS profile on the shipped agent.toml and its simulators: every equipment's values, retained status
and per-tag metadata under `<location>/<equipment>/...`, as a subscriber arriving late sees them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from test_shipped_config import shipped_copy

from agent.config import load_config
from peers import ROOT, TESTS, Broker, Daemon, Recorder, wait_until

LOC = "acme/demo-plant/machining/line-1"


def test_uns_topics_and_payloads_for_the_shipped_config(tmp_path: Path, broker: Broker) -> None:
    cfg_path, _ = shipped_copy(tmp_path, broker.port)
    text = cfg_path.read_text().replace("[mqtt]\n", '[mqtt]\nprofiles = ["edge-agent", "uns"]\n', 1)
    # the first equipment placed in the plant; the others fall back to the site
    text = text.replace('id = "hybrid-1"\n', f'id = "hybrid-1"\nlocation = "{LOC}"\n', 1)
    cfg_path.write_text(text)
    cfg = load_config(cfg_path)
    roots = {eq.id: f"{eq.location or cfg.agent.site}/{eq.id}" for eq in cfg.equipment}
    assert roots["hybrid-1"] == f"{LOC}/hybrid-1" and roots["plc-1"] == "demo-plant/plc-1"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT)])
    with open(tmp_path / "simulate.log", "wb") as sim_log:
        sim = subprocess.Popen(
            [sys.executable, "-m", "agent", "simulate", "--config", str(cfg_path)],
            stdout=sim_log,
            stderr=sim_log,
            env=env,
            cwd=tmp_path,
        )
    rec = Recorder(broker.port, [f"{r}/#" for r in roots.values()])
    daemon = Daemon(cfg_path)
    try:
        wait_until(lambda: "simulating" in (tmp_path / "simulate.log").read_text(), what="simulators up")
        daemon.start()
        for eq in cfg.equipment:
            root = roots[eq.id]
            rec.wait_for(
                lambda ms, root=root: any(
                    m.topic == f"{root}/status" and m.json["status"] not in ("offline", "unknown") for m in ms
                ),
                f"{eq.id} alive on the UNS",
            )
            if eq.driver == "file_drop" or not eq.tags:
                continue
            values = rec.wait_for(lambda ms, root=root: [m for m in ms if m.topic.startswith(f"{root}/telemetry/")])
            for m in values:
                tag = m.topic.rsplit("/", 1)[1]
                assert eq.tag(tag) is not None, m.topic
                assert set(m.json) >= {"value", "timestamp", "quality", "unit"} and not m.retain
                assert m.json["unit"] == eq.tag(tag).unit
        late = Recorder(broker.port, [f"{r}/+/#" for r in roots.values()], clean=True)
        try:
            for eq in cfg.equipment:
                root = roots[eq.id]
                wanted = {f"{root}/status"} | {f"{root}/metadata/{t.name}" for t in eq.tags}
                late.wait_for(lambda ms, w=wanted: w <= {m.topic for m in ms}, f"{eq.id} retained messages")
                meta = [m for m in late.select(contains=f"{root}/metadata/")]
                assert all(m.retain and m.json["equipment_id"] == eq.id for m in meta)
            assert not [m for m in late.messages if "/telemetry/" in m.topic], "values are never retained"
        finally:
            late.close()
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
