"""The driver's Publish response decoder against asyncua's own, on the same bytes."""

from __future__ import annotations

import math
import random
import struct
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from asyncua import ua
from asyncua.common.utils import Buffer
from asyncua.ua import ua_binary

from drivers.opcua.publish import (
    DataChanges,
    _data_changes,
    _Unsupported,
    decode_publish_response,
    items_of,
)

T0 = datetime(2026, 11, 27, 12, 0, 0, 123456, tzinfo=UTC)
VT = ua.VariantType


def item(handle: int, dv: ua.DataValue) -> ua.MonitoredItemNotification:
    return ua.MonitoredItemNotification(ClientHandle=handle, Value=dv)


def value(v: Any, vt: ua.VariantType, **kw: Any) -> ua.DataValue:
    return ua.DataValue(ua.Variant(v, vt), **kw)


def response(notifications: list[Any], **params: Any) -> bytes:
    msg = ua.NotificationMessage(SequenceNumber=params.pop("seq", 7), PublishTime=T0, NotificationData=notifications)
    result = ua.PublishResult(SubscriptionId=params.pop("sub", 3), NotificationMessage=msg, **params)
    return ua_binary.struct_to_binary(ua.PublishResponse(Parameters=result))


def both(raw: bytes) -> tuple[ua.PublishResponse, ua.PublishResponse]:
    return decode_publish_response(Buffer(raw)), ua_binary.struct_from_binary(ua.PublishResponse, Buffer(raw))


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, float) and a == 0.0 and isinstance(b, float):
        return math.copysign(1, a) == math.copysign(1, b) and b == 0.0
    return type(a) is type(b) and a == b


def assert_same_items(ours: list[Any], theirs: list[Any]) -> None:
    assert len(ours) == len(theirs)
    for mine, ref in zip(ours, theirs, strict=True):
        assert len(mine) == len(ref) == 4
        for a, b in zip(ref, mine, strict=True):
            assert same(a, b), (ref, mine)


def data_items(resp: ua.PublishResponse) -> list[Any]:
    out: list[Any] = []
    for n in resp.Parameters.NotificationMessage.NotificationData:
        if isinstance(n, DataChanges):
            out.extend(n.items)
        elif isinstance(n, ua.DataChangeNotification):
            out.extend(items_of(n))
    return out


SCALARS: list[tuple[Any, ua.VariantType]] = [
    (True, VT.Boolean),
    (False, VT.Boolean),
    (-128, VT.SByte),
    (255, VT.Byte),
    (-32768, VT.Int16),
    (65535, VT.UInt16),
    (-(2**31), VT.Int32),
    (2**32 - 1, VT.UInt32),
    (-(2**63), VT.Int64),
    (2**63 - 1, VT.Int64),
    (2**64 - 1, VT.UInt64),
    (0.1, VT.Float),
    (-0.0, VT.Double),
    (math.pi, VT.Double),
    (float("nan"), VT.Double),
    (float("inf"), VT.Double),
    (float("-inf"), VT.Float),
    ("Spindel-Überlast €", VT.String),
    ("", VT.String),
    (None, VT.String),
    (T0, VT.DateTime),
    (None, VT.Null),
]


def test_every_scalar_type_decodes_as_asyncua_does_on_the_fast_path() -> None:
    stamps = [T0 + timedelta(milliseconds=i) for i in range(len(SCALARS))]
    items = [item(i + 1, value(v, vt, SourceTimestamp=stamps[i])) for i, (v, vt) in enumerate(SCALARS)]
    notification = ua.DataChangeNotification(MonitoredItems=items)
    body = ua_binary.struct_to_binary(notification)
    fast = _data_changes(body, 0, len(body))  # no fallback for plain scalars
    assert_same_items(fast, items_of(ua_binary.from_binary(ua.DataChangeNotification, Buffer(body))))
    ours, theirs = both(response([notification]))
    assert_same_items(data_items(ours), data_items(theirs))
    assert [i[1] for i in fast][:3] == [True, False, -128]


