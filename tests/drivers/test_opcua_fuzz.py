"""Fuzzing the OPC UA Publish-response decoder and the value conversion behind it (hypothesis).

Values of every scalar type (and the non-scalar ones that take asyncua's variant decoder), encoded by
asyncua's encoder, decode to what asyncua's own decoder gives; random, truncated and corrupted bytes
raise PublishDecodeError and nothing else; whatever decodes converts to a Reading without raising. Last,
against a real server, a response corrupted on the wire is counted and the session goes on.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
from asyncua import ua
from asyncua.common.utils import Buffer
from asyncua.ua import ua_binary
from hypothesis import given
from hypothesis import strategies as st
from test_opcua import Collector, equipment
from test_opcua_publish import data_items, response

from drivers.base import DriverContext
from drivers.opcua import OpcUaDriver, plain, quality_of
from drivers.opcua.publish import (
    DataChanges,
    PublishDecodeError,
    decode_publish_response,
    overflowed_handles,
)
from drivers.opcua.sim import NS_SPINDLE, MachineServer
from peers import free_port

VT = ua.VariantType
UTC_MIN = datetime(1601, 1, 2, tzinfo=UTC)
UTC_MAX = datetime(9999, 12, 30, tzinfo=UTC)


def ints(bits: int, signed: bool) -> st.SearchStrategy[int]:
    return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else st.integers(0, 2**bits - 1)


def texts() -> st.SearchStrategy[str]:
    return st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


# Every scalar type the fast path reads, and others asyncua's variant decoder takes value by value.
SCALARS: dict[ua.VariantType, st.SearchStrategy[Any]] = {
    VT.Boolean: st.booleans(),
    VT.SByte: ints(8, True),
    VT.Byte: ints(8, False),
    VT.Int16: ints(16, True),
    VT.UInt16: ints(16, False),
    VT.Int32: ints(32, True),
    VT.UInt32: ints(32, False),
    VT.Int64: ints(64, True),
    VT.UInt64: ints(64, False),
    VT.Float: st.floats(width=32),
    VT.Double: st.floats(),
    VT.String: st.none() | texts(),
    VT.DateTime: st.datetimes(
        min_value=UTC_MIN.replace(tzinfo=None), max_value=UTC_MAX.replace(tzinfo=None), timezones=st.just(UTC)
    ),
    VT.Null: st.none(),
}
OTHERS: dict[ua.VariantType, st.SearchStrategy[Any]] = {
    VT.ByteString: st.none() | st.binary(max_size=20),
    VT.Guid: st.uuids().map(lambda u: uuid.UUID(int=u.int)),
    VT.LocalizedText: st.builds(ua.LocalizedText, st.none() | texts(), st.none() | st.sampled_from(["de", "en-US"])),
    VT.QualifiedName: st.builds(ua.QualifiedName, texts(), st.integers(0, 2**15 - 1)),  # packed as an Int16
    VT.NodeId: st.builds(ua.NodeId, ints(32, False), ints(16, False)),
    VT.StatusCode: ints(32, False).map(lambda c: ua.StatusCode(ua.UInt32(c))),
}


@st.composite
def variants(draw: st.DrawFn, types: dict[ua.VariantType, st.SearchStrategy[Any]]) -> ua.Variant:
    vtype = draw(st.sampled_from(sorted(types, key=lambda t: t.value)))
    if vtype != VT.Null and draw(st.integers(0, 9)) == 0:  # now and then an array
        return ua.Variant(draw(st.lists(types[vtype], max_size=4)), vtype, is_array=True)
    return ua.Variant(draw(types[vtype]), vtype)


@st.composite
def data_values(draw: st.DrawFn, types: dict[ua.VariantType, st.SearchStrategy[Any]]) -> ua.DataValue:
    stamps = st.none() | st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    )
    dv = ua.DataValue(
        draw(st.none() | variants(types)),
        SourceTimestamp=draw(stamps),
        ServerTimestamp=draw(stamps),
    )
    code = draw(st.none() | st.sampled_from([0, 0x480, 0x400, 0x80, 0x40000480]) | ints(32, False))
    dv.StatusCode = None if code is None else ua.StatusCode(ua.UInt32(code))
    return dv


def notification(values: list[ua.DataValue]) -> ua.DataChangeNotification:
    items = [ua.MonitoredItemNotification(ClientHandle=h, Value=dv) for h, dv in enumerate(values, start=1)]
    return ua.DataChangeNotification(MonitoredItems=items)


def asyncua_items(raw: bytes) -> list[Any]:
    return data_items(ua_binary.struct_from_binary(ua.PublishResponse, Buffer(raw)))


@given(st.lists(data_values(SCALARS), max_size=30))
def test_scalars_of_every_type_decode_as_asyncua_decodes_them(values: list[ua.DataValue]) -> None:
    raw = response([notification(values)])
    ours = decode_publish_response(Buffer(raw))
    mine = data_items(ours)
    # repr: the same types and values, NaN and -0.0 included.
    assert repr(mine) == repr(asyncua_items(raw))
    (changes,) = ours.Parameters.NotificationMessage.NotificationData
    assert isinstance(changes, DataChanges)
    assert changes.overflowed == overflowed_handles(mine)


@given(st.lists(data_values(SCALARS | OTHERS), max_size=20), st.booleans())
def test_any_value_decodes_as_asyncua_decodes_it(values: list[ua.DataValue], diagnostics: bool) -> None:
    note = notification(values)
    if diagnostics:
        note.DiagnosticInfos = [ua.DiagnosticInfo(SymbolicId=1, AdditionalInfo="why")]
    raw = response([note])
    ours = decode_publish_response(Buffer(raw))
    assert repr(data_items(ours)) == repr(asyncua_items(raw))


def valid_response(values: list[ua.DataValue]) -> bytes:
    return response([notification(values)], AvailableSequenceNumbers=[1, 2], Results=[ua.StatusCode()])


def decodes_or_refuses(raw: bytes) -> ua.PublishResponse | None:
    """The decoder's contract: a response, or PublishDecodeError and nothing else."""
    try:
        return decode_publish_response(Buffer(raw))
    except PublishDecodeError:
        return None


