"""A simulated Modbus PLC: a pymodbus server (TCP, or RTU on a serial port) over a small machine model.

`SimServer` is a device with four tables whose values can be set and read directly (tests use it);
`PlcSimulator` adds a machine that cycles idle -> running (with a pause) -> idle, now and then
stopping in error, counting parts. Its register map (unit 1, 0-based addresses):

| table    | address | type              | meaning                                              |
|----------|---------|-------------------|------------------------------------------------------|
| holding  | 0       | uint16            | state: 0 idle, 1 running, 2 paused, 3 error          |
| holding  | 1       | uint16            | error code (0 = none)                                |
| holding  | 2-3     | uint32            | part counter                                         |
| holding  | 4       | uint16            | progress in per mille (scale 0.001 gives 0..1)       |
| holding  | 5-6     | uint32            | job number (0 while idle)                            |
| holding  | 8-15    | string, 8 regs    | process id, "PROC-001".."PROC-006" (empty when idle) |
| holding  | 16-17   | float32, ABCD     | spindle temperature, degC                            |
| holding  | 18-19   | float32, CDAB     | coolant temperature, degC (little word order)        |
| holding  | 20      | uint16, writable  | spindle speed setpoint, rpm                          |
| holding  | 21      | uint16 bits       | bit 0 door open, bit 1 coolant on                    |
| input    | 0       | uint16            | actual spindle speed, rpm                            |
| input    | 1-2     | float32           | power, kW                                            |
| coil     | 0       | bool, writable    | work light                                           |
| discrete | 0       | bool              | door closed                                          |

Holding registers 0..19 and 21 are read-only: a write there gets ILLEGAL_DATA_ADDRESS, as a real PLC
answers.

The simulator is the driver's independent oracle: it packs registers itself (`set_value`, `set_string`)
and never uses the driver's codec or planner.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers.modbus.config import ModbusConnection
from drivers.sdk import EquipmentConfig

log = structlog.get_logger("edge_agent.simulate")

TABLE_KEYS = {"coil": "c", "discrete": "d", "holding": "h", "input": "i"}
Range = tuple[int, int] | tuple[int, int, bool]


class SimServer:
    """One simulated Modbus device served over TCP or RTU; its tables are plain memory.

    `ranges` gives, per table, the valid (start, count[, readonly]) ranges; any other address answers
    ILLEGAL_DATA_ADDRESS. Values persist across `stop()` and a later `start_*()`, as a device's memory
    does across a restart. `requests` counts the requests received (every function code).
    """

    def __init__(self, ranges: dict[str, Sequence[Range]] | None = None, unit_id: int = 1) -> None:
        default: dict[str, Sequence[Range]] = {
            "holding": [(0, 2000)],
            "input": [(0, 2000)],
            "coil": [(0, 4000)],
            "discrete": [(0, 4000)],
        }
        self.ranges = {**default, **(ranges or {})}
        self.unit_id = unit_id
        self.requests = 0
        self.server: ModbusTcpServer | ModbusSerialServer | None = None
        self.port = 0
        self._saved: dict[str, list[int]] | None = None

    def _device(self) -> SimDevice:
        blocks: list[list[SimData]] = []
        for table in ("coil", "discrete", "holding", "input"):
            entries = []
            for r in sorted(self.ranges[table]):
                start, count = r[0], r[1]
                readonly = bool(r[2]) if len(r) > 2 else False  # type: ignore[misc]
                if table in ("coil", "discrete"):
                    data = SimData(start, count=count, values=False, datatype=DataType.BITS, readonly=readonly)
                else:
                    data = SimData(start, count=count, values=0, datatype=DataType.REGISTERS, readonly=readonly)
                entries.append(data)
            blocks.append(entries)
        return SimDevice(id=self.unit_id, simdata=(blocks[0], blocks[1], blocks[2], blocks[3]))

    def _trace(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            self.requests += 1
        return pdu

    def _restore(self) -> None:
        if self._saved is not None:
            for table, regs in self._saved.items():
                self._block(table)[2][:] = regs

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on host:port (0: a free port); returns the port."""
        server = ModbusTcpServer(self._device(), address=(host, port), trace_pdu=self._trace)
        self.server = server
        self._restore()
        await server.serve_forever(background=True)
        transport: Any = server.transport
        self.port = int(transport.sockets[0].getsockname()[1])
        return self.port

    async def start_rtu(self, serial_port: str, baudrate: int = 19200, parity: str = "N") -> None:
        """Serve RTU on a serial port (one end of a pty pair in tests)."""
        server = ModbusSerialServer(
            self._device(),
            framer=FramerType.RTU,
            port=serial_port,
            baudrate=baudrate,
            parity=parity,
            trace_pdu=self._trace,
        )
        self.server = server
        self._restore()
        await server.serve_forever(background=True)

    async def stop(self) -> None:
        """Stop serving (closing every client connection); memory is kept for the next start."""
        server, self.server = self.server, None
        if server is None:
            return
        self._saved = {t: list(self._block_of(server, t)[2]) for t in TABLE_KEYS}
        await server.shutdown()
        # A serial listener that lost its port schedules a re-listen that shutdown leaves behind.
        task = getattr(server, "reconnect_task", None)
        if isinstance(task, asyncio.Task) and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- memory

    @staticmethod
    def _block_of(server: ModbusTcpServer | ModbusSerialServer, table: str) -> tuple[int, int, list[int], list[int]]:
        # pymodbus 3.16 keeps a device's memory in SimRuntime.block: (start, count, registers, flags).
        core: Any = server.context
        return core.devices[next(iter(core.devices))].block[TABLE_KEYS[table]]  # type: ignore[no-any-return]

    def _block(self, table: str) -> tuple[int, int, list[int], list[int]]:
        if self.server is None:
            raise RuntimeError("the simulated device is not running")
        return self._block_of(self.server, table)

    def set_registers(self, table: str, address: int, registers: Sequence[int]) -> None:
        """Put raw 16-bit registers at an address of the holding or input table."""
        start, _, regs, _ = self._block(table)
        for i, value in enumerate(registers):
            regs[address - start + i] = value & 0xFFFF

    def get_registers(self, table: str, address: int, count: int) -> list[int]:
        """Raw registers at an address."""
        start, _, regs, _ = self._block(table)
        return list(regs[address - start : address - start + count])

    def set_bits(self, table: str, address: int, bits: Sequence[bool]) -> None:
        """Set coils or discrete inputs."""
        start, _, regs, _ = self._block(table)
        for i, bit in enumerate(bits):
            n = address + i
            idx = n // 16 - start
            if bit:
                regs[idx] |= 1 << (n % 16)
            else:
                regs[idx] &= ~(1 << (n % 16)) & 0xFFFF

    def get_bits(self, table: str, address: int, count: int) -> list[bool]:
        """Coils or discrete inputs."""
        start, _, regs, _ = self._block(table)
        return [bool((regs[(n // 16) - start] >> (n % 16)) & 1) for n in range(address, address + count)]

    def set_value(
        self, table: str, address: int, fmt: str, value: Any, byte_order: str = "big", word_order: str = "big"
    ) -> list[int]:
        """Store a value packed with a struct format (`f`, `I`, ...) in the given orders; returns the registers."""
        regs = list(struct.unpack(f">{struct.calcsize(fmt) // 2}H", struct.pack(">" + fmt, value)))
        if word_order == "little":
            regs.reverse()
        if byte_order == "little":
            regs = [((r & 0xFF) << 8) | (r >> 8) for r in regs]
        self.set_registers(table, address, regs)
        return regs

    def get_value(self, table: str, address: int, fmt: str, byte_order: str = "big", word_order: str = "big") -> Any:
        """The value at an address, the inverse of `set_value`."""
        regs = self.get_registers(table, address, struct.calcsize(fmt) // 2)
        if byte_order == "little":
            regs = [((r & 0xFF) << 8) | (r >> 8) for r in regs]
        if word_order == "little":
            regs.reverse()
        return struct.unpack(">" + fmt, struct.pack(f">{len(regs)}H", *regs))[0]

    def set_string(self, table: str, address: int, text: str, length: int) -> None:
        """ASCII text padded with NULs to `length` registers, high byte first."""
        raw = text.encode("ascii").ljust(2 * length, b"\x00")
        self.set_registers(table, address, list(struct.unpack(f">{length}H", raw)))


# ---- the PLC ------------------------------------------------------------------------------------

STATE_IDLE, STATE_RUNNING, STATE_PAUSED, STATE_ERROR = 0, 1, 2, 3
IDLE_S, RUN_S, PAUSE_AT_S, PAUSE_S, ERROR_S = 8.0, 40.0, 20.0, 5.0, 6.0
ERROR_EVERY = 3  # every third job ends in an error
ERROR_CODE = 17  # "spindle drive fault"


class PlcSimulator(SimServer):
    """A machine that cycles through jobs; its state is a function of time, written every tick."""

    def __init__(self, unit_id: int = 1, clock: Any = time.monotonic) -> None:
        super().__init__(
            {
                "holding": [(0, 20, True), (20, 1), (21, 1, True)],
                "input": [(0, 3, True)],
                "coil": [(0, 16)],
                "discrete": [(0, 16, True)],
            },
            unit_id,
        )
        self.clock = clock
        self.t0 = clock()
        self.spindle_temp = 24.0
        self.last_tick = self.t0

    def phase(self, t: float) -> tuple[int, int, float, int]:
        """(state, job number, progress 0..1, finished jobs) at `t` seconds since start."""
        cycle_s = IDLE_S + RUN_S + PAUSE_S + ERROR_S
        n = int(t // cycle_s)
        into = t - n * cycle_s
        job = 4711 + n + 1
        errs = (n + 1) % ERROR_EVERY == 0
        done = n - n // ERROR_EVERY  # jobs finished in earlier cycles; the failed ones do not count
        if into < IDLE_S:
            return STATE_IDLE, 0, 0.0, done
        into -= IDLE_S
        active = RUN_S + PAUSE_S
        if into < active:
            if PAUSE_AT_S <= into < PAUSE_AT_S + PAUSE_S:
                return STATE_PAUSED, job, PAUSE_AT_S / RUN_S, done
            ran = into if into < PAUSE_AT_S else into - PAUSE_S
            return STATE_RUNNING, job, min(1.0, ran / RUN_S), done
        # After the job: an error spell every ERROR_EVERY jobs, else idle until the next cycle.
        if errs:
            return STATE_ERROR, job, min(1.0, (RUN_S - 2) / RUN_S), done
        return STATE_IDLE, 0, 0.0, done + 1

    def tick(self) -> None:
        """Write the machine's state for now into the registers."""
        now = self.clock()
        dt = max(0.0, now - self.last_tick)
        self.last_tick = now
        state, job, progress, done = self.phase(now - self.t0)
        setpoint = self.get_registers("holding", 20, 1)[0]
        running = state == STATE_RUNNING
        # First-order approach to 84 degC while cutting, to ambient otherwise: crosses an 80 degC alert.
        target = 84.0 if running else 24.0
        self.spindle_temp += (target - self.spindle_temp) * (1 - math.exp(-dt / 8.0))
        coolant = 19.5 + (self.spindle_temp - 24.0) * 0.1
        self.set_registers("holding", 0, [state, ERROR_CODE if state == STATE_ERROR else 0])
        self.set_value("holding", 2, "I", done)
        self.set_registers("holding", 4, [round(progress * 1000)])
        self.set_value("holding", 5, "I", job)
        # The process ids the built-in MPM emulator knows, so the shipped demo links work to MPM.
        self.set_string("holding", 8, f"PROC-{(job - 4712) % 6 + 1:03d}" if job else "", 8)
        self.set_value("holding", 16, "f", round(self.spindle_temp, 2))
        self.set_value("holding", 18, "f", round(coolant, 2), word_order="little")
        door_open = state == STATE_IDLE
        self.set_registers("holding", 21, [(1 if door_open else 0) | (2 if running else 0)])
        self.set_registers("input", 0, [setpoint if running else 0])
        self.set_value("input", 1, "f", round(setpoint * 0.0009 if running else 0.2, 3))
        self.set_bits("discrete", 0, [not door_open])

    async def run(self, tick_s: float = 0.1) -> None:
        """Update the registers until cancelled."""
        self.set_registers("holding", 20, [12000])
        while True:
            self.tick()
            await asyncio.sleep(tick_s)


async def _pty_pair(device_end: Path, sim_end: Path) -> asyncio.subprocess.Process:
    """socat linking two ptys at the given paths; returns once both links exist."""
    socat = shutil.which("socat")
    if socat is None:
        raise RuntimeError("the Modbus RTU simulator needs socat (Debian package socat)")
    for link in (device_end, sim_end):
        link.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
    proc = await asyncio.create_subprocess_exec(
        socat,
        f"pty,raw,echo=0,link={device_end}",
        f"pty,raw,echo=0,link={sim_end}",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    for _ in range(300):
        if os.path.exists(device_end) and os.path.exists(sim_end):
            return proc
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()
    raise RuntimeError(f"socat did not create the pty pair at {device_end}")


async def simulate(equipment: EquipmentConfig, state_dir: Path) -> None:
    """Serve the PLC on the equipment's host and port (or, for RTU, on a pty linked at its serial_port)."""
    conn: ModbusConnection = equipment.connection
    plc = PlcSimulator(unit_id=conn.unit_id or 1)
    socat: asyncio.subprocess.Process | None = None
    try:
        if conn.transport == "tcp":
            await plc.start_tcp(conn.host or "127.0.0.1", conn.port)
            where = f"{conn.host}:{plc.port}"
        else:
            assert conn.serial_port is not None  # the connection model requires it for rtu
            device_end = Path(conn.serial_port)
            socat = await _pty_pair(device_end, state_dir / f"{equipment.id}.modbus-sim.tty")
            await plc.start_rtu(str(state_dir / f"{equipment.id}.modbus-sim.tty"), conn.baudrate, conn.parity)
            where = str(device_end)
        log.info("modbus_simulator_started", equipment_id=equipment.id, endpoint=where, unit_id=plc.unit_id)
        await plc.run()
    finally:
        await plc.stop()
        if socat is not None and socat.returncode is None:
            socat.terminate()
            await socat.wait()
