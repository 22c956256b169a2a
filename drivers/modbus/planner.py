"""The request planner: tags coalesced into the fewest read requests (blocks), split and rejoined on faults."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from drivers.modbus.codec import Codec, Layout
from drivers.modbus.config import BIT_TABLES, ModbusConnection, ModbusTag

TABLES = ("holding", "input", "coil", "discrete")


@dataclass(slots=True)
class Block:
    """One read request: a table, a start address, a count, and the tags it carries."""

    table: str
    start: int
    count: int
    codecs: list[Codec] = field(default_factory=list)
    ok: bool = True  # the last read of this block succeeded
    last: bytes | list[bool] | None = None  # the data of its last good read, decoded and given as readings
    _layout: Layout | None = None

    def compile(self) -> Layout:
        """The block's register tags compiled for decoding (once)."""
        if self._layout is None:
            self._layout = Layout(self.codecs)
        return self._layout


def coalesce(table: str, tags: Sequence[ModbusTag], max_gap: int, limit: int) -> list[Block]:
    """The fewest blocks covering `tags` of one table, none spanning a gap over `max_gap` or over `limit`.

    Tags sorted by address are taken greedily: a tag joins the open block when the unused stretch
    before it is at most `max_gap` and the block stays within `limit`. For tags that do not overlap
    every part of a feasible run is feasible, so this greedy cut is minimal. A tag is never split
    across requests, so one request always reads a whole value (a 32-bit value is never torn).
    """
    ordered = sorted(tags, key=lambda t: (t.address, t.size))
    blocks: list[Block] = []
    start = end = 0
    members: list[ModbusTag] = []

    def flush() -> None:
        if members:
            blocks.append(Block(table, start, end - start, [Codec(t, start) for t in members]))

    for tag in ordered:
        t_end = tag.address + tag.size
        if members and tag.address - end <= max_gap and max(end, t_end) - start <= limit:
            members.append(tag)
            end = max(end, t_end)
            continue
        flush()
        members = [tag]
        start, end = tag.address, t_end
    flush()
    return blocks


def request_limit(table: str, conn: ModbusConnection) -> int:
    """The most registers (or bits) one request of `table` may read."""
    return conn.max_bits_per_request if table in BIT_TABLES else conn.max_registers_per_request


def plan(tags: Sequence[ModbusTag], conn: ModbusConnection) -> list[Block]:
    """Every table's blocks, in table order."""
    out: list[Block] = []
    for table in TABLES:
        members = [t for t in tags if t.table == table]
        if not members:
            continue
        limit = request_limit(table, conn)
        gap = conn.max_gap if table in BIT_TABLES else min(conn.max_gap, limit)
        out.extend(coalesce(table, members, gap, limit))
    return out


def split(block: Block) -> tuple[Block, Block]:
    """Two blocks with the first and second half of a block's tags."""
    half = len(block.codecs) // 2

    def make(codecs: list[Codec]) -> Block:
        start = min(c.start for c in codecs)
        end = max(c.end for c in codecs)
        return Block(block.table, start, end - start, [c.rebase(start) for c in codecs])

    return make(block.codecs[:half]), make(block.codecs[half:])


def rejoin(parts: list[Block], limit: int) -> list[Block]:
    """Merge neighbouring good parts of a split block where no unread register lies between them.

    Every register of a good part was read successfully, so two touching good parts read as one
    request are sure to succeed; a stretch between them that was never read might hold the hole.
    """
    out: list[Block] = []
    for part in parts:
        prev = out[-1] if out else None
        if prev is not None and prev.ok and part.ok and part.start <= prev.start + prev.count:
            end = max(prev.start + prev.count, part.start + part.count)
            if end - prev.start <= limit:
                codecs = [c.rebase(prev.start) for c in prev.codecs + part.codecs]
                out[-1] = Block(prev.table, prev.start, end - prev.start, codecs)
                continue
        out.append(part)
    return out