@given(st.binary(max_size=400))
def test_random_bytes_raise_only_the_declared_error(raw: bytes) -> None:
    decodes_or_refuses(raw)


@given(st.lists(data_values(SCALARS | OTHERS), min_size=1, max_size=8), st.data())
def test_truncated_responses_raise_the_declared_error(values: list[ua.DataValue], data: st.DataObject) -> None:
    raw = valid_response(values)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(PublishDecodeError):
        decode_publish_response(Buffer(raw[:cut]))


@given(st.lists(data_values(SCALARS | OTHERS), min_size=1, max_size=8), st.data())
def test_corrupted_responses_decode_or_raise_the_declared_error(
    values: list[ua.DataValue], data: st.DataObject
) -> None:
    raw = bytearray(valid_response(values))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.sampled_from([0x00, 0xFF, 0x80, 0x7F, 0x01, 0x0B, 0x0C, 0x18, raw[at] ^ 0x40]))
    decoded = decodes_or_refuses(bytes(raw))
    if decoded is not None:
        # Whatever decodes converts to readings without raising.
        driver = fuzz_driver()
        for item in data_items(decoded):
            tag = driver.tags[item[0] % len(driver.tags)]
            driver._reading(tag, item)


def test_a_huge_array_of_nulls_is_refused_not_built() -> None:
    # Five bytes declaring 2**31 - 1 Null elements: asyncua's decoder would build them one by one.
    good = valid_response([ua.DataValue(ua.Variant(1.5, VT.Double))])
    at = good.index(bytes([VT.Double.value]) + struct.pack("<d", 1.5))
    raw = good[:at] + bytes([0x80]) + struct.pack("<i", 2**31 - 1) + good[at + 9 :]
    with pytest.raises(PublishDecodeError, match="Null"):
        decode_publish_response(Buffer(raw))


# ---- value conversion ------------------------------------------------------------------------------

