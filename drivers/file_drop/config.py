"""`[equipment.connection]` of a file-drop equipment, its cross-field checks and which names it takes."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

from pydantic import Field, field_validator

from drivers.sdk import EquipmentConfig, Model

# The work folder inside `directory` that claimed files wait in until their result is durable.
PROCESSING = ".processing"
# Names a writer gives a file while it is still being written.
IGNORED_SUFFIXES = (".tmp", ".part")


class FileDropConnection(Model):
    """`[equipment.connection]` of a file-drop equipment; patterns match file names case-insensitively."""

    directory: Path
    patterns: list[str] = Field(default_factory=lambda: ["*.csv", "*.json"], min_length=1)
    processed_dir: Path
    failed_dir: Path
    stable_s: float = Field(1.0, ge=0)
    max_file_bytes: int = Field(10_485_760, ge=1)
    rescan_s: float = Field(5.0, gt=0)

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            if not p or "/" in p or os.sep in p:
                raise ValueError(f"pattern {p!r} must be a non-empty file-name pattern without a folder")
        return v


def check_folders(equipment: EquipmentConfig) -> list[tuple[tuple[str | int, ...], str]]:
    """processed_dir and failed_dir must be neither the watched folder nor its work folder."""
    conn = equipment.connection
    problems: list[tuple[tuple[str | int, ...], str]] = []
    directory = os.path.realpath(conn.directory)
    for field in ("processed_dir", "failed_dir"):
        target = os.path.realpath(getattr(conn, field))
        if target == directory:
            problems.append((("connection", field), f"must differ from connection.directory ({conn.directory})"))
        elif target == os.path.join(directory, PROCESSING):
            problems.append((("connection", field), f"must not be the work folder {PROCESSING} of the directory"))
    return problems


def wanted(name: str, patterns: list[str]) -> bool:
    """Whether a top-level file name is a report to take (not hidden, not in progress, matching one of the
    lower-cased `patterns`)."""
    lower = name.lower()
    if name.startswith(".") or lower.endswith(IGNORED_SUFFIXES):
        return False
    return any(fnmatch.fnmatchcase(lower, p) for p in patterns)
