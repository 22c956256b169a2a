"""The edge node's counters and message shapes without a broker: seq wraps from 255 to 0, bdSeq is persisted
and wraps, an offline device gets a DDEATH and is born again before its next data. Decoded with
pure-protobuf (the host application's library in the end-to-end tests), not with the daemon's module."""

from __future__ import annotations

import json
from pathlib import Path

from e2e.test_sparkplug import Payload
from hypothesis import given
from hypothesis import strategies as st

from agent.config import AgentConfig, parse_config
from agent.northbound.fanout import ProfileSink
from agent.sparkplug import payload as pl
from agent.sparkplug.commands import metric_value
from agent.sparkplug.node import SparkplugNode
from agent.store import Store, StoredMessage
from peers import scripted_equipment


def config(tmp: Path) -> AgentConfig:
    text = f"""
[agent]
id = "cell-t"
site = "s1"
state_dir = "{tmp / "state"}"
driver_modules = ["scripted_driver"]
[mqtt]
profiles = ["sparkplug"]
{scripted_equipment("mill-1", tmp / "script.jsonl")}
"""
    return parse_config(text, tmp / "agent.toml")


def node_at(tmp: Path) -> tuple[SparkplugNode, Store]:
    cfg = config(tmp)
    store = Store(tmp / "state")
    store.open()
    return SparkplugNode(cfg, ProfileSink(store, lambda: cfg), "1.0"), store


def row(i: int, body: dict[str, object]) -> StoredMessage:
    topic = "spBv1.0/s1/DDATA/cell-t/mill-1"
    return StoredMessage(i, i, "telemetry", topic, json.dumps(body).encode(), 0, False, None, None)


def test_seq_counts_every_message_and_wraps_from_255_to_0(tmp_path: Path) -> None:
    node, store = node_at(tmp_path)
    try:
        node.new_session()
        seqs = [Payload.loads(data).seq for _, data in node.births()]
        for i in range(300):
            body = {"metrics": [{"tag": "temp", "value": float(i), "ts": "2026-01-01T00:00:00Z", "quality": "good"}]}
            seqs.extend(Payload.loads(data).seq for _, data in node.encode(row(i + 1, body), False))
        assert seqs[:3] == [0, 1, 2]
        assert seqs == [n % 256 for n in range(len(seqs))]
        assert 255 in seqs and seqs[seqs.index(255) + 1] == 0
    finally:
        store.close()


def test_bdseq_is_persisted_and_wraps(tmp_path: Path) -> None:
    node, store = node_at(tmp_path)
    store.set_state("sparkplug.bdseq", 254)
    deaths = [Payload.loads(node.new_session()[1]).metrics[0].long_value for _ in range(3)]
    store.close()
    assert deaths == [255, 0, 1]
    again, store = node_at(tmp_path)
    try:
        assert Payload.loads(again.new_session()[1]).metrics[0].long_value == 2
    finally:
        store.close()


def test_an_offline_device_dies_and_is_born_again_before_its_next_data(tmp_path: Path) -> None:
    node, store = node_at(tmp_path)
    try:
        node.new_session()
        node.births()
        death = node.encode(row(1, {"status": {"status": "offline"}}), False)
        assert [t for t, _ in death] == ["spBv1.0/s1/DDEATH/cell-t/mill-1"]
        body = {"metrics": [{"tag": "temp", "value": 2.0, "ts": "2026-01-01T00:00:00Z", "quality": "good"}]}
        back = node.encode(row(2, body), False)
        assert [t.split("/")[2] for t, _ in back] == ["DBIRTH", "DDATA"]
    finally:
        store.close()


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_int64_metrics_round_trip_through_twos_complement(value: int) -> None:
    p = pl.new(0)
    m = pl.add_metric(p, name="x", datatype=pl.INT64, value=value)
    assert metric_value(m) == value


def test_a_tag_born_without_a_value_is_born_again_with_the_type_of_its_first_value(tmp_path: Path) -> None:
    node, store = node_at(tmp_path)
    try:
        node.new_session()
        births = node.births()
        program = next(m for m in Payload.loads(births[1][1]).metrics if m.name == "program")
        assert program.datatype == pl.DOUBLE and program.is_null
        body = {"metrics": [{"tag": "program", "value": "O1234", "ts": "2026-01-01T00:00:00Z", "quality": "good"}]}
        out = node.encode(row(1, body), False)
        assert [t.split("/")[2] for t, _ in out] == ["DBIRTH", "DDATA"]
        reborn = next(m for m in Payload.loads(out[0][1]).metrics if m.name == "program")
        assert reborn.datatype == pl.STRING
        value = Payload.loads(out[1][1]).metrics[0]
        assert value.alias == reborn.alias and value.string_value == "O1234"
    finally:
        store.close()
