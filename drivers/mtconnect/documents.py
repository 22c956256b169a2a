"""MTConnect response documents read into plain records: the device model (`/probe`), observations
(`/current`, `/sample`) and errors.

Elements are matched on their local names, so the 1.x and 2.x namespaces (and documents without one)
read alike. Only what the driver uses is kept.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime

from drivers.sdk import DataError, parse_iso

UNAVAILABLE = "UNAVAILABLE"
CONDITION_LEVELS = frozenset({"Normal", "Warning", "Fault", "Unavailable"})


def local(tag: str) -> str:
    """An element's name without its namespace."""
    return tag.rsplit("}", 1)[-1]


@dataclass(frozen=True, slots=True)
class DataItem:
    """One data item of the device model."""

    id: str
    name: str | None
    category: str  # SAMPLE, EVENT or CONDITION
    type: str  # EXECUTION, POSITION, ... (upper case, as the standard writes it)
    sub_type: str | None = None
    units: str | None = None


@dataclass(slots=True)
class Device:
    """A device of `/probe`: its name, uuid and data items by id."""

    name: str
    uuid: str | None
    items: dict[str, DataItem] = field(default_factory=dict)

    def find(self, ref: str) -> DataItem | None:
        """The data item whose id, or else name, is `ref`."""
        item = self.items.get(ref)
        if item is not None:
            return item
        return next((i for i in self.items.values() if i.name == ref), None)

    def first_of(self, type_: str) -> DataItem | None:
        """The first data item of a type, in document order."""
        return next((i for i in self.items.values() if i.type == type_), None)


@dataclass(frozen=True, slots=True)
class Header:
    """What every response header says about the agent's buffer."""

    instance_id: str
    first_sequence: int = 0
    last_sequence: int = 0
    next_sequence: int = 0


@dataclass(slots=True)
class Observation:
    """One value of one data item; a condition carries its level, native code and text."""

    item_id: str
    sequence: int
    ts: datetime
    value: object  # text, or a dict for a data set or table, a list for a time series
    level: str | None = None  # condition: Normal, Warning, Fault or Unavailable
    native_code: str | None = None


@dataclass(slots=True)
class Streams:
    """An MTConnectStreams document: its header and its observations in sequence order."""

    header: Header
    observations: list[Observation]


