"""The Sparkplug B edge node (`[mqtt] profiles = ["sparkplug"]`) seen by an independent host application:
it decodes with pure-protobuf (the daemon encodes with the protobuf runtime and a generated module) from
message definitions written here from the specification."""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from pure_protobuf.annotations import Field, double, uint
from pure_protobuf.message import BaseMessage

from peers import Broker, Daemon, script_line, scripted_equipment, wait_until, write_config

G = "plant-a"
NODE = "cell-t"


@dataclass
class PropertyValue(BaseMessage):
    type: Annotated[uint | None, Field(1)] = None
    is_null: Annotated[bool | None, Field(2)] = None
    string_value: Annotated[str | None, Field(8)] = None


@dataclass
class PropertySet(BaseMessage):
    keys: Annotated[list[str], Field(1)] = field(default_factory=list)
    values: Annotated[list[PropertyValue], Field(2)] = field(default_factory=list)


@dataclass
class Metric(BaseMessage):
    name: Annotated[str | None, Field(1)] = None
    alias: Annotated[uint | None, Field(2)] = None
    timestamp: Annotated[uint | None, Field(3)] = None
    datatype: Annotated[uint | None, Field(4)] = None
    is_historical: Annotated[bool | None, Field(5)] = None
    is_null: Annotated[bool | None, Field(7)] = None
    properties: Annotated[PropertySet | None, Field(9)] = None
    long_value: Annotated[uint | None, Field(11)] = None
    double_value: Annotated[double | None, Field(13)] = None
    boolean_value: Annotated[bool | None, Field(14)] = None
    string_value: Annotated[str | None, Field(15)] = None


@dataclass
class Payload(BaseMessage):
    timestamp: Annotated[uint | None, Field(1)] = None
    metrics: Annotated[list[Metric], Field(2)] = field(default_factory=list)
    seq: Annotated[uint | None, Field(3)] = None


@dataclass
class Seen:
    topic: str
    payload: Payload
    qos: int
    retain: bool


class Host:
    """The host application: subscribes to the group, decodes everything, sends commands."""

    def __init__(self, port: int) -> None:
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"host-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        self.client.on_connect = lambda c, *a: (c.subscribe(f"spBv1.0/{G}/#", qos=1), self.ready.set())
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        wait_until(self.ready.is_set, what="host connected")

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.seen.append(Seen(msg.topic, Payload.loads(bytes(msg.payload)), msg.qos, bool(msg.retain)))

    def of(self, kind: str, device: str | None = None) -> list[Seen]:
        topic = f"spBv1.0/{G}/{kind}/{NODE}" + (f"/{device}" if device else "")
        with self.lock:
            return [s for s in self.seen if s.topic == topic]

    def rebirth(self) -> None:
        p = Payload(timestamp=1, metrics=[Metric(name="Node Control/Rebirth", datatype=11, boolean_value=True)])
        self.client.publish(f"spBv1.0/{G}/NCMD/{NODE}", bytes(p), qos=0).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def metric(p: Payload, name: str) -> Metric:
    return next(m for m in p.metrics if m.name == name)


def spb_config(tmp: Path, port: int) -> tuple[Path, Path]:
    script = tmp / "script.jsonl"
    script.touch()
    extra = f'profiles = ["sparkplug"]\n[mqtt.sparkplug]\ngroup_id = "{G}"\n'
    return write_config(tmp, port, scripted_equipment("mill-1", script), mqtt_extra=extra), script


