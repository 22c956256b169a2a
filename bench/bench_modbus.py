"""Modbus polling throughput: the driver versus a bare pymodbus client, same server, same run.

    .venv/bin/python bench/bench_modbus.py [--registers 10000] [--seconds 5] [--rounds 3] [--gc both]

A pymodbus TCP server (the project's SimServer) runs in a child process holding `--registers`
holding registers. In alternating rounds the parent reads all of them
  - bare:    one AsyncModbusTcpClient (the driver's settings), sequential 125-register reads, ints kept;
  - driver:  ModbusDriver.read_once() over tags covering every register, decoded into Readings,
             once with one uint16 tag per register and once with a mixed map (16/32/64-bit, floats);
             the server's registers hold still, so after the first poll the driver reports nothing new
             (readings by exception); `uint16 changing` forgets the last data before each poll, as if
             every register had changed: every block decoded, a Reading per tag.
Each phase polls back to back for `--seconds`. Printed: registers/s, requests per poll (counted by
the server) against the minimum under the gap rule, CPU seconds per poll of client and server, RSS,
and the driver-to-bare ratios (medians over the rounds). `--gc frozen` runs after `gc.freeze()` (a daemon that froze its
start-up heap, so that full collections skip it); `both` runs the default collector, then frozen.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import parse_config
from agent.model import Unchanged
from drivers.base import DriverContext
from drivers.modbus import MAX_REGISTERS, ModbusDriver
from drivers.modbus.sim import SimServer

SIZES = {"uint16": 1, "int16": 1, "int32": 2, "uint32": 2, "float32": 2, "float64": 4, "int64": 4}


def serve(registers: int, conn: Connection, count: Synchronized) -> None:  # type: ignore[type-arg]
    """Child process: serve the registers until the parent says stop."""

    async def main() -> None:
        sim = SimServer({"holding": [(0, registers)]})
        original = sim._trace

        def trace(sending: bool, pdu: Any) -> Any:
            if not sending:
                count.value += 1
            return original(sending, pdu)

        sim._trace = trace  # type: ignore[method-assign]
        port = await sim.start_tcp()
        fill(sim, registers)
        conn.send(port)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_reader(conn.fileno(), stop.set)
        await stop.wait()
        await sim.stop()

    asyncio.run(main())


FORMATS = {"uint16": "H", "int16": "h", "int32": "i", "uint32": "I", "float32": "f", "float64": "d", "int64": "q"}


def fill(sim: SimServer, registers: int) -> None:
    """Plausible values for the mixed map (sensor floats, counters); the uint16 map reads the same words."""
    for i, tag in enumerate(mixed_map(registers)):
        dtype = tag["type"]
        value: float | int = {
            "uint16": i % 60000,
            "int16": -(i % 30000),
            "int32": -1000 * i,
            "int64": i * 10**12,
            "float32": 20.0 + (i % 1000) * 0.01,
            "float64": i * 1.5,
        }[dtype]
        sim.set_value("holding", tag["address"], FORMATS[dtype], value)


def mixed_map(registers: int) -> list[dict[str, Any]]:
    """Tags of several widths covering registers 0..registers-1 without gaps."""
    cycle = ["uint16", "float32", "int32", "uint16", "float64", "int16", "float32", "int64"]
    tags, addr, i = [], 0, 0
    while True:
        dtype = cycle[i % len(cycle)]
        if addr + SIZES[dtype] > registers:
            break
        tags.append({"name": f"m{i}", "address": addr, "type": dtype})
        addr += SIZES[dtype]
        i += 1
    while addr < registers:
        tags.append({"name": f"m{i}", "address": addr, "type": "uint16"})
        addr += 1
        i += 1
    return tags


def minimum_requests(tags: list[dict[str, Any]], max_gap: int = 16, limit: int = MAX_REGISTERS) -> int:
    """Fewest requests under the gap rule (whole tags per request), by dynamic programming."""
    spans = sorted((t["address"], t["address"] + SIZES[t.get("type", "uint16")]) for t in tags)
    best = [0] + [10**9] * len(spans)
    for i in range(1, len(spans) + 1):
        for j in range(i - 1, -1, -1):
            if spans[i - 1][1] - spans[j][0] > limit:
                break
            if j < i - 1 and spans[j + 1][0] - spans[j][1] > max_gap:
                break
            best[i] = min(best[i], best[j] + 1)
    return best[-1]


def make_driver(port: int, tags: list[dict[str, Any]], folder: Path) -> ModbusDriver:
    lines = [
        "[agent]",
        'id = "bench"',
        'site = "lab"',
        'state_dir = "state"',
        "[[equipment]]",
        'id = "plc"',
        'driver = "modbus"',
        "[equipment.connection]",
        'host = "127.0.0.1"',
        f"port = {port}",
        "timeout_s = 5.0",
    ]
    for t in tags:
        lines.append("[[equipment.tags]]")
        lines += [f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}" for k, v in t.items()]
    cfg = parse_config("\n".join(lines) + "\n", folder / "agent.toml")
    return ModbusDriver(cfg.equipment[0], DriverContext(folder))


@dataclass
class Phase:
    name: str
    polls: int
    seconds: float
    requests: int
    cpu_s: float
    server_cpu_s: float

    def regs_per_s(self, registers: int) -> float:
        return registers * self.polls / self.seconds


def cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


async def bare_phase(port: int, registers: int, seconds: float, count: Any, server: psutil.Process) -> Phase:
    from pymodbus.client import AsyncModbusTcpClient

    # The driver's client settings (bench config timeout_s = 5.0, default retries = 1, no own reconnect).
    client = AsyncModbusTcpClient(
        "127.0.0.1", port=port, timeout=5.0, retries=1, reconnect_delay=0, reconnect_delay_max=0
    )
    assert await client.connect()
    me = psutil.Process()
    polls = 0
    c0, s0, r0, t0 = cpu(me), cpu(server), count.value, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        values: list[int] = []
        for start in range(0, registers, MAX_REGISTERS):
            n = min(MAX_REGISTERS, registers - start)
            rr = await client.read_holding_registers(start, count=n, device_id=1)
            assert not rr.isError()
            values.extend(rr.registers)
        assert len(values) == registers
        polls += 1
    phase = Phase("bare", polls, time.perf_counter() - t0, count.value - r0, cpu(me) - c0, cpu(server) - s0)
    client.close()
    return phase


async def driver_phase(
    name: str, driver: ModbusDriver, seconds: float, count: Any, server: psutil.Process, ntags: int, changing: bool
) -> Phase:
    me = psutil.Process()
    async with driver:
        await driver.read_once()  # connect and settle before timing
        polls = 0
        c0, s0, r0, t0 = cpu(me), cpu(server), count.value, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            if changing:
                # As if every register had changed since the last poll: every block decoded, a reading per tag.
                for block in driver.blocks:
                    block.last = None
            out = await driver.read_once()
            assert isinstance(out[-1], Unchanged) and len(out) == (ntags + 1 if changing else 1)
            polls += 1
        return Phase(name, polls, time.perf_counter() - t0, count.value - r0, cpu(me) - c0, cpu(server) - s0)


async def run(registers: int, seconds: float, rounds: int, frozen: bool) -> None:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    count = ctx.Value("q", 0, lock=False)
    proc = ctx.Process(target=serve, args=(registers, child, count), daemon=True)
    proc.start()
    try:
        port = parent.recv()
        server = psutil.Process(proc.pid)
        folder = Path(tempfile.mkdtemp(prefix="bench-modbus-"))
        uint16_tags = [{"name": f"r{a}", "address": a} for a in range(registers)]
        mixed = mixed_map(registers)
        maps = {"driver uint16": uint16_tags, "driver mixed": mixed, "uint16 changing": uint16_tags}
        drivers = {name: make_driver(port, tags, folder) for name, tags in maps.items()}
        minimum = {name: minimum_requests(tags) for name, tags in maps.items()}
        gc.collect()
        if frozen:
            gc.freeze()
        results: dict[str, list[Phase]] = {"bare": [], **{name: [] for name in maps}}
        for _ in range(rounds):
            results["bare"].append(await bare_phase(port, registers, seconds, count, server))
            for name, d in drivers.items():
                changing = name.endswith("changing")
                phase = await driver_phase(name, d, seconds, count, server, len(maps[name]), changing)
                results[name].append(phase)
        rss_client = psutil.Process().memory_info().rss / 2**20
        rss_server = server.memory_info().rss / 2**20
    finally:
        parent.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        gc.unfreeze()

    def med(phases: list[Phase], f: Any) -> float:
        return statistics.median(f(p) for p in phases)

    bare_rps = med(results["bare"], lambda p: p.regs_per_s(registers))
    print(f"\nModbus TCP, {registers} holding registers, {rounds} rounds x {seconds:g} s per phase, medians")
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, gc {'frozen' if frozen else 'default'},"
        f" load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    header = f"{'phase':<15}{'tags':>7}{'regs/s':>12}{'polls/s':>9}{'req/poll':>10}{'minimum':>9}"
    print(header + f"{'cpu ms/poll':>13}{'server cpu ms/poll':>20}{'vs bare':>9}")
    for name, phases in results.items():
        ntags = registers if name == "bare" else len(maps[name])
        rps = med(phases, lambda p: p.regs_per_s(registers))
        req = med(phases, lambda p: p.requests / p.polls)
        want = -(-registers // MAX_REGISTERS) if name == "bare" else minimum[name]
        cpu_ms = med(phases, lambda p: 1000 * p.cpu_s / p.polls)
        srv_ms = med(phases, lambda p: 1000 * p.server_cpu_s / p.polls)
        polls_s = med(phases, lambda p: p.polls / p.seconds)
        print(
            f"{name:<15}{ntags:>7}{rps:>12,.0f}{polls_s:>9.1f}{req:>10.1f}{want:>9}"
            f"{cpu_ms:>13.1f}{srv_ms:>20.1f}{rps / bare_rps:>9.0%}"
        )
    print(f"RSS: client {rss_client:.0f} MiB (driver maps loaded), server {rss_server:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registers", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gc", choices=["default", "frozen", "both"], default="both")
    args = parser.parse_args()
    for frozen in {"default": [False], "frozen": [True], "both": [False, True]}[args.gc]:
        asyncio.run(run(args.registers, args.seconds, args.rounds, frozen))


if __name__ == "__main__":
    main()
