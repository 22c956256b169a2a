"""The Modbus TCP and RTU driver: coalesced polling of holding/input registers, coils and discrete inputs,
reported by exception; writes of holding registers and coils."""

from __future__ import annotations

import asyncio
import gc
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any, TypeAlias, TypeVar

from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from drivers.modbus.client import (
    SPLIT_CODES,
    Client,
    DeviceError,
    block_data,
    exception_code,
    exception_name,
    make_client,
    read_request,
)
from drivers.modbus.codec import encode_registers
from drivers.modbus.config import ModbusConnection, ModbusTag, write_command_problems
from drivers.modbus.planner import Block, plan, rejoin, request_limit, split
from drivers.sdk import (
    CommandBase,
    CommandError,
    CommandResult,
    ConnectionState,
    DriverContext,
    EquipmentConfig,
    Event,
    PollingDriver,
    Reading,
    Unchanged,
    register_driver,
    utcnow,
    validate_write,
)

T = TypeVar("T")

#: A poll's outcome for one block before decoding: its data, or a bad reading per tag it could not read.
_Part: TypeAlias = "Reading | tuple[Block, bytes | list[bool]]"


def _decode(parts: list[_Part], ts: datetime) -> list[Event]:
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
        block.compile().decode_into(data, ts, out)
    return out


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
        self._client: Client | None = None
        self._inflight = 0
        self._bad: dict[str, str] = {}  # tag -> why it is unreadable, to log transitions only
        self.log = self.log.bind(endpoint=self.conn.endpoint)

    # -- config hooks

    @classmethod
    def default_stale_after_s(cls, equipment: EquipmentConfig) -> float:
        """Three poll intervals."""
        return 3 * equipment.connection.poll_interval_ms / 1000.0

    @classmethod
    def check_equipment(cls, equipment: EquipmentConfig) -> list[tuple[tuple[str | int, ...], str]]:
        """Write commands must target a writable tag."""
        return write_command_problems(equipment)

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
        _registers_for(command, tag, value)
        return checked

    # -- lifecycle

    @property
    def poll_interval_s(self) -> float:
        return self.conn.poll_interval_ms / 1000.0

    async def connect(self) -> None:
        """Open the TCP connection or the serial port; raise ConnectionError when it fails."""
        await self.close()  # a re-entered driver starts from a fresh client
        conn = self.conn
        client = make_client(conn, self._on_link)
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

    def _connected(self) -> Client:
        client = self._client
        if client is None or not client.connected:
            raise ConnectionError(f"not connected to Modbus device at {self.conn.endpoint}")
        return client

    async def _call(self, request: Callable[[], Awaitable[T]]) -> T:
        """Run one request; a lost link or a silent device raises ConnectionError."""
        self._connected()
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

    async def _fetch(self, block: Block) -> bytes | list[bool] | DeviceError:
        """A block's data, or the device's exception response as a value."""
        client = self._connected()
        request = read_request(client, block.table, block.start, block.count, self.conn.unit_id)
        response = await self._call(request)
        try:
            return block_data(response, block.table, block.count, self.conn.endpoint)
        except DeviceError as err:
            return err

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
        reads: list[int] = []  # the values of every good read
        for block in self.blocks:
            await self._settle(block, await self._fetch(block), ts, parts, refined, reads)
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
        # The values and the duration of the whole poll.
        self.metrics.values(sum(reads))
        self.metrics.request(time.monotonic() - started)
        return out

    async def _settle(
        self,
        block: Block,
        result: bytes | list[bool] | DeviceError,
        ts: datetime,
        out: list[_Part],
        refined: list[Block],
        reads: list[int],
    ) -> None:
        """Queue a block's data for decoding in `out` (its value count in `reads`), or split it on an
        address error."""
        if isinstance(result, DeviceError):
            err = result
            if err.code in SPLIT_CODES and len(block.codecs) > 1:
                self.log.info("block_split", table=block.table, start=block.start, count=block.count, code=err.code)
                parts: list[Block] = []
                for half in split(block):
                    await self._settle(half, await self._fetch(half), ts, out, parts, reads)
                refined.extend(rejoin(parts, request_limit(block.table, self.conn)))
                return
            block.ok = False
            block.last = None
            refined.append(block)
            self.metrics.error("exception_response")
            why = str(err) if err.code else "short response"
            for codec in block.codecs:
                if self._bad.get(codec.name) != why:
                    self.log.warning(
                        "tag_unreadable", tag=codec.name, table=block.table, address=codec.start, error=why
                    )
                    self._bad[codec.name] = why
                out.append(Reading(codec.name, None, ts, "bad"))
            return
        block.ok = True
        refined.append(block)
        reads.append(len(block.codecs))
        self.metrics.read()  # one read per good request, counted as it arrives
        if self._bad:
            for codec in block.codecs:
                if self._bad.pop(codec.name, None) is not None:
                    self.log.info("tag_readable", tag=codec.name)
        if result != block.last:
            block.last = result
            out.append((block, result))

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
            regs = _registers_for(command, tag, value)
            data["registers"] = regs
            if len(regs) == 1:
                rr = await self._call(lambda: client.write_register(tag.address, regs[0], device_id=unit))
            else:
                rr = await self._call(lambda: client.write_registers(tag.address, regs, device_id=unit))
        if rr.isError():
            code = exception_code(rr)
            name = exception_name(code)
            self.log.warning("write_refused", command=command.name, tag=tag.name, code=code, exception=name)
            return CommandResult(
                False,
                f"device refused the write to {tag.name!r}: {name} (exception code {code})",
                {**data, "exception_code": code, "exception": name},
            )
        self.log.info("write_done", command=command.name, tag=tag.name)
        return CommandResult(True, f"wrote {value!r} to {tag.name!r}", data)


def _registers_for(command: CommandBase, tag: ModbusTag, value: Any) -> list[int]:
    """The registers a write of `value` to `tag` sends; CommandError (out_of_range) when it does not fit."""
    try:
        return encode_registers(tag, value)
    except (ValueError, OverflowError, struct.error) as err:
        raise CommandError(f"command {command.name!r}: {err}", "out_of_range") from None
