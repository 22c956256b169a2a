"""Registers <-> values: types, byte and word order, bits of a register, strings, scaling.

The one place that knows how Modbus lays a value out in registers. Byte and word order are decoded with
`struct`, since pymodbus's converters know no byte order.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from datetime import datetime
from itertools import repeat
from typing import Any

from drivers.modbus.config import REGISTERS, ModbusTag
from drivers.sdk import Event, Reading

#: struct format of every numeric type.
FORMATS: dict[str, str] = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "int64": "q",
    "uint64": "Q",
    "float32": "f",
    "float64": "d",
}
#: struct format and register count of every numeric type.
NUMERIC: dict[str, tuple[str, int]] = {dtype: (fmt, REGISTERS[dtype]) for dtype, fmt in FORMATS.items()}
INT_RANGE: dict[str, tuple[int, int]] = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}
_FLOAT32_MAX = 3.4028234663852886e38


def layout(byte_order: str, word_order: str) -> tuple[bool, str]:
    """(read the byte-swapped buffer?, struct endianness) for a value stored in these orders.

    A block's registers are kept as two byte strings: high byte first (`big`) and low byte first
    (`swapped`). Of the four layouts, ABCD and DCBA read from `big` with `>` and `<`; BADC and CDAB
    read from `swapped` with `>` and `<`.
    """
    return byte_order != word_order, "<" if word_order == "little" else ">"


def swap_bytes(big: bytes) -> bytes:
    """The same registers with each register's two bytes swapped."""
    out = bytearray(len(big))
    out[0::2] = big[1::2]
    out[1::2] = big[0::2]
    return bytes(out)


def decode_registers(tag: ModbusTag, registers: Sequence[int]) -> Any:
    """The value of a register tag from its registers (as the device holds them)."""
    n = len(registers)
    big = struct.pack(f">{n}H", *registers)
    swapped = struct.pack(f"<{n}H", *registers)
    return Codec(tag, tag.address).decode(big, swapped)


def encode_registers(tag: ModbusTag, value: Any) -> list[int]:
    """The registers to write for `value` (in engineering units: scale and offset reversed).

    Raises ValueError naming why the value does not fit the tag's type.
    """
    dtype = tag.dtype
    if dtype not in NUMERIC:
        raise ValueError(f"tag {tag.name!r} of type {dtype} cannot be written as a number")
    if isinstance(value, bool):
        value = int(value)
    if not isinstance(value, (int, float)):
        raise ValueError(f"value {value!r} is not a number")
    scaled = tag.scale is not None or tag.offset is not None
    fmt, nregs = NUMERIC[dtype]
    try:
        raw: int | float = tag.unscaled(value) if scaled else value
        if dtype.startswith("float"):
            raw = float(raw)
    except OverflowError:  # an integer beyond any float (JSON carries thousands of digits)
        raise ValueError(f"value {value} is out of range for {dtype}") from None
    if dtype.startswith("float"):
        if dtype == "float32" and math.isfinite(raw) and abs(raw) > _FLOAT32_MAX:
            raise ValueError(f"value {value} is out of range for float32")
    else:
        if isinstance(raw, float):
            if not math.isfinite(raw):
                raise ValueError(f"value {value} is not finite")
            if scaled:
                raw = round(raw)
            elif raw.is_integer():
                raw = int(raw)
            else:
                raise ValueError(f"value {value} is not a whole number, as {dtype} tag {tag.name!r} needs")
        lo, hi = INT_RANGE[dtype]
        if not lo <= raw <= hi:
            raise ValueError(f"value {value} is out of range for {dtype} ({lo}..{hi}) after scaling")
    swapped, endian = layout(tag.byte_order, tag.word_order)
    packed = struct.pack(endian + fmt, raw)
    return list(struct.unpack(f"{'<' if swapped else '>'}{nregs}H", packed))


_F32 = struct.Struct(">f")
_F32_SHORT: dict[float, float] = {}  # raw float32 -> short decimal; polled values repeat, formatting is slow


def shortest_float32(value: float) -> float:
    """A short decimal that is the same float32 (24.35, not 24.350000381469727)."""
    short = _F32_SHORT.get(value)
    if short is not None:
        return short
    if not math.isfinite(value):
        return value
    bits = _F32.pack(value)
    for digits in (7, 8):  # float32 has 7.2 significant digits; 9 always round-trip
        short = float(f"{value:.{digits}g}")
        if _F32.pack(short) == bits:
            break
    else:
        short = float(f"{value:.9g}")
    if len(_F32_SHORT) >= 65536:
        _F32_SHORT.clear()
    if value:  # 0.0 and -0.0 are one key; leave both out so the sign survives
        _F32_SHORT[value] = short
    return short


