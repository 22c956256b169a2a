"""Which entries of the folder are waiting to be taken, since when they have looked the same, and which
ones could not be moved out of the way and are left alone."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from drivers.file_drop.entries import Look


@dataclass(slots=True)
class _Seen:
    """What a candidate entry looked like when first seen so, and since when (monotonic)."""

    look: Look
    since: float


class Candidates:
    """Entries of the top level seen so far, each with the time since which it has held still."""

    def __init__(self, directory: Path, stable_s: float) -> None:
        self.directory = directory
        self.stable_s = stable_s
        self.seen: dict[str, _Seen] = {}
        # Entries (at the top level or in .processing/) that could not be moved: left alone while they look the same.
        self.stuck: dict[Path, Look] = {}

    def clear(self) -> None:
        self.seen.clear()

    def listed(self, listing: dict[str, Look], now: float) -> None:
        """A full listing of the wanted entries: forget what is gone, note the rest."""
        for gone in set(self.seen) - set(listing):
            del self.seen[gone]
        self.keep_stuck_in(self.directory, listing)
        for name, look in listing.items():
            self.note(name, look, now)

    def note(self, name: str, look: Look | None, now: float) -> None:
        """What `name` looks like now; None when it is gone."""
        if look is None or self.stuck.get(self.directory / name) == look:
            self.seen.pop(name, None)
            return
        seen = self.seen.get(name)
        if seen is None or seen.look != look:
            self.seen[name] = _Seen(look, now)

    def ready(self, now: float, limit: int) -> list[tuple[str, Look]]:
        """Up to `limit` entries that held still for stable_s, oldest (by mtime) first."""
        due = sorted((seen.look[1], name) for name, seen in self.seen.items() if now - seen.since >= self.stable_s)
        return [(name, self.seen[name].look) for _, name in due[:limit]]

    def postpone(self, names: list[str], since: float) -> None:
        """Count these as holding still only from `since` (a claim failed): no tight retry loop."""
        for name in names:
            if name in self.seen:
                self.seen[name].since = since

    def after_claim(
        self,
        batch: list[str],
        taken: set[str],
        changed: dict[str, Look | None],
        now: float,
        retry_since: float,
    ) -> None:
        """After a claim of `batch`: forget what was `taken` (claimed or failed as not regular), wait again
        for what `changed` (gone: None), and postpone the rest, which still waits in .processing/."""
        for name in batch:
            if name in taken:
                self.seen.pop(name, None)
            elif name in changed:
                new_look = changed[name]
                if new_look is None:
                    self.seen.pop(name, None)
                else:
                    self.seen[name] = _Seen(new_look, now)  # still being written: wait again
            elif name in self.seen:
                self.seen[name].since = retry_since

    def next_due(self, deadline: float) -> float:
        """The earlier of `deadline` and the time the first waiting entry becomes ready."""
        for seen in self.seen.values():
            deadline = min(deadline, seen.since + self.stable_s)
        return deadline

    def leave_alone(self, path: Path, look: Look) -> None:
        self.stuck[path] = look

    def left_alone(self, path: Path, look: Look) -> bool:
        return self.stuck.get(path) == look

    def keep_stuck_in(self, folder: Path, names: Collection[str]) -> None:
        """Forget left-alone entries of `folder` that are no longer there."""
        for path in [p for p in self.stuck if p.parent == folder and p.name not in names]:
            del self.stuck[path]
