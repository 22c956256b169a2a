"""The file-drop driver against a real temporary folder, files written the way machines write them.

The test plays the daemon's part: it consumes the driver's events and resolves each result's
`committed` future, answering a key it has seen before as a duplicate, as the outbox does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.config import EquipmentConfig, parse_config
from agent.errors import ConfigError
from agent.model import ConnectionState, Event, QualityResult, StatusFact, iso
from drivers.base import DriverContext
from drivers.file_drop import FileDropDriver, file_timestamp, numbered, place_file
from fs import tmpfs
from peers import GUARD_S

HEADER = "process_id,feature,nominal,measured,lower_tol,upper_tol,unit\n"


def config_text(tmp_path: Path, **conn: Any) -> str:
    values: dict[str, Any] = {
        "directory": "drop",
        "processed_dir": "processed",
        "failed_dir": "failed",
        "stable_s": 0.3,
        "rescan_s": 1.0,
    }
    values.update(conn)
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items() if v is not None]
    return "\n".join(
        [
            "[agent]",
            'id = "cell-1"',
            'site = "plant-a"',
            'state_dir = "state"',
            "",
            "[[equipment]]",
            'id = "cmm-1"',
            'type = "cmm"',
            'driver = "file_drop"',
            "[equipment.connection]",
            *lines,
            "",
        ]
    )


def equipment(tmp_path: Path, **conn: Any) -> EquipmentConfig:
    cfg = parse_config(config_text(tmp_path, **conn), tmp_path / "agent.toml")
    return cfg.equipment[0]


class Daemon:
    """Consumes the driver's events and commits results the way the daemon's outbox does."""

    def __init__(self, known: set[str] | None = None, fail_first: int = 0, hold: bool = False) -> None:
        self.keys: set[str] = set(known or ())
        self.events: list[Event] = []
        self.results: list[tuple[QualityResult, bool]] = []
        self.held: list[QualityResult] = []
        self.fail_first = fail_first
        self.hold = hold

    async def consume(self, events: AsyncIterator[Event]) -> None:
        async for ev in events:
            self.events.append(ev)
            if isinstance(ev, QualityResult):
                assert ev.committed is not None and not ev.committed.done()
                if self.fail_first > 0:
                    self.fail_first -= 1
                    ev.committed.set_exception(OSError("disk full"))
                elif self.hold:
                    self.held.append(ev)
                else:
                    self.commit(ev)

    def commit(self, ev: QualityResult) -> None:
        fresh = ev.idempotency_key not in self.keys
        self.keys.add(ev.idempotency_key)
        self.results.append((ev, fresh))
        assert ev.committed is not None
        ev.committed.set_result(fresh)

    def of_kind(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


class Run:
    def __init__(self, daemon: Daemon, task: asyncio.Task[None], eq: EquipmentConfig) -> None:
        self.daemon = daemon
        self.task = task
        conn = eq.connection
        self.directory = Path(conn.directory)
        self.processed = Path(conn.processed_dir)
        self.failed = Path(conn.failed_dir)
        self.processing = self.directory / ".processing"

    async def wait(self, cond: Callable[[], bool], what: str, timeout: float = GUARD_S) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.task.done():
                self.task.result()  # surfaces a driver failure
                raise AssertionError(f"event stream ended while waiting for {what}")
            if time.monotonic() > deadline:
                kinds = [type(e).__name__ for e in self.daemon.events[-10:]]
                raise AssertionError(f"timed out waiting for {what}; last events: {kinds}")
            await asyncio.sleep(0.05)

    def names(self, folder: Path) -> list[str]:
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@asynccontextmanager
async def running(
    eq: EquipmentConfig,
    tmp_path: Path,
    daemon: Daemon | None = None,
    context: DriverContext | None = None,
    driver_class: type[FileDropDriver] = FileDropDriver,
) -> AsyncIterator[Run]:
    daemon = daemon or Daemon()
    async with driver_class(eq, context or DriverContext(tmp_path / "state")) as driver:
        task = asyncio.create_task(daemon.consume(driver.events()))
        try:
            yield Run(daemon, task, eq)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert not [t for t in asyncio.all_tasks() if "file_drop[" in t.get_name() and not t.done()]


async def write_in_pieces(path: Path, data: bytes, pieces: int = 3, pause_s: float = 0.2) -> None:
    """Write as a measuring machine does: under the final name, in pieces, with pauses."""
    size = -(-len(data) // pieces)
    with open(path, "wb") as f:
        for i in range(0, len(data), size):
            f.write(data[i : i + size])
            f.flush()
            if i + size < len(data):
                await asyncio.sleep(pause_s)  # the writer's pace, not a wait for a condition


def report(pid: str = "JOB-000101") -> bytes:
    return (
        HEADER
        + f"{pid},bore_A_diameter,12.000,12.009,0,0.018,mm\n"
        + f"{pid},length_overall,120.000,120.130,-0.1,0.1,mm\n"
        + f"{pid},width,60.000,59.500,-0.1,0.1,mm\n"
        + f"{pid},flatness_top,0,0.011,0,0.02,mm\n"
    ).encode()


# ---- results ------------------------------------------------------------------------------------


async def test_csv_written_slowly_lands_once_with_scores(tmp_path: Path) -> None:
    eq = equipment(tmp_path, stable_s=2.0)
    (tmp_path / "drop").mkdir()
    async with running(eq, tmp_path) as run:
        await run.wait(lambda: bool(run.daemon.of_kind(StatusFact)), "idle")
        data = report()
        await write_in_pieces(run.directory / "part7.csv", data)
        await run.wait(lambda: run.names(run.processed) == ["part7.csv"], "file in processed_dir")
        assert len(run.daemon.results) == 1
        ev, fresh = run.daemon.results[0]
        assert fresh
        r = ev.result
        assert r["process_id"] == "JOB-000101"
        assert r["equipment_id"] == "cmm-1"
        assert r["source"] == "file_drop:part7.csv"
        assert [(d["feature"], d["severity"]) for d in r["defects"]] == [
            ("length_overall", "major"),
            ("width", "critical"),
        ]
        assert r["quality_scores"] == {"dimensional": 0.5}
        assert r["overall_score"] == 0.5
        assert len(r["measurements"]) == 4
        moved = run.processed / "part7.csv"
        assert moved.read_bytes() == data
        assert r["timestamp"] == file_timestamp(moved.stat().st_mtime_ns)
        assert ev.idempotency_key == hashlib.sha256(data).hexdigest()
        assert run.names(run.directory) == [".processing"]
        assert run.names(run.processing) == []
        assert run.names(run.failed) == []
        statuses = [(s.status, s.error_message) for s in run.daemon.of_kind(StatusFact)]
        assert statuses == [("idle", None)]
        assert [c.connected for c in run.daemon.of_kind(ConnectionState)] == [True]


async def test_json_result_lands_once(tmp_path: Path) -> None:
    eq = equipment(tmp_path, stable_s=2.0)
    (tmp_path / "drop").mkdir()
    async with running(eq, tmp_path) as run:
        obj = {"process_id": "JOB-7", "quality_scores": {"dimensional": 0.9, "surface": 0.8}, "defects": []}
        await write_in_pieces(run.directory / "vision-7.json", json.dumps(obj, indent=2).encode())
        await run.wait(lambda: run.names(run.processed) == ["vision-7.json"], "json in processed_dir")
        assert len(run.daemon.results) == 1
        r = run.daemon.results[0][0].result
        assert r["process_id"] == "JOB-7"
        assert r["overall_score"] == 0.8
        assert r["source"] == "file_drop:vision-7.json"
        assert r["timestamp"] == file_timestamp((run.processed / "vision-7.json").stat().st_mtime_ns)


async def test_file_stays_claimed_until_the_result_is_committed(tmp_path: Path) -> None:
    eq = equipment(tmp_path)
    (tmp_path / "drop").mkdir()
    daemon = Daemon(hold=True)
    async with running(eq, tmp_path, daemon) as run:
        (run.directory / "a.csv").write_bytes(report())
        await run.wait(lambda: bool(daemon.held), "result handed over")
        assert run.names(run.processing) == ["a.csv"]
        assert run.names(run.processed) == []
        daemon.commit(daemon.held.pop())
        await run.wait(lambda: run.names(run.processed) == ["a.csv"], "moved after commit")


async def test_commit_failure_keeps_the_file_and_retries(tmp_path: Path) -> None:
    eq = equipment(tmp_path, rescan_s=0.5)
    (tmp_path / "drop").mkdir()
    daemon = Daemon(fail_first=1)
    async with running(eq, tmp_path, daemon) as run:
        (run.directory / "a.csv").write_bytes(report())
        await run.wait(lambda: run.names(run.processed) == ["a.csv"], "moved after the retry")
        assert len(daemon.results) == 1 and daemon.results[0][1]
        errors = [s for s in daemon.of_kind(StatusFact) if s.status == "error"]
        assert errors and "not being stored" in (errors[0].error_message or "")
        await run.wait(lambda: daemon.of_kind(StatusFact)[-1].status == "idle", "idle again")


async def test_ignored_names_are_left_alone(tmp_path: Path) -> None:
    eq = equipment(tmp_path)
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "sub").mkdir()
    ignored = [".hidden.csv", "b.csv.tmp", "c.CSV.part", "notes.txt", "sub"]
    for name in ignored[:-1]:
        (drop / name).write_bytes(report())
    (drop / "sub" / "d.csv").write_bytes(report("JOB-SUB"))
    async with running(eq, tmp_path) as run:
        tmp = drop / "e.csv.tmp"
        tmp.write_bytes(report("JOB-E"))
        os.replace(tmp, drop / "e.csv")  # write-then-rename: only the final name counts
        (drop / "F.CSV").write_bytes(report("JOB-F"))
        # The ignored files were there at the first listing, before these two: had they been taken, it
        # would have been first.
        await run.wait(lambda: run.names(run.processed) == ["F.CSV", "e.csv"], "both processed")
        assert sorted(r.result["process_id"] for r, _ in run.daemon.results) == ["JOB-E", "JOB-F"]
    assert sorted(p.name for p in drop.iterdir()) == sorted([".processing", *ignored])
    assert (drop / "sub" / "d.csv").exists()


# ---- bad files ----------------------------------------------------------------------------------

BAD_FILES: dict[str, tuple[bytes, list[str]]] = {
    "empty.csv": (b"", ["empty"]),
    "header_only.csv": (HEADER.encode(), ["header only"]),
    "wrong_column.csv": (b"process_id,feature,nominal,measured,lower,upper_tol\nJ,a,1,1,0,0\n", ["row 1", "'lower'"]),
    "missing_column.csv": (b"process_id,feature,nominal,measured,lower_tol\nJ,a,1,1,0\n", ["row 1", "'upper_tol'"]),
    "non_numeric.csv": ((HEADER + "J,a,1,1,0,0,mm\nJ,b,1,abc,0,0,mm\n").encode(), ["row 3", "'measured'", "'abc'"]),
    "latin1.csv": (HEADER.encode() + "J,Durchmesser ä,1,1,0,0,mm\n".encode("latin-1"), ["row 2", "UTF-8"]),
    "mixed_ids.csv": ((HEADER + "J1,a,1,1,0,0,mm\nJ2,b,1,1,0,0,mm\n").encode(), ["row 3", "'process_id'"]),
    "missing_pid.csv": ((HEADER + ",a,1,1,0,0,mm\n").encode(), ["row 2", "'process_id'"]),
    "tolerances.csv": ((HEADER + "J,a,1,1,0.1,-0.1,mm\n").encode(), ["row 2", "'lower_tol'"]),
    "too_big.csv": ((HEADER + "J,a,1,1,0,0,mm\n" * 400).encode(), ["max_file_bytes (4096)"]),
    "array.json": (b"[1, 2, 3]", ["expected an object"]),
    "no_pid.json": (b'{"overall_score": 1.0}', ["'process_id'"]),
    "broken.json": (b'{"process_id": "J",\n  "overall_score": }', ["line 2", "column"]),
}


async def test_each_bad_file_ends_in_failed_dir_with_its_reason(tmp_path: Path) -> None:
    eq = equipment(tmp_path, max_file_bytes=4096)
    (tmp_path / "drop").mkdir()
    async with running(eq, tmp_path) as run:
        for name, (data, _) in BAD_FILES.items():
            (run.directory / name).write_bytes(data)
        (run.directory / "good.csv").write_bytes(report())
        expected = sorted([*BAD_FILES, *(f"{n}.error.txt" for n in BAD_FILES)])
        await run.wait(lambda: run.names(run.failed) == expected, "every bad file in failed_dir")
        await run.wait(lambda: run.names(run.processed) == ["good.csv"], "the good one processed")
        assert [r.result["process_id"] for r, _ in run.daemon.results] == ["JOB-000101"]
        for name, (data, parts) in BAD_FILES.items():
            assert (run.failed / name).read_bytes() == data
            reason = (run.failed / f"{name}.error.txt").read_text()
            assert name in reason.splitlines()[0]
            for part in parts:
                assert part in reason, (name, part, reason)
        assert run.names(run.processing) == []
        assert all(s.status == "idle" for s in run.daemon.of_kind(StatusFact))


# ---- crash states, duplicates, names ------------------------------------------------------------


async def test_leftover_in_processing_is_finished_at_start(tmp_path: Path) -> None:
    eq = equipment(tmp_path)
    processing = tmp_path / "drop" / ".processing"
    processing.mkdir(parents=True)
    data = report("JOB-LEFT")
    (processing / "left.csv").write_bytes(data)
    (processing / "bad.csv").write_bytes(HEADER.encode())
    async with running(eq, tmp_path) as run:
        await run.wait(lambda: run.names(run.processed) == ["left.csv"], "leftover processed")
        await run.wait(lambda: run.names(run.failed) == ["bad.csv", "bad.csv.error.txt"], "bad leftover failed")
        assert [(r.result["process_id"], fresh) for r, fresh in run.daemon.results] == [("JOB-LEFT", True)]
        assert run.names(run.processing) == []


async def test_leftover_already_in_the_outbox_is_not_sent_again(tmp_path: Path) -> None:
    eq = equipment(tmp_path)
    processing = tmp_path / "drop" / ".processing"
    processing.mkdir(parents=True)
    data = report("JOB-DONE")
    (processing / "done.csv").write_bytes(data)
    daemon = Daemon(known={hashlib.sha256(data).hexdigest()})
    async with running(eq, tmp_path, daemon) as run:
        await run.wait(lambda: run.names(run.processed) == ["done.csv"], "leftover moved")
        assert [fresh for _, fresh in daemon.results] == [False]


async def test_crash_between_link_and_unlink_leaves_one_copy(tmp_path: Path) -> None:
    eq = equipment(tmp_path)
    processing = tmp_path / "drop" / ".processing"
    processing.mkdir(parents=True)
    processed = tmp_path / "processed"
    processed.mkdir()
    data = report("JOB-HALF")
    (processing / "half.csv").write_bytes(data)
    os.link(processing / "half.csv", processed / "half.csv")  # the move's first half, then a crash
    daemon = Daemon(known={hashlib.sha256(data).hexdigest()})
    async with running(eq, tmp_path, daemon) as run:
        await run.wait(lambda: run.names(run.processing) == [], "leftover finished")
        assert run.names(run.processed) == ["half.csv"]


async def test_same_report_under_another_name_is_a_duplicate(tmp_path: Path) -> None:
    eq = equipment(tmp_path)
    (tmp_path / "drop").mkdir()
    async with running(eq, tmp_path) as run:
        data = report("JOB-TWICE")
        (run.directory / "first.csv").write_bytes(data)
        await run.wait(lambda: run.names(run.processed) == ["first.csv"], "first processed")
        (run.directory / "again.csv").write_bytes(data)
        await run.wait(lambda: run.names(run.processed) == ["again.csv", "first.csv"], "re-drop moved")
        (first, fresh1), (second, fresh2) = run.daemon.results
        assert first.idempotency_key == second.idempotency_key
        assert (fresh1, fresh2) == (True, False)
        assert second.result["source"] == "file_drop:again.csv"


async def test_taken_names_get_a_numeric_suffix(tmp_path: Path) -> None:
    eq = equipment(tmp_path)
    (tmp_path / "drop").mkdir()
    processed, failed = tmp_path / "processed", tmp_path / "failed"
    processed.mkdir()
    failed.mkdir()
    (processed / "part7.csv").write_text("old report")
    (processed / "part7.1.csv").write_text("older report")
    (failed / "bad.csv").write_text("old bad")
    (failed / "bad.csv.error.txt").write_text("old reason")
    async with running(eq, tmp_path) as run:
        (run.directory / "part7.csv").write_bytes(report())
        (run.directory / "bad.csv").write_bytes(b"")
        await run.wait(lambda: "part7.2.csv" in run.names(processed), "suffixed in processed_dir")
        await run.wait(lambda: "bad.1.csv.error.txt" in run.names(failed), "suffixed in failed_dir")
    assert (processed / "part7.csv").read_text() == "old report"
    assert (processed / "part7.1.csv").read_text() == "older report"
    assert (processed / "part7.2.csv").read_bytes() == report()
    assert (failed / "bad.csv").read_text() == "old bad"
    assert (failed / "bad.csv.error.txt").read_text() == "old reason"
    assert "bad.csv" in (failed / "bad.1.csv.error.txt").read_text()
    assert (failed / "bad.1.csv").read_bytes() == b""


def test_numbered_names() -> None:
    assert numbered("part7.csv", 0) == "part7.csv"
    assert numbered("part7.csv", 1) == "part7.1.csv"
    assert numbered("a.b.json", 2) == "a.b.2.json"
    assert numbered("report", 3) == "report.3"


def test_place_file_never_overwrites(tmp_path: Path) -> None:
    src_dir, dst = tmp_path / "src", tmp_path / "dst"
    src_dir.mkdir()
    dst.mkdir()
    (dst / "x.csv").write_text("keep")
    (dst / "x.1.csv.error.txt").write_text("orphan reason")
    (src_dir / "x.csv").write_text("new")
    final = place_file(src_dir / "x.csv", dst, "x.csv", "why")
    assert final.name == "x.2.csv"
    assert (dst / "x.csv").read_text() == "keep"
    assert (dst / "x.1.csv.error.txt").read_text() == "orphan reason"
    assert (dst / "x.2.csv.error.txt").read_text() == "why"
    assert not (src_dir / "x.csv").exists()


def test_place_file_across_filesystems_copies(tmp_path: Path) -> None:
    (tmp_path / "y.csv").write_text("report")
    os.utime(tmp_path / "y.csv", ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    with tmpfs(tmp_path / "other-fs") as other:
        (Path(other) / "y.csv").write_text("taken")
        final = place_file(tmp_path / "y.csv", Path(other), "y.csv")
        assert final.name == "y.1.csv"
        assert final.read_text() == "report"
        assert final.stat().st_mtime_ns == 1_700_000_000_000_000_000
        assert (Path(other) / "y.csv").read_text() == "taken"
    assert not (tmp_path / "y.csv").exists()


# ---- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["processed_dir", "failed_dir"])
def test_check_config_refuses_output_folder_equal_to_directory(tmp_path: Path, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(config_text(tmp_path, directory="drops", **{field: "./drops/"}), tmp_path / "agent.toml")
    lines = info.value.problems
    assert any(
        line.startswith(f"equipment[cmm-1].connection.{field}: must differ from connection.directory") for line in lines
    )
    assert all("(line " in line for line in lines)


def test_config_defaults_and_refusals(tmp_path: Path) -> None:
    eq = equipment(tmp_path, stable_s=None, rescan_s=None)
    conn = eq.connection
    assert conn.patterns == ["*.csv", "*.json"]
    assert conn.stable_s == 1.0 and conn.max_file_bytes == 10_485_760
    assert conn.directory == tmp_path / "drop"
    assert FileDropDriver.command_kinds == frozenset()
    with pytest.raises(ConfigError) as info:
        parse_config(config_text(tmp_path, processed_dir=None), tmp_path / "agent.toml")
    assert any("connection.processed_dir: field required" in p for p in info.value.problems)
    with pytest.raises(ConfigError) as info:
        parse_config(config_text(tmp_path, patterns=["in/*.csv"]), tmp_path / "agent.toml")
    assert any("connection.patterns" in p for p in info.value.problems)


# ---- volume -------------------------------------------------------------------------------------


async def test_a_thousand_files_at_once_each_once(tmp_path: Path) -> None:
    eq = equipment(tmp_path, stable_s=0.2)
    drop = tmp_path / "drop"
    drop.mkdir()
    staging = tmp_path / "staging"
    staging.mkdir()
    names = [f"r{i:04d}.csv" for i in range(1000)]
    for i, name in enumerate(names):
        (staging / name).write_bytes(report(f"JOB-{i:06d}"))
    async with running(eq, tmp_path) as run:
        await run.wait(lambda: bool(run.daemon.of_kind(StatusFact)), "idle")
        for name in names:
            os.rename(staging / name, drop / name)
        await run.wait(lambda: len(run.names(run.processed)) == 1000, "1000 files processed", timeout=120)
        results = run.daemon.results
        assert len(results) == 1000
        assert all(fresh for _, fresh in results)
        assert sorted(r.result["source"] for r, _ in results) == [f"file_drop:{n}" for n in names]
        assert run.names(run.processed) == names
        assert run.names(run.processing) == []
        assert run.names(run.failed) == []


# ---- folder health ------------------------------------------------------------------------------


async def test_folder_deleted_is_offline_and_recreated_is_idle(tmp_path: Path) -> None:
    eq = equipment(tmp_path, rescan_s=0.5)
    drop = tmp_path / "drop"
    drop.mkdir()
    async with running(eq, tmp_path) as run:
        await run.wait(lambda: bool(run.daemon.of_kind(StatusFact)), "idle")
        shutil.rmtree(drop)
        await run.wait(
            lambda: any(not c.connected for c in run.daemon.of_kind(ConnectionState)), "offline after deletion"
        )
        down = next(c for c in run.daemon.of_kind(ConnectionState) if not c.connected)
        assert down.error == f"directory missing: {drop}"
        n = len(run.daemon.events)
        drop.mkdir()
        await run.wait(lambda: [type(e) for e in run.daemon.events[n:]] == [ConnectionState, StatusFact], "back")
        back, idle = run.daemon.events[n:]
        assert isinstance(back, ConnectionState) and back.connected
        assert isinstance(idle, StatusFact) and idle.status == "idle"
        # The new folder is watched: a report dropped into it is taken.
        (drop / "after.csv").write_bytes(report("JOB-AFTER"))
        await run.wait(lambda: run.names(run.processed) == ["after.csv"], "processed after recreation")


async def test_missing_at_start_then_created(tmp_path: Path) -> None:
    eq = equipment(tmp_path, rescan_s=0.5)
    async with running(eq, tmp_path) as run:
        await run.wait(lambda: bool(run.daemon.of_kind(ConnectionState)), "first state")
        assert run.daemon.events[0] == ConnectionState(False, f"directory missing: {tmp_path / 'drop'}")
        run.directory.mkdir()
        await run.wait(lambda: bool(run.daemon.of_kind(StatusFact)), "idle")
        assert run.daemon.of_kind(StatusFact)[-1].status == "idle"


async def test_unreadable_folder_is_error(tmp_path: Path) -> None:
    eq = equipment(tmp_path, rescan_s=0.5)
    (tmp_path / "drop").write_text("a file where the folder should be")
    async with running(eq, tmp_path) as run:
        await run.wait(lambda: bool(run.daemon.of_kind(StatusFact)), "a status")
        fact = run.daemon.of_kind(StatusFact)[0]
        assert fact.status == "error" and "is not a directory" in (fact.error_message or "")
        assert run.daemon.of_kind(ConnectionState) == [ConnectionState(True)]
        (tmp_path / "drop").unlink()
        (tmp_path / "drop").mkdir()
        await run.wait(lambda: run.daemon.of_kind(StatusFact)[-1].status == "idle", "idle again")


# ---- the simulator ------------------------------------------------------------------------------


async def test_simulator_reports_are_taken(tmp_path: Path) -> None:
    from drivers.file_drop.sim import simulate

    eq = equipment(tmp_path)
    sim = asyncio.create_task(simulate(eq, tmp_path / "state", interval_s=0.2, seed=7))
    try:
        async with running(eq, tmp_path) as run:
            await run.wait(lambda: len(run.daemon.results) >= 3, "three simulated reports")
            for ev, _ in run.daemon.results:
                r = ev.result
                assert r["process_id"].startswith("JOB-")
                assert len(r["measurements"]) == 10
                assert r["timestamp"] <= iso(datetime.now(UTC))
            for name in run.names(run.failed):
                assert name.endswith(".error.txt") or (run.failed / f"{name}.error.txt").exists()
    finally:
        sim.cancel()
        await asyncio.gather(sim, return_exceptions=True)
    assert (tmp_path / "state" / "simulate" / "file_drop-cmm-1.job").read_text().isdigit()
