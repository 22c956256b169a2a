"""Equipment status to MPM process status through the outbox, against the MPM emulator over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.model import EquipmentStatus
from agent.mpm import MPMClient
from agent.outbox import Outbox
from agent.process_sync import ProcessSync
from agent.simulate.mpm_emulator import MPMEmulator

API_KEY = "sync-test-key"
CLIENT_OPTIONS: dict[str, Any] = {"backoff_base_s": 0.005, "backoff_max_s": 0.02, "max_retries": 1}
FAST_OUTBOX: dict[str, Any] = {"backoff_base_s": 0.01, "backoff_max_s": 0.1}
EID = "printer-1"


@pytest.fixture
async def outbox(tmp_path: Path, client: MPMClient) -> AsyncIterator[Outbox]:
    async with Outbox(tmp_path / "outbox.sqlite", client, **FAST_OUTBOX) as box:
        yield box


def st(status: str, pid: str | None = None, error: str | None = None) -> EquipmentStatus:
    return EquipmentStatus(EID, "3d_printer", status, process_id=pid, error_message=error)


async def feed(sync: ProcessSync, box: Outbox, *statuses: EquipmentStatus) -> list[tuple[str, str]]:
    sent = []
    for s in statuses:
        sent += sync.on_status(EID, s)
    assert await box.wait_idle(30)
    return sent


async def test_run_pause_run_complete_in_order(emulator: MPMEmulator, outbox: Outbox) -> None:
    sync = ProcessSync(outbox)
    sent = await feed(
        sync,
        outbox,
        st("idle"),
        st("running", "JOB-1"),
        st("running", "JOB-1"),  # no change for MPM
        st("paused", "JOB-1"),
        st("running", "JOB-1"),
        st("idle", "JOB-1"),
        st("idle"),
    )
    assert sent == [("JOB-1", "running"), ("JOB-1", "paused"), ("JOB-1", "running"), ("JOB-1", "completed")]
    assert emulator.status_history("JOB-1") == ["running", "paused", "running", "completed"]
    updates = emulator.status_updates("JOB-1")
    keys = [u["idempotency_key"] for u in updates]
    assert all(keys) and len(set(keys)) == 4  # every update carries its own key
    assert updates[0]["metadata"]["equipment_id"] == EID
    assert sync.open_process(EID) is None


async def test_error_gives_failed(emulator: MPMEmulator, outbox: Outbox) -> None:
    sync = ProcessSync(outbox)
    await feed(sync, outbox, st("running", "JOB-2"), st("error", None, "Thermal Runaway"), st("idle"))
    assert emulator.status_history("JOB-2") == ["running", "failed"]
    assert emulator.status_updates("JOB-2")[1]["metadata"]["error_message"] == "Thermal Runaway"


async def test_paused_then_error_gives_failed(emulator: MPMEmulator, outbox: Outbox) -> None:
    sync = ProcessSync(outbox)
    await feed(sync, outbox, st("running", "JOB-2"), st("paused"), st("error"))
    assert emulator.status_history("JOB-2") == ["running", "paused", "failed"]


async def test_new_process_while_running_completes_the_old_first(
    tmp_path: Path, emulator: MPMEmulator, client: MPMClient
) -> None:
    box = Outbox(tmp_path / "outbox.sqlite", client, **FAST_OUTBOX)
    sync = ProcessSync(box)
    sent = [*sync.on_status(EID, st("running", "JOB-A")), *sync.on_status(EID, st("running", "JOB-B"))]
    assert sent == [("JOB-A", "running"), ("JOB-A", "completed"), ("JOB-B", "running")]
    # Committed in that order: the old process's completion is queued before the new one starts.
    assert [(i.process_id, i.payload()["status"]) for i in box.pending()] == sent
    async with box:
        assert await feed(sync, box, st("idle", "JOB-B")) == [("JOB-B", "completed")]
    assert emulator.status_history("JOB-A") == ["running", "completed"]
    assert emulator.status_history("JOB-B") == ["running", "completed"]


async def test_outage_in_between_still_completes(emulator: MPMEmulator, outbox: Outbox) -> None:
    sync = ProcessSync(outbox)
    sent = await feed(sync, outbox, st("running", "JOB-3"), st("offline"), st("unknown"), st("idle"))
    assert sent == [("JOB-3", "running"), ("JOB-3", "completed")]
    assert emulator.status_history("JOB-3") == ["running", "completed"]


async def test_job_tag_cleared_on_the_way_to_idle(emulator: MPMEmulator, outbox: Outbox) -> None:
    sync = ProcessSync(outbox)
    # The job tag clears while still running, then the machine goes idle: the open process completes.
    await feed(sync, outbox, st("running", "JOB-4"), st("running", None), st("idle", None))
    assert emulator.status_history("JOB-4") == ["running", "completed"]


async def test_offline_and_unknown_send_nothing(emulator: MPMEmulator, outbox: Outbox) -> None:
    sync = ProcessSync(outbox)
    sent = await feed(sync, outbox, st("offline"), st("unknown"), st("offline", "JOB-5"), st("maintenance"))
    assert sent == []
    assert outbox.depth() == 0
    assert not [c for c in emulator.calls if c["call"] == "update_process_status"]
    # Idle or error with nothing open sends nothing either.
    assert await feed(sync, outbox, st("idle", "JOB-5"), st("error", "JOB-5")) == []


async def test_paused_resumed_without_process_id(emulator: MPMEmulator, outbox: Outbox) -> None:
    sync = ProcessSync(outbox)
    await feed(sync, outbox, st("running", "JOB-6"), st("paused"), st("running"), st("idle"))
    assert emulator.status_history("JOB-6") == ["running", "paused", "running", "completed"]


async def test_state_survives_restart(tmp_path: Path, emulator: MPMEmulator, client: MPMClient) -> None:
    path = tmp_path / "outbox.sqlite"
    async with Outbox(path, client, **FAST_OUTBOX) as box:
        sync = ProcessSync(box)
        await feed(sync, box, st("running", "JOB-7"), st("paused", "JOB-7"))
    async with Outbox(path, client, **FAST_OUTBOX) as box:
        sync = ProcessSync(box)
        assert sync.open_process(EID) == "JOB-7"
        # The same status seen again after the restart is nothing new for MPM.
        assert await feed(sync, box, st("offline"), st("paused", "JOB-7")) == []
        await feed(sync, box, st("idle"))
    assert emulator.status_history("JOB-7") == ["running", "paused", "completed"]


async def test_keys_are_deterministic_across_restart(tmp_path: Path, emulator: MPMEmulator, client: MPMClient) -> None:
    # Two runs that see the same history from the same database derive the same key for the same update.
    path = tmp_path / "outbox.sqlite"
    box = Outbox(path, client, **FAST_OUTBOX)
    sync = ProcessSync(box)
    snapshot = box.get_state(f"process_sync:{EID}")
    sync.on_status(EID, st("running", "JOB-8"))
    first_key = box.pending()[0].idempotency_key
    # Simulate a crash before the state was kept: put the old state back, then replay the same status.
    box.set_state(f"process_sync:{EID}", snapshot or '{"process_id": null, "last_sent": null, "seq": 0}')
    box.close()
    box = Outbox(path, client, **FAST_OUTBOX)
    sync = ProcessSync(box)
    sync.on_status(EID, st("running", "JOB-8"))
    assert [i.idempotency_key for i in box.pending()] == [first_key]  # a duplicate, not a second update
    async with box:
        assert await box.wait_idle(30)
    assert emulator.status_history("JOB-8") == ["running"]


async def test_updates_wait_out_an_mpm_outage(emulator: MPMEmulator, outbox: Outbox) -> None:
    sync = ProcessSync(outbox)
    emulator.fail_next(8, 503)
    await feed(sync, outbox, st("running", "JOB-9"), st("paused"), st("running"), st("idle"))
    assert emulator.status_history("JOB-9") == ["running", "paused", "running", "completed"]
