"""Live view benchmark: the pipeline's throughput (as `bench_pipeline.py` measures it) with 200 WebSocket
clients on the equipment channel, one of which never reads, beside the same burst without clients.

Run: `.venv/bin/python bench/bench_live.py` (starts its own mosquitto on a free port). The WebSocket
clients run in a separate process (`--clients PORT N`), so their reading does not share this one's core.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests"), str(HERE.parent / "tests" / "e2e")]

from bench_pipeline import R, config, count_values  # noqa: E402
from test_ws_fanout import stalled_client  # noqa: E402

from peers import Broker, Daemon, Recorder, script_line, wait_until  # noqa: E402

TAGS, ROUNDS, CLIENTS = 1000, 100, 200


async def clients(port: int, n: int) -> None:
    """Client mode: `n` readers counting telemetry values; "ready" once subscribed, counts at "stop"."""
    import aiohttp

    counts = [0] * n  # values received (telemetry is conflated for WebSocket clients)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        sockets = [await session.ws_connect(f"ws://127.0.0.1:{port}/api/v1/ws") for _ in range(n)]
        for ws in sockets:
            await ws.send_json({"type": "subscribe", "channels": ["equipment"]})

        async def read(i: int, ws: aiohttp.ClientWebSocketResponse) -> None:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT and msg.data.startswith('{"event":"telemetry"'):
                    counts[i] += msg.data.count('"tag":')

        readers = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(sockets)]
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        closed = sum(ws.closed for ws in sockets)
        print(json.dumps({"min": min(counts), "max": max(counts), "closed": closed}), flush=True)
        for ws in sockets:
            await ws.close()
        await asyncio.gather(*readers)


def run(tmp: Path, with_clients: bool) -> dict[str, float]:
    broker = Broker(tmp / "broker")
    broker.start()
    script = tmp / "src.jsonl"
    cfg = config(tmp, broker.port, script, TAGS, 0.05)
    rec = Recorder(broker.port, [f"{R}/equipment/+/telemetry"], clean=True)
    daemon = Daemon(cfg).start()
    readers = stalled = None
    try:
        port = daemon.wait_log("http_listening")[0]["port"]
        proc = psutil.Process(daemon.proc.pid)  # type: ignore[union-attr]
        if with_clients:
            readers = subprocess.Popen(
                [sys.executable, __file__, "--clients", str(port), str(CLIENTS - 1)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert readers.stdout is not None and readers.stdout.readline().strip() == "ready"
            stalled = stalled_client(port)
        script_line(script, tag="t0", value=-1.0)
        wait_until(lambda: count_values(rec) >= 1, what="first value")
        total = TAGS * ROUNDS
        cpu0 = sum(proc.cpu_times()[:2])
        t0 = time.perf_counter()
        script_line(script, op="burst", tags=TAGS, rounds=ROUNDS)
        wait_until(lambda: count_values(rec) >= total + 1, timeout=600, what="the burst over MQTT")
        elapsed = time.perf_counter() - t0
        cpu = sum(proc.cpu_times()[:2]) - cpu0
        out: dict[str, float] = {"values_per_s": total / elapsed, "cpu_us_per_value": 1e6 * cpu / total}
        if readers is not None:
            assert readers.stdin is not None and readers.stdout is not None
            wait_until(lambda: any(e.get("event") == "ws_client_dropped" for e in daemon.logs()), 120, "the drop")
            time.sleep(2)  # let the readers take what is still on the way before counting
            readers.stdin.write("stop\n")
            readers.stdin.flush()
            counts = json.loads(readers.stdout.readline())
            out.update(
                ws_readers=CLIENTS - 1,
                ws_values_received_min=counts["min"],  # conflated: the latest value per tag every 0.25 s
                ws_values_received_max=counts["max"],
                ws_readers_closed=counts["closed"],
                values_in_burst=total + 1,
                stalled_dropped=1.0,
            )
        return out
    finally:
        if readers is not None:
            readers.kill()
            readers.wait()
        if stalled is not None:
            stalled.close()
        daemon.stop()
        rec.close()
        broker.stop()


def main() -> None:
    if sys.argv[1:2] == ["--clients"]:
        asyncio.run(clients(int(sys.argv[2]), int(sys.argv[3])))
        return
    results = {}
    for name, with_clients in (
        ("without_clients", False),
        ("with_200_clients", True),
        ("without_clients_again", False),
    ):
        with tempfile.TemporaryDirectory() as d:
            results[name] = run(Path(d), with_clients)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