def test_status_codes_and_timestamps_in_every_combination() -> None:
    codes = [None, ua.StatusCodes.Good, ua.StatusCodes.UncertainLastUsableValue, ua.StatusCodes.BadNodeIdUnknown]
    items = []
    handle = 0
    for code in codes:
        for source in (None, T0):
            for server in (None, T0 + timedelta(seconds=1)):
                handle += 1
                dv = ua.DataValue(ua.Variant(handle * 1.5, VT.Double), SourceTimestamp=source, ServerTimestamp=server)
                if code is None:
                    dv.StatusCode = None
                else:
                    dv.StatusCode = ua.StatusCode(code)
                items.append(item(handle, dv))
    items.append(item(999, ua.DataValue()))  # nothing in it at all
    ours, theirs = both(response([ua.DataChangeNotification(MonitoredItems=items)]))
    assert_same_items(data_items(ours), data_items(theirs))
    statuses = {i[2] for i in data_items(ours)}
    assert statuses == {0, ua.StatusCodes.UncertainLastUsableValue, ua.StatusCodes.BadNodeIdUnknown}


@pytest.mark.parametrize(
    "odd",
    [
        value([1.0, 2.0, 3.0], VT.Double),  # an array
        value(ua.LocalizedText("Bereit", "de"), VT.LocalizedText),
        value(ua.NodeId(5, 2), VT.NodeId),
        value(b"\x00\x01", VT.ByteString),
    ],
    ids=["array", "localized-text", "node-id", "bytes"],
)
def test_anything_else_falls_back_to_asyncua_with_the_same_result(odd: ua.DataValue) -> None:
    items = [item(1, value(1.0, VT.Double, SourceTimestamp=T0)), item(2, odd), item(3, value("x", VT.String))]
    notification = ua.DataChangeNotification(MonitoredItems=items)
    body = ua_binary.struct_to_binary(notification)
    with pytest.raises(_Unsupported):
        _data_changes(body, 0, len(body))
    ours, theirs = both(response([notification]))
    mine, ref = data_items(ours), data_items(theirs)
    assert [i[0] for i in mine] == [1, 2, 3]
    assert repr(mine) == repr(ref)


def test_the_envelope_and_other_notifications_come_through() -> None:
    change = ua.DataChangeNotification(MonitoredItems=[item(4, value(42, VT.Int32, SourceTimestamp=T0))])
    status = ua.StatusChangeNotification(Status=ua.StatusCode(ua.StatusCodes.BadTimeout))
    events = ua.EventNotificationList(Events=[ua.EventFieldList(ClientHandle=9, EventFields=[ua.Variant(1)])])
    raw = response(
        [status, change, events],
        AvailableSequenceNumbers=[5, 6, 7],
        MoreNotifications=True,
        Results=[ua.StatusCode(ua.StatusCodes.Good), ua.StatusCode(ua.StatusCodes.BadSequenceNumberUnknown)],
        DiagnosticInfos=[ua.DiagnosticInfo(SymbolicId=3, AdditionalInfo="why")],
        seq=41,
        sub=12,
    )
    ours, theirs = both(raw)
    mine, ref = ours.Parameters, theirs.Parameters
    assert mine.SubscriptionId == ref.SubscriptionId == 12
    assert mine.AvailableSequenceNumbers == ref.AvailableSequenceNumbers == [5, 6, 7]
    assert mine.MoreNotifications is ref.MoreNotifications is True
    assert mine.NotificationMessage.SequenceNumber == 41
    assert mine.NotificationMessage.PublishTime == ref.NotificationMessage.PublishTime
    assert mine.Results == ref.Results
    assert mine.DiagnosticInfos == ref.DiagnosticInfos
    assert ours.ResponseHeader == theirs.ResponseHeader
    kinds = [type(n) for n in mine.NotificationMessage.NotificationData]
    assert kinds == [ua.StatusChangeNotification, DataChanges, ua.EventNotificationList]
    assert mine.NotificationMessage.NotificationData[0] == ref.NotificationMessage.NotificationData[0]
    assert mine.NotificationMessage.NotificationData[2] == ref.NotificationMessage.NotificationData[2]
    assert_same_items(data_items(ours), data_items(theirs))


def test_a_keep_alive_and_empty_lists() -> None:
    ours, theirs = both(response([]))
    assert ours.Parameters.NotificationMessage.NotificationData == []
    assert ours.Parameters.SubscriptionId == theirs.Parameters.SubscriptionId
    empty = ua.DataChangeNotification(MonitoredItems=[])
    ours, theirs = both(response([empty]))
    assert data_items(ours) == data_items(theirs) == []


