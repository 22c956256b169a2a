"""MTConnect through the daemon, to mosquitto: status, telemetry with units, condition alerts, and the
stream kept whole across a SIGKILL of the daemon and a buffer that wrapped while it was stopped."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

from drivers.mtconnect.sim import Lathe, lathe_agent
from peers import Broker, Daemon, LoopThread, Recorder, free_port, metric_total, wait_until, write_config

R = "edge/test-site/cell-t"


class LathePeer(LoopThread):
    """The simulated lathe and its agent, served from their own thread; the machine steps on `interval_s`."""

    def __init__(self, buffer_size: int = 4096) -> None:
        super().__init__("mtconnect-agent")
        self.agent = lathe_agent(buffer_size=buffer_size)
        self.url: str = self.run(self.agent.start())
        self.lathe: Lathe = self.call(Lathe, self.agent, 11)
        self.task: asyncio.Task[None] | None = None

    async def _steps(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.lathe.step()

    def start_stepping(self, interval_s: float) -> None:
        self.task = self.call(lambda: asyncio.ensure_future(self._steps(interval_s)))

    def stop_stepping(self) -> None:
        if self.task is not None:
            self.call(self.task.cancel)
            self.task = None

    def step(self, n: int) -> None:
        self.call(lambda: [self.lathe.step() for _ in range(n)])

    def close(self) -> None:
        self.stop_stepping()
        self.run(self.agent.stop())
        self.stop_loop()


def equipment(url: str) -> str:
    return f"""
[[equipment]]
id = "lathe-1"
type = "cnc_lathe"
driver = "mtconnect"
[equipment.connection]
url = "{url}"
device = "lathe"
poll_interval_ms = 100
[[equipment.tags]]
name = "x"
item = "Xact"
unit = "mm"
[[equipment.tags]]
name = "line"
item = "line"
[[equipment.tags]]
name = "spindle_temp"
item = "spindle_temp"
unit = "degC"
"""


def telemetry(rec: Recorder, tag: str) -> list[dict[str, Any]]:
    """Every value of `tag` in the telemetry received, each message once (QoS 1 may deliver one twice)."""
    seen: dict[int, list[dict[str, Any]]] = {}
    for m in rec.select("/equipment/lathe-1/telemetry"):
        seen.setdefault(m.json["seq"], [v for v in m.json["values"] if v["tag"] == tag])
    return [v for seq in sorted(seen) for v in seen[seq]]


def lines(rec: Recorder) -> list[int]:
    return [v["value"] for v in telemetry(rec, "line") if v["quality"] == "good"]


def test_status_telemetry_with_units_and_condition_alerts(tmp_path: Path, broker: Broker) -> None:
    peer = LathePeer()
    cfg = write_config(tmp_path, broker.port, equipment(peer.url))
    rec = Recorder(broker.port, [f"{R}/#"])
    daemon = Daemon(cfg).start()
    try:
        peer.start_stepping(0.15)
        rec.wait_for(
            lambda ms: (
                [m for m in rec.select("lathe-1/alerts") if m.json["state"] == "cleared"]
                and [m for m in rec.select("lathe-1/alerts") if m.json["value"] == "E100"][1:]
            ),
            "the Fault raised and cleared",
        )
        statuses = [m.json for m in rec.select("lathe-1/status")]
        assert {"idle", "running", "paused", "error"} <= {s["status"] for s in statuses}
        running = next(s for s in statuses if s["status"] == "running")
        assert (running["current_operation"], running["metadata"]["controller_mode"]) == ("O1000", "AUTOMATIC")
        assert running["process_id"].startswith("P-")
        x = telemetry(rec, "x")
        assert x and {v["unit"] for v in x} == {"mm"} and all(isinstance(v["value"], float) for v in x)
        fault = [m.json for m in rec.select("lathe-1/alerts") if m.json["value"] == "E100"][:2]
        assert [(a["state"], a["severity"], a["message"]) for a in fault] == [
            ("active", "critical", "Chuck pressure low"),
            ("cleared", "critical", "Chuck pressure low"),
        ]
        assert fault[0]["alert_id"] == fault[1]["alert_id"]
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        rec.close()
        peer.close()


def test_restarts_resume_from_the_persisted_sequence_without_gap_or_duplicate(tmp_path: Path, broker: Broker) -> None:
    peer = LathePeer()
    cfg = write_config(tmp_path, broker.port, equipment(peer.url))
    rec = Recorder(broker.port, [f"{R}/#"])
    daemon = Daemon(cfg).start()
    try:
        peer.start_stepping(0.03)
        rec.wait_for(lambda ms: len(lines(rec)) >= 15, "line values")
        assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
        before = len(lines(rec))
        peer.step(16)  # the machine runs on while the daemon is down
        daemon.start()
        daemon.wait_log("stream_resumed")
        rec.wait_for(lambda ms: len(lines(rec)) >= before + 30, "line values after the restart")
        assert daemon.stop() == 0  # and a clean stop keeps the last position too
        daemon.start()
        daemon.wait_log("stream_resumed", count=2)
        rec.wait_for(lambda ms: len(lines(rec)) >= before + 50, "line values after the clean restart")
        peer.stop_stepping()
        last = peer.call(lambda: peer.lathe.line)
        rec.wait_for(lambda ms: lines(rec)[-1:] == [last], "every line value")
        got = lines(rec)
        assert got == list(range(got[0], last + 1)), "a gap or a duplicate"
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        rec.close()
        peer.close()


def test_a_buffer_wrapped_while_the_daemon_was_stopped(tmp_path: Path, broker: Broker) -> None:
    peer = LathePeer(buffer_size=64)
    http = free_port()
    cfg = write_config(tmp_path, broker.port, equipment(peer.url), http=f'[http]\nlisten = "127.0.0.1:{http}"\n')
    rec = Recorder(broker.port, [f"{R}/#"])
    daemon = Daemon(cfg).start()
    try:
        peer.step(4)
        rec.wait_for(lambda ms: lines(rec), "line values")
        wait_until(lambda: (tmp_path / "state" / "mtconnect" / "lathe-1.json").exists(), what="a saved cursor")
        assert daemon.stop() == 0
        peer.step(40)  # more observations than the agent keeps
        daemon.start()
        lost = daemon.wait_log("observations_lost")[0]
        assert lost["count"] == lost["last"] - lost["first"] + 1 > 0
        assert lost["last"] == peer.call(lambda: peer.agent.first_seq) - 1
        assert metric_total(http, "edge_agent_driver_dropped_total", equipment_id="lathe-1") == lost["count"]
        assert metric_total(http, "edge_agent_driver_errors_total", kind="buffer_wrapped") == 1
        seen = len(lines(rec))
        peer.step(16)  # and then data flows
        rec.wait_for(lambda ms: len(lines(rec)) > seen, "line values after the resync")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        rec.close()
        peer.close()
