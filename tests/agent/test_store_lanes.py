"""Two broker connections read one store: each stream sees only its lane, in order, and a stream whose lane
is absent from the newest rows does not scan them again on every wake-up."""

from __future__ import annotations

import json
from pathlib import Path

from agent.mqtt import NOT_SPARKPLUG
from agent.mqtt_streams import FETCH, Stream
from agent.sparkplug.sink import SPARKPLUG
from agent.store import Store
from agent.store_memory import HeldMessages
from agent.store_rows import StoredMessage


def drain(stream: Stream, store: Store) -> list[int]:
    out = []
    while (msg := stream.next(store)) is not None:
        out.append(json.loads(msg.payload)["n"])
    return out


def test_each_lane_reads_its_own_rows_in_order(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.open()
    try:
        for n in range(3 * FETCH):
            topic = "spBv1.0/g/DDATA/node/eq" if n % 3 else "edge/site/agent/equipment/eq/telemetry"
            store.append("telemetry", topic, {"n": n}, numbered=n % 3 == 0)
        main, spb = Stream(NOT_SPARKPLUG), Stream(SPARKPLUG)
        main.reset(0, None)
        spb.reset(0, store.max_id())
        assert drain(main, store) == [n for n in range(3 * FETCH) if n % 3 == 0]
        assert drain(spb, store) == [n for n in range(3 * FETCH) if n % 3]
        assert spb.done
        # Everything up to the newest row was looked at once: the live stream's cursor is past the other lane's.
        assert main.cursor == store.last_id
        store.append("telemetry", "spBv1.0/g/DDATA/node/eq", {"n": -1}, numbered=False)
        assert main.next(store) is None and main.cursor == store.last_id
        store.append("status", "edge/site/agent/equipment/eq/status", {"n": -2})
        assert drain(main, store) == [-2]
    finally:
        store.close()


def test_rows_held_in_memory_keep_to_their_lane(tmp_path: Path) -> None:
    held = HeldMessages()
    msgs = [
        StoredMessage(i, 0, "telemetry", "spBv1.0/g/DDATA/n/e" if i % 2 else "edge/x", b"{}", 0, False, None, None)
        for i in range(1, 11)
    ]
    held.add(msgs, 100)
    assert [m.id for m in held.after(0, None, 3, SPARKPLUG)] == [1, 3, 5]
    assert [m.id for m in held.after(0, 8, 100, NOT_SPARKPLUG)] == [2, 4, 6, 8]
    assert [m.id for m in held.after(4, None, 100)] == [5, 6, 7, 8, 9, 10]


def test_other_profiles_take_no_seq(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.open()
    try:
        first = store.append("status", "edge/s", {})
        store.append("status", "acme/line/eq/status", {}, numbered=False)
        store.append_encoded([], plain=[("telemetry", "acme/line/eq/telemetry/t", '{"value":1', 1, False)])
        assert store.append("status", "edge/s", {}) == first + 1
        bodies = [json.loads(m.payload) for m in store.fetch(0, 10)]
        assert ["seq" in b for b in bodies] == [True, False, False, True]
    finally:
        store.close()


def test_kept_rows_are_forgotten_when_evicted_or_deleted(tmp_path: Path) -> None:
    store = Store(tmp_path, max_messages=5)
    store.open()
    try:
        for n in range(4):
            store.append("telemetry", "spBv1.0/g/DDATA/node/eq", {"n": n}, numbered=False)
        store.kept.update(m.id for m in store.fetch(0, 10))  # sent, kept for the window
        assert store.first_waiting_id() is None
        store.append("status", "edge/s", {"n": 4})
        waiting = store.fetch(0, 10)[-1].id
        assert store.first_waiting_id() == waiting
        for n in range(5, 8):
            store.append("telemetry", "edge/t", {"n": n})  # past the bound: the oldest telemetry goes
        assert store.kept == {m.id for m in store.fetch(0, 10) if m.id in store.kept}, "no evicted id stays kept"
        store.delete(sorted(store.kept))
        assert not store.kept
        assert store.first_waiting_id() == waiting
    finally:
        store.close()
