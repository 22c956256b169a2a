"""A JSON report: a result object written by the measuring software itself, checked and completed (the
equipment, source and timestamp filled in, overall_score derived from quality_scores); every refusal
names the line and column or the field path at fault."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import Any

from drivers.file_drop.result import SHOW_CHARS, file_time, show, source_of
from drivers.sdk import DataError, InputError, iso, load_json, parse_iso


def parse_json_report(name: str, text: str, *, equipment_id: str, mtime_ns: int) -> dict[str, Any]:
    """A result object written by the measuring software itself; `process_id` required, the rest filled in."""
    try:
        obj = load_json(text, what="the file")  # nesting, NaN and parser faults refused at the one gate
    except InputError as err:
        if err.reason == "malformed":
            _locate_bad_number(name, text)
        raise DataError(f"{name}: invalid JSON: {err}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{name}: the top level is {_json_type(obj)}, expected an object")
    pid = obj.get("process_id")
    if "process_id" not in obj:
        raise DataError(f"{name}: field 'process_id' is missing")
    if isinstance(pid, int) and not isinstance(pid, bool):
        pid = str(pid)
    if not isinstance(pid, str) or not pid.strip():
        raise DataError(f"{name}: field 'process_id' must be a non-empty string, got {_json_type(pid)}")
    result = dict(obj)
    result["process_id"] = pid.strip()
    scores = result.get("quality_scores", {})
    if not isinstance(scores, dict):
        raise DataError(f"{name}: field 'quality_scores' must be an object, got {_json_type(scores)}")
    for category, score in scores.items():
        if not _is_number(score):
            raise DataError(
                f"{name}: field {_path(('quality_scores', category))} must be a number, got {_json_type(score)}"
            )
    result["quality_scores"] = scores
    overall = result.get("overall_score")
    if overall is not None:
        if not _is_number(overall):
            raise DataError(f"{name}: field 'overall_score' must be a number, got {_json_type(overall)}")
    elif scores:
        result["overall_score"] = min(scores.values())
    else:
        raise DataError(f"{name}: field 'overall_score' is missing and there are no quality_scores to derive it from")
    for field in ("defects", "measurements"):
        items = result.setdefault(field, [])
        if not isinstance(items, list):
            raise DataError(f"{name}: field '{field}' must be a list, got {_json_type(items)}")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise DataError(f"{name}: field '{field}[{i}]' must be an object, got {_json_type(item)}")
    for field in ("equipment_id", "source"):
        if field in result and not isinstance(result[field], str):
            raise DataError(f"{name}: field '{field}' must be a string, got {_json_type(result[field])}")
    result.setdefault("equipment_id", equipment_id)
    result.setdefault("source", source_of(name))
    ts = result.get("timestamp")
    if ts is None:
        result["timestamp"] = file_time(name, mtime_ns)
    else:
        try:
            if not isinstance(ts, str):
                raise ValueError
            result["timestamp"] = iso(parse_iso(ts))
        except (ValueError, OverflowError):  # OverflowError: a valid date that leaves the calendar in UTC
            shown = show(ts) if isinstance(ts, str) else _json_type(ts)
            raise DataError(f"{name}: field 'timestamp' must be an ISO 8601 timestamp, got {shown}") from None
    _check_values(name, result)
    return result


@dataclass(frozen=True, slots=True)
class _BadNumber:
    """A number token JSON refuses (NaN, Infinity, an integer of thousands of digits), kept aside to be located."""

    token: str


def _int_or_bad(token: str) -> int | _BadNumber:
    if len(token) > sys.get_int_max_str_digits():
        return _BadNumber(f"an integer of {len(token)} digits")
    return int(token)


def _locate_bad_number(name: str, text: str) -> None:
    """Raise a DataError naming the field of a number token that load_json refused without a position.

    Only after load_json refused the text as malformed, so its nesting is already known to be bounded. A
    syntax error found instead is named with its line and column; otherwise load_json's reason stands.
    """
    try:
        obj = json.loads(text, parse_constant=_BadNumber, parse_int=_int_or_bad)
    except json.JSONDecodeError as err:  # the bad number was not the only fault: name the one with a place
        raise DataError(f"{name}: invalid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    except Exception:  # load_json's own message says what is wrong
        return
    _check_values(name, obj)


def _path(parts: tuple[str | int, ...]) -> str:
    """A JSON path as messages quote it: 'measurements[0].measured'."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            part = part if len(part) <= SHOW_CHARS else part[:SHOW_CHARS] + "..."
            text += f".{part}" if text else part
    return repr(text)


def _unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_values(name: str, obj: Any) -> None:
    """Refuse, naming its path, a value no JSON body can carry: an infinite number (1e400 parses as one)
    or a string with a lone surrogate (a `\\ud800` escape). Iterative: load_json has bounded the depth."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(obj, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, _BadNumber):
            where = f"field {_path(path)}" if path else "the top level"
            raise DataError(f"{name}: invalid JSON: {where}: {value.token} is not a JSON number")
        if isinstance(value, float) and not math.isfinite(value):
            raise DataError(f"{name}: field {_path(path)} must be a finite number, got {value}")
        if isinstance(value, str) and not _unicode(value):
            raise DataError(f"{name}: field {_path(path)} holds a lone surrogate escape, which is not Unicode text")
        if isinstance(value, dict):
            for key, item in value.items():
                if not _unicode(key):
                    raise DataError(
                        f"{name}: a field name in {_path(path) if path else 'the top level'} holds a "
                        "lone surrogate escape, which is not Unicode text"
                    )
                stack.append((item, (*path, key)))
        elif isinstance(value, list):
            stack.extend((item, (*path, i)) for i, item in enumerate(value))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
