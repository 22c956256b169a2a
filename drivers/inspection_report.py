"""Inspection reports dropped as files: parse a CSV or JSON report into the contract's quality result.

Pure functions, no I/O: the file-drop driver reads the bytes and the modification time and hands them
here. Every refusal is a DataError whose message names the file and, where there is one, the row and
column (CSV) or the line and column or field path (JSON) at fault; no other exception leaves
`parse_report`, whatever the bytes. CSV rows are numbered as a spreadsheet shows them: the header is row 1.
A result always encodes as strict JSON: no infinity, no NaN, no string that is not Unicode.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, DecimalException
from typing import Any

from agent import jsonin
from agent.errors import DataError
from agent.model import iso, json_bytes, parse_iso

CSV_COLUMNS = ("process_id", "feature", "nominal", "measured", "lower_tol", "upper_tol")
OPTIONAL_COLUMNS = ("unit",)
NUMERIC_COLUMNS = ("nominal", "measured", "lower_tol", "upper_tol")
# A plain decimal number; Decimal() alone would also take "NaN", "Infinity" and "1_000".
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
# How much of an offending value a message quotes: enough to find it, never a whole file.
SHOW_CHARS = 40


def _show(text: str) -> str:
    """A value as a message quotes it, cut to SHOW_CHARS."""
    return repr(text if len(text) <= SHOW_CHARS else text[:SHOW_CHARS] + "...")


def idempotency_key(data: bytes) -> str:
    """The key of a report: the SHA-256 of its bytes, so a re-drop under another name gives the same key."""
    return hashlib.sha256(data).hexdigest()


def file_timestamp(mtime_ns: int) -> str:
    """A file's modification time as the contract's UTC timestamp with milliseconds."""
    # Integer arithmetic: a float of nanoseconds since 1970 can round .9995 s up into the next second.
    seconds, ns = divmod(mtime_ns, 1_000_000_000)
    return iso(datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=ns // 1000))


def _file_time(name: str, mtime_ns: int) -> str:
    try:
        return file_timestamp(mtime_ns)
    except (ValueError, OverflowError, OSError):
        raise DataError(f"{name}: the file's modification time ({mtime_ns} ns) is not a usable date") from None


def source_of(name: str) -> str:
    """The `source` of a result read from the file called `name`."""
    # A name that is not UTF-8 reaches Python with surrogate escapes, which no JSON body can carry.
    return "file_drop:" + name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def parse_report(
    name: str,
    data: bytes,
    *,
    equipment_id: str,
    mtime_ns: int,
    max_bytes: int | None = None,
    max_result_bytes: int | None = None,
) -> dict[str, Any]:
    """The quality result of a report file: JSON when the name ends in `.json`, the contract's CSV otherwise.

    With `max_result_bytes` (MPM's `max_body_bytes`), a result whose request body would be larger is
    refused here, so that it never becomes a dead letter.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise DataError(f"{name}: file is {len(data)} bytes, over max_file_bytes ({max_bytes})")
    text = _decode(name, data)
    if not text.strip():
        raise DataError(f"{name}: file is empty")
    if name.lower().endswith(".json"):
        result = parse_json_report(name, text, equipment_id=equipment_id, mtime_ns=mtime_ns)
    else:
        result = parse_csv_report(name, text, equipment_id=equipment_id, mtime_ns=mtime_ns)
    if max_result_bytes is not None:
        check_body_size(name, result, max_result_bytes)
    return result


def check_body_size(name: str, result: dict[str, Any], limit: int) -> None:
    """Refuse a result whose body, as the outbox stores and sends it (`json_bytes`), exceeds `limit`."""
    size = len(json_bytes(result))
    if size > limit:
        raise DataError(
            f"{name}: the quality result is {size} bytes as JSON, over MPM's max_body_bytes ({limit}); not sent"
        )


def _decode(name: str, data: bytes) -> str:
    try:
        # utf-8-sig: measuring software on Windows often writes a byte-order mark.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        row = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{name}: row {row}, byte {err.start - line_start + 1}: not UTF-8 text (byte 0x{data[err.start]:02x})"
        ) from None


