"""Pipeline benchmark: the scripted source as fast as it can, through monitor, store and MQTT.

Run: `.venv/bin/python bench/bench_pipeline.py` (starts its own mosquitto on a free port).
Prints values/s end to end with the daemon's CPU and RSS, the store's replay rate after an outage,
and RSS growth over the import baseline with 10,000 tags.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from peers import Broker, Daemon, Recorder, script_line, wait_until

R = "edge/bench/cell-b"


def config(tmp: Path, port: int, script: Path, tags: int, interval: float) -> Path:
    tag_tables = "".join(f'[[equipment.tags]]\nname = "t{i}"\n' for i in range(tags))
    text = f"""
[agent]
id = "cell-b"
site = "bench"
state_dir = "state"
log_level = "info"
reconnect_max_s = 0.5
driver_modules = ["scripted_driver"]
[mqtt]
url = "mqtt://127.0.0.1:{port}"
telemetry_interval_s = {interval}
status_heartbeat_s = 3600
buffer_max_messages = 10000000
replay_max_per_s = 0
[http]
listen = "127.0.0.1:0"
[[equipment]]
id = "src"
driver = "scripted"
[equipment.connection]
script = "{script}"
{tag_tables}
"""
    path = tmp / "agent.toml"
    path.write_text(text)
    return path


def count_values(rec: Recorder) -> int:
    with rec.lock:
        msgs = list(rec.messages)
    return sum(m.payload.count(b'"tag":') for m in msgs if m.topic.endswith("/telemetry"))


def throughput(tmp: Path) -> dict[str, float]:
    broker = Broker(tmp / "broker")
    broker.start()
    script = tmp / "src.jsonl"
    tags, rounds = 1000, 200
    cfg = config(tmp, broker.port, script, tags, 0.05)
    rec = Recorder(broker.port, [f"{R}/equipment/+/telemetry"], clean=True)
    daemon = Daemon(cfg).start()
    try:
        proc = psutil.Process(daemon.proc.pid)  # type: ignore[union-attr]
        script_line(script, tag="t0", value=-1.0)
        wait_until(lambda: count_values(rec) >= 1, what="first value")
        total = tags * rounds
        cpu0 = sum(proc.cpu_times()[:2])
        t0 = time.perf_counter()
        script_line(script, op="burst", tags=tags, rounds=rounds)
        peak = 0
        while count_values(rec) < total + 1:
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.05)
            if time.perf_counter() - t0 > 300:
                raise RuntimeError("burst did not arrive")
        elapsed = time.perf_counter() - t0
        cpu = sum(proc.cpu_times()[:2]) - cpu0
        return {
            "values": total,
            "values_per_s": total / elapsed,
            "cpu_percent_of_core": 100 * cpu / elapsed,
            "cpu_us_per_value": 1e6 * cpu / total,
            "peak_rss_mib": peak / 2**20,
        }
    finally:
        daemon.stop()
        rec.close()
        broker.stop()


class CSubscriber:
    """`mosquitto_sub` (the C client) with a persistent session, its lines counted: a subscriber fast
    enough not to be what limits a replay."""

    def __init__(self, port: int, topic: str, out: Path, client_id: str) -> None:
        exe = shutil.which("mosquitto_sub")
        if exe is None:
            raise RuntimeError("mosquitto_sub (Debian package mosquitto-clients) is needed for the replay figure")
        self.out = out
        fh = open(out, "wb")
        self.proc = subprocess.Popen(
            [
                exe,
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-t",
                topic,
                "-q",
                "1",
                "-c",
                "-i",
                client_id,
                "-V",
                "mqttv5",
                "-x",
                "3600",
                "-F",
                "%U %p",  # each line: the receipt time (ns resolution), then the payload
            ],
            stdout=fh,
            stderr=subprocess.DEVNULL,
        )
        fh.close()

    def lines(self) -> int:
        return self.out.read_bytes().count(b"\n")

    def rate(self, first: int, count: int) -> float:
        """Messages per second between the receipt of line `first` and of line `first + count - 1`."""
        rows = self.out.read_bytes().splitlines()[first : first + count]
        t0, t1 = float(rows[0].split(b" ", 1)[0]), float(rows[-1].split(b" ", 1)[0])
        return (len(rows) - 1) / (t1 - t0)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def replay(tmp: Path) -> dict[str, float]:
    broker = Broker(tmp / "broker2")
    broker.start()
    script = tmp / "rp.jsonl"
    (tmp / "rp").mkdir()
    cfg = config(tmp / "rp", broker.port, script, 1, 0.05)
    count = 20_000
    sub = CSubscriber(broker.port, f"{R}/equipment/+/status", tmp / "replay.out", "bench-replay")
    daemon = Daemon(cfg).start()
    try:
        script_line(script, op="status", status="idle")
        wait_until(lambda: sub.lines() >= 1, what="first status")
        broker.stop()
        script_line(script, op="status_burst", count=count)
        db = tmp / "rp" / "state" / "store.sqlite"

        def stored() -> int:
            import sqlite3

            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            try:
                return int(con.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
            finally:
                con.close()

        wait_until(lambda: stored() >= count, timeout=300, what="stored backlog")
        n0 = sub.lines()
        broker.start()
        wait_until(lambda: sub.lines() >= n0 + count, timeout=300, what="replay")
        # from the first replayed message to the last, by receipt time: the reconnect backoff is not part
        # of the replay rate
        replay_rate = sub.rate(n0, count)
        received = sub.out.read_bytes().splitlines()[n0:]
        hist = sum(1 for line in received if b'"is_historical":true' in line)
        sample = received[-1].split(b" ", 1)[1]
    finally:
        daemon.stop()
        sub.close()
        broker.stop()
    bare = bare_paho(tmp, count, sample)
    return {
        "messages": count,
        "replay_msgs_per_s": replay_rate,
        "bare_paho_msgs_per_s": bare,
        "ratio_to_bare": replay_rate / bare,
        "historical": hist,
    }


def bare_paho(tmp: Path, count: int, payload: bytes) -> float:
    """The ceiling: a bare paho client publishing `count` QoS 1 messages to the same subscriber."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    broker = Broker(tmp / "broker-bare")
    broker.start()
    sub = CSubscriber(broker.port, "bare/#", tmp / "bare.out", "bench-bare")
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        time.sleep(0.5)  # the subscriber's subscription in place
        for _ in range(count):
            client.publish("bare/status", payload, qos=1)
        wait_until(lambda: sub.lines() >= count, timeout=300, what="bare messages")
        return sub.rate(0, count)
    finally:
        client.disconnect()
        client.loop_stop()
        sub.close()
        broker.stop()


