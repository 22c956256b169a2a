"""Values between OPC UA and the daemon: variants to plain Python, readings with scaling and quality from
status codes, and parameters coerced to a node's data type (writes and method arguments)."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from asyncua import ua

from drivers.opcua.config import OpcUaTag
from drivers.opcua.publish import Item
from drivers.sdk import Reading, utcnow

_INT_RANGES: dict[ua.VariantType, tuple[int, int]] = {
    ua.VariantType.SByte: (-(2**7), 2**7 - 1),
    ua.VariantType.Byte: (0, 2**8 - 1),
    ua.VariantType.Int16: (-(2**15), 2**15 - 1),
    ua.VariantType.UInt16: (0, 2**16 - 1),
    ua.VariantType.Int32: (-(2**31), 2**31 - 1),
    ua.VariantType.UInt32: (0, 2**32 - 1),
    ua.VariantType.Int64: (-(2**63), 2**63 - 1),
    ua.VariantType.UInt64: (0, 2**64 - 1),
}
_FLOATS = (ua.VariantType.Float, ua.VariantType.Double)
_PLAIN = (int, float, str, bool, type(None), datetime, bytes)
#: Types a decoded value already has as plain Python (the driver's fast path checks `type(v) in PLAIN_TYPES`).
PLAIN_TYPES = frozenset(_PLAIN)
# Status codes below this are Good (severity bits 30-31 clear), whatever their info bits say.
_GOOD_BELOW = 0x40000000


def quality_of(code: ua.StatusCode | None) -> str:
    """The contract's quality for an OPC UA status code."""
    if code is None or code.value == 0:
        return "good"
    if code.is_good():
        return "good"
    return "uncertain" if code.is_uncertain() else "bad"


def plain(value: Any) -> Any:
    """An OPC UA value as plain Python (JSON-friendly after json_safe)."""
    if type(value) in _PLAIN:
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, ua.LocalizedText):
        return value.Text
    if isinstance(value, ua.QualifiedName):
        return value.Name
    if isinstance(value, ua.NodeId):
        return value.to_string()
    if isinstance(value, ua.StatusCode):
        return value.name
    if isinstance(value, ua.Variant):
        return plain(value.Value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (int, float, str)):
        return value
    return str(value)


def to_reading(tag: OpcUaTag, item: Item, unscalable: Callable[[OpcUaTag, Any], None]) -> Reading:
    """One data change item as the tag's Reading: quality from its status, scaled where the tag says.

    A value a scaled tag cannot scale (text, boolean, array) reads bad; `unscalable(tag, raw)` is told.
    """
    _, raw, status, ts = item
    quality = "good" if status < _GOOD_BELOW else quality_of(ua.StatusCode(ua.UInt32(status)))
    if ts is None:
        ts = utcnow()
    elif ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    value = raw if type(raw) in _PLAIN else plain(raw)
    if (tag.scale is not None or tag.offset is not None) and value is not None:
        if type(value) not in (int, float):
            unscalable(tag, raw)
            return Reading(tag.name, None, ts, "bad")
        value = tag.scaled(value)
    return Reading(tag.name, value, ts, quality)


def coerce(value: Any, vtype: ua.VariantType, what: str) -> Any:
    """Convert a parameter to a node's builtin data type; ValueError names what does not fit."""
    name = vtype.name
    if vtype == ua.VariantType.Boolean:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{what}: {value!r} is not a Boolean (true/false or 0/1)")
    if vtype in _INT_RANGES:
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, float):
            if not math.isfinite(value) or not value.is_integer():
                raise ValueError(f"{what}: {value!r} is not an integer, the node's data type is {name}")
            value = int(value)
        if not isinstance(value, int):
            raise ValueError(f"{what}: {value!r} is not a number, the node's data type is {name}")
        low, high = _INT_RANGES[vtype]
        if not low <= value <= high:
            raise ValueError(f"{what}: {value} does not fit the node's data type {name} ({low}..{high})")
        return value
    if vtype in _FLOATS:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
            if vtype == ua.VariantType.Float and math.isfinite(out) and abs(out) > 3.4028234663852886e38:
                raise ValueError(f"{what}: {value} does not fit the node's data type Float")
            return out
        raise ValueError(f"{what}: {value!r} is not a number, the node's data type is {name}")
    if vtype == ua.VariantType.String:
        if isinstance(value, str):
            return value
        raise ValueError(f"{what}: {value!r} is not text, the node's data type is String")
    raise ValueError(f"{what}: writing the data type {name} is not supported")


def variant_type(datatype: Any) -> ua.VariantType | None:
    """The builtin VariantType of a DataType node id, or None for structured/custom types."""
    if isinstance(datatype, ua.NodeId) and datatype.NamespaceIndex == 0 and isinstance(datatype.Identifier, int):
        if 1 <= datatype.Identifier <= 25:
            return ua.VariantType(datatype.Identifier)
        if datatype.Identifier == 29:  # Enumeration subtypes travel as Int32
            return ua.VariantType.Int32
    return None


def write_value(tag: OpcUaTag, value: Any, vtype: ua.VariantType) -> Any:
    """A command's value for the tag's node: unscaled where the tag scales, coerced to `vtype` (ValueError)."""
    raw = value
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and (tag.scale is not None or tag.offset is not None)
    ):
        raw = tag.unscaled(value)
    return coerce(raw, vtype, f"tag {tag.name!r}")


class ArgumentError(ValueError):
    """Method arguments that do not fit the method's declared inputs; `status` is the OPC UA name for it."""

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status


def call_arguments(command: str, args: list[Any], inputs: list[ua.Argument]) -> list[ua.Variant]:
    """Method arguments as variants of the declared input types (as given when none are declared)."""
    if not inputs:
        return [ua.Variant(a) for a in args]
    if len(args) != len(inputs):
        raise ArgumentError(
            f"method {command!r} takes {len(inputs)} argument(s), got {len(args)}",
            "BadArgumentsMissing" if len(args) < len(inputs) else "BadTooManyArguments",
        )
    variants: list[ua.Variant] = []
    for i, (arg, spec) in enumerate(zip(args, inputs, strict=True)):
        vtype = variant_type(spec.DataType)
        if vtype is None:
            variants.append(ua.Variant(arg))
            continue
        try:
            variants.append(ua.Variant(coerce(arg, vtype, f"args[{i}] ({spec.Name or 'argument'})"), vtype))
        except ValueError as err:
            raise ArgumentError(f"method {command!r}: {err}", "BadTypeMismatch") from None
    return variants
