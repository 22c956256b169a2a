"""Refused MPM credentials pause the outbox (no dead letter), against the MPM emulator over real HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import structlog

from agent.errors import DataError
from agent.mpm import MPMClient
from agent.outbox import Outbox, OutboxItem
from agent.simulate.mpm_emulator import MPMEmulator
from peers import GUARD_S, until

API_KEY = "credentials-test-key"
CLIENT_OPTIONS: dict[str, Any] = {"backoff_base_s": 0.005, "backoff_max_s": 0.02, "max_retries": 1}
OUTBOX_FAST: dict[str, Any] = {"backoff_base_s": 0.01, "backoff_max_s": 0.1}


def result(pid: str, n: int) -> dict[str, Any]:
    return {"process_id": pid, "source": "test", "overall_score": 1.0, "n": n}


def refused_calls(emu: MPMEmulator) -> int:
    return sum(1 for c in emu.calls if c["status"] in (401, 403))


def fill(box: Outbox) -> list[str]:
    """Five results for each of two processes and a status update; their keys in order."""
    keys = []
    for n in range(5):
        for pid in ("P-A", "P-B"):
            box.enqueue_quality(pid, "cmm-1", result(pid, n), f"{pid}-{n}")
            keys.append(f"{pid}-{n}")
    box.enqueue_status("P-A", "cmm-1", "running", {}, "P-A-status")
    return keys


def assert_each_once(emu: MPMEmulator, keys: list[str]) -> None:
    stored = emu.results()
    assert sorted(r["idempotency_key"] for r in stored) == sorted(keys)
    for pid in ("P-A", "P-B"):
        assert [r["body"]["n"] for r in emu.results(pid)] == list(range(5))
    assert emu.status_history("P-A") == ["running"]


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_key_pauses_without_dead_letters_then_delivers_each_once(
    tmp_path: Path, emulator: MPMEmulator, client: MPMClient, status: int
) -> None:
    outcomes: list[tuple[str, str]] = []
    box = Outbox(
        tmp_path / "outbox.sqlite", client, on_outcome=lambda i, s: outcomes.append((i.kind, s)), **OUTBOX_FAST
    )
    keys = fill(box)
    emulator.fail(status, None)  # every call refused until told otherwise (the test's "for a while")
    with structlog.testing.capture_logs() as logs:
        async with box:
            # several probes, each refused: paused, nothing dead, everything kept
            await until(lambda: refused_calls(emulator) >= 4, what="several refused probes")
            health = box.health()
            assert health["status"] == "down" and health["reason"] == f"credentials refused ({status})"
            assert health["dead_letters"] == 0 and health["depth"] == len(keys) + 1
            assert box.dead_letters() == [] and box.depth() == len(keys) + 1
            assert box.credentials_refused_count >= 4
            emulator.clear_faults()
            assert await box.wait_idle(GUARD_S)
            assert box.health()["status"] == "up" and box.health()["reason"] is None
            assert box.dead_letters() == []
    assert_each_once(emulator, keys)
    assert ("quality_result", "rejected") not in outcomes
    events = [e["event"] for e in logs]
    # logged once per transition, not once per refused probe
    assert events.count("outbox_credentials_refused") == 1 and events.count("outbox_credentials_accepted") == 1
    assert "outbox_dead_letter" not in events
    assert not [e for e in logs if API_KEY in repr(e)], "a credential reached the log"


async def test_rotated_key_recovers_with_a_new_client_at_once(tmp_path: Path, emulator: MPMEmulator) -> None:
    assert emulator.base_url
    old = MPMClient(emulator.base_url, api_key=API_KEY, **CLIENT_OPTIONS)
    new = MPMClient(emulator.base_url, api_key="rotated-key", **CLIENT_OPTIONS)
    emulator.set_api_key("rotated-key")  # MPM now refuses the configured key
    # A long backoff: only retry_now (what a reload calls) can make it deliver within the guard.
    box = Outbox(tmp_path / "outbox.sqlite", old, backoff_base_s=3600, backoff_max_s=3600)
    keys = fill(box)
    try:
        async with box:
            await until(lambda: box.health()["status"] == "down", what="outbox down")
            assert box.health()["reason"] == "credentials refused (401)" and box.dead_letter_count() == 0
            await box.set_client(new)
            assert await box.wait_idle(GUARD_S)
    finally:
        await old.close()
        await new.close()
    assert_each_once(emulator, keys)


async def test_key_fixed_on_mpm_side_retry_now(tmp_path: Path, emulator: MPMEmulator, client: MPMClient) -> None:
    emulator.set_api_key("something-else")
    box = Outbox(tmp_path / "outbox.sqlite", client, backoff_base_s=3600, backoff_max_s=3600)
    keys = fill(box)
    async with box:
        await until(lambda: box.health()["status"] == "down", what="outbox down")
        emulator.set_api_key(API_KEY)
        box.retry_now()
        assert await box.wait_idle(GUARD_S)
    assert_each_once(emulator, keys)


async def test_oauth2_token_endpoint_refusing_pauses(tmp_path: Path) -> None:
    emu = MPMEmulator(client_id="agent", client_secret="the-right-secret")
    await emu.start()
    try:
        async with MPMClient(
            emu.base_url or "", auth="oauth2", token_url=emu.token_url, client_id="agent", client_secret="wrong",
            **CLIENT_OPTIONS,
        ) as c:  # fmt: skip
            box = Outbox(tmp_path / "outbox.sqlite", c, **OUTBOX_FAST)
            box.enqueue_quality("P-A", "cmm-1", result("P-A", 0), "k0")
            async with box:
                await until(lambda: box.health()["status"] == "down", what="outbox down")
                assert box.health()["reason"] == "credentials refused (401)"
                assert box.dead_letters() == [] and box.depth() == 1
                # the secret is fixed on the server side (the agent's is the one configured now)
                emu.client_secret = "wrong"
                box.retry_now()
                assert await box.wait_idle(GUARD_S)
        assert [r["idempotency_key"] for r in emu.results()] == ["k0"]
    finally:
        await emu.stop()


async def test_auth_none_sends_no_credentials(tmp_path: Path) -> None:
    emu = MPMEmulator()  # open access
    await emu.start()
    try:
        async with MPMClient(emu.base_url or "", api_key="ignored", auth="none", **CLIENT_OPTIONS) as c:
            assert await c.health_check()
            box = Outbox(tmp_path / "outbox.sqlite", c, **OUTBOX_FAST)
            box.enqueue_quality("P-A", "cmm-1", result("P-A", 0), "k0")
            async with box:
                assert await box.wait_idle(GUARD_S)
        assert [r["idempotency_key"] for r in emu.results()] == ["k0"]
        assert emu.calls and all(call["auth"] is None for call in emu.calls)
    finally:
        await emu.stop()


async def test_oversized_quality_result_refused_at_enqueue(
    tmp_path: Path, emulator: MPMEmulator, client: MPMClient
) -> None:
    box = Outbox(tmp_path / "outbox.sqlite", client, max_body_bytes=2048, **OUTBOX_FAST)
    big = {**result("P-A", 0), "blob": "x" * 4096}
    with pytest.raises(DataError, match=r"is \d+ bytes, more than the 2048 accepted") as err:
        box.enqueue_quality("P-A", "cmm-1", big, "big-1")
    assert "big-1" in str(err.value) and "P-A" in str(err.value)
    assert box.depth() == 0 and box.is_known("big-1") is None
    assert box.enqueue_quality("P-A", "cmm-1", result("P-A", 1), "small-1") is True
    async with box:
        assert await box.wait_idle(GUARD_S)
        assert box.dead_letters() == []
    assert [r["idempotency_key"] for r in emulator.results()] == ["small-1"]


async def test_outcome_of_a_refused_item_is_not_reported(tmp_path: Path, emulator: MPMEmulator) -> None:
    """A refused key never reports an item as rejected (its quality message would say so for good)."""
    assert emulator.base_url
    seen: list[OutboxItem] = []
    async with MPMClient(emulator.base_url, api_key="wrong", **CLIENT_OPTIONS) as c:
        box = Outbox(tmp_path / "outbox.sqlite", c, on_outcome=lambda i, s: seen.append(i), **OUTBOX_FAST)
        box.enqueue_quality("P-A", "cmm-1", result("P-A", 0), "k0")
        async with box:
            await until(lambda: refused_calls(emulator) >= 3, what="refused probes")
            await asyncio.sleep(0)
    assert seen == [] and box.depth() == 1
