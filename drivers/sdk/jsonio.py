"""Strict JSON out (NaN and infinities as strings) and the one gate for JSON that comes from outside:
MQTT command payloads, HTTP bodies, drop files, MPM answers.

The one place for how JSON is written: the NaN policy (`nonfinite`: a non-finite float becomes the
string "NaN", "Infinity" or "-Infinity") and the escaping rules. There are two, each for a reason:
- broker messages (`message_bytes`, `value_text`) are ASCII JSON, non-ASCII text as \\u escapes, so any
  Python string encodes, even a lone surrogate that an outside `"\\ud800"` decodes to;
- what the MPM outbox stores and sends (`json_bytes`) is UTF-8 JSON, byte for byte as it always was
  (stored bodies and idempotency keys depend on those bytes).

Outside JSON is refused, with a reason, when it is larger than the caller's size limit, is not UTF-8,
nests deeper than `MAX_DEPTH` levels, or carries NaN/Infinity literals. No library exception
(RecursionError, UnicodeDecodeError, MemoryError) ever leaves `loads`: the caller sees `InputError` only.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from enum import Enum
from typing import Any

from drivers.sdk.errors import DataError
from drivers.sdk.events import iso

MAX_DEPTH = 64


class InputError(DataError, ValueError):
    """Outside JSON that was refused; `reason` is a short word (`too_large`, `too_deep`, `malformed`)."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def depth(value: Any) -> int:
    """How deeply `value` nests containers (a scalar is 0, `[]` is 1); iterative, so never recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            level += 1
            stack.extend((v, level) for v in item.values())
        elif isinstance(item, list):
            level += 1
            stack.extend((v, level) for v in item)
        else:
            continue
        if level > deepest:
            deepest = level
            if deepest > MAX_DEPTH:
                return deepest
    return deepest


def _bracket_depth(text: str) -> int:
    """The deepest bracket nesting in JSON text, strings skipped: checked before parsing, so a
    100,000-deep document is refused without the parser ever recursing into it."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return 0
    level = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            level += 1
            if level > deepest:
                deepest = level
                if deepest > MAX_DEPTH:
                    return deepest
        elif ch in "]}":
            level -= 1
    return deepest


def loads(data: bytes | bytearray | str, *, max_bytes: int | None = None, what: str = "JSON") -> Any:
    """Parse outside JSON within the limits; raise InputError naming `what` and the reason."""
    size = len(data)
    if max_bytes is not None and size > max_bytes:
        raise InputError(f"{what} is {size} bytes, more than the {max_bytes} accepted", "too_large")
    if isinstance(data, (bytes, bytearray)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{what} is not UTF-8 (byte {err.start})") from None
    else:
        text = data
    if _bracket_depth(text) > MAX_DEPTH:
        raise InputError(f"{what} nests deeper than {MAX_DEPTH} levels", "too_deep")
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except json.JSONDecodeError as err:
        raise InputError(f"{what} is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    except (ValueError, RecursionError, MemoryError, UnicodeError) as err:
        raise InputError(f"{what} is not valid JSON: {type(err).__name__}: {err}") from None
    return value


_COMPACT = (",", ":")


def nonfinite(value: float) -> str:
    """The NaN policy: how a non-finite float is spelt (as a JSON string; JSON has no such numbers)."""
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def json_bytes(obj: Any) -> bytes:
    """Strict compact JSON bytes: what the MPM outbox stores and the MPM client sends, byte for byte."""
    return json.dumps(json_safe(obj), separators=_COMPACT, ensure_ascii=False, allow_nan=False).encode()


def message_bytes(obj: Any) -> bytes:
    """Strict compact ASCII JSON bytes of a broker message; fast when `obj` is plain JSON already,
    anything JSON has no type for written as its `str`."""
    try:
        return json.dumps(obj, separators=_COMPACT, allow_nan=False).encode()
    except (ValueError, TypeError):
        return json.dumps(json_safe(obj), separators=_COMPACT, allow_nan=False, default=str).encode()


_ascii_string = json.encoder.encode_basestring_ascii  # what json.dumps does with a str, without its overhead


def value_text(value: Any) -> str:
    """One value as strict ASCII JSON text (as `message_bytes` writes it), fast for the common scalars."""
    t = type(value)
    if t is float:
        if math.isfinite(value):
            return repr(value)
        return f'"{nonfinite(value)}"'
    if t is int:
        return str(value)
    if t is bool:
        return "true" if value else "false"
    if value is None:
        return "null"
    if t is str:
        return _ascii_string(value)
    return json.dumps(json_safe(value), default=str)


def json_safe(value: Any) -> Any:
    """Make a value strict-JSON: NaN and infinities become strings, containers are walked."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return nonfinite(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Enum):
        return value.value
    return value
