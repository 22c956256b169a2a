"""OPC UA driver against a real asyncua server started on a free loopback port."""

from __future__ import annotations

import asyncio
import datetime as dt
import textwrap
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import pytest
import structlog.testing
from asyncua import ua
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.config import EquipmentConfig, parse_config
from agent.errors import CommandError
from agent.metrics import REGISTRY
from agent.model import ConnectionState, Event, Reading
from drivers.base import DriverContext
from drivers.opcua import OpcUaDriver, plain, quality_of
from drivers.opcua.sim import ERROR, IDLE, NS_MACHINE, NS_SPINDLE, PAUSED, RUNNING, MachineServer
from peers import GUARD_S, free_port, until

REPO = Path(__file__).resolve().parents[2]


def equipment(
    tmp_path: Path, endpoint: str, *, connection: str = "", tags: str | None = None, extra: str = ""
) -> EquipmentConfig:
    """One OPC UA equipment parsed by the real config loader."""
    if tags is None:
        tags = f"""
        [[equipment.tags]]
        name = "state"
        node = "ns=2;s=Machine.State"
        [[equipment.tags]]
        name = "progress"
        node = "ns=2;s=Machine.Progress"
        [[equipment.tags]]
        name = "program"
        node = "ns=2;s=Machine.Program"
        [[equipment.tags]]
        name = "temp"
        node = "nsu={NS_SPINDLE};s=Spindle.Temp"
        unit = "degC"
        [[equipment.tags]]
        name = "setpoint"
        node = "ns=2;s=Machine.SpeedSetpoint"
        """
    text = textwrap.dedent(
        f"""
        [agent]
        id = "cell-1"
        site = "plant-a"
        state_dir = "{tmp_path / "state"}"
        [[equipment]]
        id = "mill-1"
        type = "cnc_mill"
        driver = "opcua"
        [equipment.connection]
        endpoint = "{endpoint}"
        """
    )
    text += textwrap.dedent(connection) + textwrap.dedent(
        """
        [equipment.status]
        tag = "state"
        map = { "0" = "idle", "1" = "running", "2" = "paused", "3" = "error" }
        """
    )
    text += textwrap.dedent(tags) + textwrap.dedent(extra)
    cfg = parse_config(text, tmp_path / "agent.toml")
    return cfg.equipment[0]


class Collector:
    """Runs `async for` over a driver's events in a task; tests wait on what arrived."""

    def __init__(self, source: AsyncIterator[Event]) -> None:
        self.events: list[Event] = []
        self.error: BaseException | None = None
        self.task = asyncio.create_task(self._run(source))

    async def _run(self, source: AsyncIterator[Event]) -> None:
        try:
            async for ev in source:
                self.events.append(ev)
        except Exception as err:
            self.error = err

    def readings(self, tag: str) -> list[Reading]:
        return [e for e in self.events if isinstance(e, Reading) and e.tag == tag]

    def values(self, tag: str) -> list[Any]:
        return [r.value for r in self.readings(tag)]

    async def wait(self, cond: Callable[[], bool], what: str = "condition") -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GUARD_S
        while not cond():
            if self.error is not None and not isinstance(self.error, ConnectionError):
                raise AssertionError(f"event stream failed: {self.error!r}")
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}; events: {self.events[-20:]}")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass


async def supervise(eq: EquipmentConfig, ctx: DriverContext, out: list[Event], cap_s: float = 2.0) -> None:
    """What the supervisor does: enter, stream, on a ConnectionError leave, back off, re-enter."""
    backoff = 0.2
    while True:
        try:
            async with OpcUaDriver(eq, ctx) as d:
                out.append(ConnectionState(True))
                backoff = 0.2
                async for ev in d.events():
                    out.append(ev)
        except ConnectionError as err:
            if not out or not (isinstance(out[-1], ConnectionState) and not out[-1].connected):
                out.append(ConnectionState(False, str(err)))
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, cap_s)


