"""MTConnect documents shaped like the standard's examples, in the 1.x and 2.x namespaces (and none): the
device model, observations, errors; the status vocabulary; where to start streaming after a connect."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.mtconnect.cursor import Cursor, Lost, Start, plan
from drivers.mtconnect.documents import (
    AgentError,
    DataItem,
    Header,
    Observation,
    parse_probe,
    parse_streams,
    typed_value,
)
from drivers.mtconnect.machine import Machine
from drivers.sdk import DataError

NAMESPACES = {
    "1.3": ' xmlns="urn:mtconnect.org:MTConnect{kind}:1.3" xmlns:m="urn:mtconnect.org:MTConnect{kind}:1.3"',
    "2.0": ' xmlns="urn:mtconnect.org:MTConnect{kind}:2.0"',
    "none": "",
}


def probe_doc(ns: str, agent_device: bool = False) -> bytes:
    attrs = NAMESPACES[ns].format(kind="Devices")
    agent = (
        '<Agent id="agent_ad" name="Agent" uuid="agent-uuid"><DataItems>'
        '<DataItem category="EVENT" id="agent_avail" type="AVAILABILITY"/></DataItems></Agent>'
        if agent_device
        else ""
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<MTConnectDevices{attrs}>
  <Header creationTime="2024-01-10T08:00:00Z" sender="agent" instanceId="1700000000" version="{ns}" bufferSize="131072"
    assetBufferSize="1024" assetCount="0"/>
  <Devices>
    {agent}
    <Device id="d1" name="VMC-3Axis" uuid="000-111">
      <Description manufacturer="SystemInsights"/>
      <DataItems>
        <DataItem category="EVENT" id="avail" name="avail" type="AVAILABILITY"/>
      </DataItems>
      <Components>
        <Axes id="a" name="base">
          <Components>
            <Linear id="x" name="X">
              <DataItems>
                <DataItem category="SAMPLE" id="Xact" name="Xact" nativeUnits="MILLIMETER" subType="ACTUAL"
                  type="POSITION" units="MILLIMETER"/>
                <DataItem category="CONDITION" id="Xtravel" type="POSITION"/>
              </DataItems>
            </Linear>
          </Components>
        </Axes>
        <Controller id="cn1" name="controller">
          <DataItems>
            <DataItem category="EVENT" id="mode" name="mode" type="CONTROLLER_MODE"/>
            <DataItem category="CONDITION" id="system" name="sys" type="SYSTEM"/>
          </DataItems>
          <Components>
            <Path id="pth" name="path">
              <DataItems>
                <DataItem category="EVENT" id="execution" name="execution" type="EXECUTION"/>
                <DataItem category="EVENT" id="program" name="program" type="PROGRAM"/>
                <DataItem category="EVENT" id="pcount" name="part_count" type="PART_COUNT"/>
                <DataItem category="EVENT" id="pid" name="part_id" type="PART_ID"/>
                <DataItem category="EVENT" id="vars" type="VARIABLE" representation="DATA_SET"/>
              </DataItems>
            </Path>
          </Components>
        </Controller>
      </Components>
    </Device>
  </Devices>
</MTConnectDevices>""".encode()


def streams_doc(ns: str, body: str, instance: str = "1700000000", first: int = 1, nxt: int = 120) -> bytes:
    attrs = NAMESPACES[ns].format(kind="Streams")
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<MTConnectStreams{attrs}>
  <Header creationTime="2024-01-10T08:00:05Z" sender="agent" instanceId="{instance}" version="{ns}"
    bufferSize="131072" nextSequence="{nxt}" firstSequence="{first}" lastSequence="{nxt - 1}"/>
  <Streams>
    <DeviceStream name="VMC-3Axis" uuid="000-111">
      {body}
    </DeviceStream>
  </Streams>
</MTConnectStreams>""".encode()


CURRENT = """
<ComponentStream component="Device" name="VMC-3Axis" componentId="d1">
  <Events><Availability dataItemId="avail" name="avail" sequence="5"
      timestamp="2024-01-10T08:00:00.1Z">AVAILABLE</Availability></Events>
</ComponentStream>
<ComponentStream component="Linear" name="X" componentId="x">
  <Samples>
    <Position dataItemId="Xact" name="Xact" sequence="110" subType="ACTUAL"
      timestamp="2024-01-10T08:00:04.5Z">-12.0345</Position>
  </Samples>
  <Condition><Normal dataItemId="Xtravel" sequence="6" timestamp="2024-01-10T08:00:00.1Z"
      type="POSITION"/></Condition>
</ComponentStream>
<ComponentStream component="Controller" name="controller" componentId="cn1">
  <Events><ControllerMode dataItemId="mode" name="mode" sequence="7"
      timestamp="2024-01-10T08:00:00.1Z">AUTOMATIC</ControllerMode></Events>
  <Condition>
    <Fault dataItemId="system" name="sys" nativeCode="1001" nativeSeverity="2" sequence="100"
      timestamp="2024-01-10T08:00:03Z" type="SYSTEM">Emergency stop</Fault>
    <Warning dataItemId="system" name="sys" nativeCode="2002" sequence="101"
      timestamp="2024-01-10T08:00:03.2Z" type="SYSTEM">Lube low</Warning>
  </Condition>
