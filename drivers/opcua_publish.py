"""Publish responses for the OPC UA driver, with data changes decoded straight from the bytes.

asyncua decodes every value of a notification through its generic dataclass decoder (a DataValue, a
Variant and their fields, one Python call each), which took most of the driver's CPU. Here the
envelope is read directly and each data change item becomes one tuple, `Item`; whatever is not a
plain scalar (arrays, structures, diagnostics) falls back to asyncua's own decoder for that
notification, so the result is the same either way, only slower. (Picoseconds are read here as the
specification orders them, see the mask bits below.) The decoder is installed on the driver's own
session (`install`), never globally.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import datetime
from typing import Any

from asyncua import ua
from asyncua.client.ua_session import UaSession
from asyncua.common.utils import Buffer
from asyncua.ua import ua_binary
from asyncua.ua.uaerrors import UaStructParsingError

#: One data change: client handle, value (plain Python), status code, and its timestamp: the source
#: timestamp, else the server's, else None.
Item = tuple[int, Any, int, datetime | None]

#: The status of an item whose notification carried no DataValue at all.
NO_VALUE_STATUS = ua.StatusCodes.BadNoData

# A FourByteNodeId of namespace 0: encoding byte 1, namespace 0, the id as a 16-bit integer.
_DATA_CHANGE_PREFIX = bytes([1, 0]) + struct.pack("<H", ua.ObjectIds.DataChangeNotification_Encoding_DefaultBinary)

_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_HANDLE_MASK = struct.Struct("<IB")
_DOUBLE = struct.Struct("<d")
_HEADER = struct.Struct("<qII")  # a ResponseHeader's timestamp, request handle and service result
_NO_HEADER = b"\x00\x00\x00"  # an empty ExtensionObject: null node id, no body
# Scalar variant types by their built-in type id: how to unpack and how many bytes.
_SCALARS: dict[int, tuple[struct.Struct, int]] = {
    1: (struct.Struct("<?"), 1),  # Boolean
    2: (struct.Struct("<b"), 1),  # SByte
    3: (struct.Struct("<B"), 1),  # Byte
    4: (struct.Struct("<h"), 2),  # Int16
    5: (struct.Struct("<H"), 2),  # UInt16
    6: (struct.Struct("<i"), 4),  # Int32
    7: (struct.Struct("<I"), 4),  # UInt32
    8: (struct.Struct("<q"), 8),  # Int64
    9: (struct.Struct("<Q"), 8),  # UInt64
    10: (struct.Struct("<f"), 4),  # Float
    11: (_DOUBLE, 8),  # Double
}
_STRING, _DATETIME, _NULL, _DOUBLE_ID = 12, 13, 0, 11
# DataValue mask bits (OPC UA Part 6, 5.2.2.17). The fields follow in the order value, status, source
# timestamp, source picoseconds, server timestamp, server picoseconds. (asyncua 2.1 decodes both
# timestamps before both picosecond fields, which misreads a value carrying source picoseconds and a
# server timestamp; the few servers that send picoseconds follow the specification.)
_HAS_VALUE, _HAS_STATUS, _HAS_SOURCE_TS, _HAS_SERVER_TS = 0x01, 0x02, 0x04, 0x08
_HAS_SOURCE_PICOSECONDS, _HAS_SERVER_PICOSECONDS = 0x10, 0x20


class _Unsupported(Exception):
    """Not a plain scalar data change: asyncua decodes this notification."""


class DataChanges:
    """A DataChangeNotification as the driver takes it: its items, decoded."""

    __slots__ = ("items",)

    def __init__(self, items: list[Item]) -> None:
        self.items = items


def items_of(notification: ua.DataChangeNotification) -> list[Item]:
    """The items of a notification that asyncua decoded."""
    out: list[Item] = []
    for item in notification.MonitoredItems or []:
        dv = item.Value
        if dv is None:
            out.append((item.ClientHandle, None, NO_VALUE_STATUS, None))
            continue
        value = dv.Value.Value if dv.Value is not None else None
        status = dv.StatusCode.value if dv.StatusCode is not None else 0
        out.append((item.ClientHandle, value, status, dv.SourceTimestamp or dv.ServerTimestamp))
    return out


def _datetime(ticks: int, cache: dict[int, datetime]) -> datetime:
    # Values written together share one timestamp: convert each distinct one once.
    dt = cache.get(ticks)
    if dt is None:
        dt = cache[ticks] = ua.win_epoch_to_datetime(ticks)
    return dt


def _data_changes(raw: bytes, pos: int, end: int) -> list[Item]:
    """The items of a DataChangeNotification body in raw[pos:end]; _Unsupported for anything but scalars."""
    (count,) = _I32.unpack_from(raw, pos)
    pos += 4
    items: list[Item] = []
    append = items.append
    times: dict[int, datetime] = {}
    encoding = ua_binary.get_string_encoding()
    scalars = _SCALARS
    for _ in range(max(count, 0)):
        handle, mask = _HANDLE_MASK.unpack_from(raw, pos)
        pos += 5
        value: Any = None
        if mask & _HAS_VALUE:
            vtype = raw[pos]
            pos += 1
            if vtype == _DOUBLE_ID:
                (value,) = _DOUBLE.unpack_from(raw, pos)
                pos += 8
            elif vtype in scalars:
                fmt, size = scalars[vtype]
                (value,) = fmt.unpack_from(raw, pos)
                pos += size
            elif vtype == _STRING:
                (length,) = _I32.unpack_from(raw, pos)
                pos += 4
                if length >= 0:
                    if pos + length > end:
                        raise _Unsupported
                    value = raw[pos : pos + length].decode(encoding, errors="surrogateescape")
                    pos += length
            elif vtype == _DATETIME:
                value = _datetime(_I64.unpack_from(raw, pos)[0], times)
                pos += 8
            elif vtype != _NULL:
                raise _Unsupported  # arrays, structures, node ids, texts with locale...
        status = 0
        if mask & _HAS_STATUS:
            (status,) = _U32.unpack_from(raw, pos)
            pos += 4
        ts = None
        if mask & _HAS_SOURCE_TS:
            ts = _datetime(_I64.unpack_from(raw, pos)[0], times)
            pos += 8
        if mask & _HAS_SOURCE_PICOSECONDS:
            pos += 2  # finer than the milliseconds the daemon keeps
        if mask & _HAS_SERVER_TS:
            if ts is None:  # only wanted without a source timestamp
                ts = _datetime(_I64.unpack_from(raw, pos)[0], times)
            pos += 8
        if mask & _HAS_SERVER_PICOSECONDS:
            pos += 2
        append((handle, value, status, ts))
    (diagnostics,) = _I32.unpack_from(raw, pos)
    pos += 4
    if diagnostics > 0 or pos != end:
        raise _Unsupported
    return items


def _with_asyncua(decode: Callable[[Buffer], Any], raw: bytes, pos: int) -> tuple[Any, int]:
    """Decode one element at raw[pos:] with asyncua; return it and the position after it."""
    buf = Buffer(raw, pos)
    before = len(buf)
    value = decode(buf)
    return value, pos + before - len(buf)


def _notification(raw: bytes, pos: int) -> tuple[Any, int]:
    """One NotificationData element (an ExtensionObject): DataChanges for data changes, else asyncua's object."""
    if raw.startswith(_DATA_CHANGE_PREFIX, pos) and raw[pos + 4] & 1:
        (length,) = _I32.unpack_from(raw, pos + 5)
        start = pos + 9
        end = start + length
        if length > 0 and end <= len(raw):
            try:
                return DataChanges(_data_changes(raw, start, end)), end
            except (_Unsupported, struct.error, IndexError):
                notification = ua_binary.from_binary(ua.DataChangeNotification, Buffer(raw[start:end]))
                return DataChanges(items_of(notification)), end
    return _with_asyncua(ua_binary.extensionobject_from_binary, raw, pos)


