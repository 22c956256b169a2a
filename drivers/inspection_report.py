"""Report parsing now lives in the file-drop package (`drivers.file_drop.report` and its neighbours); this
module stays for one release so that code importing the old path keeps working."""

from __future__ import annotations

from drivers.file_drop.report import check_body_size, idempotency_key, parse_report
from drivers.file_drop.report_csv import CSV_COLUMNS, NUMERIC_COLUMNS, OPTIONAL_COLUMNS, parse_csv_report
from drivers.file_drop.report_json import parse_json_report
from drivers.file_drop.result import SHOW_CHARS, file_timestamp, source_of
from drivers.file_drop.scoring import score_rows

__all__ = [
    "CSV_COLUMNS",
    "NUMERIC_COLUMNS",
    "OPTIONAL_COLUMNS",
    "SHOW_CHARS",
    "check_body_size",
    "file_timestamp",
    "idempotency_key",
    "parse_csv_report",
    "parse_json_report",
    "parse_report",
    "score_rows",
    "source_of",
]
