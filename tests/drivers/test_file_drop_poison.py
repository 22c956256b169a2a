"""Poison reports cost only themselves: the file-drop driver fails each one alone and goes on.

Driver level, against a real folder; the test plays the daemon as tests/drivers/test_file_drop.py does.
The daemon-level counterparts (SIGKILL during a parse, MPM's body limit) are in tests/e2e.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from test_file_drop import HEADER, Daemon, equipment, report, running

from agent.model import StatusFact, json_bytes
from drivers.base import DriverContext
from drivers.file_drop import FileDropDriver, attempts_ledger_path, parse_report

DEEP = ('{"process_id": "J", "overall_score": 1, "x": ' + "[" * 10_000 + "]" * 10_000 + "}").encode()
BIG = json.dumps({"process_id": "JOB-BIG", "overall_score": 1.0, "notes": "x" * 5000}).encode()

POISON: dict[str, tuple[bytes, list[str]]] = {
    "deep.json": (DEEP, ["deep.json", "nests deeper than 64"]),
    "inf.csv": ((HEADER + "J,a,1,1e400,0,0,mm\n").encode(), ["row 2", "'measured'", "1e400", "out of range"]),
    "exp.csv": ((HEADER + "J,a,1e999999999999999999,1,0,0,mm\n").encode(), ["row 2", "'nominal'", "out of range"]),
    "dev.csv": ((HEADER + "J,a,-1.7e308,1.7e308,0,0,mm\n").encode(), ["row 2", "deviation", "out of range"]),
    "inf.json": (b'{"process_id": "J", "overall_score": 1e400}', ["'overall_score'", "finite"]),
    "inf_inside.json": (
        b'{"process_id": "J", "overall_score": 1, "measurements": [{"measured": -1e999}]}',
        ["'measurements[0].measured'", "finite"],
    ),
    "surrogate.json": (b'{"process_id": "J", "overall_score": 1, "note": "\\ud800"}', ["'note'", "surrogate"]),
    "year.json": (b'{"process_id": "J", "overall_score": 1, "timestamp": "0001-01-01T00:00:00+01:00"}', ["timestamp"]),
    "big.json": (BIG, ["big.json", "max_body_bytes (4096)"]),
}


async def test_each_poison_file_fails_alone_and_the_next_report_lands(tmp_path: Path) -> None:
    eq = equipment(tmp_path)
    (tmp_path / "drop").mkdir()
    context = DriverContext(tmp_path / "state", max_result_bytes=4096)
    async with running(eq, tmp_path, context=context) as run:
        for name, (data, _) in POISON.items():
            (run.directory / name).write_bytes(data)
        await run.wait(lambda: bool(run.daemon.results) or len(run.names(run.failed)) >= 2, "the first outcome")
        (run.directory / "good.csv").write_bytes(report())
        expected = sorted([*POISON, *(f"{n}.error.txt" for n in POISON)])
        await run.wait(lambda: run.names(run.failed) == expected, "every poison file in failed_dir")
        await run.wait(lambda: run.names(run.processed) == ["good.csv"], "the good one processed")
        assert [r.result["process_id"] for r, _ in run.daemon.results] == ["JOB-000101"]
        for name, (data, parts) in POISON.items():
            assert (run.failed / name).read_bytes() == data
            reason = (run.failed / f"{name}.error.txt").read_text()
            assert reason.splitlines()[0].startswith(f"{name}: "), reason
            for part in parts:
                assert part in reason, (name, part, reason)
        # The size named is that of the body the outbox would have stored: the object as the parser filled it in.
        filled = parse_report(
            "big.json", BIG, equipment_id="cmm-1", mtime_ns=(run.failed / "big.json").stat().st_mtime_ns
        )
        assert f"{len(json_bytes(filled))} bytes" in (run.failed / "big.json.error.txt").read_text()
        assert run.names(run.processing) == []
        assert all(s.status == "idle" for s in run.daemon.of_kind(StatusFact))


class Fragile(FileDropDriver):
    """A driver whose parser fails as libraries do: files named after an exception raise it."""

    def _read(self, path: Path, name: str) -> tuple[dict[str, Any], str]:
        if name.startswith("recursion"):
            raise RecursionError("maximum recursion depth exceeded")
        if name.startswith("memory"):
            raise MemoryError
        if name.startswith("library"):
            raise KeyError("a bug in a library")
        return super()._read(path, name)


async def test_a_library_exception_fails_that_file_only(tmp_path: Path) -> None:
    eq = equipment(tmp_path)
    (tmp_path / "drop").mkdir()
    async with running(eq, tmp_path, driver_class=Fragile) as run:
        for name in ("recursion.json", "memory.csv", "library.csv"):
            (run.directory / name).write_bytes(report())
        (run.directory / "good.csv").write_bytes(report("JOB-GOOD"))
        await run.wait(lambda: len(run.names(run.failed)) == 6, "three files in failed_dir")
        await run.wait(lambda: run.names(run.processed) == ["good.csv"], "the good one processed")
        assert "RecursionError: maximum recursion depth" in (run.failed / "recursion.json.error.txt").read_text()
        assert (run.failed / "memory.csv.error.txt").read_text().startswith("memory.csv: cannot be read as a report")
        assert "MemoryError" in (run.failed / "memory.csv.error.txt").read_text()
        assert "KeyError" in (run.failed / "library.csv.error.txt").read_text()
        assert [r.result["process_id"] for r, _ in run.daemon.results] == ["JOB-GOOD"]
        assert not run.task.done()  # the event stream never broke


def seed_ledger(tmp_path: Path, entries: dict[str, int]) -> Path:
    """An attempts ledger as a daemon that died that often while handling each file would have left it."""
    processing = tmp_path / "drop" / ".processing"
    files = {}
    for name, attempts in entries.items():
        st = os.lstat(processing / name)
        files[name] = {"attempts": attempts, "look": [st.st_size, st.st_mtime_ns, st.st_ino]}
    path = attempts_ledger_path(tmp_path / "state", "cmm-1")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"files": files}))
    return path


def ledger(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())["files"] if path.exists() else {}


async def test_a_file_the_agent_died_on_twice_is_failed_unread(tmp_path: Path) -> None:
    """Unit-level check of the ledger's rule; tests/e2e kills a real daemon twice during a parse."""
    eq = equipment(tmp_path)
    processing = tmp_path / "drop" / ".processing"
    processing.mkdir(parents=True)
    (processing / "twice.csv").write_bytes(report("JOB-TWICE"))  # valid: parsed, it would give a result
    (processing / "once.csv").write_bytes(report("JOB-ONCE"))
    (processing / "renamed.csv").write_bytes(report("JOB-OTHER"))
    path = seed_ledger(tmp_path, {"twice.csv": 2, "once.csv": 1, "renamed.csv": 2})
    # renamed.csv is another file now, under a name the ledger knew: it starts from nothing.
    (processing / "renamed.csv").unlink()
    (processing / "renamed.csv").write_bytes(report("JOB-NEW") + b"\n")
    async with running(eq, tmp_path) as run:
        await run.wait(lambda: run.names(run.failed) == ["twice.csv", "twice.csv.error.txt"], "twice.csv failed")
        await run.wait(lambda: run.names(run.processed) == ["once.csv", "renamed.csv"], "the others processed")
        reason = (run.failed / "twice.csv.error.txt").read_text()
        assert reason.startswith("twice.csv: the agent stopped 2 times while handling this file"), reason
        assert sorted(r.result["process_id"] for r, _ in run.daemon.results) == ["JOB-NEW", "JOB-ONCE"]
        assert ledger(path) == {}


