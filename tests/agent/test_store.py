"""The durable store: eviction, a full disk, a corrupt file, seq across reopenings."""

from __future__ import annotations

import json
from pathlib import Path

from agent import metrics
from agent.store import Store


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