# ---- CSV ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Row:
    line: int
    feature: str
    nominal: Decimal
    measured: Decimal
    lower_tol: Decimal
    upper_tol: Decimal
    unit: str | None


def parse_csv_report(name: str, text: str, *, equipment_id: str, mtime_ns: int) -> dict[str, Any]:
    """Score a CSV report (`process_id,feature,nominal,measured,lower_tol,upper_tol[,unit]`)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header, columns = _header(name, reader)
        rows: list[_Row] = []
        process_id: str | None = None
        pid_row = 0
        for fields in reader:
            line = reader.line_num
            if not any(f.strip() for f in fields):
                continue  # blank lines, a trailing one most of all, carry nothing
            if len(fields) != len(header):
                if len(fields) < len(header):
                    missing = header[len(fields)]
                    raise DataError(
                        f"{name}: row {line}, column '{missing}': missing value "
                        f"(expected {len(header)} fields, found {len(fields)})"
                    )
                raise DataError(
                    f"{name}: row {line}, column {len(header) + 1}: unexpected extra field "
                    f"(expected {len(header)} fields, found {len(fields)})"
                )
            values = {col: fields[i].strip() for col, i in columns.items()}
            pid = values["process_id"]
            if not pid:
                raise DataError(f"{name}: row {line}, column 'process_id': empty value")
            if process_id is None:
                process_id, pid_row = pid, line
            elif pid != process_id:
                raise DataError(
                    f"{name}: row {line}, column 'process_id': {_show(pid)} differs from {_show(process_id)} "
                    f"of row {pid_row} (one process per file)"
                )
            if not values["feature"]:
                raise DataError(f"{name}: row {line}, column 'feature': empty value")
            nums = {col: _number(name, line, col, values[col]) for col in NUMERIC_COLUMNS}
            if nums["lower_tol"] > nums["upper_tol"]:
                raise DataError(
                    f"{name}: row {line}, column 'lower_tol': {values['lower_tol'][:SHOW_CHARS]} is greater than "
                    f"upper_tol {values['upper_tol'][:SHOW_CHARS]}"
                )
            rows.append(
                _Row(
                    line=line,
                    feature=values["feature"],
                    nominal=nums["nominal"],
                    measured=nums["measured"],
                    lower_tol=nums["lower_tol"],
                    upper_tol=nums["upper_tol"],
                    unit=values.get("unit") or None,
                )
            )
    except csv.Error as err:
        raise DataError(f"{name}: row {reader.line_num}: malformed CSV: {err}") from None
    if not rows or process_id is None:
        raise DataError(f"{name}: row 1: header only, no measurement rows")
    return score_rows(name, process_id, rows, equipment_id=equipment_id, mtime_ns=mtime_ns)


def _header(name: str, reader: Any) -> tuple[list[str], dict[str, int]]:
    for fields in reader:
        if any(f.strip() for f in fields):
            break
    else:
        raise DataError(f"{name}: file is empty")
    line = reader.line_num
    header = [f.strip().lower() for f in fields]
    expected = ",".join(CSV_COLUMNS) + "[," + ",".join(OPTIONAL_COLUMNS) + "]"
    columns: dict[str, int] = {}
    for i, col in enumerate(header):
        if col in columns:
            raise DataError(f"{name}: row {line}, column {_show(col)}: duplicate column")
        if not col:
            raise DataError(f"{name}: row {line}, column {i + 1}: empty column name; expected {expected}")
        if col not in CSV_COLUMNS and col not in OPTIONAL_COLUMNS:
            hint = " (the delimiter must be a comma)" if len(header) == 1 and ";" in col else ""
            raise DataError(f"{name}: row {line}, column {_show(col)}: unknown column{hint}; expected {expected}")
        columns[col] = i
    missing = [c for c in CSV_COLUMNS if c not in columns]
    if missing:
        raise DataError(
            f"{name}: row {line}, column '{missing[0]}': missing column"
            + (f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else "")
            + f"; expected {expected}"
        )
    return header, columns


def _number(name: str, line: int, column: str, text: str) -> Decimal:
    if not text:
        raise DataError(f"{name}: row {line}, column '{column}': empty value")
    if not _NUMBER.fullmatch(text):
        raise DataError(f"{name}: row {line}, column '{column}': {_show(text)} is not a number")
    try:
        value = Decimal(text)
        finite = math.isfinite(float(value))
    except DecimalException:  # an exponent beyond what Decimal holds
        finite = False
    if not finite:  # 1e400 is a number, but no JSON body can carry it
        raise DataError(f"{name}: row {line}, column '{column}': {_show(text)} is out of range")
    return value


def _finite(name: str, line: int, what: str, value: Decimal) -> float:
    """A computed value as a float, refused when it overflows (a deviation between two huge numbers)."""
    as_float = float(value)
    if not math.isfinite(as_float):
        raise DataError(f"{name}: row {line}, column 'measured': the {what} is out of range")
    return as_float


def score_rows(name: str, process_id: str, rows: list[_Row], *, equipment_id: str, mtime_ns: int) -> dict[str, Any]:
    """The result of measured rows: band checks in exact decimal arithmetic, so a value on the limit is in."""
    measurements: list[dict[str, Any]] = []
    defects: list[dict[str, Any]] = []
    in_tol = 0
    for row in rows:
        low = row.nominal + row.lower_tol
        high = row.nominal + row.upper_tol
        deviation = _finite(name, row.line, "deviation measured - nominal", row.measured - row.nominal)
        ok = low <= row.measured <= high
        measurement: dict[str, Any] = {
            "feature": row.feature,
            "nominal": float(row.nominal),
            "measured": float(row.measured),
            "deviation": deviation,
            "lower_tol": float(row.lower_tol),
            "upper_tol": float(row.upper_tol),
            "unit": row.unit,
            "in_tolerance": ok,
        }
        measurements.append(measurement)
        if ok:
            in_tol += 1
            continue
        outside = (low - row.measured) if row.measured < low else (row.measured - high)
        defects.append(
            {
                "feature": row.feature,
                "measured": float(row.measured),
                "nominal": float(row.nominal),
                "deviation": deviation,
                "severity": "critical" if outside > high - low else "major",
                "unit": row.unit,
            }
        )
    scores = {"dimensional": in_tol / len(rows)}
    return {
        "process_id": process_id,
        "equipment_id": equipment_id,
        "source": source_of(name),
        "overall_score": min(scores.values()),
        "quality_scores": scores,
        "defects": defects,
        "measurements": measurements,
        "timestamp": _file_time(name, mtime_ns),
    }


# ---- JSON ---------------------------------------------------------------------------------------


def parse_json_report(name: str, text: str, *, equipment_id: str, mtime_ns: int) -> dict[str, Any]:
    """A result object written by the measuring software itself; `process_id` required, the rest filled in."""
    try:
        obj = jsonin.loads(text, what="the file")  # nesting, NaN and parser faults refused at the one gate
    except jsonin.InputError as err:
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
        result["timestamp"] = _file_time(name, mtime_ns)
    else:
        try:
            if not isinstance(ts, str):
                raise ValueError
            result["timestamp"] = iso(parse_iso(ts))
        except (ValueError, OverflowError):  # OverflowError: a valid date that leaves the calendar in UTC
            shown = _show(ts) if isinstance(ts, str) else _json_type(ts)
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
    """Raise a DataError naming the field of a number token that jsonin refused without a position.

    Only after jsonin refused the text as malformed, so its nesting is already known to be bounded. A
    syntax error found instead is named with its line and column; otherwise jsonin's reason stands.
    """
    try:
        obj = json.loads(text, parse_constant=_BadNumber, parse_int=_int_or_bad)
    except json.JSONDecodeError as err:  # the bad number was not the only fault: name the one with a place
        raise DataError(f"{name}: invalid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    except Exception:  # jsonin's own message says what is wrong
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
    or a string with a lone surrogate (a `\\ud800` escape). Iterative: jsonin has bounded the depth."""
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
