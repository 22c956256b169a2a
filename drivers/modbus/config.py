"""`[equipment.connection]` and tags of a Modbus device: the models and their cross-field checks."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from drivers.sdk import EquipmentConfig, Model, TagBase

Table = Literal["holding", "input", "coil", "discrete"]
DataType = Literal["int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "bool", "string"]
Order = Literal["big", "little"]

#: Protocol limits of one read request (Modbus application protocol v1.1b3, 6.1-6.4).
MAX_REGISTERS = 125
MAX_BITS = 2000
BIT_TABLES = frozenset({"coil", "discrete"})
WRITABLE_TABLES = frozenset({"holding", "coil"})

#: Registers every numeric type occupies (the codec knows how they are laid out).
REGISTERS: dict[str, int] = {
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "int64": 4,
    "uint64": 4,
    "float32": 2,
    "float64": 4,
}


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
        return REGISTERS[dtype]

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


def write_command_problems(equipment: EquipmentConfig) -> list[tuple[tuple[str | int, ...], str]]:
    """Write commands must target a writable tag: (path below the equipment, message) per offender."""
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
