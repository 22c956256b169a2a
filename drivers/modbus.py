"""Modbus TCP and RTU: coalesced polling of holding/input registers, coils and discrete inputs.

pymodbus is used only in this module (pinned to 3.16: its keywords change between minor versions).
Byte and word order are decoded here with `struct`, since pymodbus's converters know no byte order.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any, Literal, TypeAlias, TypeVar

from pydantic import Field, model_validator
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType
from pymodbus.pdu.register_message import ReadHoldingRegistersResponse, ReadInputRegistersResponse

from agent import metrics
from agent.config import CommandBase, EquipmentConfig, Model, TagBase
from agent.errors import CommandError
from agent.model import CommandResult, ConnectionState, Event, Reading, Unchanged, utcnow
from drivers.base import DriverContext, PollingDriver, validate_write
from drivers.registry import register_driver

T = TypeVar("T")

# pymodbus logs every failed attempt and timeout at warning/error level; the supervisor logs the
# transitions instead. An explicitly configured level (the lead's logging setup, debugging) is kept.
if logging.getLogger("pymodbus").level == logging.NOTSET:
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

Table = Literal["holding", "input", "coil", "discrete"]
DataType = Literal["int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "bool", "string"]
Order = Literal["big", "little"]

#: Protocol limits of one read request (Modbus application protocol v1.1b3, 6.1-6.4).
MAX_REGISTERS = 125
MAX_BITS = 2000
BIT_TABLES = frozenset({"coil", "discrete"})
WRITABLE_TABLES = frozenset({"holding", "coil"})

#: struct format and register count of every numeric type.
NUMERIC: dict[str, tuple[str, int]] = {
    "int16": ("h", 1),
    "uint16": ("H", 1),
    "int32": ("i", 2),
    "uint32": ("I", 2),
    "int64": ("q", 4),
    "uint64": ("Q", 4),
    "float32": ("f", 2),
    "float64": ("d", 4),
}
INT_RANGE: dict[str, tuple[int, int]] = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}

#: Exception codes of the Modbus specification, by number.
EXCEPTION_NAMES = {
    1: "ILLEGAL_FUNCTION",
    2: "ILLEGAL_DATA_ADDRESS",
    3: "ILLEGAL_DATA_VALUE",
    4: "SERVER_DEVICE_FAILURE",
    5: "ACKNOWLEDGE",
    6: "SERVER_DEVICE_BUSY",
    7: "NEGATIVE_ACKNOWLEDGE",
    8: "MEMORY_PARITY_ERROR",
    10: "GATEWAY_PATH_UNAVAILABLE",
    11: "GATEWAY_TARGET_DEVICE_FAILED_TO_RESPOND",
}
#: Codes after which a block is split: the request named an address (or a count) the device lacks.
SPLIT_CODES = frozenset({2, 3})
#: Codes a gateway sends when the device behind it is unreachable: the device is offline.
GATEWAY_CODES = frozenset({10, 11})


def exception_name(code: int) -> str:
    """The specification's name of a Modbus exception code."""
    return EXCEPTION_NAMES.get(code, f"EXCEPTION_{code}")


# ---- configuration ------------------------------------------------------------------------------


class ModbusConnection(Model):
    """`[equipment.connection]` of a Modbus device."""

    transport: Literal["tcp", "rtu"] = "tcp"
    host: str | None = None
    port: int = Field(502, ge=1, le=65535)
    unit_id: int = Field(1, ge=0, le=255)
    serial_port: Path | None = None
    baudrate: int = Field(19200, gt=0)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[5, 6, 7, 8] = 8
    poll_interval_ms: int = Field(1000, ge=10)
    timeout_s: float = Field(1.0, gt=0, le=60)
    retries: int = Field(1, ge=0, le=5)
    max_gap: int = Field(16, ge=0, le=MAX_BITS)
    max_registers_per_request: int = Field(MAX_REGISTERS, ge=1, le=MAX_REGISTERS)
    max_bits_per_request: int = Field(MAX_BITS, ge=1, le=MAX_BITS)

    @model_validator(mode="after")
    def _transport_fields(self) -> ModbusConnection:
        if self.transport == "tcp" and not self.host:
            raise ValueError("transport tcp needs host")
        if self.transport == "rtu" and not self.serial_port:
            raise ValueError("transport rtu needs serial_port")
        return self

    @property
    def endpoint(self) -> str:
        """Where the device is, for logs and messages."""
        if self.transport == "tcp":
            return f"{self.host}:{self.port} unit {self.unit_id}"
        return f"{self.serial_port} unit {self.unit_id}"


