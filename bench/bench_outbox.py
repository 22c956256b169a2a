"""Outbox drain rate after an MPM outage, against the MPM emulator in its own process.

    .venv/bin/python bench/bench_outbox.py [--results 6000] [--processes 50] [--concurrency 8]

The backlog is what 10 minutes of outage leave at 10 results/s (the default), committed while MPM is
unreachable. Printed, all measured in the same run:
- enqueue: how fast results are committed to the outbox;
- db only: the outbox's own SQLite work per item (head read + delivered mark) with no HTTP at all;
- raw client: the same number of submissions straight from MPMClient with the same concurrency
  (what MPM, the emulator here, can take from this client);
- outbox drain: the backlog delivered through the outbox; the ratio to the raw client shows what
  the outbox costs on top of MPM.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.mpm import MPMClient  # noqa: E402
from agent.outbox import Outbox  # noqa: E402

API_KEY = "bench-key"
SERVER = """
import asyncio, sys
import structlog, logging
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
from agent.simulate.mpm_emulator import MPMEmulator

async def main():
    emu = MPMEmulator(api_key=sys.argv[1], call_log_size=1000)
    print(await emu.start(), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def result(pid: str, n: int) -> dict[str, Any]:
    return {
        "process_id": pid,
        "equipment_id": "cmm-1",
        "source": f"file_drop:part{n}.csv",
        "overall_score": 0.75,
        "quality_scores": {"dimensional": 0.75},
        "defects": [{"feature": "bore", "measured": 10.09, "nominal": 10.0, "deviation": 0.09, "severity": "major"}],
        "measurements": [
            {"feature": f"f{i}", "measured": 1.0 + i, "nominal": 1.0 + i, "in_tolerance": True} for i in range(4)
        ],
        "timestamp": "2026-01-01T00:00:00.000Z",
    }


async def start_server() -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVER, API_KEY, stdout=asyncio.subprocess.PIPE, cwd=str(ROOT)
    )
    assert proc.stdout is not None
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        if not line:
            raise RuntimeError("the MPM emulator did not start")
        if line.startswith("http://"):
            return proc, line


async def raw_client(base: str, n: int, processes: int, concurrency: int, tag: str) -> float:
    async with MPMClient(base, api_key=API_KEY, max_retries=0) as client:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                pid = f"RAW{tag}-{i % processes}"
                await client.submit_quality_results(pid, result(pid, i), f"raw{tag}-{i}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start


def db_only(path: Path, n: int, processes: int) -> float:
    """The outbox's SQLite work per delivered item, no HTTP: head read plus the delivered mark."""
    box = Outbox(path, client=None, backoff_max_s=1.0)  # type: ignore[arg-type]
    for i in range(n):
        pid = f"DB-{i % processes}"
        box.enqueue_quality(pid, "cmm-1", result(pid, i), f"db-{i}")
    start = time.perf_counter()
    for p in range(processes):
        while (item := box._head(f"DB-{p}")) is not None:
            box._finish(item, "delivered", None, None)
    elapsed = time.perf_counter() - start
    box.close()
    return elapsed


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=int, default=6000)
    ap.add_argument("--processes", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    n, procs, conc = args.results, args.processes, args.concurrency

    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    server, base = await start_server()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmpdir = Path(tmp)
            db_s = db_only(tmpdir / "db.sqlite", n, procs)

            await raw_client(base, min(n, 500), procs, conc, "warm")
            raw_s = await raw_client(base, n, procs, conc, "")

            async with MPMClient(base, api_key=API_KEY) as client:
                box = Outbox(tmpdir / "outbox.sqlite", client, concurrency=conc)
                start = time.perf_counter()
                for i in range(n):
                    pid = f"P-{i % procs}"
                    box.enqueue_quality(pid, "cmm-1", result(pid, i), f"bench-{i}")
                enqueue_s = time.perf_counter() - start
                start = time.perf_counter()
                await box.start()
                if not await box.wait_idle(3600):
                    raise RuntimeError("the outbox did not drain")
                drain_s = time.perf_counter() - start
                await box.stop()
                box.close()
    finally:
        server.terminate()
        await server.wait()

    print(f"backlog: {n} results over {procs} processes, concurrency {conc}")
    print(f"enqueue:      {n / enqueue_s:9.0f} results/s")
    print(f"db only:      {n / db_s:9.0f} items/s  (head read + delivered mark, no HTTP)")
    print(f"raw client:   {n / raw_s:9.0f} results/s  (MPMClient straight to the emulator)")
    print(f"outbox drain: {n / drain_s:9.0f} results/s")
    print(f"drain / raw client: {raw_s / drain_s:.2f}   db share of drain time: {db_s / drain_s:.0%}")


if __name__ == "__main__":
    asyncio.run(main())
