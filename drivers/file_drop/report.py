"""Inspection reports dropped as files: parse a CSV or JSON report into the contract's quality result.

Pure functions, no I/O: the file-drop driver reads the bytes and the modification time and hands them
here. Every refusal is a DataError whose message names the file and, where there is one, the row and
column (CSV) or the line and column or field path (JSON) at fault; no other exception leaves
`parse_report`, whatever the bytes. CSV rows are numbered as a spreadsheet shows them: the header is row 1.
A result always encodes as strict JSON: no infinity, no NaN, no string that is not Unicode.
"""

from __future__ import annotations

import hashlib
from typing import Any

from drivers.file_drop.report_csv import parse_csv_report
from drivers.file_drop.report_json import parse_json_report
from drivers.sdk import DataError, json_bytes


def idempotency_key(data: bytes) -> str:
    """The key of a report: the SHA-256 of its bytes, so a re-drop under another name gives the same key."""
    return hashlib.sha256(data).hexdigest()


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