class ModbusTag(TagBase):
    """A Modbus tag: a table, a 0-based address, a type and its orders."""

    table: Table = "holding"
    address: int = Field(ge=0, le=65535)
    type: DataType | None = None
    length: int | None = Field(None, ge=1, le=MAX_REGISTERS)
    byte_order: Order = "big"
    word_order: Order = "big"
    bit: int | None = Field(None, ge=0, le=15)

    @model_validator(mode="after")
    def _cross_fields(self) -> ModbusTag:
        if self.type is None:
            self.type = "bool" if self.table in BIT_TABLES or self.bit is not None else "uint16"
        if self.table in BIT_TABLES:
            if self.type != "bool":
                raise ValueError(f"a {self.table} tag is a bool (got type {self.type})")
            if self.bit is not None:
                raise ValueError("bit applies to holding and input registers only")
        elif self.type == "bool" and self.bit is None:
            raise ValueError("a bool tag on a register table needs bit (0..15)")
        elif self.bit is not None and self.type != "bool":
            raise ValueError(f"bit makes a bool tag (got type {self.type})")
        if self.type == "string" and self.length is None:
            raise ValueError("a string tag needs length (registers)")
        if self.length is not None and self.type != "string":
            raise ValueError("length applies to string tags only")
        if self.type in ("bool", "string") and (self.scale is not None or self.offset is not None):
            raise ValueError(f"scale and offset apply to numeric tags, not {self.type}")
        if self.address + self.size - 1 > 65535:
            raise ValueError(f"address {self.address} + {self.size} exceeds the address space (65535)")
        return self

    @property
    def dtype(self) -> str:
        """The data type, defaults resolved."""
        return self.type or "uint16"

    @property
    def size(self) -> int:
        """Registers (or bits, for coil and discrete tables) the tag occupies."""
        dtype = self.dtype
        if dtype == "bool":
            return 1
        if dtype == "string":
            return self.length or 1
        return NUMERIC[dtype][1]

    @property
    def writable(self) -> str | None:
        """None when a write command may target this tag, else why not."""
        if self.table not in WRITABLE_TABLES:
            return f"tag {self.name!r} is in the read-only {self.table} table"
        if self.bit is not None:
            return f"tag {self.name!r} is one bit of a register and is not writable"
        if self.dtype == "string":
            return f"tag {self.name!r} is a string and is not writable"
        return None


# ---- decoding and encoding ----------------------------------------------------------------------


def _layout(byte_order: str, word_order: str) -> tuple[bool, str]:
    """(read the byte-swapped buffer?, struct endianness) for a value stored in these orders.

    A block's registers are kept as two byte strings: high byte first (`big`) and low byte first
    (`swapped`). Of the four layouts, ABCD and DCBA read from `big` with `>` and `<`; BADC and CDAB
    read from `swapped` with `>` and `<`.
    """
    return byte_order != word_order, "<" if word_order == "little" else ">"


def decode_registers(tag: ModbusTag, registers: Sequence[int]) -> Any:
    """The value of a register tag from its registers (as the device holds them)."""
    n = len(registers)
    big = struct.pack(f">{n}H", *registers)
    swapped = struct.pack(f"<{n}H", *registers)
    return _Codec(tag, tag.address).decode(big, swapped)


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
        if dtype == "float32" and math.isfinite(raw) and abs(raw) > 3.4028234663852886e38:
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
    swapped, endian = _layout(tag.byte_order, tag.word_order)
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


class _Codec:
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
        self.swapped, self.endian = _layout(tag.byte_order, tag.word_order)
        dtype = tag.dtype
        self.fmt = NUMERIC[dtype][0] if dtype in NUMERIC else ""
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

    def rebase(self, block_start: int) -> _Codec:
        """The same codec for a block that starts elsewhere."""
        return _Codec(self.tag, block_start)

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


# ---- the request planner ------------------------------------------------------------------------


class _Group:
    """Numeric tags of one byte layout in a block, unpacked by one struct call."""

    __slots__ = ("names", "posts", "struct", "swapped")

    def __init__(self, fmt: str, swapped: bool, members: list[_Codec]) -> None:
        self.struct = struct.Struct(fmt)
        self.swapped = swapped
        self.names = [c.name for c in members]
        posts = [c.post for c in members]
        self.posts = posts if any(p is not None for p in posts) else None


