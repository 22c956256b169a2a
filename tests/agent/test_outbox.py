"""The durable MPM outbox against the built-in MPM emulator over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

from agent.model import json_bytes
from agent.mpm import MPMClient
from agent.outbox import Outbox, OutboxItem
from agent.simulate.mpm_emulator import MPMEmulator
from peers import until

API_KEY = "outbox-test-key"
CLIENT_OPTIONS: dict[str, Any] = {"backoff_base_s": 0.005, "backoff_max_s": 0.02, "max_retries": 1}
OUTBOX_FAST: dict[str, Any] = {"backoff_base_s": 0.01, "backoff_max_s": 0.1}
REPO = Path(__file__).resolve().parents[2]


class Outcomes:
    """Records outcome callbacks."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    def __call__(self, item: OutboxItem, state: str) -> None:
        self.seen.append((item.idempotency_key, state, item.kind))


def result(pid: str, n: int) -> dict[str, Any]:
    return {"process_id": pid, "equipment_id": "cmm-1", "source": "test", "overall_score": 1.0, "n": n}


def stored(emu: MPMEmulator, pid: str) -> list[int]:
    return [r["body"]["n"] for r in emu.results(pid)]


async def test_outage_then_recovery_exactly_once_in_order(
    tmp_path: Path, emulator: MPMEmulator, client: MPMClient
) -> None:
    outcomes = Outcomes()
    emulator.fail_next(20, 503)
    box = Outbox(tmp_path / "outbox.sqlite", client, on_outcome=outcomes, **OUTBOX_FAST)
    pids = ["P-A", "P-B", "P-C"]
    for n in range(10):
        for pid in pids:
            assert box.enqueue_quality(pid, "cmm-1", result(pid, n), f"{pid}-{n}") is True
    assert box.depth() == 30
    async with box:
        assert await box.wait_idle(30)
        assert box.dead_letters() == []
    for pid in pids:
        assert stored(emulator, pid) == list(range(10))
    assert len(emulator.results()) == 30
    assert sum(1 for c in emulator.calls if c["status"] == 503) == 20
    delivered = sorted(k for k, s, _ in outcomes.seen if s == "delivered")
    assert delivered == sorted(f"{p}-{n}" for p in pids for n in range(10))


async def test_same_key_twice_is_one_delivery(tmp_path: Path, emulator: MPMEmulator, client: MPMClient) -> None:
    box = Outbox(tmp_path / "outbox.sqlite", client, **OUTBOX_FAST)
    assert box.enqueue_quality("P-1", "cmm-1", result("P-1", 1), "same-key") is True
    assert box.enqueue_quality("P-1", "cmm-1", result("P-1", 1), "same-key") is False  # pending: duplicate
    assert box.depth() == 1
    async with box:
        assert await box.wait_idle(30)
        assert box.enqueue_quality("P-1", "cmm-1", result("P-1", 1), "same-key") is False  # delivered: duplicate
        assert box.is_known("same-key") == "delivered"
    assert len(emulator.results()) == 1
    assert sum(1 for c in emulator.calls if c["call"] == "submit_quality_results") == 1


async def test_body_bytes_and_key_kept_across_retries(tmp_path: Path, emulator: MPMEmulator, client: MPMClient) -> None:
    res = {"process_id": "P-1", "overall_score": 0.5, "text": "Größe ✓", "ratio": float("nan")}
    emulator.fail(503, 4, call="submit_quality_results")
    async with Outbox(tmp_path / "outbox.sqlite", client, **OUTBOX_FAST) as box:
        box.enqueue_quality("P-1", "cmm-1", res, "k-bytes")
        assert await box.wait_idle(30)
    attempts = [c for c in emulator.calls if c["call"] == "submit_quality_results"]
    assert len(attempts) == 5
    assert {c["idempotency_key"] for c in attempts} == {"k-bytes"}
    assert {c["body_sha256"] for c in attempts} == {hashlib.sha256(json_bytes(res)).hexdigest()}
    assert emulator.results()[0]["body"]["ratio"] == "NaN"


async def test_reopen_after_crash_delivers_each_once(tmp_path: Path, emulator: MPMEmulator, client: MPMClient) -> None:
    path = tmp_path / "outbox.sqlite"
    emulator.fail(503, None)
    box = Outbox(path, client, **OUTBOX_FAST)
    await box.start()
    for n in range(20):
        box.enqueue_quality(f"P-{n % 2}", "cmm-1", result(f"P-{n % 2}", n), f"crash-{n}")
    await until(lambda: len(emulator.calls) >= 3)
    await box.stop()  # no drain
    box.close()
    emulator.clear_faults()
    # The second run finds everything still pending.
    async with Outbox(path, client, **OUTBOX_FAST) as again:
        assert again.depth() == 20
        assert await again.wait_idle(30)
    assert stored(emulator, "P-0") == list(range(0, 20, 2))
    assert stored(emulator, "P-1") == list(range(1, 20, 2))


