"""MTConnect end to end: the daemon versus a bare client polling the same simulated agent in the same run.

    .venv/bin/python bench/bench_mtconnect.py [--items 500] [--hz 10] [--seconds 20] [--warmup 5]
        [--poll-ms 100] [--count 10000] [--json]

Peers, all on loopback and started by the bench, each in its own process:
- the simulated agent (drivers/mtconnect/sim.py) with the lathe plus `--items` temperature samples, every
  one of them changing `--hz` times a second (a ring buffer of 2^17 observations, as cppagent's default);
- mosquitto and `edge-agent run` as tests/peers.py starts and configures them (`telemetry_interval_s = 0.1`)
  with one MTConnect equipment whose tags are every sample (deadband 0: each observation is a value);
- a bare client: aiohttp polling `/sample?from=<next>&count=N` at the same interval, parsing each
  document with xml.etree.ElementTree and taking every observation's id, sequence, timestamp and value.

After the warm-up, CPU (user+system) of the daemon and of the bare client is measured over the same
window; then the machine stops, and every observation the agent made of the samples must have arrived on
MQTT, once (values counted by tag and value on receipt).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

AGENT_ID, SITE, EID = "cell-t", "test-site", "lathe-b"  # as peers.write_config names the agent


# ---- the agent process ------------------------------------------------------------------------------


async def serve(port: int, items: int, hz: float, stop_file: Path, count_file: Path) -> None:
    """Serve the agent; once `<stop_file>.go` exists step the machine at `hz` until `stop_file` does."""
    from drivers.mtconnect.sim import Lathe, lathe_agent

    agent = lathe_agent("lathe", buffer_size=131072, extra=items)
    await agent.start("127.0.0.1", port)
    lathe = Lathe(agent, seed=1)
    made = 0
    period = 1 / hz
    while not stop_file.with_suffix(".go").exists():  # noqa: ASYNC110 (another process makes the file)
        await asyncio.sleep(0.05)
    tick = time.monotonic()
    while not stop_file.exists():
        before = agent.next_seq
        lathe.step()
        fresh = itertools.islice(reversed(agent.buffer), agent.next_seq - before)
        made += sum(1 for o in fresh if o.item.id[1:].isdigit())
        tick += period
        await asyncio.sleep(max(0.0, tick - time.monotonic()))
    count_file.write_text(str(made))
    await asyncio.sleep(3600)


# ---- the bare client process ------------------------------------------------------------------------


async def bare(url: str, poll_s: float, count: int) -> None:
    import xml.etree.ElementTree as ET

    import aiohttp

    taken = 0
    nxt: int | None = None
    async with aiohttp.ClientSession() as session:
        while True:
            started = time.monotonic()
            path = "current" if nxt is None else f"sample?from={nxt}&count={count}"
            async with session.get(f"{url}/lathe/{path}") as resp:
                root = ET.fromstring(await resp.read())
            more = False
            for el in root.iter():
                name = el.tag.rsplit("}", 1)[-1]
                if name == "Header":
                    nxt = int(el.get("nextSequence", "0"))
                    more = nxt <= int(el.get("lastSequence", "0"))
                elif el.get("dataItemId") is not None:
                    _ = (el.get("dataItemId"), int(el.get("sequence", "0")), el.get("timestamp"), el.text)
                    taken += 1
            if not more:
                await asyncio.sleep(max(0.0, poll_s - (time.monotonic() - started)))


# ---- the bench --------------------------------------------------------------------------------------


def cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def equipment(url: str, items: int, poll_ms: int, count: int) -> str:
    """The `[[equipment]]` table: one MTConnect lathe whose tags are the samples."""
    tags = "".join(f'[[equipment.tags]]\nname = "s{i:03d}"\nitem = "s{i:03d}"\nunit = "degC"\n' for i in range(items))
    conn = f'url = "{url}"\ndevice = "lathe"\npoll_interval_ms = {poll_ms}\ncount = {count}\n'
    return (
        f'[[equipment]]\nid = "{EID}"\ntype = "cnc_lathe"\ndriver = "mtconnect"\n[equipment.connection]\n{conn}{tags}'
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from peers import Broker, Daemon, Recorder, free_port, wait_until, write_config

    tmp = Path(tempfile.mkdtemp(prefix="bench-mtconnect-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stop_file, count_file = tmp / "stop", tmp / "made"
    me = [sys.executable, str(Path(__file__).resolve())]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    broker = Broker(tmp / "broker")
    broker.start()
    agent = subprocess.Popen(
        [
            *me,
            "--serve",
            str(port),
            "--items",
            str(args.items),
            "--hz",
            str(args.hz),
            "--stop-file",
            str(stop_file),
            "--count-file",
            str(count_file),
        ],
        env=env,
    )
    rec = Recorder(broker.port, [f"edge/{SITE}/{AGENT_ID}/equipment/{EID}/telemetry"])
    daemon = Daemon(write_config(tmp, broker.port, equipment(url, args.items, args.poll_ms, args.count)))
    bare_proc: subprocess.Popen[bytes] | None = None
    try:
        wait_until(lambda: _up(url), what="the agent")
        daemon.start()
        # the samples are UNAVAILABLE until the machine runs: one bad value each, then every observation good
        wait_until(lambda: _values(rec, "bad") >= args.items, what="the daemon's first read")
        stop_file.with_suffix(".go").touch()
        bare_proc = subprocess.Popen(
            [*me, "--bare", url, "--poll-ms", str(args.poll_ms), "--count", str(args.count)], env=env
        )
        assert daemon.proc is not None
        dp, bp = psutil.Process(daemon.proc.pid), psutil.Process(bare_proc.pid)
        time.sleep(args.warmup)
        d0, b0, t0 = cpu(dp), cpu(bp), time.monotonic()
        time.sleep(args.seconds)
        d1, b1, t1 = cpu(dp), cpu(bp), time.monotonic()
        stop_file.touch()
        wait_until(count_file.exists, what="the machine to stop")
        made = int(count_file.read_text())

        try:
            wait_until(lambda: _values(rec, "good") >= made, timeout=60, what="every observation on MQTT")
        except AssertionError:
            print(f"made {made}, delivered {_values(rec, 'good')}", file=sys.stderr)
            raise
        time.sleep(1.0)  # and no more than those
        got = _values(rec, "good")
        window = t1 - t0
        return {
            "items": args.items,
            "hz": args.hz,
            "observations": made,
            "delivered": got,
            "daemon_cpu_pct": round(100 * (d1 - d0) / window, 1),
            "bare_cpu_pct": round(100 * (b1 - b0) / window, 1),
            "cpu_ratio": round((d1 - d0) / max(b1 - b0, 1e-9), 2),
            "values_per_s": round(args.items * args.hz),
        }
    finally:
        for p in (bare_proc, agent):
            if p is not None:
                p.kill()
                p.wait()
        daemon.kill()
        rec.close()
        broker.stop()


def _values(rec: Any, quality: str) -> int:
    """Telemetry values of the samples received with `quality`."""
    return sum(1 for m in rec.select() for v in m.json["values"] if v["tag"][0] == "s" and v["quality"] == quality)


def _up(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/lathe/probe", timeout=2):
            return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=500)
    ap.add_argument("--hz", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--poll-ms", type=int, default=100)
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--bare", help=argparse.SUPPRESS)
    ap.add_argument("--stop-file", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--count-file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.items, args.hz, args.stop_file, args.count_file))
        return
    if args.bare:
        asyncio.run(bare(args.bare, args.poll_ms / 1000, args.count))
        return
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return
    for k, v in result.items():
        print(f"{k:>16}: {v}")
    print("every observation delivered once:", result["delivered"] == result["observations"])


if __name__ == "__main__":
    main()
