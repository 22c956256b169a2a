"""File drops through the daemon: reports land in MPM once, through slow writes, crashes and repeats."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.outbox import Outbox
from drivers.file_drop import idempotency_key
from peers import Broker, Daemon, MpmPeer, Recorder, wait_until, write_config

R = "edge/test-site/cell-t"
CSV = (
    "process_id,feature,nominal,measured,lower_tol,upper_tol,unit\n"
    "PROC-007,bore_d,10.0,10.02,-0.05,0.05,mm\n"
    "PROC-007,slot_w,5.0,5.08,-0.05,0.05,mm\n"
    "PROC-007,length,100.0,100.35,-0.1,0.1,mm\n"
    "PROC-007,flat,0.0,0.01,0.0,0.02,mm\n"
)


@pytest.fixture
def mpm() -> Iterator[MpmPeer]:
    peer = MpmPeer()
    yield peer
    peer.close()


def config(tmp: Path, broker: Broker, mpm: MpmPeer, stable_s: float = 0.5, mpm_extra: str = "") -> Path:
    body = f"""
[mpm]
base_url = "{mpm.base_url}"
auth = "none"
rate_limit_per_minute = 1000000
{mpm_extra}

[[equipment]]
id = "cmm-1"
type = "cmm"
driver = "file_drop"
[equipment.connection]
directory = "drops"
processed_dir = "processed"
failed_dir = "failed"
stable_s = {stable_s}
rescan_s = 0.5
"""
    (tmp / "drops").mkdir(exist_ok=True)
    return write_config(tmp, broker.port, body)


def test_slow_csv_and_json_land_once(tmp_path: Path, broker: Broker, mpm: MpmPeer) -> None:
    cfg = config(tmp_path, broker, mpm, stable_s=2.0)
    rec = Recorder(broker.port, [f"{R}/equipment/+/quality", f"{R}/equipment/+/status"])
    daemon = Daemon(cfg).start()
    try:
        rec.wait_for(lambda ms: [m for m in rec.select("/status") if m.json["status"] == "idle"], "watching")
        target = tmp_path / "drops" / "part7.csv"
        data = CSV.encode()
        with open(target, "wb") as fh:  # written in three pieces with pauses, as a slow machine writes
            for piece in (data[:60], data[60:150], data[150:]):
                fh.write(piece)
                fh.flush()
                time.sleep(0.2)
        mtime = os.stat(target).st_mtime
        (tmp_path / "drops" / "part8.json").write_text(
            json.dumps({"process_id": "PROC-008", "overall_score": 0.9, "quality_scores": {"visual": 0.9}})
        )
        wait_until(lambda: len(mpm.call(mpm.emu.results)) >= 2, what="both results in MPM")
        wait_until(
            lambda: (tmp_path / "processed" / "part7.csv").exists() and (tmp_path / "processed" / "part8.json").exists()
        )
        stored = {r["process_id"]: r["body"] for r in mpm.call(mpm.emu.results)}
        assert len(mpm.call(mpm.emu.results)) == 2
        csv = stored["PROC-007"]
        assert csv["equipment_id"] == "cmm-1" and csv["source"] == "file_drop:part7.csv"
        assert csv["quality_scores"]["dimensional"] == 0.5 and csv["overall_score"] == 0.5
        defects = {d["feature"]: d for d in csv["defects"]}
        assert set(defects) == {"slot_w", "length"}
        assert defects["slot_w"]["severity"] == "major"  # out by 0.03, band width 0.1
        assert defects["length"]["severity"] == "critical"  # out by 0.25, more than the band width 0.2
        assert abs(defects["length"]["deviation"] - 0.35) < 1e-9
        assert len(csv["measurements"]) == 4 and sum(1 for m in csv["measurements"] if m["in_tolerance"]) == 2
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(mtime))
        assert csv["timestamp"].startswith(ts) and csv["timestamp"].endswith("Z")

        def deliveries() -> list[str] | None:
            got = [m.json["mpm_delivery"] for m in rec.select("/quality")]
            return got if {"pending", "delivered"} <= set(got) else None

        states = rec.wait_for(lambda ms: deliveries(), "pending then delivered")
        assert states.index("pending") < states.index("delivered")
        # the same report dropped again under another name: not sent again, reported as a duplicate
        (tmp_path / "drops" / "part7-again.csv").write_bytes(data)
        dup = rec.wait_for(lambda ms: [m.json for m in rec.select("/quality") if m.json.get("duplicate")], "duplicate")
        assert dup[0]["mpm_delivery"] == "delivered"
        wait_until(lambda: (tmp_path / "processed" / "part7-again.csv").exists())
        assert len(mpm.call(mpm.emu.results)) == 2
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        rec.close()


def test_crash_states_and_a_thousand_files(tmp_path: Path, broker: Broker, mpm: MpmPeer) -> None:
    cfg = config(tmp_path, broker, mpm)
    processing = tmp_path / "drops" / ".processing"
    processing.mkdir(parents=True)
    # a file claimed but never committed, and one whose result is already in the outbox
    a = CSV.replace("PROC-007", "PROC-101").encode()
    b = CSV.replace("PROC-007", "PROC-102").encode()
    (processing / "a.csv").write_bytes(a)
    (processing / "b.csv").write_bytes(b)
    state = tmp_path / "state"
    state.mkdir()
    from agent.mpm import MPMClient

    client = MPMClient(mpm.base_url)
    outbox = Outbox(state / "outbox.sqlite", client)
    assert outbox.enqueue_quality(
        "PROC-102", "cmm-1", {"process_id": "PROC-102", "overall_score": 0.5}, idempotency_key(b)
    )
    outbox.close()
    for i in range(1000):
        (tmp_path / "drops" / f"r{i:04d}.json").write_text(json.dumps({"process_id": f"J-{i}", "overall_score": 1.0}))
    daemon = Daemon(cfg).start()
    try:
        wait_until(lambda: len(mpm.call(mpm.emu.results)) >= 1002, timeout=120, what="1,002 results")
        wait_until(lambda: len(list((tmp_path / "processed").iterdir())) >= 1002, timeout=120, what="files processed")
        keys = [r["idempotency_key"] for r in mpm.call(mpm.emu.results)]
        assert len(keys) == len(set(keys)) == 1002, "a result was stored twice"
        assert {r["process_id"] for r in mpm.call(mpm.emu.results)} >= {"PROC-101", "PROC-102"}
        assert not list(processing.iterdir()) and not [p for p in (tmp_path / "drops").iterdir() if p.is_file()]
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    import asyncio

    asyncio.run(client.close())


GOOD = "process_id,feature,nominal,measured,lower_tol,upper_tol,unit\nPROC-GOOD,bore_d,10.0,10.02,-0.05,0.05,mm\n"
SECRET = "root:$6$aSeCrEtHaShFoRtHeTeSt:19000:0:99999:7:::"


def test_poison_reports_fail_alone_and_the_next_lands_once(tmp_path: Path, broker: Broker, mpm: MpmPeer) -> None:
    # max_body_bytes at its floor, 1 KiB: a report of a few KiB gives a result MPM would refuse.
    cfg = config(tmp_path, broker, mpm, mpm_extra="max_body_bytes = 1024")
    secret = tmp_path / "shadow"  # stands in for /etc/shadow: outside the folder, never to be read
    secret.write_text(SECRET)
    rec = Recorder(broker.port, [f"{R}/equipment/+/quality", f"{R}/equipment/+/status"])
    daemon = Daemon(cfg)
    try:
        daemon.start()
        rec.wait_for(lambda ms: [m for m in rec.select("/status") if m.json["status"] == "idle"], "watching")
        drops, failed = tmp_path / "drops", tmp_path / "failed"
        poison = {
            "deep.json": ('{"process_id": "PROC-DEEP", "x": ' + "[" * 10_000 + "]" * 10_000 + "}").encode(),
            "inf.csv": GOOD.replace("PROC-GOOD", "PROC-INF").replace("10.02", "1e400").encode(),
            "big.json": json.dumps({"process_id": "PROC-BIG", "overall_score": 1.0, "notes": "x" * 3000}).encode(),
        }
        for name, data in poison.items():
            (drops / name).write_bytes(data)
        os.symlink(secret, drops / "shadow.csv")
        wait_until(lambda: len(list(failed.glob("*.error.txt"))) >= 2, what="the first poison files failed")
        (drops / "good.csv").write_text(GOOD)
        wait_until(lambda: (tmp_path / "processed" / "good.csv").exists(), what="the good report processed")
        names = [*poison, "shadow.csv"]
        wait_until(
            lambda: sorted(p.name for p in failed.iterdir()) == sorted([*names, *(f"{n}.error.txt" for n in names)]),
            what="every poison file in failed_dir",
        )
        reasons = {n: (failed / f"{n}.error.txt").read_text() for n in names}
        assert "nests deeper than 64 levels" in reasons["deep.json"]
        assert "row 2, column 'measured': '1e400' is out of range" in reasons["inf.csv"]
        assert "max_body_bytes (1024)" in reasons["big.json"] and "bytes as JSON" in reasons["big.json"]
        assert reasons["shadow.csv"].startswith(f"shadow.csv: a symbolic link to {str(secret)!r}")
        assert os.readlink(failed / "shadow.csv") == str(secret)
        wait_until(lambda: mpm.call(mpm.emu.results), what="the good result in MPM")
        assert [r["process_id"] for r in mpm.call(mpm.emu.results)] == ["PROC-GOOD"]
        assert daemon.stop() == 0
        assert len(mpm.call(mpm.emu.results)) == 1
        logs = daemon.log_path.read_text()
        assert '"driver_failed"' not in logs, "the driver broke off"
        assert SECRET not in logs and all(SECRET not in m.payload.decode() for m in rec.messages)
        assert SECRET not in json.dumps(mpm.call(mpm.emu.results))
    finally:
        daemon.kill()
        rec.close()


def slow_report(rows: int = 860_000) -> bytes:
    """A valid CSV of about 10 MB (just under max_file_bytes) whose parse takes seconds: time to SIGKILL."""
    return ("process_id,feature,nominal,measured,lower_tol,upper_tol\n" + "P,a,1,1,0,0\n" * rows).encode()


def attempts(tmp: Path, name: str) -> int:
    path = tmp / "state" / "file_drop" / "cmm-1.attempts.json"
    try:
        return int(json.loads(path.read_text())["files"][name]["attempts"])
    except (FileNotFoundError, KeyError):
        return 0


@pytest.mark.slow
def test_a_file_the_daemon_dies_on_twice_is_failed_on_the_third_start(
    tmp_path: Path, broker: Broker, mpm: MpmPeer
) -> None:
    cfg = config(tmp_path, broker, mpm)
    data = slow_report()
    assert len(data) < 10_485_760
    (tmp_path / "drops" / "slow.csv").write_bytes(data)
    processing = tmp_path / "drops" / ".processing"
    daemons: list[Daemon] = []
    try:
        for death in (1, 2):
            daemon = Daemon(cfg).start()
            daemons.append(daemon)
            # The ledger counts an attempt durably before the parse begins; the parse then takes seconds.
            wait_until(lambda death=death: attempts(tmp_path, "slow.csv") == death, what=f"parse attempt {death}")
            if death == 2:
                daemon.wait_log("report_retried_after_crash", file="slow.csv", attempt=2)
            daemon.kill()  # SIGKILL, in the middle of the parse
            assert (processing / "slow.csv").exists()
            assert not (tmp_path / "failed").exists() and not mpm.call(mpm.emu.results)
        daemon = Daemon(cfg).start()
        daemons.append(daemon)
        reason_file = tmp_path / "failed" / "slow.csv.error.txt"
        wait_until(reason_file.exists, what="slow.csv failed on the third start")
        assert reason_file.read_text().startswith("slow.csv: the agent stopped 2 times while handling this file")
        assert (tmp_path / "failed" / "slow.csv").read_bytes() == data
        (tmp_path / "drops" / "good.csv").write_text(GOOD)
        wait_until(lambda: mpm.call(mpm.emu.results), what="the next report in MPM")
        wait_until(lambda: (tmp_path / "processed" / "good.csv").exists(), what="good.csv processed")
        assert [r["process_id"] for r in mpm.call(mpm.emu.results)] == ["PROC-GOOD"]
        assert attempts(tmp_path, "slow.csv") == 0 and not list(processing.iterdir())
        assert daemon.stop() == 0
    finally:
        for d in daemons:
            d.kill()
