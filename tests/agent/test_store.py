"""The durable store: eviction, a full disk, a corrupt file, seq across reopenings."""

from __future__ import annotations

import json
from pathlib import Path

from agent import metrics
from agent.store import Store
from fs import ext4_image, fail_ext4, fill, tmpfs


def kinds(store: Store) -> list[str]:
    return [m.kind for m in store.fetch(0, 10_000)]


def test_full_store_evicts_oldest_telemetry_only(tmp_path: Path) -> None:
    store = Store(tmp_path, max_messages=10)
    store.open()
    before = metrics.STORE_EVICTED._value.get()
    store.append("status", "s", {"n": 0}, retain=True)
    for i in range(12):
        store.append("telemetry", "t", {"n": i})
    store.append("alert", "a", {"n": 1})
    for i in range(5):
        store.append("quality", "q", {"n": i})
    assert store.depth == 10
    remaining = store.fetch(0, 100)
    telemetry = [json.loads(m.payload)["n"] for m in remaining if m.kind == "telemetry"]
    assert telemetry == [9, 10, 11]  # the oldest went first
    assert kinds(store).count("status") == 1 and kinds(store).count("alert") == 1 and kinds(store).count("quality") == 5
    assert store.evicted == 9
    assert metrics.STORE_EVICTED._value.get() - before == 9
    # beyond the bound with nothing left to evict: the store grows, nothing critical is dropped
    for i in range(5):
        store.append("status", "s", {"n": i})
    assert store.depth == 12 and "telemetry" not in kinds(store)
    store.close()


def test_disk_full_drops_telemetry_keeps_the_rest(tmp_path: Path) -> None:
    store = Store(tmp_path, max_messages=1_000_000)
    store.open()
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count={pages + 2}")
    big = "x" * 3000
    for i in range(30):
        store.append("telemetry", "t", {"n": i, "pad": big})
    store.append("status", "s", {"status": "running", "pad": big * 40})
    assert store.degraded is not None and "full" in store.degraded
    # the status was not lost: it waits in memory and is counted in the depth
    assert store.depth >= 1
    store.db.execute("PRAGMA max_page_count=1000000")
    store.append("alert", "a", {"state": "active"})
    assert store.degraded is None
    got = [json.loads(m.payload) for m in store.fetch(0, 1000)]
    assert any(p.get("status") == "running" for p in got) and any(p.get("state") == "active" for p in got)
    seqs = [p["seq"] for p in got]
    assert seqs == sorted(seqs)
    store.close()


