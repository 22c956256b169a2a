"""Health of the MPM link (durations, errors, last error, uptime) and the outbox's oldest-item age, with the
built-in MPM emulator failing and recovering; quality results with their delivery state on the WebSocket."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from peers import GUARD_S, Broker, Daemon, MpmPeer, free_port, script_line, scripted_equipment, until, write_config


@pytest.fixture
def mpm() -> Iterator[MpmPeer]:
    peer = MpmPeer()
    yield peer
    peer.close()


def healthz(port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=GUARD_S) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as err:
        return json.loads(err.read())  # type: ignore[no-any-return]


def gauge(port: int, name: str, **labels: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=GUARD_S) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def result(pid: str) -> dict[str, Any]:
    return {"process_id": pid, "source": "test", "overall_score": 0.9, "quality_scores": {}, "defects": []}


async def test_mpm_link_health_and_outbox_age(tmp_path: Path, broker: Broker, mpm: MpmPeer) -> None:
    port = free_port()
    script = tmp_path / "press.jsonl"
    section = f'[mpm]\nbase_url = "{mpm.base_url}"\nauth = "none"\nrate_limit_per_minute = 100000\n'
    cfg = write_config(
        tmp_path,
        broker.port,
        section + scripted_equipment("press-1", script),
        http=f'[http]\nlisten = "127.0.0.1:{port}"\n',
    )
    mpm.call(mpm.emu.fail, 503, None)  # MPM failing until told otherwise
    daemon = Daemon(cfg)
    try:
        await asyncio.to_thread(daemon.start)
        await asyncio.to_thread(daemon.wait_log, "http_listening")
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"ws://127.0.0.1:{port}/api/v1/ws")
            await ws.send_json({"type": "subscribe", "channels": ["quality"]})
            script_line(script, op="quality", result=result("PROC-9"), key="key-9")

            async def quality(delivery: str) -> dict[str, Any]:
                async with asyncio.timeout(GUARD_S):
                    while True:
                        msg = (await ws.receive()).json()
                        if msg["event"] == "qualityResult" and msg["data"]["mpm_delivery"] == delivery:
                            return msg["data"]  # type: ignore[no-any-return]

            pending = await quality("pending")
            assert pending["process_id"] == "PROC-9" and pending["idempotency_key"] == "key-9"
            # failing: errors counted with the last one, the outbox's oldest item ages
            link = await until(
                lambda: (x := healthz(port)["components"]["outbox"]["link"])["errors_total"] >= 2 and x,
                "MPM errors",
            )
            assert link["up"] is False and "503" in link["last_error"] and link["last_error_at"]
            assert link["duration_s"]["count"] >= 2 and link["duration_s"]["mean"] is not None
            await until(lambda: (gauge(port, "edge_agent_outbox_oldest_age_seconds") or 0) >= 0.5, "outbox age")
            assert gauge(port, "edge_agent_link_up", link="mpm", equipment_id="") == 0
            # recovered: delivered, up again, the outbox empty
            mpm.call(mpm.emu.clear_faults)
            assert (await quality("delivered"))["process_id"] == "PROC-9"
            await until(lambda: gauge(port, "edge_agent_outbox_oldest_age_seconds") == 0, "outbox drained")
            up = healthz(port)["components"]["outbox"]["link"]
            assert up["up"] is True and 0 < up["uptime_ratio"] < 1 and up["last_error"]
            await ws.close()
    finally:
        await asyncio.to_thread(daemon.stop)