def test_random_notifications_agree_with_asyncua() -> None:
    rng = random.Random(20261127)
    pool = SCALARS + [(rng.uniform(-1e9, 1e9), VT.Double) for _ in range(10)]
    for _ in range(50):
        items = []
        for h in range(rng.randint(1, 60)):
            v, vt = rng.choice(pool)
            dv = value(v, vt)
            if rng.random() < 0.7:
                dv.SourceTimestamp = T0 + timedelta(microseconds=rng.randrange(10**9))
            if rng.random() < 0.3:
                dv.ServerTimestamp = T0
            if rng.random() < 0.2:
                dv.StatusCode = ua.StatusCode(ua.StatusCodes.BadCommunicationError)
            items.append(item(h, dv))
        ours, theirs = both(response([ua.DataChangeNotification(MonitoredItems=items)]))
        assert_same_items(data_items(ours), data_items(theirs))


def test_a_truncated_response_raises() -> None:
    raw = response([ua.DataChangeNotification(MonitoredItems=[item(1, value("abc", VT.String))])])
    for cut in (len(raw) - 3, len(raw) - 12, 40):
        with pytest.raises(Exception):  # noqa: B017 - any decoding error; publish() turns it into UaStructParsingError
            decode_publish_response(Buffer(raw[:cut]))


def test_response_headers_read_directly_or_by_asyncua_agree() -> None:
    plain = ua.ResponseHeader(Timestamp=T0, RequestHandle=77, ServiceResult=ua.StatusCode(ua.StatusCodes.Good))
    rich = ua.ResponseHeader(
        Timestamp=T0,
        RequestHandle=78,
        ServiceDiagnostics=ua.DiagnosticInfo(SymbolicId=1),
        StringTable=["eins", "zwei"],
    )
    for header in (plain, rich):
        msg = ua.NotificationMessage(SequenceNumber=1, PublishTime=T0, NotificationData=[])
        raw = ua_binary.struct_to_binary(
            ua.PublishResponse(ResponseHeader=header, Parameters=ua.PublishResult(2, NotificationMessage=msg))
        )
        ours, theirs = both(raw)
        assert ours.ResponseHeader == theirs.ResponseHeader
    # A null string table (length -1) rather than an empty one.
    raw = bytearray(ua_binary.struct_to_binary(ua.PublishResponse(ResponseHeader=plain)))
    at = 4 + 17
    assert raw[at : at + 4] == b"\x00\x00\x00\x00"
    raw[at : at + 4] = b"\xff\xff\xff\xff"
    ours, theirs = both(bytes(raw))
    assert ours.ResponseHeader == theirs.ResponseHeader


def test_picoseconds_are_skipped_where_the_specification_puts_them() -> None:
    # Source picoseconds alone: asyncua and the specification agree on the layout.
    one = ua.DataChangeNotification(
        MonitoredItems=[
            item(1, value(7, VT.Int32, SourceTimestamp=T0, SourcePicoseconds=5)),
            item(2, value(8, VT.Int32)),
        ]
    )
    ours, theirs = both(response([one]))
    assert_same_items(data_items(ours), data_items(theirs))
    # Every field, laid out as Part 6 orders a DataValue: value, status, source timestamp, source
    # picoseconds, server timestamp, server picoseconds.
    ticks = ua.datetime_to_win_epoch(T0)
    body = (
        struct.pack("<i", 2)
        + struct.pack("<IB", 1, 0x3F)
        + bytes([11])
        + struct.pack("<d", 2.5)
        + struct.pack("<I", ua.StatusCodes.UncertainLastUsableValue)
        + struct.pack("<qH", ticks, 123)
        + struct.pack("<qH", ticks + 10_000_000, 456)
        + struct.pack("<IB", 2, 0x19)  # value, server timestamp, source picoseconds without a source timestamp
        + bytes([6])
        + struct.pack("<i", -4)
        + struct.pack("<H", 9)
        + struct.pack("<q", ticks)
        + struct.pack("<i", -1)
    )
    assert _data_changes(body, 0, len(body)) == [
        (1, 2.5, ua.StatusCodes.UncertainLastUsableValue, T0),
        (2, -4, 0, T0),
    ]