@pytest.fixture
async def machine() -> AsyncIterator[MachineServer]:
    server = MachineServer(port=free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# ---- config ----------------------------------------------------------------------------------------


def test_config_accepts_node_forms_and_defaults(tmp_path: Path) -> None:
    tags = """
    [[equipment.tags]]
    name = "state"
    node = "ns=2;s=Machine.State"
    [[equipment.tags]]
    name = "a"
    node = "i=2258"
    [[equipment.tags]]
    name = "b"
    node = "ns=3;g=09087e75-8e5e-499b-954f-f2a9603db28a"
    [[equipment.tags]]
    name = "c"
    node = "ns=1;b=M/RbKBsRVkePCePcx24oRA=="
    [[equipment.tags]]
    name = "d"
    node = "nsu=urn:vendor:press;s=Press.Temp"
    sampling_interval_ms = 250
    queue_size = 5
    """
    eq = equipment(tmp_path, "opc.tcp://127.0.0.1:4840", tags=tags)
    assert eq.connection.publishing_interval_ms == 100
    assert eq.connection.mode == "None"
    driver = OpcUaDriver(eq, DriverContext(tmp_path))
    # v2 defaults: sampled as fast as the server can, the queue derived from the revised intervals
    # (100 ms publishing, sampled every 100 ms: 11), status tags at least 10; per-tag settings win.
    assert driver._sampling_ms(eq.tag("a")) == 0.0 and driver._sampling_ms(eq.tag("d")) == 250
    assert driver._queue_size(eq.tag("state"), 100.0) == 11
    assert driver._queue_size(eq.tag("state"), 1000.0) == 10
    assert driver._queue_size(eq.tag("a"), 100.0) == 11
    assert driver._queue_size(eq.tag("d"), 100.0) == 5


@pytest.mark.parametrize(
    ("connection", "tags", "message"),
    [
        ('security_policy = "Basic256Sha256"\nsecurity_mode = "None"\n', None, "needs security_mode"),
        ('security_mode = "Sign"\n', None, "needs security_policy"),
        ('password_env = "X"\n', None, "needs a username"),
        ('certificate_file = "c.der"\n', None, "together"),
        ("", '[[equipment.tags]]\nname = "state"\nnode = "Machine.State"\n', "not a node id"),
        ("", '[[equipment.tags]]\nname = "state"\nnode = "ns=x;s=Machine.State"\n', "not a node id"),
    ],
)
def test_config_rejects(tmp_path: Path, connection: str, tags: str | None, message: str) -> None:
    from agent.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        equipment(tmp_path, "opc.tcp://127.0.0.1:4840", connection=connection, tags=tags)
    assert message in str(info.value)


def test_config_rejects_bad_endpoint_and_method_without_nodes(tmp_path: Path) -> None:
    from agent.errors import ConfigError

    with pytest.raises(ConfigError, match=r"opc\.tcp://host:port"):
        equipment(tmp_path, "http://127.0.0.1:4840")
    for kind in ("method", "reset"):
        extra = f'[[equipment.commands]]\nname = "reset"\nkind = "{kind}"\nobject = "ns=2;s=Machine"\n'
        with pytest.raises(ConfigError, match="object and method"):
            equipment(tmp_path, "opc.tcp://127.0.0.1:4840", extra=extra)


def test_validate_command_schemas(tmp_path: Path) -> None:
    extra = """
    [[equipment.commands]]
    name = "load"
    kind = "method"
    object = "ns=2;s=Machine"
    method = "ns=2;s=Machine.LoadProgram"
    [[equipment.commands]]
    name = "load_process"
    kind = "load_process"
    [[equipment.commands]]
    name = "set_speed"
    kind = "write"
    tag = "setpoint"
    max = 24000
    """
    eq = equipment(tmp_path, "opc.tcp://127.0.0.1:4840", extra=extra)
    v = OpcUaDriver.validate_command
    assert v(eq, eq.command("load"), {"args": ["a.nc", 2]}) == {"args": ["a.nc", 2]}
    assert v(eq, eq.command("load"), {}) == {"args": []}
    bad: dict[str, Any]
    for bad in ({"args": "a.nc"}, {"args": [{"x": 1}]}, {"argv": []}):
        with pytest.raises(CommandError):
            v(eq, eq.command("load"), bad)
    with pytest.raises(CommandError) as info:
        v(eq, eq.command("set_speed"), {"value": 30000})
    assert info.value.reason == "out_of_range"


def test_quality_and_plain_values() -> None:
    def code(value: int) -> ua.StatusCode:
        return ua.StatusCode(ua.UInt32(value))

    assert quality_of(ua.StatusCode()) == "good"
    assert quality_of(code(ua.StatusCodes.UncertainLastUsableValue)) == "uncertain"
    assert quality_of(code(ua.StatusCodes.BadSensorFailure)) == "bad"
    assert plain(ua.LocalizedText("hello")) == "hello"
    assert plain([ua.NodeId.from_string("ns=2;i=5")]) == ["ns=2;i=5"]


# ---- data ------------------------------------------------------------------------------------------


async def test_initial_values_source_timestamps_and_status_codes(tmp_path: Path, machine: MachineServer) -> None:
    ts = dt.datetime(2026, 3, 4, 5, 6, 7, 123000, tzinfo=dt.UTC)
    await machine.set("Machine.Program", "bracket.nc", ts=ts)
    eq = equipment(tmp_path, machine.endpoint)
    async with OpcUaDriver(eq, DriverContext(tmp_path)) as d:
        got = Collector(d.events())
        try:
            # The subscription's initial notification carries every tag's current value.
            await got.wait(
                lambda: all(got.readings(t) for t in ("state", "progress", "program", "temp", "setpoint")),
                "initial values",
            )
            first = got.readings("program")[0]
            assert (first.value, first.ts, first.quality) == ("bracket.nc", ts, "good")
            assert got.readings("temp")[0].value == 25.0

            ts2 = dt.datetime(2026, 3, 4, 5, 6, 8, 456000, tzinfo=dt.UTC)
            await machine.set("Spindle.Temp", 81.5, ts=ts2)
            await got.wait(lambda: 81.5 in got.values("temp"), "temp 81.5")
            r = got.readings("temp")[-1]
            assert (r.value, r.ts, r.quality) == (81.5, ts2, "good")

            await machine.set("Spindle.Temp", 79.0, status=ua.StatusCodes.UncertainLastUsableValue)
            await got.wait(lambda: got.readings("temp")[-1].quality == "uncertain", "uncertain temp")
            assert got.readings("temp")[-1].value == 79.0
            await machine.set("Spindle.Temp", 0.0, status=ua.StatusCodes.BadSensorFailure)
            await got.wait(lambda: got.readings("temp")[-1].quality == "bad", "bad temp")
        finally:
            await got.stop()


async def test_status_changes_faster_than_publishing_interval_are_kept(tmp_path: Path, machine: MachineServer) -> None:
    eq = equipment(tmp_path, machine.endpoint, connection="publishing_interval_ms = 500\n")
    async with OpcUaDriver(eq, DriverContext(tmp_path)) as d:
        got = Collector(d.events())
        try:
            await got.wait(lambda: bool(got.readings("state")) and bool(got.readings("progress")), "initial values")
            # Five states and five progress values inside one publishing interval: the status tag
            # (a queue of at least 10) delivers every one in order.
            for state, progress in zip((RUNNING, PAUSED, RUNNING, ERROR, IDLE), (0.1, 0.2, 0.3, 0.4, 0.5), strict=True):
                await machine.set("Machine.State", state)
                await machine.set("Machine.Progress", progress)
            await got.wait(lambda: got.values("state")[-1:] == [IDLE] and len(got.values("state")) >= 6, "all states")
            assert got.values("state") == [IDLE, RUNNING, PAUSED, RUNNING, ERROR, IDLE]
            await got.wait(lambda: got.values("progress")[-1] == 0.5, "last progress")
            stamps = [r.ts for r in got.readings("state")]
            assert stamps == sorted(stamps)
            assert d.dropped == 0
        finally:
            await got.stop()


class TinyQueueDriver(OpcUaDriver):
    """The driver with a client-side queue far below what one publish response carries."""

    def _queue_maxsize(self, queued: int) -> int:
        return 4


async def test_dropped_notifications_are_counted_and_logged(tmp_path: Path, machine: MachineServer) -> None:
    eq = equipment(tmp_path, machine.endpoint, connection="publishing_interval_ms = 200\n")
    metric = {"equipment_id": "mill-1"}
    before = REGISTRY.get_sample_value("edge_agent_driver_dropped_total", metric) or 0.0
    async with TinyQueueDriver(eq, DriverContext(tmp_path)) as d:
        stream = cast(AsyncGenerator[Event, None], d.events())
        # Nobody consumes yet: the initial values (5) already overflow the queue of 4.
        counters = d._counters
        await until(lambda: counters.produced >= 5, "initial notification")
        for state in (RUNNING, PAUSED, RUNNING, ERROR, IDLE, RUNNING):
            await machine.set("Machine.State", state)
        await until(lambda: counters.produced >= 11, "six state changes")
        got: list[Event] = []
        while len(got) < 4:
            got.append(await anext(stream))
        # Four survived (the newest), everything else was dropped, and the count says so exactly.
        assert counters.produced == 11
        assert d.dropped == 7
        assert REGISTRY.get_sample_value("edge_agent_driver_dropped_total", metric) == before + 7
        assert [e.value for e in got if isinstance(e, Reading) and e.tag == "state"][-1] == RUNNING
        await stream.aclose()


async def test_nsu_tags_resolve_after_restart_with_namespaces_reordered(tmp_path: Path) -> None:
    port = free_port()
    tags = f"""
    [[equipment.tags]]
    name = "state"
    node = "nsu={NS_MACHINE};s=Machine.State"
    [[equipment.tags]]
    name = "temp"
    node = "nsu={NS_SPINDLE};s=Spindle.Temp"
    """
    eq = equipment(tmp_path, f"opc.tcp://127.0.0.1:{port}", tags=tags)
    out: list[Event] = []
    first = MachineServer(port=port)
    await first.start()
    runner = asyncio.create_task(supervise(eq, DriverContext(tmp_path), out))
    second: MachineServer | None = None
    try:
        await first.set("Spindle.Temp", 41.0)
        await until(
            lambda: any(isinstance(e, Reading) and e.value == 41.0 for e in out), "temp 41 from the first server"
        )
        await first.stop()
        second = MachineServer(port=port, namespaces=("urn:other:a", "urn:other:b", NS_SPINDLE, NS_MACHINE))
        await second.start()
        assert second.ns[NS_SPINDLE] != first.ns[NS_SPINDLE]
        await second.set("Spindle.Temp", 42.0)
        await second.set("Machine.State", RUNNING)
        await until(lambda: any(isinstance(e, Reading) and e.tag == "temp" and e.value == 42.0 for e in out), "temp 42")
        await until(
            lambda: any(isinstance(e, Reading) and e.tag == "state" and e.value == RUNNING for e in out), "state"
        )
        after = out[max(i for i, e in enumerate(out) if isinstance(e, ConnectionState) and e.connected) :]
        assert all(e.quality == "good" for e in after if isinstance(e, Reading))
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await first.stop()
        if second is not None:
            await second.stop()


async def test_server_down_at_start_raises_clear_connection_error(tmp_path: Path) -> None:
    eq = equipment(tmp_path, f"opc.tcp://127.0.0.1:{free_port()}")
    with pytest.raises(ConnectionError, match=r"opc.tcp://127.0.0.1:\d+ is unreachable"):
        async with OpcUaDriver(eq, DriverContext(tmp_path)):
            pass


@pytest.mark.slow
async def test_server_restart_after_5s_reports_loss_and_data_flows_again(tmp_path: Path) -> None:
    port = free_port()
    eq = equipment(tmp_path, f"opc.tcp://127.0.0.1:{port}")
    out: list[Event] = []
    server = MachineServer(port=port)
    await server.start()
    runner = asyncio.create_task(supervise(eq, DriverContext(tmp_path), out))
    try:
        await server.set("Machine.State", RUNNING)
        await until(
            lambda: any(isinstance(e, Reading) and e.tag == "state" and e.value == RUNNING for e in out), "running"
        )
        await server.stop()
        await until(lambda: any(isinstance(e, ConnectionState) and not e.connected for e in out), "connection lost")
        lost = next(e for e in out if isinstance(e, ConnectionState) and not e.connected)
        assert lost.error and "connection lost" in lost.error
        await asyncio.sleep(5.0)  # the outage itself, not a wait for the code under test
        mark = len(out)
        server = MachineServer(port=port)
        await server.start()
        await server.set("Machine.State", PAUSED)
        await until(
            lambda: any(isinstance(e, Reading) and e.tag == "state" and e.value == PAUSED for e in out[mark:]),
            "paused after restart",
        )
        assert any(isinstance(e, ConnectionState) and e.connected for e in out[mark:])
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await server.stop()


# ---- faults and commands ---------------------------------------------------------------------------

FAULT_TAGS = """
[[equipment.tags]]
name = "state"
node = "ns=2;s=Machine.State"
[[equipment.tags]]
name = "missing"
node = "ns=2;s=Machine.DoesNotExist"
[[equipment.tags]]
name = "folder"
node = "ns=2;s=Machine"
[[equipment.tags]]
name = "scaled_text"
node = "ns=2;s=Machine.Program"
scale = 2.0
[[equipment.tags]]
name = "unknown_ns"
node = "nsu=urn:nobody;s=Machine.State"
[[equipment.tags]]
name = "setpoint"
node = "ns=2;s=Machine.SpeedSetpoint"
scale = 0.001
[[equipment.tags]]
name = "mode"
node = "ns=2;s=Machine.Mode"
[[equipment.tags]]
name = "parts"
node = "ns=2;s=Machine.PartCount"
[[equipment.tags]]
name = "program"
node = "ns=2;s=Machine.Program"
"""

FAULT_COMMANDS = """
[[equipment.commands]]
name = "set_speed"
kind = "write"
tag = "setpoint"
[[equipment.commands]]
name = "set_mode"
kind = "write"
tag = "mode"
[[equipment.commands]]
name = "set_parts"
kind = "write"
tag = "parts"
[[equipment.commands]]
name = "set_program"
kind = "write"
tag = "program"
[[equipment.commands]]
name = "set_missing"
kind = "write"
tag = "missing"
[[equipment.commands]]
name = "reset"
kind = "reset"
object = "ns=2;s=Machine"
method = "ns=2;s=Machine.Reset"
[[equipment.commands]]
name = "load_program"
kind = "method"
object = "ns=2;s=Machine"
method = "ns=2;s=Machine.LoadProgram"
[[equipment.commands]]
name = "no_such_method"
kind = "method"
object = "ns=2;s=Machine"
method = "ns=2;s=Machine.Explode"
"""


async def test_bad_nodes_become_bad_readings_and_commands_report_status(tmp_path: Path, machine: MachineServer) -> None:
    eq = equipment(tmp_path, machine.endpoint, tags=FAULT_TAGS, extra=FAULT_COMMANDS)
    with structlog.testing.capture_logs() as logs:
        driver = OpcUaDriver(eq, DriverContext(tmp_path))
        await driver.connect()
    # One clear line per unavailable node, naming the tag, the node and why.
    lines = {(e["tag"], e["reason"]) for e in logs if e["event"] == "tag_unavailable"}
    assert ("missing", "BadNodeIdUnknown") in lines
    assert ("folder", "BadAttributeIdInvalid") in lines
    assert ("unknown_ns", "namespace urn:nobody is not on the server") in lines
    d = driver
    try:
        got = Collector(d.events())
        try:
            await got.wait(
                lambda: all(got.readings(t) for t in ("missing", "folder", "unknown_ns", "scaled_text", "state")),
                "readings",
            )
            for tag in ("missing", "folder", "unknown_ns", "scaled_text"):
                assert got.readings(tag)[0].quality == "bad", tag
            assert "BadNodeIdUnknown" in d.unavailable["missing"]
            assert "not on the server" in d.unavailable["unknown_ns"]
            await got.wait(lambda: got.values("setpoint") == [12.0], "scaled setpoint")

            # Writes: coerced to the node's type and unscaled; the server's verdict is the result.
            res = await d.send_command(eq.command("set_speed"), {"value": 15})
            assert res.success, res.message
            assert await machine.get("Machine.SpeedSetpoint") == 15000.0
            await got.wait(lambda: got.values("setpoint")[-1] == 15.0, "written setpoint")
            res = await d.send_command(eq.command("set_mode"), {"value": 3.0})
            assert res.success and await machine.get("Machine.Mode") == 3
            res = await d.send_command(eq.command("set_mode"), {"value": 3.5})
            assert not res.success and "UInt16" in res.message
            res = await d.send_command(eq.command("set_mode"), {"value": 70000})
            assert not res.success and "does not fit" in res.message
            res = await d.send_command(eq.command("set_parts"), {"value": 5})
            assert not res.success and res.data["status"] == "BadUserAccessDenied", res
            assert "BadUserAccessDenied" in res.message
            res = await d.send_command(eq.command("set_program"), {"value": 5})
            assert not res.success and "String" in res.message
            res = await d.send_command(eq.command("set_missing"), {"value": 5})
            assert not res.success and "BadNodeIdUnknown" in res.message

            # Methods: the server's status code decides.
            await machine.set("Machine.State", RUNNING)
            res = await d.send_command(eq.command("reset"), {"args": []})
            assert not res.success and res.data["status"] == "BadInvalidState"
            await machine.set("Machine.State", ERROR)
            res = await d.send_command(eq.command("reset"), {"args": []})
            assert res.success, res.message
            assert machine.reset_calls == 1
            res = await d.send_command(eq.command("load_program"), {"args": ["flange.nc"]})
            assert res.success and res.data["outputs"] == [True]
            assert machine.loaded_programs == ["flange.nc"]
            res = await d.send_command(eq.command("load_program"), {"args": []})
            assert not res.success and "takes 1 argument" in res.message
            res = await d.send_command(eq.command("load_program"), {"args": [7]})
            assert not res.success and "not text" in res.message
            res = await d.send_command(eq.command("no_such_method"), {"args": []})
            assert not res.success and res.data["status"].startswith("Bad")

            # The good tags kept running through all of it.
            await got.wait(lambda: got.values("state")[-3:] == [RUNNING, ERROR, IDLE], "state after reset")
            assert got.error is None
        finally:
            await got.stop()
    finally:
        await d.close()


# ---- security --------------------------------------------------------------------------------------


def make_cert(folder: Path, name: str, uri: str) -> tuple[Path, Path]:
    """A self-signed application instance certificate (DER) and key (PEM) for `uri`."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{name}.der", folder / f"{name}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("pki")
    return {
        "server": make_cert(folder, "server", "urn:edge-agent:sim:server"),
        "impostor": make_cert(folder, "impostor", "urn:edge-agent:sim:server"),
    }


@pytest.fixture
async def secure_machine(pki: dict[str, tuple[Path, Path]]) -> AsyncIterator[MachineServer]:
    cert, key = pki["server"]
    server = MachineServer(
        port=free_port(), secure=True, certificate=cert, private_key=key, users={"operator": "s3cret-pw"}
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def secure_connection(tmp_path: Path, server_cert: Path, password: str, *, policy: bool = True) -> str:
    (tmp_path / "pw").write_text(password + "\n")
    lines = ""
    if policy:
        lines += 'security_policy = "Basic256Sha256"\nsecurity_mode = "SignAndEncrypt"\n'
    lines += f'server_certificate_file = "{server_cert}"\nusername = "operator"\npassword_file = "{tmp_path / "pw"}"\n'
    return lines


async def test_secure_connect_with_pinned_certificate_and_password(
    tmp_path: Path, secure_machine: MachineServer, pki: dict[str, tuple[Path, Path]]
) -> None:
    eq = equipment(
        tmp_path, secure_machine.endpoint, connection=secure_connection(tmp_path, pki["server"][0], "s3cret-pw")
    )
    ctx = DriverContext(tmp_path / "state")
    async with OpcUaDriver(eq, ctx) as d:
        got = Collector(d.events())
        try:
            await secure_machine.set("Machine.State", RUNNING)
            await got.wait(lambda: RUNNING in got.values("state"), "running over a secure channel")
        finally:
            await got.stop()
    # The client certificate was generated into state_dir once and is reused.
    cert = tmp_path / "state" / "opcua" / "mill-1-cert.der"
    assert cert.is_file() and (tmp_path / "state" / "opcua" / "mill-1-key.pem").is_file()
    before = cert.read_bytes()
    async with OpcUaDriver(eq, ctx):
        pass
    assert cert.read_bytes() == before


@pytest.mark.parametrize("case", ["wrong_password", "wrong_pinned_certificate", "none_only_client"])
async def test_secure_server_refusals_are_clear(
    tmp_path: Path, secure_machine: MachineServer, pki: dict[str, tuple[Path, Path]], case: str
) -> None:
    server_cert = pki["impostor" if case == "wrong_pinned_certificate" else "server"][0]
    password = "not-the-password" if case == "wrong_password" else "s3cret-pw"
    connection = secure_connection(tmp_path, server_cert, password, policy=case != "none_only_client")
    if case == "none_only_client":
        connection = connection.replace(f'server_certificate_file = "{server_cert}"\n', "")
    eq = equipment(tmp_path, secure_machine.endpoint, connection=connection)
    with pytest.raises(ConnectionError) as info:
        async with OpcUaDriver(eq, DriverContext(tmp_path / "state")):
            pass
    message = str(info.value)
    assert secure_machine.endpoint in message
    assert password not in message
    expected = {
        "wrong_password": "check username and password",
        "wrong_pinned_certificate": "differs from server_certificate_file",
        "none_only_client": "offers no endpoint with security_policy None",
    }[case]
    assert expected in message, message


# ---- the built-in simulator with the shipped equipment ----------------------------------------------


async def test_simulator_serves_the_shipped_equipment(tmp_path: Path) -> None:
    from drivers.opcua.sim import simulate

    port = free_port()
    # The OPC UA equipment of the shipped agent.toml itself, on a free port.
    text = (REPO / "agent.toml").read_text().replace("opc.tcp://127.0.0.1:4840", f"opc.tcp://127.0.0.1:{port}")
    eq = next(e for e in parse_config(text, tmp_path / "agent.toml").equipment if e.driver == "opcua")
    sim = asyncio.create_task(simulate(eq, tmp_path / "state"))
    out: list[Event] = []
    runner = asyncio.create_task(supervise(eq, DriverContext(tmp_path / "state"), out))
    try:

        def latest(tag: str) -> Any:
            values = [e.value for e in out if isinstance(e, Reading) and e.tag == tag and e.quality == "good"]
            return values[-1] if values else None

        def seen(tag: str) -> set[Any]:
            return {e.value for e in out if isinstance(e, Reading) and e.tag == tag}

        await until(lambda: all(latest(t) is not None for t in ("state", "spindle_temp", "job", "program")), "values")
        assert not any(isinstance(e, Reading) and e.quality != "good" for e in out)
        await until(
            lambda: RUNNING in seen("state") and any(isinstance(v, float) and v > 0 for v in seen("progress")), "a job"
        )
        assert any(isinstance(v, str) and v.startswith("JOB-") for v in seen("job"))
        async with OpcUaDriver(eq, DriverContext(tmp_path / "state")) as d:
            res = await d.send_command(eq.command("set_speed"), {"value": 18000})
            assert res.success, res.message
            res = await d.send_command(eq.command("set_laser_power"), {"value": 250.5})
            assert res.success, res.message
        await until(lambda: latest("speed_setpoint") == 18000.0, "setpoint echoed")
    finally:
        runner.cancel()
        sim.cancel()
        await asyncio.gather(runner, sim, return_exceptions=True)
