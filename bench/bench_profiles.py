"""What each northbound profile costs: the pipeline burst of `bench_pipeline.py` (1,000 tags x 100 rounds,
`telemetry_interval_s = 0.05`) with `[mqtt] profiles` set to today's alone, Sparkplug beside it, UNS beside it,
and all three; values/s end to end on each stream and the daemon's CPU per value. The Sparkplug stream is
compared with a bare paho client publishing the same values, encoded with the same protobuf schema in
DDATA messages of the same size, and the UNS stream with a bare paho client publishing one QoS 1 JSON
message per value, each to the same kind of subscriber in the same run.

Run: `.venv/bin/python bench/bench_profiles.py` (starts its own mosquitto on free ports).
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
import psutil
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_pipeline import CSubscriber, count_values

from agent.sparkplug import payload as pl
from peers import Broker, Daemon, Recorder, script_line, wait_until

TAGS, ROUNDS = 1000, 100
R = "edge/bench/cell-b"
GROUP = "bench"


def config(tmp: Path, port: int, script: Path, profiles: list[str]) -> Path:
    tag_tables = "".join(f'[[equipment.tags]]\nname = "t{i}"\n' for i in range(TAGS))
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
telemetry_interval_s = 0.05
status_heartbeat_s = 3600
buffer_max_messages = 10000000
replay_max_per_s = 0
profiles = {json.dumps(profiles)}
[mqtt.sparkplug]
group_id = "{GROUP}"
[http]
listen = "127.0.0.1:0"
[[equipment]]
id = "src"
driver = "scripted"
location = "acme/bench"
[equipment.connection]
script = "{script}"
{tag_tables}
"""
    path = tmp / "agent.toml"
    path.write_text(text)
    return path


class SparkplugCounter:
    """A plain subscriber to the group keeping raw DDATA payloads; decoded (and counted) when asked."""

    def __init__(self, port: int) -> None:
        self.raw: list[bytes] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.on_connect = lambda c, *a: (c.subscribe(f"spBv1.0/{GROUP}/#", qos=0), self.ready.set())
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 60)
        self.client.loop_start()
        wait_until(self.ready.is_set, what="counter connected")
        self._decoded = 0
        self.values = 0
        self.messages = 0

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        if "/DDATA/" in msg.topic:
            with self.lock:
                self.raw.append(bytes(msg.payload))

    def count(self) -> int:
        with self.lock:
            fresh = self.raw[self._decoded :]
            self._decoded = len(self.raw)
        for data in fresh:
            p = pl.decode(data)
            self.values += sum(1 for m in p.metrics if m.HasField("double_value"))
            self.messages += 1
        return self.values

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run(tmp: Path, profiles: list[str]) -> dict[str, float]:
    tmp.mkdir()
    broker = Broker(tmp / "broker")
    broker.start()
    script = tmp / "src.jsonl"
    cfg = config(tmp, broker.port, script, profiles)
    counters: dict[str, Callable[[], int]] = {}
    closers: list[Callable[[], None]] = []
    if "edge-agent" in profiles:
        rec = Recorder(broker.port, [f"{R}/equipment/+/telemetry"], clean=True)
        counters["edge-agent"] = lambda: count_values(rec)
        closers.append(rec.close)
    if "uns" in profiles:
        sub = CSubscriber(broker.port, "acme/bench/src/telemetry/#", tmp / "uns.out", "bench-uns")
        counters["uns"] = sub.lines
        closers.append(sub.close)
    spb: SparkplugCounter | None = None
    if "sparkplug" in profiles:
        spb = SparkplugCounter(broker.port)
        counters["sparkplug"] = spb.count
        closers.append(spb.close)
    daemon = Daemon(cfg).start()
    try:
        proc = psutil.Process(daemon.proc.pid)  # type: ignore[union-attr]
        script_line(script, tag="t0", value=-1.0)
        for name, count in counters.items():
            wait_until(lambda c=count: c() >= 1, timeout=60, what=f"first value on {name}")  # type: ignore[misc]
        base = {name: count() for name, count in counters.items()}
        total = TAGS * ROUNDS
        cpu0 = sum(proc.cpu_times()[:2])
        t0 = time.perf_counter()
        script_line(script, op="burst", tags=TAGS, rounds=ROUNDS)
        done: dict[str, float] = {}
        while len(done) < len(counters):
            for name, count in counters.items():
                if name not in done and count() - base[name] >= total:
                    done[name] = time.perf_counter() - t0
            time.sleep(0.05)
            if time.perf_counter() - t0 > 600:
                raise RuntimeError(f"burst did not arrive: {[(n, c() - base[n]) for n, c in counters.items()]}")
        elapsed = max(done.values())
        cpu = sum(proc.cpu_times()[:2]) - cpu0
        out: dict[str, float] = {f"{name}_values_per_s": total / t for name, t in done.items()}
        out["cpu_us_per_value"] = 1e6 * cpu / total
        out["elapsed_s"] = elapsed
        if spb is not None:
            out["sparkplug_values_per_ddata"] = spb.values / max(1, spb.messages)
        return out
    finally:
        daemon.stop()
        for close in closers:
            close()
        broker.stop()


