"""The inotify watch on the folder (watchfiles): it only notes changed names and wakes the driver; the
driver's periodic rescan finds whatever a watch misses (network shares, a watch that failed)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchfiles import awatch


class FolderWatch:
    """A watch on the top level of one folder, restarted whenever the folder is another one (a new inode)."""

    def __init__(self, directory: Path, wanted: Callable[[str], bool], log: Any, task_name: str) -> None:
        self.directory = directory
        self.wanted = wanted
        self.log = log
        self.task_name = task_name
        # Names of wanted entries reported changed since the driver last took them.
        self.changes: set[str] = set()
        self.wake = asyncio.Event()
        # The (device, inode) of the folder being watched, None when no watch is in place.
        self.watched: tuple[int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None

    def take_changes(self) -> set[str]:
        """The names reported since the last call."""
        names, self.changes = self.changes, set()
        return names

    async def start(self, ident: tuple[int, int] | None) -> None:
        await self.stop()
        stop = asyncio.Event()
        self._stop = stop
        self.watched = ident
        self._task = asyncio.create_task(self._run(stop), name=self.task_name)

    async def stop(self) -> None:
        task, stop = self._task, self._stop
        self._task = self._stop = None
        self.watched = None
        if stop is not None:
            stop.set()  # the watch thread sees this within one step and returns
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=10)
        if not done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self, stop: asyncio.Event) -> None:
        try:
            async for changes in awatch(
                self.directory, watch_filter=None, recursive=False, stop_event=stop, debounce=200, step=50
            ):
                relevant = False
                for _change, raw in changes:
                    path = Path(raw)
                    if path.parent == self.directory and self.wanted(path.name):
                        self.changes.add(path.name)
                        relevant = True
                    elif path == self.directory:
                        relevant = True
                if relevant:
                    self.wake.set()
        except Exception as err:  # the periodic rescan still finds files; a new folder gets a new watch
            self.log.warning("watch_failed", directory=str(self.directory), error=str(err))
        self.wake.set()
