"""`edge-agent scan modbus`: which addresses of a device's tables answer, with their raw values.

Each table is read in blocks; a block the device refuses (ILLEGAL_DATA_ADDRESS and the like) is halved
until single addresses are left, so the result is exactly the addresses the device serves, for a few
requests more than the served ranges need. The CLI reaches this module through the registry by name.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from drivers.modbus.client import DeviceError, block_data, make_client, read_request
from drivers.modbus.config import BIT_TABLES, MAX_BITS, MAX_REGISTERS, ModbusConnection

#: Block sizes of the first reads: well under the protocol limits, which some devices do not reach.
BLOCK = {"holding": 100, "input": 100, "coil": 1000, "discrete": 1000}


@dataclass(frozen=True)
class Found:
    """One address that answered, with its raw value (a register as an unsigned 16-bit int, or a bit)."""

    table: str
    address: int
    value: int | bool


def connection_for(
    target: str, unit: int, timeout: float, baudrate: int = 19200, parity: str = "N"
) -> ModbusConnection:
    """TCP for HOST[:PORT], RTU for a serial device path (one that starts with /)."""
    if target.startswith("/"):
        return ModbusConnection.model_validate(
            {
                "transport": "rtu",
                "serial_port": Path(target),
                "unit_id": unit,
                "timeout_s": timeout,
                "baudrate": baudrate,
                "parity": parity,
                "retries": 0,
            }
        )
    host, _, port = target.rpartition(":") if target.count(":") == 1 else (target, "", "")
    return ModbusConnection.model_validate(
        {
            "transport": "tcp",
            "host": host or target,
            "port": int(port) if port else 502,
            "unit_id": unit,
            "timeout_s": timeout,
            "retries": 0,
        }
    )


async def scan(conn: ModbusConnection, tables: list[str], first: int, last: int) -> list[Found]:
    """Every address in `first..last` of each table that answers a read."""
    client = make_client(conn, lambda up: None)
    if not await client.connect():
        raise ConnectionError(f"cannot connect to {conn.endpoint}")
    found: list[Found] = []
    try:
        for table in tables:
            limit = MAX_BITS if table in BIT_TABLES else MAX_REGISTERS
            size = min(BLOCK[table], limit)
            for start in range(first, last + 1, size):
                await _probe(client, conn, table, start, min(size, last + 1 - start), found)
    finally:
        client.close()
    return found


async def _probe(client: object, conn: ModbusConnection, table: str, start: int, count: int, out: list[Found]) -> None:
    try:
        response = await read_request(client, table, start, count, conn.unit_id)()  # type: ignore[arg-type]
        data = block_data(response, table, count, conn.endpoint)
    except DeviceError:
        if count > 1:
            half = count // 2
            await _probe(client, conn, table, start, half, out)
            await _probe(client, conn, table, start + half, count - half, out)
        return
    if isinstance(data, list):
        out.extend(Found(table, start + i, bool(b)) for i, b in enumerate(data[:count]))
    else:
        values = struct.unpack(f">{count}H", data)
        out.extend(Found(table, start + i, v) for i, v in enumerate(values))


def ranges(found: list[Found]) -> list[tuple[str, int, int]]:
    """The answering addresses as (table, first, last) runs."""
    runs: list[tuple[str, int, int]] = []
    for f in found:
        if runs and runs[-1][0] == f.table and runs[-1][2] == f.address - 1:
            runs[-1] = (f.table, runs[-1][1], f.address)
        else:
            runs.append((f.table, f.address, f.address))
    return runs


def stanzas(found: list[Found]) -> str:
    """`[[equipment.tags]]` for every answering address (registers as uint16; combine them as needed)."""
    short = {"holding": "hr", "input": "ir", "coil": "coil", "discrete": "di"}
    out = []
    for f in found:
        typ = "" if f.table in BIT_TABLES else 'type = "uint16"\n'
        raw = str(f.value).lower() if isinstance(f.value, bool) else f"{f.value} (0x{f.value:04x})"
        out.append(
            f'[[equipment.tags]]\nname = "{short[f.table]}_{f.address}"\ntable = "{f.table}"\n'
            f"address = {f.address}  # raw {raw}\n{typ}"
        )
    return "\n".join(out)