class AgentError(DataError):
    """An MTConnectError document: `code` is the first error's errorCode (OUT_OF_RANGE, NO_DEVICE, ...)."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"agent error {code}: {text}")
        self.code = code


def _root(body: bytes, what: str) -> ET.Element:
    try:
        return ET.fromstring(body)
    except ET.ParseError as err:
        raise DataError(f"{what}: not well-formed XML ({err})") from None


def _check_error(root: ET.Element) -> None:
    if local(root.tag) == "MTConnectError":
        first = next((e for e in root.iter() if local(e.tag) == "Error"), None)
        code = first.get("errorCode", "UNKNOWN") if first is not None else "UNKNOWN"
        text = (first.text or "").strip() if first is not None else ""
        raise AgentError(code, text)


def _int(el: ET.Element, name: str, what: str) -> int:
    try:
        return int(el.get(name, "0"))
    except ValueError:
        raise DataError(f"{what}: header {name}={el.get(name)!r} is not an integer") from None


def _header(root: ET.Element, what: str) -> Header:
    el = next((c for c in root if local(c.tag) == "Header"), None)
    if el is None or not el.get("instanceId"):
        raise DataError(f"{what}: no Header with an instanceId")
    return Header(
        el.get("instanceId", ""),
        _int(el, "firstSequence", what),
        _int(el, "lastSequence", what),
        _int(el, "nextSequence", what),
    )


def parse_probe(body: bytes, device: str | None = None) -> tuple[Header, Device]:
    """The device named (by name or uuid) `device`, or the only device, from an MTConnectDevices document.

    2.x agents list themselves as an `Agent` next to the devices; it is never picked by default.
    """
    root = _root(body, "probe")
    _check_error(root)
    if local(root.tag) != "MTConnectDevices":
        raise DataError(f"probe: expected MTConnectDevices, got {local(root.tag)}")
    header = _header(root, "probe")
    devices = [d for d in root.iter() if local(d.tag) in ("Device", "Agent")]
    if device is not None:
        chosen = next((d for d in devices if device in (d.get("name"), d.get("uuid"))), None)
        if chosen is None:
            names = ", ".join(d.get("name") or d.get("uuid") or "?" for d in devices) or "none"
            raise DataError(f"probe: no device {device!r} (the agent serves: {names})")
    else:
        real = [d for d in devices if local(d.tag) == "Device"]
        if len(real) != 1:
            raise DataError(f"probe: the agent serves {len(real)} devices: set connection.device")
        chosen = real[0]
    out = Device(chosen.get("name") or chosen.get("uuid") or "", chosen.get("uuid"))
    for el in chosen.iter():
        if local(el.tag) != "DataItem" or not el.get("id"):
            continue
        item = DataItem(
            id=el.get("id", ""),
            name=el.get("name"),
            category=el.get("category", "EVENT").upper(),
            type=el.get("type", "").upper(),
            sub_type=el.get("subType"),
            units=el.get("units"),
        )
        out.items[item.id] = item
    return header, out


def _value(el: ET.Element, name: str) -> object:
    """An observation's value: its text, a data set's or table's entries, a time series' numbers."""
    if len(el):
        return {
            e.get("key", ""): ({local(c.tag): (c.text or "") for c in e} if len(e) else (e.text or "").strip())
            for e in el
            if local(e.tag) == "Entry"
        }
    text = (el.text or "").strip()
    if name.endswith("TimeSeries") and text != UNAVAILABLE:
        return [float(x) for x in text.split()]
    return text


def parse_streams(body: bytes, items: dict[str, DataItem] | None = None) -> Streams:
    """An MTConnectStreams document: observations of every device stream, sorted by sequence.

    An MTConnectError document raises `AgentError`; `items`, when given, keeps only those data items.
    """
    root = _root(body, "streams")
    _check_error(root)
    if local(root.tag) != "MTConnectStreams":
        raise DataError(f"streams: expected MTConnectStreams, got {local(root.tag)}")
    header = _header(root, "streams")
    out: list[Observation] = []
    stamps: dict[str, datetime] = {}  # an adapter stamps many observations alike: parse each text once
    for el in root.iter():
        item_id = el.get("dataItemId")  # only observations carry one
        if item_id is None or (items is not None and item_id not in items):
            continue
        name = local(el.tag)
        text = el.get("timestamp", "")
        try:
            seq = int(el.get("sequence", ""))
            ts = stamps.get(text) or stamps.setdefault(text, parse_iso(text))
            value = _value(el, name)
        except ValueError as err:
            raise DataError(f"streams: observation of {item_id!r}: {err}") from None
        if name in CONDITION_LEVELS and (items is None or items[item_id].category == "CONDITION"):
            out.append(Observation(item_id, seq, ts, value, name, el.get("nativeCode")))
        else:
            out.append(Observation(item_id, seq, ts, value))
    out.sort(key=lambda o: o.sequence)
    return Streams(header, out)


def typed_value(item: DataItem, value: object) -> tuple[object, str]:
    """An observation's value for a Reading, and its quality: a SAMPLE as a number, an EVENT as a number when
    it reads as one, else as text; UNAVAILABLE (or a SAMPLE that is not a number) is a bad-quality null."""
    if value == UNAVAILABLE:
        return None, "bad"
    if not isinstance(value, str) or item.category == "CONDITION":
        return value, "good"
    if item.category == "SAMPLE":
        try:
            return float(value), "good"
        except ValueError:
            return None, "bad"
    try:
        return int(value), "good"
    except ValueError:
        pass
    try:
        number = float(value)
    except ValueError:
        return value, "good"
    # "nan" or "inf" as an event's text is a word, not a number
    return (number, "good") if math.isfinite(number) else (value, "good")
