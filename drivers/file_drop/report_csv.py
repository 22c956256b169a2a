"""The contract's CSV report: `process_id,feature,nominal,measured,lower_tol,upper_tol[,unit]`, one
process per file, one measured feature per row; rows are numbered as a spreadsheet shows them (the header
is row 1), and every refusal names the row and column at fault."""

from __future__ import annotations

import csv
import io
import math
import re
from decimal import Decimal, DecimalException
from typing import Any

from drivers.file_drop.result import SHOW_CHARS, show
from drivers.file_drop.scoring import Row, score_rows
from drivers.sdk import DataError

CSV_COLUMNS = ("process_id", "feature", "nominal", "measured", "lower_tol", "upper_tol")
OPTIONAL_COLUMNS = ("unit",)
NUMERIC_COLUMNS = ("nominal", "measured", "lower_tol", "upper_tol")
# A plain decimal number; Decimal() alone would also take "NaN", "Infinity" and "1_000".
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def parse_csv_report(name: str, text: str, *, equipment_id: str, mtime_ns: int) -> dict[str, Any]:
    """Score a CSV report (`process_id,feature,nominal,measured,lower_tol,upper_tol[,unit]`)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header, columns = _header(name, reader)
        rows: list[Row] = []
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
                    f"{name}: row {line}, column 'process_id': {show(pid)} differs from {show(process_id)} "
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
                Row(
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
            raise DataError(f"{name}: row {line}, column {show(col)}: duplicate column")
        if not col:
            raise DataError(f"{name}: row {line}, column {i + 1}: empty column name; expected {expected}")
        if col not in CSV_COLUMNS and col not in OPTIONAL_COLUMNS:
            hint = " (the delimiter must be a comma)" if len(header) == 1 and ";" in col else ""
            raise DataError(f"{name}: row {line}, column {show(col)}: unknown column{hint}; expected {expected}")
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
        raise DataError(f"{name}: row {line}, column '{column}': {show(text)} is not a number")
    try:
        value = Decimal(text)
        finite = math.isfinite(float(value))
    except DecimalException:  # an exponent beyond what Decimal holds
        finite = False
    if not finite:  # 1e400 is a number, but no JSON body can carry it
        raise DataError(f"{name}: row {line}, column '{column}': {show(text)} is out of range")
    return value
