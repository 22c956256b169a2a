"""Replay benchmark: live status latency while a 100,000-message backlog replays, and the bare replay rate.

Run: `.venv/bin/python bench/bench_replay.py [--backlog 100000]` (starts its own mosquitto on free ports).

Phases, one daemon per phase, the same C subscriber stamping every message on receipt:
- idle: live status changes with no backlog (the reference latency);
- paced: the same changes while the backlog replays at the default `replay_max_per_s` (2,000);
- unpaced: the same while the backlog replays with pacing off;
- rate: the backlog replayed with pacing off and nothing live, timed by receipt from the first replayed
  message to the last, beside a bare paho client publishing the same messages in the same run.
Latency is from the moment the test writes the change to the scripted source (polled every 10 ms, the same
in every phase) to its receipt.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import CSubscriber

from peers import Broker, Daemon, script_line, wait_until

R = "edge/bench/cell-r"


def config(tmp: Path, port: int, replay_max_per_s: float) -> Path:
    text = f"""
[agent]
id = "cell-r"
site = "bench"
state_dir = "state"
log_level = "info"
reconnect_max_s = 0.5
driver_modules = ["scripted_driver"]
[mqtt]
url = "mqtt://127.0.0.1:{port}"
status_heartbeat_s = 3600
buffer_max_messages = 10000000
replay_max_per_s = {replay_max_per_s}
[http]
listen = "127.0.0.1:0"
[[equipment]]
id = "src"
driver = "scripted"
[equipment.connection]
script = "{tmp / "src.jsonl"}"
[[equipment]]
id = "live"
driver = "scripted"
[equipment.connection]
script = "{tmp / "live.jsonl"}"
"""
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "agent.toml"
    path.write_text(text)
    return path


def stored(state: Path) -> int:
    con = sqlite3.connect(f"file:{state / 'store.sqlite'}?mode=ro", uri=True)
    try:
        return int(con.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        con.close()


def receipts(sub: CSubscriber, marker: bytes) -> dict[str, float]:
    """Receipt time of each live change, by its marker."""
    out: dict[str, float] = {}
    for line in sub.out.read_bytes().splitlines():
        stamp, _, payload = line.partition(b" ")
        at = payload.find(marker)
        if at >= 0:
            end = payload.find(b'"', at)
            out.setdefault(payload[at:end].decode(), float(stamp))
    return out


def live_changes(tmp: Path, sub: CSubscriber, tag: str, count: int, every_s: float) -> list[float]:
    """Write `count` live status changes, `every_s` apart; return their latencies in ms."""
    written: dict[str, float] = {}
    for i in range(count):
        mark = f"{tag}-{i}"
        written[mark] = time.time()
        script_line(tmp / "live.jsonl", op="status", status="running" if i % 2 else "idle", current_operation=mark)
        time.sleep(every_s)
    wait_until(lambda: len(receipts(sub, tag.encode() + b"-")) >= count, timeout=300, what="live changes")
    got = receipts(sub, tag.encode() + b"-")
    return [(got[m] - t) * 1000 for m, t in written.items()]


def bare_paho(tmp: Path, count: int, payload: bytes, window: int = 200) -> float:
    """The reference: a bare paho client publishing `count` QoS 1 messages to the same kind of subscriber,
    with as many unacknowledged as the daemon allows itself (paho's own queue, unbounded, scans itself on
    every acknowledgement and slows down quadratically past some ten thousand queued messages)."""
    import threading

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    broker = Broker(tmp / "broker-bare")
    broker.start()
    sub = CSubscriber(broker.port, "bare/#", tmp / "bare.out", "bench-bare")
    room = threading.Semaphore(window)
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.max_inflight_messages_set(100)
    client.on_publish = lambda *args: room.release()
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        time.sleep(0.5)  # the subscriber's subscription in place
        for _ in range(count):
            room.acquire()
            client.publish("bare/status", payload, qos=1)
        wait_until(lambda: sub.lines() >= count, timeout=600, what="bare messages")
        return sub.rate(0, count)
    finally:
        client.disconnect()
        client.loop_stop()
        sub.close()
        broker.stop()


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def phase(tmp: Path, name: str, backlog: int, replay_max_per_s: float, live: int) -> dict[str, float]:
    work = tmp / name
    broker = Broker(work / "broker")
    broker.start()
    cfg = config(work, broker.port, replay_max_per_s)
    sub = CSubscriber(broker.port, f"{R}/equipment/+/status", work / "sub.out", f"bench-{name}")
    daemon = Daemon(cfg).start()
    out: dict[str, float] = {}
    try:
        script_line(work / "src.jsonl", op="status", status="idle")
        wait_until(lambda: sub.lines() >= 2, what="first statuses")
        if backlog:
            broker.stop()
            script_line(work / "src.jsonl", op="status_burst", count=backlog)
            wait_until(lambda: stored(work / "state") >= backlog, timeout=600, what="stored backlog")
            n0 = sub.lines()
            broker.start()
            wait_until(lambda: sub.lines() > n0 + 100, timeout=300, what="the replay under way")
        if live:
            lat = live_changes(work, sub, name, live, 0.05)
            out.update(live_p50_ms=statistics.median(lat), live_p95_ms=p95(lat), live_max_ms=max(lat))
            if backlog:
                out["replay_left_when_done"] = stored(work / "state")
        if backlog:
            wait_until(lambda: sub.lines() >= n0 + backlog, timeout=900, what="the whole replay")
            if not live:
                out["replay_msgs_per_s"] = sub.rate(n0, backlog)
                sample = sub.out.read_bytes().splitlines()[-1].split(b" ", 1)[1]
                out["bare_paho_msgs_per_s"] = bare_paho(work, backlog, sample)
                out["ratio_to_bare"] = out["replay_msgs_per_s"] / out["bare_paho_msgs_per_s"]
    finally:
        daemon.stop()
        sub.close()
        broker.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backlog", type=int, default=100_000)
    ap.add_argument("--live", type=int, default=100)
    ap.add_argument("--phases", default="idle,paced,unpaced,rate")
    args = ap.parse_args()
    wanted = set(args.phases.split(","))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results = {}
        for name, backlog, pace, live in (
            ("idle", 0, 2000, args.live),
            ("paced", args.backlog, 2000, args.live),
            ("unpaced", args.backlog, 0, args.live),
            ("rate", args.backlog, 0, 0),
        ):
            if name not in wanted:
                continue
            results[name] = phase(tmp, name, backlog, pace, live)
            print(name, json.dumps(results[name]), flush=True)
    if "idle" in results:
        idle = results["idle"]["live_p95_ms"]
        for name in ("paced", "unpaced"):
            if name in results:
                results[name]["p95_over_idle_p95"] = results[name]["live_p95_ms"] / idle
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