def memory(tmp: Path) -> dict[str, float]:
    baseline = subprocess.run(
        [
            sys.executable,
            "-c",
            # every module the daemon imports for this config: the supervisor, HTTP API, MPM link, driver
            "import sys; sys.path.insert(0, 'tests');"
            "import psutil, agent.supervisor, agent.http, agent.mpm_bridge, agent.commands, scripted_driver;"
            "print(psutil.Process().memory_info().rss)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    base = int(baseline.stdout.strip())
    broker = Broker(tmp / "broker3")
    broker.start()
    script = tmp / "mem.jsonl"
    (tmp / "mem").mkdir()
    tags = 10_000
    cfg = config(tmp / "mem", broker.port, script, tags, 0.05)
    rec = Recorder(broker.port, [f"{R}/equipment/+/telemetry"], clean=True)
    daemon = Daemon(cfg).start()
    try:
        proc = psutil.Process(daemon.proc.pid)  # type: ignore[union-attr]
        rounds = 20
        script_line(script, op="burst", tags=tags, rounds=rounds)
        peak = 0
        deadline = time.perf_counter() + 300
        while count_values(rec) < tags * rounds:
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.05)
            if time.perf_counter() > deadline:
                raise RuntimeError("burst did not arrive")
        steady = proc.memory_info().rss
        return {
            "import_baseline_mib": base / 2**20,
            "steady_rss_mib": steady / 2**20,
            "peak_rss_mib": peak / 2**20,
            "growth_steady_mib": (steady - base) / 2**20,
            "growth_peak_mib": (peak - base) / 2**20,
        }
    finally:
        daemon.stop()
        rec.close()
        broker.stop()


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results = {"throughput": throughput(tmp), "replay": replay(tmp), "memory": memory(tmp)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