@dataclass(slots=True)
class Block:
    """One read request: a table, a start address, a count, and the tags it carries."""

    table: str
    start: int
    count: int
    codecs: list[_Codec] = field(default_factory=list)
    ok: bool = True  # the last read of this block succeeded
    last: bytes | list[bool] | None = None  # the data of its last good read, decoded and given as readings
    _groups: list[_Group] | None = None
    _singles: list[_Codec] = field(default_factory=list)

    def compile(self) -> tuple[list[_Group], list[_Codec]]:
        """Numeric tags grouped by layout into one struct each, so a block decodes in a few C calls.

        Tags that overlap a group's previous tag, bits and strings are decoded one by one.
        """
        if self._groups is not None:
            return self._groups, self._singles
        groups: dict[tuple[bool, str], tuple[list[str], list[_Codec], list[int]]] = {}
        singles: list[_Codec] = []
        for codec in sorted(self.codecs, key=lambda c: c.offset):
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
        self._groups = [_Group("".join(f), swapped, m) for (swapped, _), (f, m, _) in groups.items()]
        self._singles = singles
        return self._groups, self._singles


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
            blocks.append(Block(table, start, end - start, [_Codec(t, start) for t in members]))

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


def plan(tags: Sequence[ModbusTag], conn: ModbusConnection) -> list[Block]:
    """Every table's blocks, in table order."""
    out: list[Block] = []
    for table in ("holding", "input", "coil", "discrete"):
        members = [t for t in tags if t.table == table]
        if not members:
            continue
        if table in BIT_TABLES:
            limit, gap = conn.max_bits_per_request, conn.max_gap
        else:
            limit, gap = conn.max_registers_per_request, min(conn.max_gap, conn.max_registers_per_request)
        out.extend(coalesce(table, members, gap, limit))
    return out


def _split(block: Block) -> tuple[Block, Block]:
    """Two blocks with the first and second half of a block's tags."""
    half = len(block.codecs) // 2

    def make(codecs: list[_Codec]) -> Block:
        start = min(c.start for c in codecs)
        end = max(c.end for c in codecs)
        return Block(block.table, start, end - start, [c.rebase(start) for c in codecs])

    return make(block.codecs[:half]), make(block.codecs[half:])


def _rejoin(parts: list[Block], limit: int) -> list[Block]:
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


# ---- the driver ---------------------------------------------------------------------------------


def _decode_raw(pdu: ReadHoldingRegistersResponse, data: bytes) -> None:
    """Keep the data bytes as they came (big-endian registers) and unpack the registers in one C call.

    pymodbus unpacks a response one register at a time; for 125 registers that is most of the
    client's CPU per request, and the driver decodes from the bytes anyway.
    """
    count = data[0]
    if count >= len(data):
        raise ModbusIOException(f"byte_count {count} > length of packet {len(data)}")
    raw = bytes(data[1 : 1 + count - count % 2])  # an odd count: whole registers only, as pymodbus does
    pdu.raw = raw  # type: ignore[attr-defined]
    pdu.registers = list(struct.unpack(f">{len(raw) // 2}H", raw))


class _RawHoldingResponse(ReadHoldingRegistersResponse):
    """A holding-register response that keeps its data bytes (registered on the driver's client only)."""

    decode = _decode_raw


class _RawInputResponse(ReadInputRegistersResponse):
    """An input-register response that keeps its data bytes (registered on the driver's client only)."""

    decode = _decode_raw


#: A poll's outcome for one block before decoding: its data, or a bad reading per tag it could not read.
_Part: TypeAlias = "Reading | tuple[Block, bytes | list[bool]]"


def _decode(parts: list[_Part], ts: Any) -> list[Event]:
    """The readings of a poll, in block order: bad readings as they are, blocks' data decoded."""
    out: list[Event] = []
    for part in parts:
        if isinstance(part, Reading):
            out.append(part)
            continue
        block, data = part
        if isinstance(data, list):
            base = block.start
            for codec in block.codecs:
                out.append(Reading(codec.name, bool(data[codec.start - base]), ts))
            continue
        big = data
        swapped = _swap_bytes(big)
        groups, singles = block.compile()
        for group in groups:
            values: Sequence[Any] = group.struct.unpack_from(swapped if group.swapped else big)
            if group.posts is not None:
                values = [v if p is None else p(v) for p, v in zip(group.posts, values, strict=True)]
            out.extend(map(Reading, group.names, values, repeat(ts)))
        for codec in singles:
            out.append(Reading(codec.name, codec.decode(big, swapped), ts))
    return out