def test_births_aliases_data_death_rebirth_and_bdseq_across_restarts(tmp_path: Path, broker: Broker) -> None:
    cfg, script = spb_config(tmp_path, broker.port)
    host = Host(broker.port)
    daemon = Daemon(cfg)
    try:
        daemon.start()
        wait_until(lambda: host.of("NBIRTH") and host.of("DBIRTH", "mill-1"), what="births")
        nbirth = host.of("NBIRTH")[0]
        assert nbirth.payload.seq == 0 and (nbirth.qos, nbirth.retain) == (0, False)
        bdseq = metric(nbirth.payload, "bdSeq").long_value
        assert metric(nbirth.payload, "Node Control/Rebirth").boolean_value is False
        assert metric(nbirth.payload, "Properties/Site").string_value == "test-site"
        dbirth = host.of("DBIRTH", "mill-1")[0]
        assert (dbirth.qos, dbirth.retain) == (0, False) and dbirth.payload.seq == 1
        temp = metric(dbirth.payload, "temp")
        assert temp.alias and temp.datatype == 10
        assert temp.properties is not None and temp.properties.keys == ["engUnit"]
        assert temp.properties.values[0].string_value == "degC"
        assert metric(dbirth.payload, "Status/status").datatype == 12
        aliases = {m.alias for m in dbirth.payload.metrics}
        assert len(aliases) == len(dbirth.payload.metrics), "aliases are unique"

        script_line(script, tag="state", value=1)
        script_line(script, tag="temp", value=21.5)

        def temp_values() -> list[float | None]:
            return [
                m.double_value for s in host.of("DDATA", "mill-1") for m in s.payload.metrics if m.alias == temp.alias
            ]

        wait_until(lambda: 21.5 in temp_values(), what="temp by alias")
        data = host.of("DDATA", "mill-1")
        assert all(m.name is None for s in data for m in s.payload.metrics), "born with an alias: sent by alias only"
        assert all((s.qos, s.retain) == (0, False) for s in data)
        status_alias = metric(dbirth.payload, "Status/status").alias
        wait_until(
            lambda: (
                "running"
                in [
                    m.string_value
                    for s in host.of("DDATA", "mill-1")
                    for m in s.payload.metrics
                    if m.alias == status_alias
                ]
            ),
            what="status by alias",
        )
        # seq counts every message after the NBIRTH, one by one, modulo 256
        seqs = [s.payload.seq for s in host.seen if "/NDEATH/" not in s.topic]
        assert all(b == (a + 1) % 256 for a, b in itertools.pairwise(seqs)), seqs

        host.rebirth()
        wait_until(lambda: len(host.of("NBIRTH")) == 2, what="rebirth on NCMD")
        reborn = host.of("NBIRTH")[1].payload
        assert reborn.seq == 0 and metric(reborn, "bdSeq").long_value == bdseq
        wait_until(lambda: len(host.of("DBIRTH", "mill-1")) == 2, what="DBIRTH after the rebirth")

        assert daemon.stop() == 0
        wait_until(lambda: host.of("NDEATH"), what="NDEATH on a clean stop")
        death = host.of("NDEATH")[0]
        assert metric(death.payload, "bdSeq").long_value == bdseq and (death.qos, death.retain) == (1, False)

        daemon = Daemon(cfg).start()
        wait_until(lambda: len(host.of("NBIRTH")) == 3, what="birth after the restart")
        again = metric(host.of("NBIRTH")[2].payload, "bdSeq").long_value
        assert again == (bdseq or 0) + 1, "bdSeq keeps counting across a restart (persisted in state_dir)"
        daemon.kill()
        wait_until(lambda: len(host.of("NDEATH")) == 2, what="the Will on a death")
        will = host.of("NDEATH")[1]
        assert metric(will.payload, "bdSeq").long_value == again and will.qos == 1 and not will.retain
    finally:
        daemon.stop()
        host.close()


def commands_run(script: Path) -> list[dict[str, Any]]:
    path = Path(str(script) + ".commands.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_dcmd_writes_run_as_declared_commands_with_their_validation(tmp_path: Path, broker: Broker) -> None:
    cfg, script = spb_config(tmp_path, broker.port)
    cfg.write_text(cfg.read_text().replace(f'group_id = "{G}"', f'group_id = "{G}"\ndcmd_enabled = true'))
    host = Host(broker.port)
    daemon = Daemon(cfg)
    try:
        daemon.start()
        script_line(script, tag="state", value=1)
        wait_until(lambda: host.of("DBIRTH", "mill-1"), what="DBIRTH")
        dbirth = host.of("DBIRTH", "mill-1")[0].payload
        daemon.wait_log("status_changed", status="running")

        def dcmd(*metrics: Metric) -> None:
            p = Payload(timestamp=1, metrics=list(metrics))
            host.client.publish(f"spBv1.0/{G}/DCMD/{NODE}/mill-1", bytes(p), qos=0).wait_for_publish(10)

        # by alias, inside set_speed's range (0..24000): written through the declared command
        dcmd(Metric(alias=metric(dbirth, "setpoint").alias, datatype=10, double_value=1000.0))
        wait_until(lambda: commands_run(script), what="the write applied")
        assert commands_run(script) == [{"command": "set_speed", "params": {"value": 1000.0}}]
        # by name, outside the range: refused by the command's validation, never reaching the device
        dcmd(Metric(name="setpoint", datatype=10, double_value=30000.0))
        refused = daemon.wait_log("command", source="sparkplug", success=False)
        assert refused[0]["command"] == "set_speed"
        # a metric without a declared write command: ignored, with a log line
        dcmd(Metric(name="temp", datatype=10, double_value=5.0))
        daemon.wait_log("sparkplug_dcmd_undeclared", metric="temp")
        assert len(commands_run(script)) == 1
    finally:
        daemon.stop()
        host.close()
