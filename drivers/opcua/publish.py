"""Publish responses for the OPC UA driver, with data changes decoded straight from the bytes.

asyncua decodes every value of a notification through its generic dataclass decoder (a DataValue, a
Variant and their fields, one Python call each), which took most of the driver's CPU. Here the
envelope is read directly and each data change item becomes one tuple, `Item`; a value that is not a
plain scalar (an array, a structure, a node id) is decoded by asyncua's own variant decoder, so the
result is the same either way, only slower. (Picoseconds are read here as the specification orders
them, see the mask bits below.) Anything malformed raises `PublishDecodeError` and nothing else. The
decoder is installed on the driver's own session (`install`), never globally.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
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

# A status code's InfoType (bits 10-11) and the Overflow info bit (7), OPC UA Part 4, 7.39: the server's
# queue for the item overflowed and lost values since its previous notification. The info bits mean
# something only with InfoType DataValue (01).
OVERFLOW_MASK, OVERFLOW = 0x0C80, 0x0480

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


class PublishDecodeError(UaStructParsingError):
    """A Publish response that cannot be decoded (truncated or malformed): the decoder's only error."""


class _Unsupported(Exception):
    """Not a plain scalar data change: decoded again with asyncua's decoder for each value that is not."""


class DataChanges:
    """A DataChangeNotification as the driver takes it: its items, decoded, and the handles of those
    whose status carries the Overflow bit."""

    __slots__ = ("items", "overflowed")

    def __init__(self, items: list[Item], overflowed: list[int] | None = None) -> None:
        self.items = items
        self.overflowed = overflowed if overflowed is not None else overflowed_handles(items)


def overflowed_handles(items: Sequence[Item]) -> list[int]:
    """The client handles of items whose status says the server's queue overflowed before them."""
    return [item[0] for item in items if item[2] & OVERFLOW_MASK == OVERFLOW]


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


_TICKS_EPOCH = ua.uatypes.FILETIME_EPOCH_AS_UTC_DATETIME
_TICKS_MAX = ua.uatypes.MAX_OPC_FILETIME


def _from_ticks(ticks: int) -> datetime:
    """asyncua's win_epoch_to_datetime, one call shorter for the usual case."""
    if 0 <= ticks < _TICKS_MAX:
        return _TICKS_EPOCH + timedelta(0, 0, ticks // 10)
    return ua.win_epoch_to_datetime(ticks)


def _datetime(ticks: int, cache: dict[int, datetime]) -> datetime:
    # Values written together share one timestamp: convert each distinct one once.
    dt = cache.get(ticks)
    if dt is None:
        dt = cache[ticks] = _from_ticks(ticks)
    return dt


def _data_changes(
    raw: bytes, pos: int, end: int, overflowed: list[int] | None = None, mixed: bool = False
) -> list[Item]:
    """The items of a DataChangeNotification body in raw[pos:end]; handles flagged Overflow go to `overflowed`.

    Plain scalars are read here; anything else raises _Unsupported, or with `mixed` is decoded by asyncua's
    variant decoder, value by value. Malformed bytes raise PublishDecodeError (or struct.error, IndexError).
    """
    if overflowed is None:
        overflowed = []
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
                        raise PublishDecodeError(f"a string of {length} bytes overruns its notification")
                    value = raw[pos : pos + length].decode(encoding, errors="surrogateescape")
                    pos += length
            elif vtype == _DATETIME:
                value = _datetime(_I64.unpack_from(raw, pos)[0], times)
                pos += 8
            elif vtype != _NULL:
                if not mixed:
                    raise _Unsupported  # arrays, structures, node ids, texts with locale...
                value, pos = _variant(raw, pos - 1, end)
        status = 0
        if mask & _HAS_STATUS:
            (status,) = _U32.unpack_from(raw, pos)
            pos += 4
            if status & OVERFLOW_MASK == OVERFLOW:
                overflowed.append(handle)
        ts = None
        if mask & _HAS_SOURCE_TS:
            # Inline, not _datetime: this runs for nearly every value.
            (ticks,) = _I64.unpack_from(raw, pos)
            ts = times.get(ticks)
            if ts is None:
                ts = times[ticks] = _from_ticks(ticks)
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
    if pos + 4 > end:
        raise PublishDecodeError("data change items overrun their notification")
    (diagnostics,) = _I32.unpack_from(raw, pos)
    if (diagnostics > 0 or pos + 4 != end) and not mixed:
        # Diagnostics after the items: asyncua's way reads them too. The driver has no use for them, and
        # the body's length says where the notification ends, so the second pass skips them.
        raise _Unsupported
    return items


def _variant(raw: bytes, pos: int, end: int) -> tuple[Any, int]:
    """The value of the Variant at raw[pos:end] by asyncua's decoder, and the position after it."""
    encoding = raw[pos]
    if encoding & 0x3F == _NULL and encoding & 0x80:
        # An array of Null elements takes no bytes per element: asyncua would build 2**31 of them from five
        # bytes. Nothing sends such an array; refuse one longer than what is left of the message.
        (length,) = _I32.unpack_from(raw, pos + 1)
        if length > end - pos:
            raise PublishDecodeError(f"an array of {length} Null values")
    variant, after = _with_asyncua(ua_binary.variant_from_binary, raw, pos, end)
    return variant.Value, after


def _with_asyncua(decode: Callable[[Buffer], Any], raw: bytes, pos: int, end: int = -1) -> tuple[Any, int]:
    """Decode one element at raw[pos:end] with asyncua; return it and the position after it."""
    buf = Buffer(raw, pos, -1 if end < 0 else end - pos)
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
            overflowed: list[int] = []
            try:
                items = _data_changes(raw, start, end, overflowed)
            except _Unsupported:
                overflowed.clear()
                items = _data_changes(raw, start, end, overflowed, mixed=True)
            return DataChanges(items, overflowed), end
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


def decode_publish_response(data: Buffer | bytes) -> ua.PublishResponse:
    """A PublishResponse whose data change notifications are `DataChanges`; the rest as asyncua has it.

    Raises PublishDecodeError, and nothing else, for bytes that are not a whole, well-formed response.
    """
    raw = bytes(data)
    try:
        return _publish_response(raw)
    except PublishDecodeError:
        raise
    except Exception as err:  # struct.error, IndexError, asyncua's NotEnoughData, UaError, RecursionError...
        raise PublishDecodeError(f"malformed Publish response ({type(err).__name__}: {err})") from err


def _publish_response(raw: bytes) -> ua.PublishResponse:
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


def install(session: UaSession, on_error: Callable[[PublishDecodeError], None] | None = None) -> None:
    """Make `session` decode its Publish responses here (asyncua's publish loop calls `session.publish`).

    A response that cannot be decoded goes to `on_error` and raises PublishDecodeError, which asyncua's
    publish loop takes as a parsing error: it skips the response and goes on with the next.
    """

    async def publish(acks: list[ua.SubscriptionAcknowledgement]) -> ua.PublishResponse:
        request = ua.PublishRequest()
        request.Parameters.SubscriptionAcknowledgements = acks if acks else []
        data = await session._send_request(request, timeout=0)
        try:
            return decode_publish_response(data)
        except PublishDecodeError as err:
            if on_error is not None:
                on_error(err)
            raise

    session.publish = publish  # type: ignore[method-assign]