async def test_commit_failures_are_not_counted_as_deaths(tmp_path: Path) -> None:
    eq = equipment(tmp_path, rescan_s=0.2)
    (tmp_path / "drop").mkdir()
    daemon = Daemon(fail_first=4)  # the store refuses four times, in-process: the agent lives through each
    async with running(eq, tmp_path, daemon) as run:
        (run.directory / "a.csv").write_bytes(report())
        await run.wait(lambda: run.names(run.processed) == ["a.csv"], "moved after the retries")
        assert len(daemon.results) == 1 and run.names(run.failed) == []
        assert ledger(attempts_ledger_path(tmp_path / "state", "cmm-1")) == {}


async def test_the_count_is_durable_before_the_parse_starts(tmp_path: Path) -> None:
    """While a parse runs, the ledger on disk already counts it (what a SIGKILL would leave)."""
    seen: list[dict[str, Any]] = []

    class Watching(FileDropDriver):
        def _read(self, path: Path, name: str) -> tuple[dict[str, Any], str]:
            seen.append(ledger(attempts_ledger_path(tmp_path / "state", "cmm-1")))
            return super()._read(path, name)

    eq = equipment(tmp_path)
    (tmp_path / "drop").mkdir()
    async with running(eq, tmp_path, driver_class=Watching) as run:
        (run.directory / "a.csv").write_bytes(report())
        await run.wait(lambda: run.names(run.processed) == ["a.csv"], "processed")
    assert [{n: e["attempts"] for n, e in s.items()} for s in seen] == [{"a.csv": 1}]
    assert ledger(attempts_ledger_path(tmp_path / "state", "cmm-1")) == {}


async def test_names_that_are_not_utf8_do_not_stop_the_folder(tmp_path: Path) -> None:
    eq = equipment(tmp_path)
    drop = tmp_path / "drop"
    drop.mkdir()
    async with running(eq, tmp_path) as run:
        (drop / os.fsdecode(b"good\xff.csv")).write_bytes(report("JOB-LATIN"))
        (drop / os.fsdecode(b"bad\xfe.csv")).write_bytes(b"")
        await run.wait(lambda: len(run.names(run.processed)) == 1, "the good one processed")
        await run.wait(lambda: len(run.names(run.failed)) == 2, "the bad one failed")
        ((result, _),) = run.daemon.results
        assert result.result["source"] == "file_drop:good\ufffd.csv"
        json_bytes(result.result)  # a sendable body
        reason = (run.failed / (os.fsdecode(b"bad\xfe.csv") + ".error.txt")).read_text()
        assert reason.startswith("bad\\udcfe.csv: file is empty")
