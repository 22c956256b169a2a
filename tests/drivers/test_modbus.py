"""Modbus driver against a real pymodbus server: types and orders, coalescing, faults, commands."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import EquipmentConfig, parse_config
from agent.errors import CommandError, ConfigError
from agent.model import ConnectionState, Reading, Unchanged
from drivers.base import DriverContext
from drivers.modbus import (
    MAX_REGISTERS,
    ModbusDriver,
    ModbusTag,
    coalesce,
    decode_registers,
    encode_registers,
    shortest_float32,
)
from drivers.modbus.sim import PlcSimulator, SimServer
from peers import GUARD_S, AsyncSocatPair

# ---- harness ------------------------------------------------------------------------------------


def toml_value(v: Any) -> str:
    """A Python value as TOML (enough for these configs)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def config_text(
    connection: dict[str, Any],
    tags: list[dict[str, Any]],
    commands: list[dict[str, Any]] | None = None,
) -> str:
    lines = [
        "[agent]",
        'id = "test"',
        'site = "lab"',
        'state_dir = "state"',
        "",
        "[[equipment]]",
        'id = "plc-1"',
        'type = "plc"',
        'driver = "modbus"',
        "[equipment.connection]",
    ]
    lines += [f"{k} = {toml_value(v)}" for k, v in connection.items()]
    for tag in tags:
        lines += ["[[equipment.tags]]"] + [f"{k} = {toml_value(v)}" for k, v in tag.items()]
    for cmd in commands or []:
        lines += ["[[equipment.commands]]"] + [f"{k} = {toml_value(v)}" for k, v in cmd.items()]
    return "\n".join(lines) + "\n"


def make_equipment(
    tmp_path: Path,
    connection: dict[str, Any],
    tags: list[dict[str, Any]],
    commands: list[dict[str, Any]] | None = None,
) -> EquipmentConfig:
    """A validated equipment config, as the daemon would get it from agent.toml."""
    cfg = parse_config(config_text(connection, tags, commands), tmp_path / "agent.toml")
    return cfg.equipment[0]


