"""Scoring measured rows against their tolerance bands: in exact decimal arithmetic, so that a value on
a limit is in; a feature outside its band is a defect, `critical` when it is further out than the band
is wide."""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from drivers.file_drop.result import file_time, source_of
from drivers.sdk import DataError


@dataclass(frozen=True, slots=True)
class Row:
    """One measured feature of a CSV report; `line` is its row number, as messages name it."""

    line: int
    feature: str
    nominal: Decimal
    measured: Decimal
    lower_tol: Decimal
    upper_tol: Decimal
    unit: str | None


def _finite(name: str, line: int, what: str, value: Decimal) -> float:
    """A computed value as a float, refused when it overflows (a deviation between two huge numbers)."""
    as_float = float(value)
    if not math.isfinite(as_float):
        raise DataError(f"{name}: row {line}, column 'measured': the {what} is out of range")
    return as_float


def score_rows(name: str, process_id: str, rows: list[Row], *, equipment_id: str, mtime_ns: int) -> dict[str, Any]:
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
        "timestamp": file_time(name, mtime_ns),
    }