class Codec:
    """A tag's place in a block and how to decode it, precomputed for the poll loop."""

    __slots__ = (
        "bit",
        "decode",
        "end",
        "endian",
        "f32",
        "fmt",
        "name",
        "offset",
        "post",
        "scaled",
        "start",
        "struct",
        "swapped",
        "tag",
    )

    def __init__(self, tag: ModbusTag, block_start: int) -> None:
        self.tag = tag
        self.name = tag.name
        self.start = tag.address
        self.end = tag.address + tag.size
        self.offset = tag.address - block_start
        self.scaled = tag.scale is not None or tag.offset is not None
        self.bit = tag.bit or 0
        self.swapped, self.endian = layout(tag.byte_order, tag.word_order)
        dtype = tag.dtype
        self.fmt = FORMATS.get(dtype, "")
        self.struct = struct.Struct(self.endian + self.fmt) if self.fmt else None
        self.f32 = dtype == "float32"
        # What a raw unpacked number still needs: None for the common case of nothing.
        self.post: Callable[[Any], Any] | None = None
        if self.f32 or self.scaled:
            self.post = self._finish
        self.decode: Callable[[bytes, bytes], Any] = self._numeric
        if tag.bit is not None:
            self.decode = self._bit
        elif dtype == "string":
            self.decode = self._string

    def rebase(self, block_start: int) -> Codec:
        """The same codec for a block that starts elsewhere."""
        return Codec(self.tag, block_start)

    def _finish(self, value: Any) -> Any:
        if self.f32:
            value = shortest_float32(value)
        return self.tag.scaled(value) if self.scaled else value

    def _numeric(self, big: bytes, swapped: bytes) -> Any:
        assert self.struct is not None
        value = self.struct.unpack_from(swapped if self.swapped else big, 2 * self.offset)[0]
        return self._finish(value)

    def _bit(self, big: bytes, swapped: bytes) -> bool:
        # Bit 0 is the least significant bit of the register as its byte order defines it.
        buf = swapped if self.tag.byte_order == "little" else big
        reg = (buf[2 * self.offset] << 8) | buf[2 * self.offset + 1]
        return bool((reg >> self.bit) & 1)

    def _string(self, big: bytes, swapped: bytes) -> str:
        buf = swapped if self.tag.byte_order == "little" else big
        raw = buf[2 * self.offset : 2 * (self.offset + (self.tag.length or 1))]
        if self.tag.word_order == "little":
            # Words reversed, each word's bytes kept in the byte order chosen above.
            raw = b"".join(raw[i : i + 2] for i in range(len(raw) - 2, -1, -2))
        return raw.rstrip(b"\x00").decode("ascii", errors="replace")


class _Group:
    """Numeric tags of one byte layout in a block, unpacked by one struct call."""

    __slots__ = ("names", "posts", "struct", "swapped")

    def __init__(self, fmt: str, swapped: bool, members: list[Codec]) -> None:
        self.struct = struct.Struct(fmt)
        self.swapped = swapped
        self.names = [c.name for c in members]
        posts = [c.post for c in members]
        self.posts = posts if any(p is not None for p in posts) else None


class Layout:
    """A block's register tags compiled for decoding: numeric tags grouped by layout into one struct each,
    so a block decodes in a few C calls. Tags that overlap a group's previous tag, bits and strings are
    decoded one by one."""

    __slots__ = ("groups", "singles")

    def __init__(self, codecs: Sequence[Codec]) -> None:
        groups: dict[tuple[bool, str], tuple[list[str], list[Codec], list[int]]] = {}
        singles: list[Codec] = []
        for codec in sorted(codecs, key=lambda c: c.offset):
            if not codec.fmt or codec.tag.bit is not None:
                singles.append(codec)
                continue
            fmt, members, end = groups.setdefault((codec.swapped, codec.endian), ([codec.endian], [], [0]))
            if codec.offset < end[0]:
                singles.append(codec)
                continue
            if codec.offset > end[0]:
                fmt.append(f"{2 * (codec.offset - end[0])}x")
            fmt.append(codec.fmt)
            members.append(codec)
            end[0] = codec.end - codec.start + codec.offset
        self.groups = [_Group("".join(f), swapped, m) for (swapped, _), (f, m, _) in groups.items()]
        self.singles = singles

    def decode_into(self, big: bytes, ts: datetime, out: list[Event]) -> None:
        """Append the readings of a block's data (its registers high byte first) to `out`."""
        swapped = swap_bytes(big)
        for group in self.groups:
            values: Sequence[Any] = group.struct.unpack_from(swapped if group.swapped else big)
            if group.posts is not None:
                values = [v if p is None else p(v) for p, v in zip(group.posts, values, strict=True)]
            out.extend(map(Reading, group.names, values, repeat(ts)))
        for codec in self.singles:
            out.append(Reading(codec.name, codec.decode(big, swapped), ts))