</ComponentStream>
<ComponentStream component="Path" name="path" componentId="pth">
  <Events>
    <Execution dataItemId="execution" name="execution" sequence="112"
      timestamp="2024-01-10T08:00:04.6Z">FEED_HOLD</Execution>
    <Program dataItemId="program" name="program" sequence="30"
      timestamp="2024-01-10T08:00:01Z">O2001</Program>
    <PartCount dataItemId="pcount" name="part_count" sequence="31"
      timestamp="2024-01-10T08:00:01Z">UNAVAILABLE</PartCount>
    <PartId dataItemId="pid" name="part_id" sequence="32" timestamp="2024-01-10T08:00:01Z">A-17</PartId>
    <Variable dataItemId="vars" sequence="33" timestamp="2024-01-10T08:00:01Z" count="2"><Entry
      key="a">1</Entry><Entry key="b">x</Entry></Variable>
  </Events>
</ComponentStream>
"""


@pytest.mark.parametrize("ns", ["1.3", "2.0", "none"])
def test_probe_reads_the_device_model_in_either_namespace(ns: str) -> None:
    header, device = parse_probe(probe_doc(ns, agent_device=ns == "2.0"))
    assert header.instance_id == "1700000000"
    assert (device.name, device.uuid) == ("VMC-3Axis", "000-111")
    assert device.items["Xact"] == DataItem("Xact", "Xact", "SAMPLE", "POSITION", "ACTUAL", "MILLIMETER")
    assert device.find("part_id") is device.items["pid"]  # by name when no id matches
    assert {i.id for i in device.items.values() if i.category == "CONDITION"} == {"Xtravel", "system"}
    assert "agent_avail" not in device.items


def test_probe_picks_a_device_by_name_or_uuid_and_names_the_choices() -> None:
    assert parse_probe(probe_doc("2.0", True), "000-111")[1].name == "VMC-3Axis"
    assert parse_probe(probe_doc("2.0", True), "Agent")[1].items.keys() == {"agent_avail"}
    with pytest.raises(DataError, match=r"no device 'Mill'.*Agent, VMC-3Axis"):
        parse_probe(probe_doc("2.0", True), "Mill")


@pytest.mark.parametrize("ns", ["1.3", "2.0", "none"])
def test_streams_give_observations_in_sequence_order(ns: str) -> None:
    doc = parse_streams(streams_doc(ns, CURRENT))
    assert doc.header == Header("1700000000", 1, 119, 120)
    assert [o.sequence for o in doc.observations] == sorted(o.sequence for o in doc.observations)
    by_id: dict[str, list[Observation]] = {}
    for o in doc.observations:
        by_id.setdefault(o.item_id, []).append(o)
    assert by_id["Xact"][0].value == "-12.0345"
    assert by_id["Xact"][0].ts == datetime(2024, 1, 10, 8, 0, 4, 500000, tzinfo=UTC)
    assert [(o.level, o.native_code, o.value) for o in by_id["system"]] == [
        ("Fault", "1001", "Emergency stop"),
        ("Warning", "2002", "Lube low"),
    ]
    assert by_id["Xtravel"][0].level == "Normal"
    assert by_id["vars"][0].value == {"a": "1", "b": "x"}


@pytest.mark.parametrize("ns", ["1.3", "2.0"])
def test_an_error_document_raises_with_its_code(ns: str) -> None:
    attrs = NAMESPACES[ns].format(kind="Error")
    body = f"""<MTConnectError{attrs}><Header creationTime="2024-01-10T08:00:05Z" sender="a" instanceId="1"
      version="{ns}" bufferSize="8"/><Errors><Error errorCode="OUT_OF_RANGE">'from' must be greater than 99
      </Error></Errors></MTConnectError>""".encode()
    with pytest.raises(AgentError, match="must be greater than 99") as err:
        parse_streams(body)
    assert err.value.code == "OUT_OF_RANGE"


@pytest.mark.parametrize(
    "body",
    [b"<not xml", b"<MTConnectStreams/>", b"<Other/>"],
)
def test_malformed_documents_are_data_errors(body: bytes) -> None:
    with pytest.raises(DataError):
        parse_streams(body)


def machine_after(ns: str, body: str) -> Machine:
    _, device = parse_probe(probe_doc(ns))
    machine = Machine(device, {})
    machine.reset_conditions()
    for obs in parse_streams(streams_doc(ns, body)).observations:
        machine.apply(obs)
    return machine


@pytest.mark.parametrize("ns", ["1.3", "2.0"])
def test_status_from_a_current_document(ns: str) -> None:
    machine = machine_after(ns, CURRENT)
    fact = machine.status()
    # a Fault is active: error, whatever the execution state
    assert (fact.status, fact.error_message, fact.current_operation, fact.process_id) == (
        "error",
        "Emergency stop",
        "O2001",
        "A-17",
    )
    assert fact.metadata == {"execution": "FEED_HOLD", "availability": "AVAILABLE", "controller_mode": "AUTOMATIC"}
    assert machine.alerts("system") == {"1001": ("critical", "Emergency stop"), "2002": ("warning", "Lube low")}
    cleared = """<ComponentStream component="Controller" componentId="cn1"><Condition>
      <Normal dataItemId="system" nativeCode="1001" sequence="130" timestamp="2024-01-10T08:00:06Z" type="SYSTEM"/>
    </Condition></ComponentStream>"""
    for obs in parse_streams(streams_doc(ns, cleared)).observations:
        assert machine.apply(obs)
    assert machine.alerts("system") == {"2002": ("warning", "Lube low")}
    assert machine.status().status == "paused"  # FEED_HOLD once no Fault is active


EXECUTION = {
    "ACTIVE": "running",
    "READY": "idle",
    "STOPPED": "idle",
    "PROGRAM_COMPLETED": "idle",
    "INTERRUPTED": "paused",
    "FEED_HOLD": "paused",
    "OPTIONAL_STOP": "paused",
    "PROGRAM_STOPPED": "paused",
    "WAIT": "unknown",
}


def one(item: str, value: str, seq: int) -> Observation:
    return Observation(item, seq, datetime.now(UTC), value)


@pytest.mark.parametrize(("execution", "status"), EXECUTION.items())
def test_execution_vocabulary(execution: str, status: str) -> None:
    _, device = parse_probe(probe_doc("2.0"))
    machine = Machine(device, {})
    machine.apply(one("avail", "AVAILABLE", 1))
    machine.apply(one("execution", execution, 2))
    assert machine.status().status == status
    machine.apply(one("avail", "UNAVAILABLE", 3))
    assert machine.status().status == "offline"


def test_a_status_map_overrides_the_vocabulary_and_the_process_item_is_configurable() -> None:
    _, device = parse_probe(probe_doc("2.0"))
    machine = Machine(device, {"INTERRUPTED": "error", "WAIT": "idle"}, process_item="program")
    for seq, (item, value) in enumerate([("avail", "AVAILABLE"), ("execution", "WAIT"), ("program", "O9")]):
        machine.apply(one(item, value, seq))
    assert (machine.status().status, machine.status().process_id) == ("idle", "O9")
    machine.apply(one("execution", "INTERRUPTED", 9))
    assert machine.status().status == "error"


def test_a_normal_without_a_code_clears_every_condition_of_its_item() -> None:
    machine = machine_after("2.0", CURRENT)
    assert machine.apply(Observation("system", 200, datetime.now(UTC), "", "Normal"))
    assert machine.alerts("system") == {}
    # Unavailable says nothing: what is active stays
    machine.apply(Observation("system", 201, datetime.now(UTC), "E", "Fault", "7"))
    assert not machine.apply(Observation("system", 202, datetime.now(UTC), "", "Unavailable"))
    assert machine.alerts("system") == {"7": ("critical", "E")}


SAMPLE = DataItem("x", None, "SAMPLE", "POSITION", units="MILLIMETER")
EVENT = DataItem("e", None, "EVENT", "PART_COUNT")


@pytest.mark.parametrize(
    ("item", "raw", "expected"),
    [
        (SAMPLE, "1.5", (1.5, "good")),
        (SAMPLE, "UNAVAILABLE", (None, "bad")),
        (SAMPLE, "abc", (None, "bad")),
        (EVENT, "42", (42, "good")),
        (EVENT, "4.25", (4.25, "good")),
        (EVENT, "READY", ("READY", "good")),
        (EVENT, "nan", ("nan", "good")),
        (EVENT, "UNAVAILABLE", (None, "bad")),
    ],
)
def test_values_by_category(item: DataItem, raw: str, expected: tuple[Any, str]) -> None:
    assert typed_value(item, raw) == expected


@given(st.integers(1, 10**6), st.integers(0, 10**6), st.integers(0, 10**6), st.booleans())
def test_plan_never_skips_or_repeats(saved: int, first: int, span: int, same: bool) -> None:
    header = Header("i1", first, first + span - 1, first + span)
    start, lost = plan(("i1" if same else "i0", saved), header)
    if not same:
        assert (start, lost) == (Start.RESTARTED, None)
    elif saved < first:
        assert (start, lost) == (Start.WRAPPED, Lost(saved, first - 1))
        assert lost is not None and lost.count == first - saved
    elif saved <= first + span:
        assert (start, lost) == (Start.RESUME, None)
    else:
        assert start is Start.RESTARTED
    assert plan(None, header) == (Start.FRESH, None)


def test_the_cursor_is_kept_per_agent_and_device(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    cursor = Cursor(path, "http://a:5000/lathe")
    assert cursor.load() is None
    cursor.save(("i1", 42))
    assert Cursor(path, "http://a:5000/lathe").load() == ("i1", 42)
    assert Cursor(path, "http://a:5000/mill").load() is None  # another device: start fresh
    path.write_text("{not json")
    assert Cursor(path, "http://a:5000/lathe").load() is None
