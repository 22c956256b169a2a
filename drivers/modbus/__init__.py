"""Modbus TCP and RTU: coalesced polling of holding/input registers, coils and discrete inputs.

`config` has the models, `codec` turns registers into values and back, `planner` coalesces tags into
requests, `client` sets up pymodbus, `driver` is the `ModbusDriver`; `sim` is the simulated PLC (see
README.md). The names the single-module driver exported stay importable from here.
"""

from __future__ import annotations

from drivers.modbus.client import EXCEPTION_NAMES, GATEWAY_CODES, SPLIT_CODES, DeviceError, exception_name
from drivers.modbus.codec import INT_RANGE, NUMERIC, decode_registers, encode_registers, shortest_float32
from drivers.modbus.config import (
    BIT_TABLES,
    MAX_BITS,
    MAX_REGISTERS,
    WRITABLE_TABLES,
    DataType,
    ModbusConnection,
    ModbusTag,
    Order,
    Table,
)
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.planner import Block, coalesce, plan

__all__ = [
    "BIT_TABLES",
    "EXCEPTION_NAMES",
    "GATEWAY_CODES",
    "INT_RANGE",
    "MAX_BITS",
    "MAX_REGISTERS",
    "NUMERIC",
    "SPLIT_CODES",
    "WRITABLE_TABLES",
    "Block",
    "DataType",
    "DeviceError",
    "ModbusConnection",
    "ModbusDriver",
    "ModbusTag",
    "Order",
    "Table",
    "coalesce",
    "decode_registers",
    "encode_registers",
    "exception_name",
    "plan",
    "shortest_float32",
]