async def test_crash_while_in_flight_is_not_duplicated(
    tmp_path: Path, emulator: MPMEmulator, client: MPMClient
) -> None:
    path = tmp_path / "outbox.sqlite"
    emulator.set_delay(0.3)
    box = Outbox(path, client, **OUTBOX_FAST)
    await box.start()
    for n in range(3):
        box.enqueue_quality("P-1", "cmm-1", result("P-1", n), f"inflight-{n}")
    await until(lambda: len(emulator.calls) >= 1)
    await box.stop()  # the first request is on the wire: MPM stores it, the outbox never hears back
    box.close()
    await until(lambda: len(emulator.results()) == 1)
    emulator.set_delay(0)
    async with Outbox(path, client, **OUTBOX_FAST) as again:
        assert again.depth() == 3
        assert await again.wait_idle(30)
    assert stored(emulator, "P-1") == [0, 1, 2]
    assert [c["status"] for c in emulator.calls if c["idempotency_key"] == "inflight-0"][-1] == 200


CHILD = r"""
import asyncio, sys
from agent.mpm import MPMClient
from agent.outbox import Outbox

async def main(path, base, count):
    async with MPMClient(base, api_key=sys.argv[4], backoff_base_s=0.005, backoff_max_s=0.02) as client:
        box = Outbox(path, client, backoff_base_s=0.01, backoff_max_s=0.1)
        for n in range(count):
            pid = f"K-{n % 3}"
            box.enqueue_quality(pid, "cmm-1", {"process_id": pid, "n": n}, f"kill-{n}")
        print("queued", flush=True)
        await box.start()
        await asyncio.Event().wait()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_sigkill_with_backlog_then_restart(tmp_path: Path, emulator: MPMEmulator, client: MPMClient) -> None:
    path = tmp_path / "outbox.sqlite"
    count = 60
    emulator.set_delay(0.02)
    assert emulator.base_url
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(path), emulator.base_url, str(count), API_KEY,
        stdout=asyncio.subprocess.PIPE, env=env, cwd=str(REPO),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        while True:  # the child's log lines come first
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, "the child exited before queueing"
            if line.strip() == b"queued":
                break
        await until(lambda: len(emulator.results()) >= 10)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    emulator.set_delay(0)
    async with Outbox(path, client, **OUTBOX_FAST) as again:
        assert again.depth() < count
        assert await again.wait_idle(30)
    for k in range(3):
        assert stored(emulator, f"K-{k}") == list(range(k, count, 3))
    assert len(emulator.results()) == count


async def test_rejected_result_is_dead_lettered_and_next_goes(
    tmp_path: Path, emulator: MPMEmulator, client: MPMClient
) -> None:
    outcomes = Outcomes()
    emulator.reject_next(1, 400, call="submit_quality_results")
    async with Outbox(tmp_path / "outbox.sqlite", client, on_outcome=outcomes, **OUTBOX_FAST) as box:
        for n in range(3):
            box.enqueue_quality("P-1", "cmm-1", result("P-1", n), f"dl-{n}")
        assert await box.wait_idle(30)
        assert stored(emulator, "P-1") == [1, 2]
        assert ("dl-0", "rejected", "quality_result") in outcomes.seen
        [dead] = box.dead_letters()
        info = dead.to_dict()
        assert set(info) == {
            "id", "kind", "process_id", "equipment_id", "idempotency_key", "status_code", "reason", "created_at", "body"
        }  # fmt: skip
        assert info["kind"] == "quality_result" and info["status_code"] == 400
        assert info["idempotency_key"] == "dl-0" and info["body"] == result("P-1", 0)
        assert info["reason"] and "rejected by the emulator" in info["reason"]
        assert box.dead_letter_count() == 1
        # A dead letter's key is no duplicate: neither pending nor delivered.
        assert box.is_known("dl-0") == "dead"
        # Retried by an operator: same key, same body, delivered this time.
        assert box.retry_dead_letter(dead.id) is True
        assert box.retry_dead_letter(dead.id) is False
        assert await box.wait_idle(30)
        assert stored(emulator, "P-1") == [1, 2, 0]
        assert box.dead_letters() == []
        # Deleting: reject again, then delete.
        emulator.reject_next(1, 422, call="submit_quality_results")
        box.enqueue_quality("P-2", "cmm-1", result("P-2", 9), "dl-9")
        assert await box.wait_idle(30)
        [dead] = box.dead_letters()
        assert box.delete_dead_letter(dead.id) is True
        assert box.delete_dead_letter(dead.id) is False
        assert box.dead_letters() == []


async def test_stuck_process_does_not_block_others(tmp_path: Path, emulator: MPMEmulator, client: MPMClient) -> None:
    emulator.fail(503, None, process_id="P-STUCK")
    async with Outbox(tmp_path / "outbox.sqlite", client, **OUTBOX_FAST) as box:
        for n in range(5):
            box.enqueue_quality("P-STUCK", "cmm-1", result("P-STUCK", n), f"stuck-{n}")
        await until(lambda: len(emulator.calls) >= 4)
        for n in range(5):
            for pid in ("P-X", "P-Y"):
                box.enqueue_quality(pid, "cmm-1", result(pid, n), f"{pid}-{n}")
        await until(lambda: len(stored(emulator, "P-X")) == 5 and len(stored(emulator, "P-Y")) == 5)
        assert box.depth() == 5 and stored(emulator, "P-STUCK") == []
        emulator.clear_faults()
        assert await box.wait_idle(30)
    assert stored(emulator, "P-STUCK") == list(range(5))


async def test_long_retry_after_is_left_to_the_outbox(tmp_path: Path, emulator: MPMEmulator, client: MPMClient) -> None:
    # MPM asks for more patience than a call waits: the lane backs off and others keep going.
    emulator.fail(503, 1, retry_after=3600, process_id="P-LATER")
    async with Outbox(tmp_path / "outbox.sqlite", client, **OUTBOX_FAST) as box:
        box.enqueue_quality("P-LATER", "cmm-1", result("P-LATER", 0), "later-0")
        await until(lambda: len(emulator.calls) >= 1)
        box.enqueue_quality("P-NOW", "cmm-1", result("P-NOW", 0), "now-0")
        await until(lambda: stored(emulator, "P-NOW") == [0])
        assert box.depth() == 1 and len([c for c in emulator.calls if c["process_id"] == "P-LATER"]) == 1


async def test_status_updates_in_order_with_keys(tmp_path: Path, emulator: MPMEmulator, client: MPMClient) -> None:
    emulator.fail_next(3, 503)
    async with Outbox(tmp_path / "outbox.sqlite", client, **OUTBOX_FAST) as box:
        for i, st in enumerate(("running", "paused", "running", "completed")):
            assert box.enqueue_status("PROC-001", "press-1", st, {"i": i}, f"st-{i}") is True
        assert box.enqueue_status("PROC-001", "press-1", "completed", {"i": 3}, "st-3") is False
        assert await box.wait_idle(30)
    assert emulator.status_history("PROC-001") == ["running", "paused", "running", "completed"]
    keys = [u["idempotency_key"] for u in emulator.status_updates("PROC-001")]
    assert keys == ["st-0", "st-1", "st-2", "st-3"]


async def test_oauth2_token_expiring_mid_run(tmp_path: Path) -> None:
    emu = MPMEmulator(client_id="edge", client_secret="cs", token_lifetime_s=0.3)
    await emu.start()
    try:
        emu.set_delay(0.02)
        async with MPMClient(
            emu.base_url or "", auth="oauth2", token_url=emu.token_url, client_id="edge", client_secret="cs",
            **CLIENT_OPTIONS,
        ) as c:  # fmt: skip
            outcomes = Outcomes()
            async with Outbox(tmp_path / "outbox.sqlite", c, on_outcome=outcomes, **OUTBOX_FAST) as box:
                for n in range(40):
                    box.enqueue_quality("P-1", "cmm-1", result("P-1", n), f"tok-{n}")
                    if n == 20:
                        emu.expire_tokens()  # revoked early as well
                    await asyncio.sleep(0.01)
                assert await box.wait_idle(30)
                assert box.dead_letters() == []
        assert stored(emu, "P-1") == list(range(40))
        assert emu.tokens_issued >= 2
        assert {s for _, s, _ in outcomes.seen} == {"delivered"}
    finally:
        await emu.stop()


async def test_corrupt_file_is_set_aside(tmp_path: Path, emulator: MPMEmulator, client: MPMClient) -> None:
    path = tmp_path / "outbox.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    box = Outbox(path, client, **OUTBOX_FAST)
    try:
        assert box.depth() == 0
        assert box.enqueue_quality("P-1", "cmm-1", result("P-1", 0), "after-corrupt") is True
        assert list(tmp_path.glob("outbox.sqlite.corrupt-*"))
    finally:
        box.close()


async def test_async_outcome_callback_and_depth_metric(
    tmp_path: Path, emulator: MPMEmulator, client: MPMClient
) -> None:
    from agent.metrics import REGISTRY

    seen: list[str] = []

    async def cb(item: OutboxItem, state: str) -> None:
        await asyncio.sleep(0)
        seen.append(f"{item.idempotency_key}:{state}:{item.payload()['n']}")

    box = Outbox(tmp_path / "outbox.sqlite", client, on_outcome=cb, **OUTBOX_FAST)
    box.enqueue_quality("P-1", "cmm-1", result("P-1", 7), "cb-1")
    assert REGISTRY.get_sample_value("edge_agent_outbox_depth") == 1
    async with box:
        assert await box.wait_idle(30)
        await until(lambda: seen == ["cb-1:delivered:7"])
    assert REGISTRY.get_sample_value("edge_agent_outbox_depth") == 0
