"""The file-drop driver: inspection reports that measuring machines drop into a folder become quality
results (see README.md). Every name the former `drivers.file_drop` and `drivers.inspection_report`
modules exported is importable from here."""

from __future__ import annotations

from drivers.file_drop.config import IGNORED_SUFFIXES, PROCESSING, FileDropConnection
from drivers.file_drop.driver import CLAIM_BATCH, HEALTH_POLL_S, FileDropDriver
from drivers.file_drop.entries import Look, describe_kind, not_regular_reason, numbered, place_file
from drivers.file_drop.ledger import CRASHES_MAX, AttemptsLedger, attempts_ledger_path
from drivers.file_drop.report import check_body_size, idempotency_key, parse_report
from drivers.file_drop.report_csv import CSV_COLUMNS, NUMERIC_COLUMNS, OPTIONAL_COLUMNS, parse_csv_report
from drivers.file_drop.report_json import parse_json_report
from drivers.file_drop.result import SHOW_CHARS, file_timestamp, source_of
from drivers.file_drop.scoring import score_rows

__all__ = [
    "CLAIM_BATCH",
    "CRASHES_MAX",
    "CSV_COLUMNS",
    "HEALTH_POLL_S",
    "IGNORED_SUFFIXES",
    "NUMERIC_COLUMNS",
    "OPTIONAL_COLUMNS",
    "PROCESSING",
    "SHOW_CHARS",
    "AttemptsLedger",
    "FileDropConnection",
    "FileDropDriver",
    "Look",
    "attempts_ledger_path",
    "check_body_size",
    "describe_kind",
    "file_timestamp",
    "idempotency_key",
    "not_regular_reason",
    "numbered",
    "parse_csv_report",
    "parse_json_report",
    "parse_report",
    "place_file",
    "score_rows",
    "source_of",
]
