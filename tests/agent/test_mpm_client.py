"""MPMClient against the built-in MPM emulator over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.config import parse_config
from agent.errors import RejectedError, TransientError
from agent.metrics import REGISTRY
from agent.mpm import CredentialsRefused, MPMClient, MPMProcessData, MPMStatus, MPMTransientError, _TokenBucket
from agent.simulate.mpm_emulator import MPMEmulator, emulator_for, simulate_mpm
from peers import free_port

API_KEY = "k-0123456789-secret"
CLIENT_OPTIONS: dict[str, Any] = {"backoff_base_s": 0.01, "backoff_max_s": 0.05}


def calls_total(call: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("edge_agent_mpm_calls_total", {"call": call, "outcome": outcome}) or 0.0


async def test_every_call_with_api_key(emulator: MPMEmulator, client: MPMClient) -> None:
    ok_before = calls_total("get_process_data", "ok")
    assert await client.health_check() is True

    proc = await client.get_process_data("PROC-001")
    assert isinstance(proc, MPMProcessData)
    assert proc.process_id == "PROC-001" and proc.status is MPMStatus.PENDING
    assert set(proc.parameters) >= {"laser_power", "scan_speed", "layer_thickness"}
    assert calls_total("get_process_data", "ok") == ok_before + 1

    params = await client.get_process_parameters("PROC-002")
    assert params == emulator.processes["PROC-002"]["parameters"]

    answer = await client.update_process_status("PROC-001", MPMStatus.RUNNING, {"by": "test"}, "key-s1")
    assert answer["status"] == "running"
    assert (await client.get_process_data("PROC-001")).start_time is not None

    first = await client.submit_quality_results("PROC-001", {"overall_score": 0.9}, "key-q1")
    assert first["http_status"] == 201
    again = await client.submit_quality_results("PROC-001", {"overall_score": 0.9}, "key-q1")
    assert again["http_status"] == 200 and again["result_id"] == first["result_id"]
    assert len(emulator.results("PROC-001")) == 1

    # Every call carried the key, /health included.
    assert emulator.calls and all(c["auth"] == "api_key" for c in emulator.calls)


async def test_not_found_is_value_error(client: MPMClient) -> None:
    with pytest.raises(ValueError, match="NOPE"):
        await client.get_process_data("NOPE")
    with pytest.raises(ValueError):
        await client.get_process_parameters("NOPE")


async def test_status_errors_and_idempotency(emulator: MPMEmulator, client: MPMClient) -> None:
    with pytest.raises(RejectedError) as err:
        await client.update_process_status("PROC-003", "exploded", None, "key-bad")
    assert err.value.status_code == 400
    assert emulator.status_history("PROC-003") == []

    await client.update_process_status("PROC-003", "running", None, "key-r")
    await client.update_process_status("PROC-003", "running", None, "key-r")
    assert emulator.status_history("PROC-003") == ["running"]  # the repeated key is applied once
    with pytest.raises(RejectedError) as err:
        await client.update_process_status("PROC-003", "paused", None, "key-r")
    assert err.value.status_code == 422

    with pytest.raises(RejectedError) as err:
        await client.submit_quality_results("PROC-003", {"overall_score": 0.1}, "key-q")
        await client.submit_quality_results("PROC-003", {"overall_score": 0.2}, "key-q")
    assert err.value.status_code == 422
    assert len(emulator.results("PROC-003")) == 1

    # Unknown processes referenced by writes are created (simulated equipment invents job ids).
    await client.update_process_status("JOB-NEW", "running", None, "key-new")
    assert (await client.get_process_data("JOB-NEW")).status is MPMStatus.RUNNING


async def test_unknown_process_404_without_auto_create() -> None:
    emu = MPMEmulator(api_key=API_KEY, auto_create=False)
    base = await emu.start()
    try:
        async with MPMClient(base, api_key=API_KEY, **CLIENT_OPTIONS) as c:
            with pytest.raises(RejectedError) as err:
                await c.update_process_status("GHOST", "running", None, "k1")
            assert err.value.status_code == 404
            with pytest.raises(RejectedError) as err:
                await c.submit_quality_results("GHOST", {"overall_score": 1}, "k2")
            assert err.value.status_code == 404
    finally:
        await emu.stop()


async def test_pagination_and_filters(client: MPMClient) -> None:
    page1 = await client.list_processes(limit=4)
    page2 = await client.list_processes(limit=4, offset=4)
    assert page1.total == page2.total == 6
    assert len(page1.processes) == 4 and len(page2.processes) == 2
    ids = [p.process_id for p in page1.processes + page2.processes]
    assert len(set(ids)) == 6
    assert (await client.list_processes(offset=6)).processes == []

    build = await client.list_processes(build_id="BUILD-02")
    assert build.total == 3 and all(p.build_id == "BUILD-02" for p in build.processes)

    await client.update_process_status("PROC-005", "running", None, "k-run")
    running = await client.list_processes(status="running")
    assert [p.process_id for p in running.processes] == ["PROC-005"]
    with pytest.raises(ValueError):
        await client.list_processes(status="bogus")


def test_process_data_round_trip() -> None:
    proc = MPMProcessData(
        "P-1",
        "B-1",
        "316L",
        {"laser_power": 200.0},
        MPMStatus.COMPLETED,
        datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
        None,
        {"a": 1},
    )
    data = proc.to_dict()
    assert data["start_time"] == "2026-01-02T03:04:05.678Z" and data["status"] == "completed"
    assert MPMProcessData.from_dict(data) == proc


async def test_wrong_key_rejected_without_leaking(emulator: MPMEmulator) -> None:
    assert emulator.base_url
    secret = "wrong-key-that-must-not-leak"
    async with MPMClient(emulator.base_url, api_key=secret, **CLIENT_OPTIONS) as c:
        assert await c.health_check() is False
        with pytest.raises(RejectedError) as err:
            await c.get_process_data("PROC-001")
        assert err.value.status_code == 401
        assert secret not in str(err.value) and secret not in repr(c)


async def test_bearer_mode() -> None:
    emu = MPMEmulator(bearer_tokens=["static-token-xyz"])
    base = await emu.start()
    try:
        async with MPMClient(base, auth="bearer", bearer_token="static-token-xyz", **CLIENT_OPTIONS) as c:
            assert await c.health_check()
            assert (await c.list_processes()).total == 6
            await c.submit_quality_results("PROC-001", {"overall_score": 1.0}, "kb")
        assert all(call["auth"] == "bearer" for call in emu.calls)
        async with MPMClient(base, auth="bearer", bearer_token="other", **CLIENT_OPTIONS) as c:
            with pytest.raises(RejectedError) as err:
                await c.list_processes()
            assert err.value.status_code == 401
    finally:
        await emu.stop()


async def test_oauth2_token_refresh() -> None:
    emu = MPMEmulator(client_id="agent", client_secret="s3cret-value", token_lifetime_s=0.5)
    await emu.start()
    try:
        async with MPMClient(
            emu.base_url or "",
            auth="oauth2",
            token_url=emu.token_url,
            client_id="agent",
            client_secret="s3cret-value",
            **CLIENT_OPTIONS,
        ) as c:
            assert await c.health_check()
            assert emu.tokens_issued == 1
            # Outlive the token: the client refreshes ahead of expiry, no call fails.
            deadline = time.monotonic() + 30
            n = 0
            while emu.tokens_issued < 3:
                assert time.monotonic() < deadline
                await c.submit_quality_results("PROC-001", {"n": n}, f"oauth-{n}")
                n += 1
                await asyncio.sleep(0.05)
            # A token revoked early: the 401 triggers one refresh and the call succeeds.
            issued = emu.tokens_issued
            emu.expire_tokens()
            await c.submit_quality_results("PROC-001", {"n": n}, f"oauth-{n}")
            assert emu.tokens_issued == issued + 1
            assert len(emu.results("PROC-001")) == n + 1
            assert not [x for x in emu.calls if x["call"] != "oauth_token" and x["status"] not in (200, 201, 401)]
        async with MPMClient(
            emu.base_url or "", auth="oauth2", token_url=emu.token_url, client_id="agent", client_secret="bad-one",
            **CLIENT_OPTIONS,
        ) as c:  # fmt: skip
            with pytest.raises(RejectedError) as err:
                await c.list_processes()
            assert err.value.status_code == 401 and "bad-one" not in str(err.value)
            assert await c.health_check() is False
    finally:
        await emu.stop()


async def test_retries_transient_then_success(emulator: MPMEmulator, client: MPMClient) -> None:
    emulator.fail_next(2, 503)
    assert (await client.list_processes()).total == 6
    assert [c["status"] for c in emulator.calls] == [503, 503, 200]


async def test_retries_exhausted_and_final_4xx(emulator: MPMEmulator) -> None:
    assert emulator.base_url
    async with MPMClient(emulator.base_url, api_key=API_KEY, max_retries=2, **CLIENT_OPTIONS) as c:
        emulator.fail_next(10, 502)
        with pytest.raises(MPMTransientError) as err:
            await c.get_process_data("PROC-001")
        assert err.value.status_code == 502
        assert len(emulator.calls) == 3
        emulator.clear_faults()
        emulator.calls.clear()
        for status in (429, 408, 500, 504):
            emulator.fail_next(1, status)
            await c.get_process_data("PROC-001")
        assert [x["status"] for x in emulator.calls] == [429, 200, 408, 200, 500, 200, 504, 200]
        emulator.calls.clear()
        emulator.reject_next(1, 409)
        with pytest.raises(RejectedError) as rej:
            await c.submit_quality_results("PROC-001", {"x": 1}, "k-409")
        assert rej.value.status_code == 409 and len(emulator.calls) == 1
    async with MPMClient(emulator.base_url, api_key=API_KEY, retry_on_failure=False, **CLIENT_OPTIONS) as c:
        emulator.calls.clear()
        emulator.fail_next(1, 503)
        with pytest.raises(TransientError):
            await c.list_processes()
        assert len(emulator.calls) == 1


async def test_retry_after_is_honoured(emulator: MPMEmulator, client: MPMClient) -> None:
    emulator.fail_next(1, 503, retry_after=0.4)
    await client.health_check()  # health_check makes one attempt only
    emulator.calls.clear()
    emulator.fail_next(1, 429, retry_after=0.4)
    await client.list_processes()
    first, second = emulator.calls
    assert second["at"] - first["at"] >= 0.35  # not earlier than the server asked


async def test_network_errors_and_timeouts_are_transient(emulator: MPMEmulator) -> None:
    port = free_port()
    async with MPMClient(f"http://127.0.0.1:{port}/api/v1", api_key=API_KEY, max_retries=1, **CLIENT_OPTIONS) as c:
        with pytest.raises(TransientError):
            await c.get_process_data("PROC-001")
        assert await c.health_check() is False
    assert emulator.base_url
    emulator.set_delay(2.0)
    async with MPMClient(emulator.base_url, api_key=API_KEY, timeout=0.2, max_retries=0, **CLIENT_OPTIONS) as c:
        with pytest.raises(TransientError, match="timeout"):
            await c.get_process_data("PROC-001")


async def test_token_bucket_limits_rate() -> None:
    bucket = _TokenBucket(600)  # 10 a second, a burst of 10
    start = time.monotonic()
    for _ in range(15):
        await bucket.acquire()
    assert time.monotonic() - start >= 0.4  # the 5 beyond the burst waited for tokens


async def test_http_control_routes(emulator: MPMEmulator, client: MPMClient) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(emulator.root_url + "/_emulator/faults", json={"status": 503, "count": 1}) as r:
            assert r.status == 201
        await client.submit_quality_results("PROC-002", {"v": 1}, "ctl-1")
        async with s.get(emulator.root_url + "/_emulator/results", params={"process_id": "PROC-002"}) as r:
            stored = (await r.json())["results"]
        assert [x["body"] for x in stored] == [{"v": 1}]
        async with s.get(emulator.root_url + "/_emulator/calls") as r:
            assert [c["status"] for c in (await r.json())["calls"]] == [503, 201]
        async with s.post(emulator.root_url + "/_emulator/reset") as r:
            assert r.status == 200
    assert emulator.results() == []


async def test_from_config_and_simulate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("TEST_MPM_KEY", API_KEY)
    text = f"""
