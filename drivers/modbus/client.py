"""pymodbus, set up for the driver: the client and its settings, raw register responses, exception codes.

pymodbus is pinned to 3.16: its keywords change between minor versions.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU
from pymodbus.pdu.register_message import ReadHoldingRegistersResponse, ReadInputRegistersResponse

from drivers.modbus.config import BIT_TABLES, ModbusConnection

# pymodbus logs every failed attempt and timeout at warning/error level; the supervisor logs the
# transitions instead. An explicitly configured level (the lead's logging setup, debugging) is kept.
if logging.getLogger("pymodbus").level == logging.NOTSET:
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

Client = AsyncModbusTcpClient | AsyncModbusSerialClient

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


def exception_code(response: ModbusPDU) -> int:
    """The exception code of an error response (0 when it carries none)."""
    return int(getattr(response, "exception_code", 0) or 0)


class DeviceError(Exception):
    """The device answered a request with a Modbus exception response."""

    def __init__(self, code: int) -> None:
        super().__init__(f"{exception_name(code)} (exception code {code})")
        self.code = code


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


def make_client(conn: ModbusConnection, on_link: Callable[[bool], None]) -> Client:
    """A client for the connection (not yet connected); `on_link` hears the link go up and down."""
    client: Client
    # reconnect_delay=0: pymodbus must not reconnect on its own; the supervisor does, with backoff.
    common: dict[str, Any] = {
        "timeout": conn.timeout_s,
        "retries": conn.retries,
        "reconnect_delay": 0,
        "reconnect_delay_max": 0,
        "trace_connect": on_link,
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
    return client


def read_request(client: Client, table: str, start: int, count: int, unit: int) -> Callable[[], Awaitable[ModbusPDU]]:
    """The read of `count` registers (or bits) of `table` from `start`, ready to send."""
    if table == "holding":
        fn = client.read_holding_registers
    elif table == "input":
        fn = client.read_input_registers
    elif table == "coil":
        fn = client.read_coils
    else:
        fn = client.read_discrete_inputs
    return lambda: fn(start, count=count, device_id=unit)


def block_data(response: ModbusPDU, table: str, count: int, endpoint: str) -> bytes | list[bool]:
    """A read's data: the bits, or the registers' bytes high byte first.

    DeviceError for an exception response or a short answer; ConnectionError when a gateway says the
    device behind it is unreachable.
    """
    if response.isError():
        code = exception_code(response)
        if code in GATEWAY_CODES:
            raise ConnectionError(f"Modbus gateway at {endpoint}: {exception_name(code)}")
        raise DeviceError(code)
    if table in BIT_TABLES:
        bits = list(response.bits)
        if len(bits) < count:
            raise DeviceError(0)
        return bits
    big: bytes | None = getattr(response, "raw", None)
    if big is None:  # a response class of pymodbus's own: pack its registers
        big = struct.pack(f">{len(response.registers)}H", *response.registers)
    if len(big) != 2 * count:
        raise DeviceError(0)
    return big
