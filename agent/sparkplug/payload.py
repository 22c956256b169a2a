"""Sparkplug B payloads built with the protobuf runtime from the generated schema (`sparkplug_b_pb2`)."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

from agent.sparkplug import sparkplug_b_pb2 as pb

# The specification's data type codes this node uses.
INT64 = 4
DOUBLE = 10
BOOLEAN = 11
STRING = 12

Payload = pb.Payload
Metric = pb.Payload.Metric


def now_ms() -> int:
    """Milliseconds since the epoch, UTC: the specification's timestamps."""
    return int(time.time() * 1000)


_last_ts: tuple[str, int] = ("", 0)


def ts_ms(iso_text: Any) -> int:
    """An ISO-8601 timestamp as milliseconds since the epoch (now if missing or malformed)."""
    global _last_ts
    if isinstance(iso_text, str):
        if iso_text == _last_ts[0]:
            return _last_ts[1]  # the values of one poll share their timestamp: parsed once
        try:
            ms = int(datetime.fromisoformat(iso_text).timestamp() * 1000)
        except ValueError:
            return now_ms()
        _last_ts = (iso_text, ms)
        return ms
    return now_ms()


def datatype_of(value: Any) -> int:
    """The data type a metric is born with, from its first value (numbers as Double: ints and floats mix)."""
    if isinstance(value, bool):
        return BOOLEAN
    if isinstance(value, int | float) or value is None:
        return DOUBLE
    return STRING


def set_value(m: Metric, datatype: int, value: Any) -> None:
    """Set `m`'s value as `datatype`; a value that does not fit it is sent as null."""
    if value is None:
        m.is_null = True
    elif datatype == BOOLEAN and isinstance(value, bool | int):
        m.boolean_value = bool(value)
    elif datatype == INT64 and isinstance(value, int):
        m.long_value = value & 0xFFFFFFFFFFFFFFFF  # two's complement in the uint64 field
    elif datatype == DOUBLE and isinstance(value, int | float):
        m.double_value = float(value)
    elif datatype == DOUBLE and value in ("NaN", "Infinity", "-Infinity"):
        m.double_value = float(value.replace("Infinity", "inf"))
    elif datatype == STRING:
        m.string_value = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    else:
        m.is_null = True


def add_metric(
    p: Payload,
    *,
    name: str | None = None,
    alias: int | None = None,
    datatype: int | None = None,
    value: Any = None,
    timestamp: int | None = None,
    historical: bool = False,
    properties: dict[str, str] | None = None,
    value_type: int | None = None,
) -> Metric:
    """Add one metric; `datatype` is written (births), `value_type` only decides the encoding (data)."""
    m = p.metrics.add()
    if name is not None:
        m.name = name
    if alias is not None:
        m.alias = alias
    if datatype is not None:
        m.datatype = datatype
    m.timestamp = timestamp if timestamp is not None else now_ms()
    if historical:
        m.is_historical = True
    set_value(m, datatype if datatype is not None else (value_type or DOUBLE), value)
    if properties:
        for key, text in properties.items():
            m.properties.keys.append(key)
            pv = m.properties.values.add()
            pv.type = STRING
            pv.string_value = text
    return m


def new(seq: int | None) -> Payload:
    """An empty payload stamped now, with `seq` when given (NDEATH has none)."""
    p = Payload()
    p.timestamp = now_ms()
    if seq is not None:
        p.seq = seq
    return p


def decode(data: bytes) -> Payload:
    """A received payload (NCMD, DCMD, STATE is JSON); raises protobuf's DecodeError when malformed."""
    p = Payload()
    p.ParseFromString(data)
    return p
