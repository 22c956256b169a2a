"""The attempts ledger: how often the agent died while handling each file, so that poison is failed, not
tried forever. It lives in state_dir, one JSON file per equipment."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from drivers.file_drop.entries import Look, fsync_dir
from drivers.sdk import DataError, load_json

# A file that was being handled when the agent died this many times is failed, not tried again.
CRASHES_MAX = 2


def attempts_ledger_path(state_dir: Path, equipment_id: str) -> Path:
    """Where a file-drop equipment keeps its attempts ledger."""
    return Path(state_dir) / "file_drop" / f"{equipment_id}.attempts.json"


class AttemptsLedger:
    """How many times each file in .processing/ was being handled when the agent died.

    `begin` counts an attempt and makes it durable (fsync, atomic replace) before the parse starts; `end`
    takes it back once the attempt is over with the agent still alive. What remains counts deaths. An
    entry holds the file's look, so another file that later takes the name starts from nothing. When
    state_dir cannot be written the counts are kept in memory, and that is logged once.
    """

    def __init__(self, path: Path, log: Any) -> None:
        self.path = path
        self.log = log
        self._files: dict[str, tuple[int, Look]] = {}
        self._durable = True

    def load(self) -> None:
        """Read the ledger; an unreadable or foreign one counts as empty (a poison file then gets 2 more tries)."""
        self._files = {}
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as err:
            self.log.warning("attempts_ledger_unreadable", path=str(self.path), error=err.strerror or str(err))
            return
        try:
            files = load_json(data, what=str(self.path))["files"]
            for name, entry in files.items():
                count, look = entry["attempts"], tuple(entry["look"])
                if isinstance(count, int) and len(look) == 3 and all(isinstance(v, int) for v in look):
                    self._files[name] = (count, (look[0], look[1], look[2]))
        except (DataError, KeyError, TypeError, AttributeError):
            self.log.warning("attempts_ledger_unreadable", path=str(self.path), error="not a ledger")

    def begin(self, name: str, look: Look) -> int:
        """How many earlier attempts at this file the agent died in; below CRASHES_MAX this one is counted."""
        count, seen = self._files.get(name, (0, look))
        prior = count if seen == look else 0
        if prior < CRASHES_MAX:
            self._files[name] = (prior + 1, look)
            self._save(durable=True)
        return prior

    def end(self, name: str) -> None:
        """The attempt at `name` is over with the agent alive (or the file left .processing/)."""
        if self._files.pop(name, None) is not None:
            # No fsync: a death of the process keeps what the kernel was given; only a power cut could
            # bring back a count, which then needs two more deaths to fail the file.
            self._save(durable=False)

    def keep_only(self, names: set[str]) -> None:
        """Forget files no longer in .processing/."""
        if set(self._files) - names:
            self._files = {n: v for n, v in self._files.items() if n in names}
            self._save(durable=False)

    def _save(self, durable: bool) -> None:
        body = {"files": {n: {"attempts": c, "look": list(look)} for n, (c, look) in self._files.items()}}
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="ascii") as f:  # names that are not UTF-8 are \u-escaped
                json.dump(body, f)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            os.replace(tmp, self.path)
            if durable:
                fsync_dir(self.path.parent)
        except OSError as err:
            if self._durable:
                self._durable = False
                self.log.warning("attempts_ledger_not_durable", path=str(self.path), error=err.strerror or str(err))
            return
        if not self._durable:
            self._durable = True
            self.log.info("attempts_ledger_durable", path=str(self.path))