_DRIVER: list[OpcUaDriver] = []


def fuzz_driver() -> OpcUaDriver:
    """A driver (never connected) with a plain tag and a scaled one, for `_reading`."""
    if not _DRIVER:
        tags = """
        [[equipment.tags]]
        name = "state"
        node = "ns=2;s=A"
        [[equipment.tags]]
        name = "scaled"
        node = "ns=2;s=B"
        scale = 0.5
        offset = 1.0
        """
        folder = Path("/nonexistent-fuzz")
        _DRIVER.append(OpcUaDriver(equipment(folder, "opc.tcp://127.0.0.1:4840", tags=tags), DriverContext(folder)))
    return _DRIVER[0]


@given(st.lists(data_values(SCALARS | OTHERS), min_size=1, max_size=10))
def test_decoded_values_convert_to_readings(values: list[ua.DataValue]) -> None:
    driver = fuzz_driver()
    plain_tag, scaled_tag = driver.tags
    decoded = decode_publish_response(Buffer(valid_response(values)))
    for item in data_items(decoded):
        _, value, status, ts = item
        reading = driver._reading(plain_tag, item)
        assert reading.quality == quality_of(ua.StatusCode(ua.UInt32(status)))
        assert reading.ts is not None and reading.ts.tzinfo is not None
        if ts is not None:
            assert reading.ts == (ts if ts.tzinfo else ts.replace(tzinfo=UTC))
        if type(value) in (bool, int, float, str, datetime, type(None)):
            assert repr(reading.value) == repr(value)
        scaled = driver._reading(scaled_tag, item)
        number = plain(value)
        if type(number) in (int, float):
            assert repr(scaled.value) == repr(scaled_tag.scaled(number))
        elif number is None:
            assert scaled.value is None and scaled.quality == reading.quality
        else:
            assert (scaled.value, scaled.quality) == (None, "bad")  # a number was expected


# ---- on the wire -----------------------------------------------------------------------------------


@pytest.fixture
async def machine() -> AsyncIterator[MachineServer]:
    server = MachineServer(port=free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_a_response_corrupted_on_the_wire_is_counted_and_the_session_goes_on(
    tmp_path: Path, machine: MachineServer
) -> None:
    tags = f"""
    [[equipment.tags]]
    name = "state"
    node = "ns=2;s=Machine.State"
    [[equipment.tags]]
    name = "temp"
    node = "nsu={NS_SPINDLE};s=Spindle.Temp"
    """
    eq = equipment(tmp_path, machine.endpoint, connection="publishing_interval_ms = 50\n", tags=tags)
    with structlog.testing.capture_logs() as logs:
        d = OpcUaDriver(eq, DriverContext(tmp_path))
        await d.connect()
        got = Collector(d.events())
        try:
            await got.wait(lambda: bool(got.readings("temp")), "the initial value")
            assert d.client is not None
            session = d.client.uaclient.session
            assert session is not None
            send = session._send_request
            corrupt = [1]

            async def cut_short(request: Any, *args: Any, **kwargs: Any) -> Any:
                data = await send(request, *args, **kwargs)
                if isinstance(request, ua.PublishRequest) and corrupt:
                    corrupt.pop()
                    return Buffer(bytes(data)[:-7])  # the response as a broken server might end it
                return data

            session._send_request = cut_short  # type: ignore[method-assign]
            # The PublishRequest in flight was sent before: a change for it, then one for the next.
            for value in (61.0, 62.0):
                await machine.set("Spindle.Temp", value)
                await got.wait(lambda: got.values("temp")[-1:] == [61.0] or d.undecodable == 1, "a response")
            await got.wait(lambda: d.undecodable == 1, "the corrupted response")
            await machine.set("Spindle.Temp", 63.0)
            await got.wait(lambda: got.values("temp")[-1:] == [63.0], "values after it")
            assert got.error is None
        finally:
            await got.stop()
            await d.close()
    assert [e["event"] for e in logs if e["event"] == "publish_response_undecodable"] == [
        "publish_response_undecodable"
    ]