def tcp(port: int, **extra: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": port, "poll_interval_ms": 100, "timeout_s": 2.0, **extra}


async def polls(driver: ModbusDriver, count: int = 1) -> list[dict[str, Reading]]:
    """Iterate `driver.events()` until `count` complete polls have arrived: every tag's current reading.

    Readings come by exception: a poll gives the changed blocks' readings, then `Unchanged`; a tag
    not read anew keeps its previous reading.
    """
    names = {t.name for t in driver.tags}
    out: list[dict[str, Reading]] = []
    current: dict[str, Reading] = {}
    events = driver.events()
    first = True
    try:
        async with asyncio.timeout(GUARD_S):
            async for ev in events:
                if first:
                    assert ev == ConnectionState(connected=True)
                    first = False
                    continue
                if isinstance(ev, Unchanged):
                    if len(current) == len(names):
                        out.append(dict(current))
                        if len(out) >= count:
                            break
                    continue
                assert isinstance(ev, Reading)
                current[ev.tag] = ev
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    return out


async def read_into(driver: ModbusDriver, current: dict[str, Reading]) -> dict[str, Reading]:
    """One `read_once()`, its readings merged into `current` (the values as the monitor holds them)."""
    events = await driver.read_once()
    assert isinstance(events[-1], Unchanged)
    for ev in events[:-1]:
        assert isinstance(ev, Reading)
        current[ev.tag] = ev
    return current


async def one_poll(eq: EquipmentConfig, tmp_path: Path) -> dict[str, Reading]:
    """Connect, take one poll through `events()`, close."""
    async with ModbusDriver(eq, DriverContext(tmp_path)) as d:
        assert isinstance(d, ModbusDriver)
        return (await polls(d))[0]


def same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN and ints kept ints."""
    if isinstance(b, float) and math.isnan(b):
        return isinstance(a, float) and math.isnan(a)
    return type(a) is type(b) and a == b


@pytest.fixture(autouse=True)
async def no_leftover_tasks() -> AsyncIterator[None]:
    """A test must leave no task of its own running."""
    before = asyncio.all_tasks()
    yield
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GUARD_S
    while True:
        left = [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task() and not t.done()]
        if not left or loop.time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert not left, f"tasks left running: {left}"


@pytest.fixture
async def server() -> AsyncIterator[SimServer]:
    sim = SimServer()
    await sim.start_tcp()
    yield sim
    await sim.stop()


# ---- types and orders ---------------------------------------------------------------------------

F32_MAX = struct.unpack(">f", bytes.fromhex("7f7fffff"))[0]
VALUES: dict[str, list[Any]] = {
    "int16": [0, 1, -1, 12345, -(2**15), 2**15 - 1],
    "uint16": [0, 1, 54321, 2**16 - 1],
    "int32": [0, -1, 123456789, -(2**31), 2**31 - 1],
    "uint32": [0, 4_000_000_000, 2**32 - 1],
    "int64": [0, -1, -(2**63), 2**63 - 1, 1234567890123456789],
    "uint64": [0, 2**64 - 1, 2**63, 9_007_199_254_740_993],  # 2**53 + 1: exact, unlike a float
    "float32": [0.0, -1.5, 24.35, -273.15, F32_MAX, 1e-38, math.nan, math.inf, -math.inf],
    "float64": [0.0, -1.5, math.pi, -2.5e-300, 1.7976931348623157e308, math.nan, math.inf, -math.inf],
}
FORMATS = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "int64": "q",
    "uint64": "Q",
    "float32": "f",
    "float64": "d",
}
ORDERS = [("big", "big"), ("big", "little"), ("little", "big"), ("little", "little")]


def typed_cases() -> list[tuple[str, str, Any, str, str]]:
    """(tag name, type, value, byte_order, word_order) for every type, value and order."""
    cases = []
    for dtype, values in VALUES.items():
        for bo, wo in ORDERS:
            for i, v in enumerate(values):
                cases.append((f"{dtype}_{bo[0]}{wo[0]}_{i}", dtype, v, bo, wo))
    return cases


def expected_value(dtype: str, v: Any) -> Any:
    """What the driver reports for a value the device holds: float32 as its shortest decimal."""
    if dtype == "float32" and isinstance(v, float):
        return shortest_float32(struct.unpack(">f", struct.pack(">f", v))[0])
    return v


def load_typed(sim: SimServer, table: str = "holding") -> list[dict[str, Any]]:
    """Store every typed case in the server; returns the tag definitions."""
    tags = []
    addr = 0
    for name, dtype, value, bo, wo in typed_cases():
        fmt = FORMATS[dtype]
        sim.set_value(table, addr, fmt, value, byte_order=bo, word_order=wo)
        tags.append(
            {"name": name, "table": table, "address": addr, "type": dtype, "byte_order": bo, "word_order": wo}
        )
        addr += struct.calcsize(fmt) // 2
    return tags


async def test_every_type_and_order_decodes_to_the_value_held(server: SimServer, tmp_path: Path) -> None:
    tags = load_typed(server)
    eq = make_equipment(tmp_path, tcp(server.port), tags)
    got = await one_poll(eq, tmp_path)
    cases = typed_cases()
    assert len(got) == len(cases)
    for name, dtype, value, bo, wo in cases:
        r = got[name]
        assert r.quality == "good", name
        assert same(r.value, expected_value(dtype, value)), (name, dtype, bo, wo, r.value, value)


async def test_input_registers_decode_too(tmp_path: Path) -> None:
    sim = SimServer({"input": [(0, 2000)]})
    await sim.start_tcp()
    try:
        tags = load_typed(sim, "input")
        got = await one_poll(make_equipment(tmp_path, tcp(sim.port), tags), tmp_path)
    finally:
        await sim.stop()
    for name, dtype, value, *_ in typed_cases():
        assert same(got[name].value, expected_value(dtype, value)), name


async def test_strings_bits_coils_and_scaling(server: SimServer, tmp_path: Path) -> None:
    server.set_string("holding", 0, "PART-7/A", 6)  # 12 characters of room, NUL-padded
    # The same text with each register's bytes swapped, and with the words reversed.
    raw = b"JOB-42".ljust(6, b"\x00")
    server.set_registers("holding", 10, [int.from_bytes(raw[i : i + 2][::-1], "big") for i in range(0, 6, 2)])
    server.set_registers("holding", 20, [int.from_bytes(raw[i : i + 2], "big") for i in (4, 2, 0)])
    server.set_registers("holding", 30, [0b1000_0000_0000_0101])
    server.set_registers("holding", 31, [0x0100])  # bit 0 set when the register's bytes are swapped
    server.set_registers("holding", 40, [1234])
    server.set_value("holding", 41, "h", -500)
    server.set_value("holding", 42, "i", 100000)
    server.set_bits("coil", 3, [True, False, True])
    server.set_bits("discrete", 1998, [True])
    tags = [
        {"name": "part", "address": 0, "type": "string", "length": 6},
        {"name": "job_swapped", "address": 10, "type": "string", "length": 3, "byte_order": "little"},
        {"name": "job_words", "address": 20, "type": "string", "length": 3, "word_order": "little"},
        {"name": "b0", "address": 30, "bit": 0},
        {"name": "b1", "address": 30, "bit": 1},
        {"name": "b2", "address": 30, "bit": 2, "type": "bool"},
        {"name": "b15", "address": 30, "bit": 15},
        {"name": "b0_swapped", "address": 31, "bit": 0, "byte_order": "little"},
        {"name": "scaled", "address": 40, "scale": 0.1, "offset": -10.0},
        {"name": "temp_x10", "address": 41, "type": "int16", "scale": 0.1},
        {"name": "counter", "address": 42, "type": "int32"},
        {"name": "c3", "table": "coil", "address": 3},
        {"name": "c4", "table": "coil", "address": 4},
        {"name": "c5", "table": "coil", "address": 5, "type": "bool"},
        {"name": "d1998", "table": "discrete", "address": 1998},
        {"name": "d0", "table": "discrete", "address": 0},
    ]
    got = await one_poll(make_equipment(tmp_path, tcp(server.port), tags), tmp_path)
    values = {k: r.value for k, r in got.items()}
    assert values["part"] == "PART-7/A"
    assert values["job_swapped"] == "JOB-42"
    assert values["job_words"] == "JOB-42"
    assert (values["b0"], values["b1"], values["b2"], values["b15"]) == (True, False, True, True)
    assert values["b0_swapped"] is True
    assert values["scaled"] == pytest.approx(1234 * 0.1 - 10.0)
    assert values["temp_x10"] == pytest.approx(-50.0)
    assert values["counter"] == 100000 and type(values["counter"]) is int
    assert (values["c3"], values["c4"], values["c5"]) == (True, False, True)
    assert (values["d1998"], values["d0"]) == (True, False)
    assert all(r.quality == "good" for r in got.values())
    assert len({r.ts for r in got.values()}) == 1  # one poll, one timestamp


@pytest.mark.parametrize(("dtype", "bo", "wo"), [(t, b, w) for t in FORMATS for b, w in ORDERS])
def test_codec_round_trip_matches_an_independent_layout(dtype: str, bo: str, wo: str) -> None:
    sim = SimServer()
    fmt = FORMATS[dtype]
    for value in VALUES[dtype]:
        tag = ModbusTag.model_validate({"name": "t", "address": 0, "type": dtype, "byte_order": bo, "word_order": wo})
        if isinstance(value, float) and not math.isfinite(value):
            continue  # writes take finite values only
        regs = encode_registers(tag, value)
        # The layout the simulator computes on its own, from struct and the orders' definitions.
        expect = list(struct.unpack(f">{struct.calcsize(fmt) // 2}H", struct.pack(">" + fmt, value)))
        if wo == "little":
            expect.reverse()
        if bo == "little":
            expect = [((r & 0xFF) << 8) | (r >> 8) for r in expect]
        assert regs == expect, (dtype, value)
        assert same(decode_registers(tag, regs), expected_value(dtype, value))
    del sim


# ---- coalescing ---------------------------------------------------------------------------------

SIZES = {"uint16": 1, "int16": 1, "int32": 2, "float32": 2, "float64": 4, "uint64": 4}


def realistic_map(seed: int = 7) -> list[dict[str, Any]]:
    """300 tags over about 1,000 registers, with gaps of every width around the gap rule."""
    rng = random.Random(seed)
    tags = []
    addr = 0
    gaps = [1, 2, 4, 8, 15, 16, 17, 20, 30]
    types = ["uint16", "uint16", "int16", "int32", "float32", "float32", "float64", "uint64"]
    for i in range(300):
        dtype = rng.choice(types)
        tags.append({"name": f"t{i}", "address": addr, "type": dtype})
        addr += SIZES[dtype] + (0 if rng.random() < 0.9 else rng.choice(gaps))
    return tags


def minimum_requests(spans: list[tuple[int, int]], max_gap: int, limit: int) -> int:
    """The fewest requests under the gap rule, by dynamic programming over contiguous runs."""
    spans = sorted(spans)
    best = [0] + [10**9] * len(spans)
    for i in range(1, len(spans) + 1):
        for j in range(i - 1, -1, -1):
            run = spans[j:i]
            if run[-1][1] - run[0][0] > limit:
                break
            if all(b[0] - a[1] <= max_gap for a, b in itertools.pairwise(run)):
                best[i] = min(best[i], best[j] + 1)
    return best[-1]


async def test_coalescing_sends_the_minimum_number_of_requests(tmp_path: Path) -> None:
    tags = realistic_map()
    end = max(t["address"] + SIZES[t["type"]] for t in tags)
    assert 900 <= end <= 1300
    sim = SimServer({"holding": [(0, end + 10)]})
    await sim.start_tcp()
    try:
        for t in tags:
            sim.set_value("holding", t["address"], FORMATS[t["type"]], t["address"] % 1000)
        eq = make_equipment(tmp_path, tcp(sim.port, max_gap=16), tags)
        spans = [(t["address"], t["address"] + SIZES[t["type"]]) for t in tags]
        want = minimum_requests(spans, 16, MAX_REGISTERS)
        async with ModbusDriver(eq, DriverContext(tmp_path)) as d:
            assert isinstance(d, ModbusDriver)
            counts = []
            current: dict[str, Reading] = {}
            for _ in range(3):
                before = sim.requests
                await read_into(d, current)
                counts.append(sim.requests - before)
            assert all(r.quality == "good" for r in current.values())
            got = {tag: r.value for tag, r in current.items()}
            for t in tags:
                assert got[t["name"]] == t["address"] % 1000, t
        assert counts == [want] * 3, (counts, want)
        assert 10 < want < 300  # the map really exercises both the gap rule and the 125 limit
        assert all(b.count <= MAX_REGISTERS for b in d.blocks)
    finally:
        await sim.stop()


def test_coalesce_limits_and_gap_rule() -> None:
    def tag(addr: int, **kw: Any) -> ModbusTag:
        return ModbusTag.model_validate({"name": f"t{addr}", "address": addr, **kw})

    # A gap of exactly max_gap is read through; one more is not.
    blocks = coalesce("holding", [tag(0), tag(17), tag(35)], 16, 125)
    assert [(b.start, b.count) for b in blocks] == [(0, 18), (35, 1)]
    # 125 registers at most, and a 32-bit value never straddles two requests.
    many = [tag(a, type="uint32") for a in range(0, 400, 2)]
    blocks = coalesce("holding", many, 16, 125)
    assert all(b.count <= 125 for b in blocks)
    assert [b.count for b in blocks] == [124, 124, 124, 28]
    # Coils: up to 2,000 bits per request.
    coils = [tag(a, table="coil") for a in range(0, 5000, 10)]
    blocks = coalesce("coil", coils, 16, 2000)
    assert all(b.count <= 2000 for b in blocks) and len(blocks) == 3


async def test_readings_by_exception_block_by_block(tmp_path: Path) -> None:
    # Two blocks of holding registers (0..9 and 100..109) and one of coils.
    sim = SimServer({"holding": [(0, 200)], "coil": [(0, 16)]})
    await sim.start_tcp()
    try:
        for a in list(range(10)) + list(range(100, 110)):
            sim.set_registers("holding", a, [a + 1])
        tags = [{"name": f"r{a}", "address": a} for a in list(range(10)) + list(range(100, 110))]
        tags += [{"name": f"c{a}", "table": "coil", "address": a} for a in range(4)]
        eq = make_equipment(tmp_path, tcp(sim.port), tags)
        async with ModbusDriver(eq, DriverContext(tmp_path)) as d:
            assert isinstance(d, ModbusDriver)
            first = await d.read_once()
            assert len(first) == len(tags) + 1 and isinstance(first[-1], Unchanged)
            # Nothing changed: the same requests go out, no readings come back, only the confirmation.
            before = sim.requests
            assert [type(e) for e in await d.read_once()] == [Unchanged]
            assert sim.requests - before == 3
            # One register changes: its block's readings, the others stay quiet.
            sim.set_registers("holding", 104, [999])
            changed = {e.tag: e.value for e in await d.read_once() if isinstance(e, Reading)}
            assert changed == {f"r{a}": (999 if a == 104 else a + 1) for a in range(100, 110)}
            sim.set_bits("coil", 2, [True])
            assert {e.tag for e in await d.read_once() if isinstance(e, Reading)} == {f"c{a}" for a in range(4)}
            assert [type(e) for e in await d.read_once()] == [Unchanged]
        # A new connection starts from nothing: every tag again.
        async with ModbusDriver(eq, DriverContext(tmp_path)) as d:
            assert isinstance(d, ModbusDriver)
            again = {e.tag: e.value for e in await d.read_once() if isinstance(e, Reading)}
            assert len(again) == len(tags) and again["r104"] == 999 and again["c2"] is True
    finally:
        await sim.stop()


# ---- refused addresses --------------------------------------------------------------------------


async def test_an_illegal_address_costs_only_its_own_tag(tmp_path: Path) -> None:
    # Register 10 does not exist on this device; 0..9 and 11..40 do.
    sim = SimServer({"holding": [(0, 10), (11, 30)]})
    await sim.start_tcp()
    try:
        for a in list(range(10)) + list(range(11, 41)):
            sim.set_registers("holding", a, [a * 3])
        tags = [{"name": f"r{a}", "address": a} for a in range(0, 41)]
        eq = make_equipment(tmp_path, tcp(sim.port), tags)
        async with ModbusDriver(eq, DriverContext(tmp_path)) as d:
            assert isinstance(d, ModbusDriver)
            first = (await polls(d))[0]
            before = sim.requests
            second = await read_into(d, dict(first))
            steady = sim.requests - before
        for got in (first, second):
            assert got["r10"].quality == "bad" and got["r10"].value is None
            for a in list(range(10)) + list(range(11, 41)):
                assert got[f"r{a}"].quality == "good" and got[f"r{a}"].value == a * 3, a
        # Once split: the block left of the hole, the bad tag alone, the block right of it.
        assert steady == 3
    finally:
        await sim.stop()


async def test_a_hole_in_a_gap_is_read_around(tmp_path: Path) -> None:
    # Tags at 0 and 12 are coalesced across a gap whose register 5 does not exist.
    sim = SimServer({"holding": [(0, 5), (6, 10)]})
    await sim.start_tcp()
    try:
        sim.set_registers("holding", 0, [7])
        sim.set_registers("holding", 12, [9])
        eq = make_equipment(tmp_path, tcp(sim.port), [{"name": "a", "address": 0}, {"name": "b", "address": 12}])
        got = await one_poll(eq, tmp_path)
        assert (got["a"].value, got["b"].value) == (7, 9)
        assert all(r.quality == "good" for r in got.values())
    finally:
        await sim.stop()


# ---- link faults --------------------------------------------------------------------------------


async def reconnect(driver: ModbusDriver) -> None:
    """Re-enter the driver's context until it connects, as the supervisor does (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GUARD_S
    while True:
        try:
            await driver.__aenter__()
            return
        except ConnectionError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_device_stopped_and_restarted(tmp_path: Path) -> None:
    sim = SimServer()
    port = await sim.start_tcp()
    sim.set_registers("holding", 0, [42])
    eq = make_equipment(tmp_path, tcp(port), [{"name": "v", "address": 0}])
    driver = ModbusDriver(eq, DriverContext(tmp_path))
    try:
        async with driver:
            assert (await polls(driver))[0]["v"].value == 42
            await sim.stop()
            with pytest.raises(ConnectionError):
                async with asyncio.timeout(GUARD_S):
                    async for _ in driver.events():
                        pass
        # While the device is away, connecting fails with a ConnectionError naming it.
        with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
            await driver.connect()
        await sim.start_tcp(port=port)
        sim.set_registers("holding", 0, [43])
        await reconnect(driver)
        try:
            assert (await polls(driver))[0]["v"].value == 43
        finally:
            await driver.close()
    finally:
        await sim.stop()


async def test_link_lost_during_a_request_fails_fast(tmp_path: Path) -> None:
    """A device that drops the connection mid-request: ConnectionError, not a wait for the timeout."""
    dropped = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()
        dropped.set()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    eq = make_equipment(tmp_path, tcp(port, timeout_s=30.0, retries=0), [{"name": "v", "address": 0}])
    try:
        async with ModbusDriver(eq, DriverContext(tmp_path)) as d:
            assert isinstance(d, ModbusDriver)
            with pytest.raises(ConnectionError):
                # Far inside the 30 s request timeout: the guard proves the in-flight request was failed.
                async with asyncio.timeout(10):
                    await d.read_once()
        assert dropped.is_set()
    finally:
        srv.close()
        await srv.wait_closed()


async def test_silent_device_times_out_and_leaves_nothing_running(tmp_path: Path) -> None:
    """A device that accepts TCP and never answers: a timeout raises ConnectionError, no stuck task."""
    handlers: list[asyncio.Task[Any]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        while await reader.read(1024):
            pass  # swallow every request
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    eq = make_equipment(tmp_path, tcp(port, timeout_s=0.2, retries=1), [{"name": "v", "address": 0}])
    before = asyncio.all_tasks()
    try:
        driver = ModbusDriver(eq, DriverContext(tmp_path))
        async with driver:
            events = driver.events()
            assert await events.__anext__() == ConnectionState(connected=True)
            with pytest.raises(ConnectionError, match="no answer"):
                async with asyncio.timeout(GUARD_S):
                    await events.__anext__()
        assert driver.requests == 1
    finally:
        srv.close()
        await srv.wait_closed()
    left = [t for t in asyncio.all_tasks() - before - set(handlers) if not t.done()]
    if left:
        await asyncio.wait(left, timeout=GUARD_S)
    assert all(t.done() for t in left), left


async def test_nothing_listening_fails_connect(tmp_path: Path) -> None:
    sim = SimServer()
    port = await sim.start_tcp()
    await sim.stop()  # a port that was free a moment ago and is closed now
    eq = make_equipment(tmp_path, tcp(port), [{"name": "v", "address": 0}])
    with pytest.raises(ConnectionError, match="cannot connect"):
        async with ModbusDriver(eq, DriverContext(tmp_path)):
            pass


# ---- commands -----------------------------------------------------------------------------------

WRITE_TAGS: list[dict[str, Any]] = [
    {"name": "sp16", "address": 0, "type": "int16"},
    {"name": "sp_u32", "address": 2, "type": "uint32", "word_order": "little"},
    {"name": "sp_f32", "address": 4, "type": "float32", "word_order": "little", "byte_order": "little"},
    {"name": "sp_i64", "address": 8, "type": "int64"},
    {"name": "sp_f64", "address": 12, "type": "float64", "byte_order": "little"},
    {"name": "sp_scaled", "address": 20, "type": "uint16", "scale": 0.1},
    {"name": "lamp", "table": "coil", "address": 7},
    {"name": "locked", "address": 30},
    {"name": "flag", "address": 31, "bit": 3},
    {"name": "sensor", "table": "input", "address": 0},
    {"name": "door", "table": "discrete", "address": 0},
    {"name": "label", "address": 40, "type": "string", "length": 4},
]
WRITE_CMDS: list[dict[str, Any]] = [
    {"name": "set16", "kind": "write", "tag": "sp16", "min": -2000, "max": 2000},
    {"name": "set_u32", "kind": "write", "tag": "sp_u32"},
    {"name": "set_f32", "kind": "write", "tag": "sp_f32"},
    {"name": "set_i64", "kind": "write", "tag": "sp_i64"},
    {"name": "set_f64", "kind": "write", "tag": "sp_f64"},
    {"name": "set_scaled", "kind": "write", "tag": "sp_scaled", "min": 0, "max": 5000},
    {"name": "light", "kind": "write", "tag": "lamp"},
    {"name": "set_locked", "kind": "write", "tag": "locked"},
]


@pytest.fixture
async def write_server() -> AsyncIterator[SimServer]:
    sim = SimServer({"holding": [(0, 30), (30, 1, True), (31, 20)]})  # register 30 is read-only
    await sim.start_tcp()
    yield sim
    await sim.stop()


async def test_writes_round_trip(write_server: SimServer, tmp_path: Path) -> None:
    sim = write_server
    eq = make_equipment(tmp_path, tcp(sim.port), WRITE_TAGS, WRITE_CMDS)
    writes = [
        ("set16", -1234, lambda: sim.get_value("holding", 0, "h")),
        ("set_u32", 4_000_000_000, lambda: sim.get_value("holding", 2, "I", word_order="little")),
        ("set_f32", -273.15, lambda: sim.get_value("holding", 4, "f", "little", "little")),
        ("set_i64", -(2**63), lambda: sim.get_value("holding", 8, "q")),
        ("set_f64", math.pi, lambda: sim.get_value("holding", 12, "d", byte_order="little")),
        ("set_scaled", 123.4, lambda: sim.get_registers("holding", 20, 1)[0]),
        ("light", True, lambda: sim.get_bits("coil", 7, 1)[0]),
    ]
    held = {
        "set16": -1234,
        "set_u32": 4_000_000_000,
        "set_f32": struct.unpack(">f", struct.pack(">f", -273.15))[0],
        "set_i64": -(2**63),
        "set_f64": math.pi,
        "set_scaled": 1234,
        "light": True,
    }
    async with ModbusDriver(eq, DriverContext(tmp_path)) as d:
        assert isinstance(d, ModbusDriver)
        for name, value, read_back in writes:
            cmd = eq.command(name)
            params = ModbusDriver.validate_command(eq, cmd, {"value": value})
            result = await d.send_command(cmd, params)
            assert result.success, result
            assert read_back() == held[name], name
        got = {r.tag: r.value for r in await d.read_once() if isinstance(r, Reading)}
    assert got["sp16"] == -1234
    assert got["sp_u32"] == 4_000_000_000
    assert got["sp_f32"] == pytest.approx(-273.15)
    assert got["sp_i64"] == -(2**63)
    assert got["sp_f64"] == math.pi
    assert got["sp_scaled"] == pytest.approx(123.4)
    assert got["lamp"] is True


async def test_device_refusal_is_a_failed_result(write_server: SimServer, tmp_path: Path) -> None:
    eq = make_equipment(tmp_path, tcp(write_server.port), WRITE_TAGS, WRITE_CMDS)
    async with ModbusDriver(eq, DriverContext(tmp_path)) as d:
        cmd = eq.command("set_locked")
        result = await d.send_command(cmd, ModbusDriver.validate_command(eq, cmd, {"value": 5}))
    assert not result.success
    assert "ILLEGAL_DATA_ADDRESS" in result.message and result.data["exception_code"] == 2


@pytest.mark.parametrize(
    ("command", "value", "reason", "text"),
    [
        ("set16", 2001, "out_of_range", "above the maximum"),
        ("set16", -2001, "out_of_range", "below the minimum"),
        ("set16", 12.5, "out_of_range", "whole number"),
        ("set16", "abc", "bad_parameters", "must be a number"),
        ("set16", [1], "bad_parameters", "must be a number"),
        ("set16", math.nan, "bad_parameters", "finite"),
        ("set_u32", -1, "out_of_range", "out of range for uint32"),
        ("set_u32", 2**32, "out_of_range", "out of range for uint32"),
        ("set_f32", 1e39, "out_of_range", "out of range for float32"),
        ("set_scaled", 5000.1, "out_of_range", "above the maximum"),
        ("light", 2, "bad_parameters", "true/false or 0/1"),
    ],
)
def test_bad_command_values_are_refused_with_a_reason(
    tmp_path: Path, command: str, value: Any, reason: str, text: str
) -> None:
    eq = make_equipment(tmp_path, tcp(502), WRITE_TAGS, WRITE_CMDS)
    with pytest.raises(CommandError, match=text) as err:
        ModbusDriver.validate_command(eq, eq.command(command), {"value": value})
    assert err.value.reason == reason


@pytest.mark.parametrize(
    ("tag", "text"),
    [
        ("flag", "one bit of a register and is not writable"),
        ("sensor", "read-only input table"),
        ("door", "read-only discrete table"),
        ("label", "string and is not writable"),
    ],
)
def test_read_only_targets_are_refused(tmp_path: Path, tag: str, text: str) -> None:
    # check-config refuses the declaration ...
    cmds = [{"name": "bad", "kind": "write", "tag": tag}]
    with pytest.raises(ConfigError) as err:
        make_equipment(tmp_path, tcp(502), WRITE_TAGS, cmds)
    assert any(line.startswith("equipment[plc-1].commands[0].tag: ") and text in line for line in err.value.problems)
    # ... and the driver refuses the command even if one got through.
    eq = make_equipment(tmp_path, tcp(502), WRITE_TAGS)
    cmd = ModbusDriver.command_model(name="bad", kind="write", tag=tag)
    with pytest.raises(CommandError, match=text) as refused:
        ModbusDriver.validate_command(eq, cmd, {"value": 1})
    assert refused.value.reason == "not_writable"


# ---- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tag", "text"),
    [
        ({"name": "s", "address": 0, "type": "string"}, "needs length"),
        ({"name": "s", "address": 0, "length": 2}, "length applies to string tags only"),
        ({"name": "b", "table": "coil", "address": 0, "bit": 1}, "bit applies to holding and input"),
        ({"name": "b", "table": "coil", "address": 0, "type": "int16"}, "is a bool"),
        ({"name": "b", "address": 0, "type": "bool"}, "needs bit"),
        ({"name": "b", "address": 0, "type": "int32", "bit": 2}, "bit makes a bool tag"),
        ({"name": "b", "address": 0, "bit": 16}, "less than or equal to 15"),
        ({"name": "b", "address": 65535, "type": "int32"}, "exceeds the address space"),
        ({"name": "b", "address": 0, "type": "string", "length": 2, "scale": 2.0}, "numeric tags"),
        ({"name": "b", "address": 0, "table": "memory"}, "Input should be"),
    ],
)
def test_tag_cross_field_checks(tmp_path: Path, tag: dict[str, Any], text: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_equipment(tmp_path, tcp(502), [tag])
    assert any(line.startswith("equipment[plc-1].tags[0]") and text in line for line in err.value.problems), err.value


def test_connection_checks_and_defaults(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="transport tcp needs host"):
        make_equipment(tmp_path, {"port": 502}, [])
    with pytest.raises(ConfigError, match="transport rtu needs serial_port"):
        make_equipment(tmp_path, {"transport": "rtu"}, [])
    eq = make_equipment(tmp_path, {"host": "10.0.0.9"}, [{"name": "v", "address": 0}])
    conn = eq.connection
    assert (conn.port, conn.unit_id, conn.poll_interval_ms, conn.max_gap) == (502, 1, 1000, 16)
    assert eq.tags[0].type == "uint16" and eq.tags[0].table == "holding"
    assert ModbusDriver.default_stale_after_s(eq) == 3.0
    rtu = make_equipment(tmp_path, {"transport": "rtu", "serial_port": "plc.tty", "baudrate": 9600}, [])
    assert rtu.connection.serial_port == (tmp_path / "plc.tty")  # relative to the config's folder


# ---- the simulator ------------------------------------------------------------------------------


async def test_plc_simulator_serves_the_shipped_map(tmp_path: Path) -> None:
    now = [1000.0]
    plc = PlcSimulator(clock=lambda: now[0])
    await plc.start_tcp()
    try:
        plc.set_registers("holding", 20, [12000])
        tags = [
            {"name": "state", "address": 0},
            {"name": "error_code", "address": 1},
            {"name": "parts", "address": 2, "type": "uint32"},
            {"name": "progress", "address": 4, "scale": 0.001},
            {"name": "job", "address": 8, "type": "string", "length": 8},
            {"name": "spindle_temp", "address": 16, "type": "float32"},
            {"name": "coolant_temp", "address": 18, "type": "float32", "word_order": "little"},
            {"name": "speed_setpoint", "address": 20},
            {"name": "door_open", "address": 21, "bit": 0},
            {"name": "spindle_speed", "table": "input", "address": 0},
        ]
        cmds = [{"name": "set_speed", "kind": "write", "tag": "speed_setpoint", "min": 0, "max": 24000}]
        eq = make_equipment(tmp_path, tcp(plc.port), tags, cmds)
        seen: dict[int, dict[str, Any]] = {}
        hottest = 0.0
        current: dict[str, Reading] = {}
        async with ModbusDriver(eq, DriverContext(tmp_path)) as d:
            assert isinstance(d, ModbusDriver)
            cmd = eq.command("set_speed")
            assert (await d.send_command(cmd, ModbusDriver.validate_command(eq, cmd, {"value": 15000}))).success
            for t in range(0, 190):  # three full cycles, one second per step
                now[0] = 1000.0 + t
                plc.tick()
                values = {tag: r.value for tag, r in (await read_into(d, current)).items()}
                seen.setdefault(values["state"], values)
                hottest = max(hottest, values["spindle_temp"])
                if values["state"] == 1:
                    assert values["job"].startswith("PROC-00") and values["spindle_speed"] == 15000
            # A write to a read-only register is refused by the device, as a real PLC does.
            locked = ModbusDriver.command_model(name="x", kind="write", tag="error_code")
            refused = await d.send_command(locked, {"value": 1})
            assert not refused.success and "ILLEGAL_DATA_ADDRESS" in refused.message
        assert set(seen) == {0, 1, 2, 3}
        assert seen[3]["error_code"] == 17
        assert seen[0]["job"] == "" and seen[0]["door_open"] is True
        assert 0.0 <= seen[1]["progress"] <= 1.0
        assert values["parts"] == 2  # three jobs begun, one of them failed
        assert hottest > 80.0  # the shipped alert fires
        assert 19.0 < values["coolant_temp"] < 30.0  # little word order decoded
    finally:
        await plc.stop()


async def test_plc_simulator_runs_under_simulate(tmp_path: Path) -> None:
    from drivers.modbus.sim import simulate

    probe = SimServer()
    port = await probe.start_tcp()
    await probe.stop()
    eq = make_equipment(tmp_path, tcp(port), [{"name": "state", "address": 0}, {"name": "sp", "address": 20}])
    task = asyncio.create_task(simulate(eq, tmp_path))
    try:
        driver = ModbusDriver(eq, DriverContext(tmp_path))
        await reconnect(driver)
        try:
            got = (await polls(driver))[0]
            assert got["state"].value in (0, 1, 2, 3) and got["sp"].value == 12000
        finally:
            await driver.close()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# ---- RTU over a socat pty pair ------------------------------------------------------------------


@pytest.fixture
async def pty_pair(tmp_path: Path) -> AsyncIterator[AsyncSocatPair]:
    pair = AsyncSocatPair(tmp_path)
    await pair.start()
    yield pair
    await pair.stop()


def rtu(port: Path, **extra: Any) -> dict[str, Any]:
    return {
        "transport": "rtu",
        "serial_port": str(port),
        "baudrate": 115200,
        "unit_id": 7,
        "poll_interval_ms": 100,
        "timeout_s": 1.0,
        **extra,
    }


async def test_rtu_reads_the_same_values_as_tcp(pty_pair: AsyncSocatPair, tmp_path: Path) -> None:
    over_tcp, over_rtu = SimServer(), SimServer(unit_id=7)
    await over_tcp.start_tcp()
    await over_rtu.start_rtu(str(pty_pair.b), baudrate=115200)
    try:
        tags = load_typed(over_tcp)
        assert load_typed(over_rtu) == tags
        for sim in (over_tcp, over_rtu):
            sim.set_string("holding", 1500, "RTU-OK", 3)
            sim.set_bits("coil", 9, [True])
        tags += [
            {"name": "text", "address": 1500, "type": "string", "length": 3},
            {"name": "coil9", "table": "coil", "address": 9},
        ]
        via_tcp = await one_poll(make_equipment(tmp_path, tcp(over_tcp.port), tags), tmp_path)
        via_rtu = await one_poll(make_equipment(tmp_path, rtu(pty_pair.a), tags), tmp_path)
    finally:
        await over_tcp.stop()
        await over_rtu.stop()
    assert set(via_rtu) == set(via_tcp)
    for name, r in via_rtu.items():
        assert r.quality == "good" and same(r.value, via_tcp[name].value), name
    for name, dtype, value, *_ in typed_cases():
        assert same(via_rtu[name].value, expected_value(dtype, value)), name
    assert via_rtu["text"].value == "RTU-OK" and via_rtu["coil9"].value is True


async def test_rtu_write_round_trips(pty_pair: AsyncSocatPair, tmp_path: Path) -> None:
    sim = SimServer(unit_id=7)
    await sim.start_rtu(str(pty_pair.b), baudrate=115200)
    try:
        eq = make_equipment(
            tmp_path,
            rtu(pty_pair.a),
            [{"name": "sp", "address": 4, "type": "float32", "word_order": "little"}],
            [{"name": "set_sp", "kind": "write", "tag": "sp"}],
        )
        async with ModbusDriver(eq, DriverContext(tmp_path)) as d:
            cmd = eq.command("set_sp")
            assert (await d.send_command(cmd, ModbusDriver.validate_command(eq, cmd, {"value": 61.25}))).success
            assert sim.get_value("holding", 4, "f", word_order="little") == 61.25
            assert isinstance(d, ModbusDriver)
            assert (await polls(d))[0]["sp"].value == 61.25
    finally:
        await sim.stop()


async def test_rtu_pty_torn_down_then_back(pty_pair: AsyncSocatPair, tmp_path: Path) -> None:
    sim = SimServer(unit_id=7)
    await sim.start_rtu(str(pty_pair.b), baudrate=115200)
    sim.set_registers("holding", 0, [321])
    eq = make_equipment(tmp_path, rtu(pty_pair.a), [{"name": "v", "address": 0}])
    driver = ModbusDriver(eq, DriverContext(tmp_path))
    try:
        async with driver:
            assert (await polls(driver))[0]["v"].value == 321
            await pty_pair.stop()
            await sim.stop()
            with pytest.raises(ConnectionError):
                async with asyncio.timeout(GUARD_S):
                    async for _ in driver.events():
                        pass
        with pytest.raises(ConnectionError):
            await driver.connect()  # the port is gone
        await pty_pair.start()
        await sim.start_rtu(str(pty_pair.b), baudrate=115200)
        sim.set_registers("holding", 0, [322])
        await reconnect(driver)
        try:
            assert (await polls(driver))[0]["v"].value == 322
        finally:
            await driver.close()
    finally:
        await sim.stop()


async def test_rtu_silent_line_times_out_and_raises(pty_pair: AsyncSocatPair, tmp_path: Path) -> None:
    """The port opens but no device answers on the line: a timeout, ConnectionError, nothing left running."""
    eq = make_equipment(tmp_path, rtu(pty_pair.a, timeout_s=0.3, retries=1), [{"name": "v", "address": 0}])
    async with ModbusDriver(eq, DriverContext(tmp_path)) as d:
        assert isinstance(d, ModbusDriver)
        with pytest.raises(ConnectionError, match="no answer"):
            async with asyncio.timeout(GUARD_S):
                await d.read_once()