def _swap_bytes(big: bytes) -> bytes:
    """The same registers with each register's two bytes swapped."""
    out = bytearray(len(big))
    out[0::2] = big[1::2]
    out[1::2] = big[0::2]
    return bytes(out)


class DeviceError(Exception):
    """The device answered a request with a Modbus exception response."""

    def __init__(self, code: int) -> None:
        super().__init__(f"{exception_name(code)} (exception code {code})")
        self.code = code


@register_driver
class ModbusDriver(PollingDriver):
    """Polls a Modbus TCP or RTU device; writes holding registers and coils."""

    name = "modbus"
    connection_model = ModbusConnection
    tag_model = ModbusTag
    command_model = CommandBase
    command_kinds = frozenset({"write"})

    def __init__(self, equipment: EquipmentConfig, context: DriverContext) -> None:
        super().__init__(equipment, context)
        self.conn: ModbusConnection = equipment.connection
        self.tags: list[ModbusTag] = list(equipment.tags)
        self.blocks: list[Block] = []  # planned at every connect
        self.requests = 0  # requests sent since the driver was made: benchmarks and tests read it
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None
        self._inflight = 0
        self._bad: dict[str, str] = {}  # tag -> why it is unreadable, to log transitions only
        eid = equipment.id
        self._m_reads = metrics.DRIVER_READS.labels(equipment_id=eid)
        self._m_values = metrics.DRIVER_VALUES.labels(equipment_id=eid)
        self._m_latency = metrics.DRIVER_LATENCY.labels(equipment_id=eid)
        self.log = self.log.bind(endpoint=self.conn.endpoint)

    # -- config hooks

    @classmethod
    def default_stale_after_s(cls, equipment: EquipmentConfig) -> float:
        """Three poll intervals."""
        return 3 * equipment.connection.poll_interval_ms / 1000.0

    @classmethod
    def check_equipment(cls, equipment: EquipmentConfig) -> list[tuple[tuple[str | int, ...], str]]:
        """Write commands must target a writable tag."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for j, cmd in enumerate(equipment.commands):
            if cmd.kind != "write":
                continue
            if cmd.tag is None:
                problems.append((("commands", j, "tag"), "a write command needs tag"))
                continue
            tag = equipment.tag(cmd.tag)
            if tag is not None and (why := tag.writable) is not None:
                problems.append((("commands", j, "tag"), why))
        return problems

    @classmethod
    def validate_command(
        cls, equipment: EquipmentConfig, command: CommandBase, params: dict[str, Any]
    ) -> dict[str, Any]:
        """`{value}` for a writable tag: numeric, within min/max, and fitting the tag's type."""
        if command.kind != "write":
            raise CommandError(f"command {command.name!r}: modbus has no {command.kind!r} commands", "bad_parameters")
        tag: ModbusTag | None = equipment.tag(command.tag) if command.tag else None
        if tag is None:
            raise CommandError(f"command {command.name!r} has no tag to write", "bad_parameters")
        if (why := tag.writable) is not None:
            raise CommandError(f"command {command.name!r}: {why}", "not_writable")
        checked = validate_write(equipment, command, params)
        value = checked["value"]
        if tag.table == "coil":
            if value not in (0, 1):
                why = f"coil {tag.name!r} takes true/false or 0/1, got {value!r}"
                raise CommandError(f"command {command.name!r}: {why}", "bad_parameters")
            return {"value": bool(value)}
        try:
            encode_registers(tag, value)
        except (ValueError, OverflowError, struct.error) as err:
            raise CommandError(f"command {command.name!r}: {err}", "out_of_range") from None
        return checked

    # -- lifecycle

    @property
    def poll_interval_s(self) -> float:
        return self.conn.poll_interval_ms / 1000.0

    async def connect(self) -> None:
        """Open the TCP connection or the serial port; raise ConnectionError when it fails."""
        await self.close()  # a re-entered driver starts from a fresh client
        conn = self.conn
        client: AsyncModbusTcpClient | AsyncModbusSerialClient
        # reconnect_delay=0: pymodbus must not reconnect on its own; the supervisor does, with backoff.
        common: dict[str, Any] = {
            "timeout": conn.timeout_s,
            "retries": conn.retries,
            "reconnect_delay": 0,
            "reconnect_delay_max": 0,
            "trace_connect": self._on_link,
        }
        if conn.transport == "tcp":
            client = AsyncModbusTcpClient(conn.host or "", port=conn.port, **common)
        else:
            client = AsyncModbusSerialClient(
                str(conn.serial_port),
                framer=FramerType.RTU,
                baudrate=conn.baudrate,
                parity=conn.parity,
                stopbits=conn.stopbits,
                bytesize=conn.bytesize,
                **common,
            )
        for response in (_RawHoldingResponse, _RawInputResponse):
            client.register(response)
        try:
            ok = await client.connect()
        except (OSError, ModbusException) as err:
            client.close()
            raise ConnectionError(f"cannot connect to Modbus device at {conn.endpoint}: {err}") from err
        if not ok or not client.connected:
            client.close()
            raise ConnectionError(f"cannot connect to Modbus device at {conn.endpoint}")
        self._client = client
        self.blocks = plan(self.tags, self.conn)
        self._bad.clear()
        self.log.info("connected", requests_per_poll=len(self.blocks))

    async def close(self) -> None:
        """Close the link; never raises."""
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception as err:  # closing a broken transport must not mask the reason we close
                self.log.debug("close_failed", error=str(err))

    def _on_link(self, up: bool) -> None:
        # pymodbus leaves a request in flight waiting for its timeout when the link drops; fail it now.
        if up or self._client is None or self._inflight == 0:
            return
        future = getattr(getattr(self._client, "ctx", None), "response_future", None)
        if isinstance(future, asyncio.Future) and not future.done():
            future.set_exception(ConnectionError(f"connection to {self.conn.endpoint} lost"))

    async def events(self) -> AsyncIterator[Event]:
        """Connected, then the polled readings until the link breaks."""
        yield ConnectionState(connected=True)
        async for event in super().events():
            yield event

    # -- requests

    async def _call(self, request: Callable[[], Awaitable[T]]) -> T:
        """Run one request; a lost link or a silent device raises ConnectionError."""
        client = self._client
        if client is None or not client.connected:
            raise ConnectionError(f"not connected to Modbus device at {self.conn.endpoint}")
        self._inflight += 1
        self.requests += 1
        try:
            return await request()
        except ModbusIOException as err:
            raise ConnectionError(
                f"no answer from Modbus device at {self.conn.endpoint} within {self.conn.timeout_s:g} s"
                f" ({self.conn.retries} retries)"
            ) from err
        except ConnectionException as err:
            raise ConnectionError(f"connection to Modbus device at {self.conn.endpoint} lost") from err
        finally:
            self._inflight -= 1

    async def _read(self, block: Block) -> bytes | list[bool]:
        """One block's raw data; DeviceError for an exception response."""
        client = self._client
        assert client is not None
        unit = self.conn.unit_id
        if block.table == "holding":
            fn = client.read_holding_registers
        elif block.table == "input":
            fn = client.read_input_registers
        elif block.table == "coil":
            fn = client.read_coils
        else:
            fn = client.read_discrete_inputs
        rr = await self._call(lambda: fn(block.start, count=block.count, device_id=unit))
        if rr.isError():
            code = int(getattr(rr, "exception_code", 0) or 0)
            if code in GATEWAY_CODES:
                raise ConnectionError(f"Modbus gateway at {self.conn.endpoint}: {exception_name(code)}")
            raise DeviceError(code)
        if block.table in BIT_TABLES:
            bits = list(rr.bits)
            if len(bits) < block.count:
                raise DeviceError(0)
            return bits
        big: bytes | None = getattr(rr, "raw", None)
        if big is None:  # a response class of pymodbus's own: pack its registers
            big = struct.pack(f">{len(rr.registers)}H", *rr.registers)
        if len(big) != 2 * block.count:
            raise DeviceError(0)
        return big

    async def read_once(self) -> list[Event]:
        """One poll of every block; a refused address costs only the tags at fault.

        Requests go out one at a time (each one consistent read). Report by exception: a block whose
        data is the same as at its last good read gives no readings; the poll ends with `Unchanged`,
        which tells the monitor those values are still current. The changed blocks are decoded after
        the last answer, in one pass with the cyclic collector paused: collecting every few hundred
        new readings (each collection promoting them all) cost more CPU than building them.
        """
        started = time.monotonic()
        ts = utcnow()
        parts: list[_Part] = []
        refined: list[Block] = []
        good = 0
        for block in self.blocks:
            good += await self._settle(block, await self._fetch(block), ts, parts, refined)
        self.blocks = refined
        paused = gc.isenabled()
        if paused:
            gc.disable()
        try:
            out = _decode(parts, ts)
        finally:
            if paused:
                gc.enable()
        out.append(Unchanged(ts))
        self._m_values.inc(good)
        self._m_latency.observe(time.monotonic() - started)
        return out

    async def _fetch(self, block: Block) -> bytes | list[bool] | DeviceError:
        """A block's data, or the device's exception response as a value."""
        try:
            return await self._read(block)
        except DeviceError as err:
            return err

    async def _settle(
        self,
        block: Block,
        result: bytes | list[bool] | DeviceError,
        ts: Any,
        out: list[_Part],
        refined: list[Block],
    ) -> int:
        """Queue a block's data for decoding in `out`, or split it on an address error; returns the good values."""
        if isinstance(result, DeviceError):
            err = result
            if err.code in SPLIT_CODES and len(block.codecs) > 1:
                self.log.info("block_split", table=block.table, start=block.start, count=block.count, code=err.code)
                parts: list[Block] = []
                good = 0
                for half in _split(block):
                    good += await self._settle(half, await self._fetch(half), ts, out, parts)
                bits = block.table in BIT_TABLES
                refined.extend(
                    _rejoin(parts, self.conn.max_bits_per_request if bits else self.conn.max_registers_per_request)
                )
                return good
            block.ok = False
            block.last = None
            refined.append(block)
            metrics.DRIVER_ERRORS.labels(equipment_id=self.equipment.id, kind="exception_response").inc()
            why = str(err) if err.code else "short response"
            for codec in block.codecs:
                if self._bad.get(codec.name) != why:
                    self.log.warning(
                        "tag_unreadable", tag=codec.name, table=block.table, address=codec.start, error=why
                    )
                    self._bad[codec.name] = why
                out.append(Reading(codec.name, None, ts, "bad"))
            return 0
        block.ok = True
        refined.append(block)
        self._m_reads.inc()
        if self._bad:
            for codec in block.codecs:
                if self._bad.pop(codec.name, None) is not None:
                    self.log.info("tag_readable", tag=codec.name)
        if result != block.last:
            block.last = result
            out.append((block, result))
        return len(block.codecs)

    # -- commands

    async def send_command(self, command: CommandBase, params: dict[str, Any]) -> CommandResult:
        """Write a holding-register tag or a coil; a device's exception response is a failed result."""
        tag: ModbusTag | None = self.equipment.tag(command.tag) if command.tag else None
        if tag is None or (why := tag.writable) is not None:
            raise CommandError(f"command {command.name!r}: {why if tag else 'no tag to write'}", "not_writable")
        client = self._client
        if client is None:
            raise ConnectionError(f"not connected to Modbus device at {self.conn.endpoint}")
        unit = self.conn.unit_id
        value = params["value"]
        data: dict[str, Any] = {"tag": tag.name, "value": value}
        if tag.table == "coil":
            rr = await self._call(lambda: client.write_coil(tag.address, bool(value), device_id=unit))
        else:
            try:
                regs = encode_registers(tag, value)
            except (ValueError, OverflowError, struct.error) as err:
                raise CommandError(f"command {command.name!r}: {err}", "out_of_range") from None
            data["registers"] = regs
            if len(regs) == 1:
                rr = await self._call(lambda: client.write_register(tag.address, regs[0], device_id=unit))
            else:
                rr = await self._call(lambda: client.write_registers(tag.address, regs, device_id=unit))
        if rr.isError():
            code = int(getattr(rr, "exception_code", 0) or 0)
            name = exception_name(code)
            self.log.warning("write_refused", command=command.name, tag=tag.name, code=code, exception=name)
            return CommandResult(
                False,
                f"device refused the write to {tag.name!r}: {name} (exception code {code})",
                {**data, "exception_code": code, "exception": name},
            )
        self.log.info("write_done", command=command.name, tag=tag.name)
        return CommandResult(True, f"wrote {value!r} to {tag.name!r}", data)


__all__ = [
    "Block",
    "ModbusConnection",
    "ModbusDriver",
    "ModbusTag",
    "coalesce",
    "decode_registers",
    "encode_registers",
    "exception_name",
    "plan",
    "shortest_float32",
]