def _response_header(raw: bytes, pos: int) -> tuple[ua.ResponseHeader, int]:
    """The ResponseHeader: read directly when it has no diagnostics, string table or additional header."""
    strings = _I32.unpack_from(raw, pos + 17)[0]
    if raw[pos + 16] == 0 and strings in (-1, 0) and raw[pos + 21 : pos + 24] == _NO_HEADER:
        ticks, handle, code = _HEADER.unpack_from(raw, pos)
        header = ua.ResponseHeader(
            Timestamp=ua.win_epoch_to_datetime(ticks), RequestHandle=handle, ServiceResult=ua.StatusCode(code)
        )
        if strings == -1:
            header.StringTable = None  # type: ignore[assignment]  # as asyncua reads a null array
        return header, pos + 24
    return _with_asyncua(lambda buf: ua_binary.struct_from_binary(ua.ResponseHeader, buf), raw, pos)


def decode_publish_response(data: Buffer) -> ua.PublishResponse:
    """A PublishResponse whose data change notifications are `DataChanges`; the rest as asyncua has it."""
    raw = bytes(data)
    if raw[0] == 1:  # the response's type id, a FourByteNodeId as servers send it
        pos = 4
    else:
        _, pos = _with_asyncua(ua_binary.nodeid_from_binary, raw, 0)
    response = ua.PublishResponse()
    response.ResponseHeader, pos = _response_header(raw, pos)
    result = response.Parameters
    (result.SubscriptionId,) = _U32.unpack_from(raw, pos)
    (count,) = _I32.unpack_from(raw, pos + 4)
    pos += 8
    result.AvailableSequenceNumbers = list(struct.unpack_from(f"<{max(count, 0)}I", raw, pos))
    pos += 4 * max(count, 0)
    result.MoreNotifications = bool(raw[pos])
    pos += 1
    message = result.NotificationMessage
    (message.SequenceNumber,) = _U32.unpack_from(raw, pos)
    message.PublishTime = ua.win_epoch_to_datetime(_I64.unpack_from(raw, pos + 4)[0])
    (count,) = _I32.unpack_from(raw, pos + 12)
    pos += 16
    notifications: list[Any] = []
    for _ in range(max(count, 0)):
        notification, pos = _notification(raw, pos)
        notifications.append(notification)
    message.NotificationData = notifications
    (count,) = _I32.unpack_from(raw, pos)
    pos += 4
    result.Results = [ua.StatusCode(code) for code in struct.unpack_from(f"<{max(count, 0)}I", raw, pos)]
    pos += 4 * max(count, 0)
    (count,) = _I32.unpack_from(raw, pos)
    pos += 4
    infos: list[ua.DiagnosticInfo] = []
    for _ in range(max(count, 0)):
        info, pos = _with_asyncua(lambda buf: ua_binary.struct_from_binary(ua.DiagnosticInfo, buf), raw, pos)
        infos.append(info)
    result.DiagnosticInfos = infos
    return response


def install(session: UaSession) -> None:
    """Make `session` decode its Publish responses here (asyncua's publish loop calls `session.publish`)."""

    async def publish(acks: list[ua.SubscriptionAcknowledgement]) -> ua.PublishResponse:
        request = ua.PublishRequest()
        request.Parameters.SubscriptionAcknowledgements = acks if acks else []
        data = await session._send_request(request, timeout=0)
        try:
            return decode_publish_response(data)
        except Exception as err:
            session.logger.exception("Error parsing notification from server")
            raise UaStructParsingError from err

    session.publish = publish  # type: ignore[method-assign]