[agent]
id = "cell-1"
site = "plant"
state_dir = "state"

[mpm]
base_url = "http://127.0.0.1:{port}/api/v1"
api_key_env = "TEST_MPM_KEY"
rate_limit_per_minute = 6000
"""
    cfg = parse_config(text, tmp_path / "agent.toml")
    assert cfg.mpm is not None
    emu, host, bound = emulator_for(cfg.mpm)
    assert (host, bound, emu.api_key) == ("127.0.0.1", port, API_KEY)
    task = asyncio.create_task(simulate_mpm(cfg.mpm))
    try:
        async with MPMClient.from_config(cfg.mpm, **CLIENT_OPTIONS) as c:
            deadline = time.monotonic() + 30
            while not await c.health_check():
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.05)
            assert (await c.get_process_data("PROC-004")).build_id == "BUILD-02"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_oauth2_from_config(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "secret").write_text("cs-value\n")
    text = f"""
[agent]
id = "cell-1"
site = "plant"

[mpm]
base_url = "http://127.0.0.1:{port}/api/v1"
auth = "oauth2"
token_url = "http://127.0.0.1:{port}/auth/token"
client_id = "edge"
client_secret_file = "secret"
"""
    cfg = parse_config(text, tmp_path / "agent.toml")
    assert cfg.mpm is not None
    task = asyncio.create_task(simulate_mpm(cfg.mpm))
    try:
        async with MPMClient.from_config(cfg.mpm, **CLIENT_OPTIONS) as c:
            deadline = time.monotonic() + 30
            while True:
                try:
                    proc = await c.get_process_data("PROC-001")
                    break
                except TransientError:
                    assert time.monotonic() < deadline and not task.done()
                    await asyncio.sleep(0.05)
            assert proc.process_id == "PROC-001"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_client_raises_credentials_refused() -> None:
    emu = MPMEmulator(api_key="k")
    await emu.start()
    before = calls_total("submit_quality_results", "credentials_refused")
    try:
        async with MPMClient(emu.base_url or "", api_key="not-k", **CLIENT_OPTIONS) as c:
            with pytest.raises(CredentialsRefused) as err:
                await c.submit_quality_results("PROC-001", {"n": 1}, "x")
            assert err.value.status_code == 401 and err.value.reason == "credentials refused (401)"
            assert isinstance(err.value, RejectedError)
            assert "not-k" not in str(err.value)
        # only one attempt: a refused key is not retried inside the call; counted for the metrics
        assert len(emu.calls) == 1
        assert calls_total("submit_quality_results", "credentials_refused") == before + 1
    finally:
        await emu.stop()


async def test_hostile_answer_is_a_clear_error(emulator: MPMEmulator, client: MPMClient) -> None:
    deep = b"[" * 10_000 + b"]" * 10_000
    emulator.fail(200, 1, call="get_process_data", body=deep)
    with pytest.raises(TransientError, match="nests deeper than 64"):
        await client.get_process_data("PROC-001")
    emulator.fail(200, 1, call="list_processes", body=b'{"processes": [NaN]}')
    with pytest.raises(TransientError, match="list_processes"):
        await client.list_processes()
    # A submission MPM accepted stays accepted, whatever its answer looks like.
    emulator.fail(201, 1, call="submit_quality_results", body=deep)
    assert await client.submit_quality_results("PROC-001", {"n": 1}, "deep-1") == {"http_status": 201}
    # An error answer nested too deeply still gives a status and a short reason.
    emulator.fail(400, 1, call="submit_quality_results", body=deep)
    with pytest.raises(RejectedError) as err:
        await client.submit_quality_results("PROC-001", {"n": 2}, "deep-2")
    assert err.value.status_code == 400 and len(str(err.value)) < 500