def test_seq_never_goes_back(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.open()
    last = 0
    for _ in range(3):
        last = store.append("status", "s", {})
    store.close()
    store = Store(tmp_path)
    store.open()
    nxt = store.append("status", "s", {})
    assert nxt > last
    store.close()
    # a corrupt database is renamed aside; seq still goes on upward
    (tmp_path / "store.sqlite-wal").unlink(missing_ok=True)
    (tmp_path / "store.sqlite-shm").unlink(missing_ok=True)
    (tmp_path / "store.sqlite").write_bytes(b"garbage" * 1000)
    store = Store(tmp_path)
    store.open()
    assert list(tmp_path.glob("store.sqlite.corrupt-*"))
    assert store.append("status", "s", {}) > nxt
    assert store.depth == 1
    store.close()
    # the seq file lost as well: the database's own reservation still holds
    (tmp_path / "seq").unlink()
    store = Store(tmp_path)
    store.open()
    assert store.append("status", "s", {}) > nxt
    store.close()


def test_delete_after_ack_and_fetch_order(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.open()
    for i in range(10):
        store.append("telemetry" if i % 2 else "status", "t", {"i": i})
    msgs = store.fetch(0, 4)
    store.delete([m.id for m in msgs])
    rest = store.fetch(0, 100)
    assert [json.loads(m.payload)["i"] for m in rest] == list(range(4, 10))
    assert store.depth == 6
    assert store.fetch(rest[2].id, 100)[0].id == rest[3].id
    store.close()


def test_read_only_state_dir_holds_in_memory(tmp_path: Path) -> None:
    with ext4_image(tmp_path / "mnt") as mnt:
        store = Store(mnt / "state", max_messages=1_000_000)
        store.open()
        store.append("status", "s", {"n": 0})
        fail_ext4(mnt)
        for i in range(1, 6):
            store.append("status" if i % 2 else "telemetry", "s", {"n": i})
        assert store.not_durable is not None and "read" in store.not_durable.lower() and store.held >= 5
        # still sent from memory, in order, after what is on disk
        got = store.fetch(0, 100)
        assert [json.loads(m.payload)["n"] for m in got] == [0, 1, 2, 3, 4, 5]
        store.delete([got[0].id, got[-1].id])  # acknowledged: one on disk (cannot be deleted now), one held
        assert [json.loads(m.payload)["n"] for m in store.fetch(0, 100)] == [1, 2, 3, 4]
        store.check()  # still read-only: nothing changes, nothing lost
        assert store.not_durable is not None and store.depth == 4
        store.close()


def test_full_disk_holds_in_memory_then_commits(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", size_mib=4) as mnt:
        store = Store(mnt / "state", max_messages=1_000_000)
        store.open()
        store.append("status", "s", {"n": 0})
        filler = fill(mnt)
        big = "x" * 20_000
        for i in range(1, 40):
            store.append("status", "s", {"n": i, "pad": big})
        assert store.not_durable is not None and store.held > 0
        got = store.fetch(0, 100)
        assert [json.loads(m.payload)["n"] for m in got] == list(range(40))
        store.delete([m.id for m in got[:5]])
        filler.unlink()
        store.check()
        assert store.not_durable is None and store.held == 0 and store.depth == 35
        store.close()
        again = Store(mnt / "state")
        again.open()
        assert [json.loads(m.payload)["n"] for m in again.fetch(0, 100)] == list(range(5, 40))
        again.close()


def test_memory_bound_drops_telemetry_first(tmp_path: Path) -> None:
    with ext4_image(tmp_path / "mnt") as mnt:
        store = Store(mnt / "state", max_messages=10)
        store.open()
        fail_ext4(mnt)
        for i in range(30):
            store.append("telemetry" if i % 3 else "alert", "t", {"n": i})
        kinds_held = [m.kind for m in store.fetch(0, 100)]
        assert kinds_held.count("alert") == 10  # never dropped, even past the bound
        assert len(kinds_held) == 10 and store.dropped == 20
        store.close()


def test_deleted_store_file_is_carried_into_a_new_one(tmp_path: Path) -> None:
    store = Store(tmp_path, max_messages=1_000_000)
    store.open()
    for i in range(50):
        store.append("status", "s", {"n": i})
    store.set_state("alert|x", {"id": "a1"})
    for suffix in ("", "-wal", "-shm"):
        Path(str(store.path) + suffix).unlink(missing_ok=True)
    store.append("status", "s", {"n": 50})  # written into the unlinked file
    store.check()
    assert store.path.exists() and store.incident is not None and "deleted" in store.incident
    store.append("status", "s", {"n": 51})
    store.close()
    again = Store(tmp_path)
    again.open()
    assert [json.loads(m.payload)["n"] for m in again.fetch(0, 100)] == list(range(52))
    assert again.state_items("alert|") == {"alert|x": {"id": "a1"}}
    again.close()


def test_replaced_store_file_is_set_aside(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.open()
    store.append("status", "s", {"n": 1})
    store.path.unlink()
    store.path.write_bytes(b"someone else's file")
    store.check()
    assert store.incident is not None and "replaced" in store.incident
    assert list(tmp_path.glob("store.sqlite.replaced-*"))
    assert [json.loads(m.payload)["n"] for m in store.fetch(0, 10)] == [1]
    store.close()
