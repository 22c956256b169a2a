"""Messages the store holds in memory, not (yet) committed: while state_dir cannot be written they are
still sent, bounded (telemetry first to go), and committed as soon as writing works again."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, ValuesView

from agent.store_rows import Lane, StoredMessage


class HeldMessages:
    """Uncommitted messages by id, their ids in order, and how many of them are telemetry."""

    def __init__(self) -> None:
        self._msgs: dict[int, StoredMessage] = {}
        self._ids: list[int] = []  # sorted; entries may be stale (taken out of `_msgs` since)
        self._telemetry = 0

    def __len__(self) -> int:
        return len(self._msgs)

    def values(self) -> ValuesView[StoredMessage]:
        return self._msgs.values()

    def add(self, msgs: Iterable[StoredMessage], limit: int, kept: set[int] | None = None) -> int:
        """Hold `msgs`; past `limit`, drop the oldest telemetry (and forget it in `kept`). Return how many were
        dropped."""
        held = self._msgs
        for m in msgs:
            held[m.id] = m
            self._ids.append(m.id)  # ids only grow, so the list stays sorted
            if m.kind == "telemetry":
                self._telemetry += 1
        over = len(held) - limit
        gone = 0
        if over > 0 and self._telemetry:
            for i in list(held):
                if gone >= over or not self._telemetry:
                    break
                if held[i].kind == "telemetry":
                    del held[i]
                    if kept is not None:
                        kept.discard(i)
                    self._telemetry -= 1
                    gone += 1
        return gone

    def pop(self, i: int) -> StoredMessage | None:
        """Take message `i` out (acknowledged), if held."""
        m = self._msgs.pop(i, None)
        if m is not None and m.kind == "telemetry":
            self._telemetry -= 1
        return m

    def clear(self) -> None:
        """Everything held was committed."""
        self._msgs.clear()
        self._ids.clear()
        self._telemetry = 0

    def after(self, after_id: int, upto: int | None, limit: int, lane: Lane | None = None) -> list[StoredMessage]:
        """Up to `limit` held messages of `lane` (all without one) in order after `after_id` (and not after
        `upto`)."""
        ids = self._ids
        if len(ids) > 2 * len(self._msgs) + 64:
            ids[:] = [i for i in ids if i in self._msgs]
        out: list[StoredMessage] = []
        for i in ids[bisect.bisect_right(ids, after_id) :]:
            if upto is not None and i > upto:
                break
            m = self._msgs.get(i)
            if m is not None and (lane is None or lane.keeps(m.topic)):
                out.append(m)
                if len(out) >= limit:
                    break
        return out

    def by_kind(self) -> dict[str, int]:
        """How many are held of each kind."""
        counts: dict[str, int] = {}
        for m in self._msgs.values():
            counts[m.kind] = counts.get(m.kind, 0) + 1
        return counts