def bare(tmp: Path, per_message: int) -> float:
    """A bare paho client: the same number of double values, `per_message` metrics (by alias, timestamped)
    per DDATA, encoded with the same schema, QoS 0, to the same kind of subscriber; values/s by receipt."""
    tmp.mkdir()
    broker = Broker(tmp / "broker")
    broker.start()
    counter = SparkplugCounter(broker.port)
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        time.sleep(0.5)
        total = TAGS * ROUNDS
        t0 = time.perf_counter()
        sent, seq = 0, 0
        while sent < total:
            # the generated schema directly, not the daemon's helpers: the bare library
            p = pl.Payload(timestamp=int(time.time() * 1000), seq=seq)
            seq = (seq + 1) % 256
            for i in range(min(per_message, total - sent)):
                m = p.metrics.add()
                m.alias = i + 1
                m.timestamp = int(time.time() * 1000)
                m.double_value = float(sent + i)
            sent += len(p.metrics)
            client.publish(f"spBv1.0/{GROUP}/DDATA/bare/src", p.SerializeToString(), qos=0)
        wait_until(lambda: counter.count() >= total, timeout=300, what="bare values")
        return total / (time.perf_counter() - t0)
    finally:
        client.disconnect()
        client.loop_stop()
        counter.close()
        broker.stop()


def bare_uns(tmp: Path) -> float:
    """A bare paho client: one QoS 1 JSON message per value, as the UNS profile sends them, to the same kind
    of subscriber (the C client); messages/s by receipt."""
    tmp.mkdir()
    broker = Broker(tmp / "broker")
    broker.start()
    sub = CSubscriber(broker.port, "acme/bench/src/telemetry/#", tmp / "uns.out", "bench-uns-bare")
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.max_inflight_messages_set(100)
    # at most 200 unacknowledged, as the daemon's sink keeps: paho's own queue slows down with its length
    window = threading.Semaphore(200)
    client.on_publish = lambda *a: window.release()
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        time.sleep(0.5)
        total = TAGS * ROUNDS
        t0 = time.perf_counter()
        for i in range(total):
            window.acquire()
            body = {"value": float(i), "timestamp": "2026-12-06T05:00:00.000Z", "quality": "good", "unit": None}
            client.publish(f"acme/bench/src/telemetry/t{i % TAGS}", json.dumps(body), qos=1)
        wait_until(lambda: sub.lines() >= total, timeout=300, what="bare UNS messages")
        return total / (time.perf_counter() - t0)
    finally:
        client.disconnect()
        client.loop_stop()
        sub.close()
        broker.stop()


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results = {}
        for i, profiles in enumerate(
            (["edge-agent"], ["edge-agent", "sparkplug"], ["edge-agent", "uns"], ["edge-agent", "sparkplug", "uns"])
        ):
            results["+".join(profiles)] = run(tmp / f"run{i}", profiles)
            print(json.dumps({"+".join(profiles): results["+".join(profiles)]}, indent=1), flush=True)
        per = results["edge-agent+sparkplug"].get("sparkplug_values_per_ddata", 100.0)
        bare_rate = bare(tmp / "bare", max(1, round(per)))
        spb_rate = results["edge-agent+sparkplug"]["sparkplug_values_per_s"]
        uns_bare = bare_uns(tmp / "bare-uns")
        uns_rate = results["edge-agent+uns"]["uns_values_per_s"]
        print(
            json.dumps(
                {
                    "bare_paho_protobuf_values_per_s": bare_rate,
                    "sparkplug_ratio_to_bare": spb_rate / bare_rate,
                    "bare_paho_qos1_msgs_per_s": uns_bare,
                    "uns_ratio_to_bare": uns_rate / uns_bare,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
