"""OPC UA driver throughput versus a bare asyncua client, against one server process, in the same run.

    .venv/bin/python bench/bench_opcua.py [--vars 1000] [--rates 2,10] [--seconds 8]

For each rate a server process updates every variable `rate` times a second (source timestamp = write
time). At the same time, a bare asyncua client (iterator mode, queue size 1: the ceiling) in a process of
its own and OpcUaDriver in the bench process subscribe to the same items of that server, so both see the
same server under the same load. Printed per client: values/s, the driver's share of the bare client's
rate, client CPU (% of a core, and per 1,000 values/s) and lag from source timestamp to receipt.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asyncua import Client, Server, ua
from asyncua.common.subscription import DataChangeEvent

NS = "urn:edge-agent:bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the server process ----------------------------------------------------------------------------


async def serve(port: int, count: int, rate: float) -> None:
    """An asyncua server whose `count` Double variables all change `rate` times a second."""
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}")
    idx = await server.register_namespace(NS)
    folder = await server.nodes.objects.add_folder(ua.NodeId.from_string(f"ns={idx};s=Bench"), "Bench")
    ids = []
    for i in range(count):
        node = await folder.add_variable(ua.NodeId.from_string(f"ns={idx};s=V{i}"), f"V{i}", 0.0)
        ids.append(node.nodeid)
    await server.start()
    print(f"READY {port}", flush=True)
    period = 1.0 / rate
    tick = 0
    next_at = time.monotonic()
    while True:
        tick += 1
        now = cast(Any, datetime.now(UTC))
        for i, nid in enumerate(ids):
            value = ua.Variant(float(tick * 1000 + i), ua.VariantType.Double)
            await server.write_attribute_value(nid, ua.DataValue(value, SourceTimestamp=now, ServerTimestamp=now))
        next_at += period
        delay = next_at - time.monotonic()
        if delay < 0:
            next_at = time.monotonic()  # overloaded: skip rather than queue ticks
        await asyncio.sleep(max(0.0, delay))


# ---- the measuring side ----------------------------------------------------------------------------


class Meter:
    """Counts values and samples lag inside a measuring window."""

    def __init__(self) -> None:
        self.start = 0.0
        self.end = 0.0
        self.count = 0
        self.lags: list[float] = []
        self.cpu = 0.0

    def window(self, warmup: float, seconds: float) -> None:
        self.start = time.monotonic() + warmup
        self.end = self.start + seconds

    def record(self, ts: datetime | None) -> bool:
        """Record one value; False once the window is over."""
        now = time.monotonic()
        if now < self.start:
            return True
        if now >= self.end:
            return False
        self.count += 1
        if ts is not None and self.count % 10 == 0:
            self.lags.append((datetime.now(UTC) - ts).total_seconds())
        return True

    def report(self, seconds: float) -> dict[str, float]:
        lags = sorted(self.lags) or [float("nan")]
        return {
            "values_s": self.count / seconds,
            "cpu_pct": 100.0 * self.cpu / seconds,
            "lag_p50_ms": 1000 * statistics.median(lags),
            "lag_p95_ms": 1000 * lags[int(0.95 * (len(lags) - 1))],
        }


async def run_bare(endpoint: str, count: int, warmup: float, seconds: float) -> dict[str, float]:
    """The ceiling: asyncua alone, one subscription, iterator mode."""
    client = Client(endpoint)
    await client.connect()
    try:
        idx = (await client.get_namespace_array()).index(NS)
        sub = await client.create_subscription(100, None, queue_maxsize=4 * count + 16)
        nodes = [client.get_node(f"ns={idx};s=V{i}") for i in range(count)]
        await sub.subscribe_data_change(nodes, queuesize=1, sampling_interval=ua.Double(100.0))
        meter = Meter()
        meter.window(warmup, seconds)
        cpu0 = 0.0
        # A stalled server must not hang the bench: the window ends on time, values or not.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(warmup + seconds + 5):
                async for ev in sub:
                    if time.monotonic() >= meter.start and not cpu0:
                        cpu0 = time.process_time()
                    if isinstance(ev, DataChangeEvent) and not meter.record(
                        ev.data.monitored_item.Value.SourceTimestamp
                    ):
                        break
        meter.cpu = time.process_time() - cpu0
        await sub.delete()
        return meter.report(seconds)
    finally:
        await client.disconnect()


async def run_driver(endpoint: str, count: int, warmup: float, seconds: float) -> dict[str, float]:
    """The same items through OpcUaDriver (config parsed by the real loader)."""
    from agent.config import parse_config
    from agent.model import Reading
    from drivers.base import DriverContext
    from drivers.opcua import OpcUaDriver

    with tempfile.TemporaryDirectory() as tmp:
        lines = [
            f'[agent]\nid = "bench"\nsite = "bench"\nstate_dir = "{tmp}"\n',
            f'[[equipment]]\nid = "bench-1"\ndriver = "opcua"\n[equipment.connection]\nendpoint = "{endpoint}"\n',
        ]
        lines += [f'[[equipment.tags]]\nname = "v{i}"\nnode = "nsu={NS};s=V{i}"\n' for i in range(count)]
        eq = parse_config("".join(lines), Path(tmp) / "agent.toml").equipment[0]
        meter = Meter()
        async with OpcUaDriver(eq, DriverContext(Path(tmp))) as driver:
            meter.window(warmup, seconds)
            cpu0 = 0.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(warmup + seconds + 5):
                    async for ev in driver.events():
                        if time.monotonic() >= meter.start and not cpu0:
                            cpu0 = time.process_time()
                        if isinstance(ev, Reading) and not meter.record(ev.ts):
                            break
            meter.cpu = time.process_time() - cpu0
            dropped = driver.dropped
        out = meter.report(seconds)
        out["dropped"] = dropped
        return out


async def bench(count: int, rates: list[float], seconds: float, warmup: float) -> None:
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)
    print(f"# {count} variables, {seconds:g} s windows after {warmup:g} s warm-up, cpus={os.cpu_count()}")
    print(
        f"{'rate':>6} {'client':>7} {'values/s':>9} {'share':>6} {'cpu%':>6} {'cpu%/1k':>8} {'p50 ms':>7} {'p95 ms':>7}"
    )
    for rate in rates:
        port = free_port()
        bare_proc: asyncio.subprocess.Process | None = None
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--serve",
            str(port),
            "--vars",
            str(count),
            "--rates",
            str(rate),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if not line.startswith(b"READY"):
                raise RuntimeError(f"server did not start: {line!r}")
            endpoint = f"opc.tcp://127.0.0.1:{port}"
            bare_proc = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--bare",
                endpoint,
                "--vars",
                str(count),
                "--seconds",
                str(seconds),
                "--warmup",
                str(warmup),
                stdout=asyncio.subprocess.PIPE,
            )
            drv = await run_driver(endpoint, count, warmup, seconds)
            out, _ = await bare_proc.communicate()
            bare = json.loads(out.decode().strip().splitlines()[-1])
        finally:
            if bare_proc is not None and bare_proc.returncode is None:
                bare_proc.kill()
                await bare_proc.wait()
            proc.terminate()
            await proc.wait()
        for name, r in (("bare", bare), ("driver", drv)):
            share = r["values_s"] / bare["values_s"] if bare["values_s"] else float("nan")
            per_k = r["cpu_pct"] / (r["values_s"] / 1000) if r["values_s"] else float("nan")
            print(
                f"{rate:>5g}Hz {name:>7} {r['values_s']:>9.0f} {share:>6.1%} {r['cpu_pct']:>6.1f} {per_k:>8.2f}"
                f" {r['lag_p50_ms']:>7.1f} {r['lag_p95_ms']:>7.1f}"
            )
        print(f"{rate:>5g}Hz driver dropped notifications: {drv['dropped']:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vars", type=int, default=1000)
    parser.add_argument("--rates", default="2,10", help="comma-separated update rates in Hz")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--bare", metavar="ENDPOINT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r]
    if args.bare:
        logging.getLogger("asyncua").setLevel(logging.CRITICAL)
        print(json.dumps(asyncio.run(run_bare(args.bare, args.vars, args.warmup, args.seconds))))
    elif args.serve:
        asyncio.run(serve(args.serve, args.vars, rates[0]))
    else:
        asyncio.run(bench(args.vars, rates, args.seconds, args.warmup))


if __name__ == "__main__":
    main()
