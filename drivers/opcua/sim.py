"""The simulated OPC UA machine: an asyncua server (also the peer of the driver's tests) and `simulate`.

An independent oracle: it imports nothing of the driver, its conversions or its decoder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import structlog
from asyncua import Node, Server, ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.user_managers import UserManager

from drivers.sdk import EquipmentConfig

NS_MACHINE = "urn:edge-agent:sim:machine"
NS_SPINDLE = "urn:edge-agent:sim:spindle"

# State node values; the shipped config maps them to statuses.
IDLE, RUNNING, PAUSED, ERROR, FINISHED = 0, 1, 2, 3, 4
PROGRAMS = ("bracket_a12.nc", "housing_b7.nc", "flange_c3.nc", "shaft_d9.nc")
TEMP_ALERT = 80.0

log = structlog.get_logger("edge_agent.simulate")

# (string id, namespace, initial value, variant type, writable by clients)
VARIABLES: tuple[tuple[str, str, Any, ua.VariantType, bool], ...] = (
    ("Machine.State", NS_MACHINE, IDLE, ua.VariantType.Int32, False),
    ("Machine.Progress", NS_MACHINE, 0.0, ua.VariantType.Double, False),
    ("Machine.Program", NS_MACHINE, "", ua.VariantType.String, False),
    ("Machine.JobId", NS_MACHINE, "", ua.VariantType.String, False),
    ("Machine.SpeedSetpoint", NS_MACHINE, 12000.0, ua.VariantType.Double, True),
    ("Machine.SpindleSpeed", NS_MACHINE, 0.0, ua.VariantType.Double, False),
    ("Machine.LaserPower", NS_MACHINE, 200.0, ua.VariantType.Double, True),
    ("Machine.ScanSpeed", NS_MACHINE, 800.0, ua.VariantType.Double, True),
    ("Machine.Mode", NS_MACHINE, 1, ua.VariantType.UInt16, True),
    ("Machine.PartCount", NS_MACHINE, 0, ua.VariantType.UInt32, False),
    ("Spindle.Temp", NS_SPINDLE, 25.0, ua.VariantType.Double, False),
)


def _nid(sid: str, index: int) -> ua.NodeId:
    return ua.NodeId.from_string(f"ns={index};s={sid}")


def _code(value: int) -> ua.StatusCode:
    return ua.StatusCode(ua.UInt32(value))


class _PasswordUsers(UserManager):
    """Accepts exactly the configured username/password pairs."""

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users

    def get_user(
        self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None
    ) -> User | None:
        if username is not None and self.users.get(username) == password:
            return User(role=UserRole.User)
        return None


class MachineServer:
    """An asyncua server exposing one simulated machine.

    Tests set values directly (`set`), the simulator runs `run_cycle`. `namespaces` fixes the order in
    which namespace URIs are registered (extra URIs shift the indexes, as a reconfigured server would).
    `users` switches to username/password only; `certificate`/`private_key` with `secure=True` make the
    server offer only Basic256Sha256 SignAndEncrypt. `counters` adds that many Double variables
    `Counter.0`, `Counter.1`... (initially 0) for load tests, which `ramp` writes.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 4840,
        *,
        namespaces: Sequence[str] = (NS_MACHINE, NS_SPINDLE),
        secure: bool = False,
        certificate: Path | None = None,
        private_key: Path | None = None,
        application_uri: str = "urn:edge-agent:sim:server",
        users: dict[str, str] | None = None,
        counters: int = 0,
    ) -> None:
        self.host = host
        self.port = port
        self.endpoint = f"opc.tcp://{host}:{port}"
        self.namespaces = tuple(namespaces)
        self.secure = secure
        self.certificate = certificate
        self.private_key = private_key
        self.application_uri = application_uri
        self.users = users
        self.counters = counters
        self.server: Server | None = None
        self.nodes: dict[str, Node] = {}
        self.ns: dict[str, int] = {}
        self.reset_calls = 0
        self.loaded_programs: list[str] = []

    async def start(self) -> None:
        """Build the address space and listen."""
        server = Server(user_manager=_PasswordUsers(self.users) if self.users is not None else None)
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("edge-agent simulated machine")
        await server.set_application_uri(self.application_uri)
        if self.secure:
            if self.certificate is None or self.private_key is None:
                raise ValueError("a secure MachineServer needs certificate and private_key")
            await server.load_certificate(str(self.certificate))
            await server.load_private_key(str(self.private_key))
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
        if self.users is not None:
            server.set_identity_tokens([ua.UserNameIdentityToken])
        for uri in self.namespaces:
            self.ns[uri] = await server.register_namespace(uri)
        for uri in (NS_MACHINE, NS_SPINDLE):
            if uri not in self.ns:
                self.ns[uri] = await server.register_namespace(uri)
        objects = server.nodes.objects
        machine = await objects.add_object(
            _nid("Machine", self.ns[NS_MACHINE]), ua.QualifiedName("Machine", self.ns[NS_MACHINE])
        )
        self.nodes["Machine"] = machine
        for sid, uri, value, vtype, writable in VARIABLES:
            idx = self.ns[uri]
            node = await machine.add_variable(_nid(sid, idx), ua.QualifiedName(sid, idx), ua.Variant(value, vtype))
            if writable:
                await node.set_writable()
            self.nodes[sid] = node
        idx = self.ns[NS_MACHINE]
        for i in range(self.counters):
            sid = f"Counter.{i}"
            self.nodes[sid] = await machine.add_variable(
                _nid(sid, idx), ua.QualifiedName(sid, idx), ua.Variant(0.0, ua.VariantType.Double)
            )
        self.nodes["Machine.Reset"] = await machine.add_method(
            _nid("Machine.Reset", idx), ua.QualifiedName("Reset", idx), self._reset, [], []
        )
        self.nodes["Machine.LoadProgram"] = await machine.add_method(
            _nid("Machine.LoadProgram", idx),
            ua.QualifiedName("LoadProgram", idx),
            self._load_program,
            [ua.VariantType.String],
            [ua.VariantType.Boolean],
        )
        await server.start()
        self.server = server

    async def stop(self) -> None:
        """Stop listening and drop every session."""
        if self.server is not None:
            server, self.server = self.server, None
            await server.stop()
            # asyncua keeps a session with live subscriptions after its client vanished (so that the
            # client may transfer them); a stopped server must not leave those sessions' tasks running.
            sessions = getattr(server.iserver, "_external_sessions", {})
            for session in list(sessions.values()):
                with contextlib.suppress(Exception):
                    await session.close_session(True)

    async def __aenter__(self) -> MachineServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def node_id(self, sid: str) -> str:
        """The `ns=<index>;s=<id>` form of a simulated node under the current namespace order."""
        uri = NS_SPINDLE if sid.startswith("Spindle.") else NS_MACHINE
        return f"ns={self.ns[uri]};s={sid}"

    async def set(
        self, sid: str, value: Any, *, ts: datetime | None = None, status: ua.StatusCode | int | None = None
    ) -> None:
        """Write a value as the device would, with its source timestamp and status code."""
        node = self.nodes[sid]
        vtype = await node.read_data_type_as_variant_type()
        code = _code(status) if isinstance(status, int) else (status or ua.StatusCode())
        now = datetime.now(UTC)
        await node.write_value(
            ua.DataValue(
                ua.Variant(value, vtype),
                StatusCode=code,
                SourceTimestamp=cast(Any, ts or now),
                ServerTimestamp=cast(Any, now),
            )
        )

    async def get(self, sid: str) -> Any:
        """The current value of a simulated node."""
        return await self.nodes[sid].read_value()

    async def ramp(self, rate_hz: float, rounds: int, group: int = 10, rng: random.Random | None = None) -> int:
        """Write 1.0, 2.0 ... `rounds` to every counter at `rate_hz`; return the number of writes.

        The counters are written `group` at a time, the groups spread evenly over each period; with `rng`,
        in another order every round, so one counter's changes come 0 to 2 periods apart, as a device's
        do that knows nothing of the client's publishing. Each value carries its own source timestamp.
        A round that starts late is not made up for by writing faster: every value is written once, at
        most `rate_hz` times a second.
        """
        assert self.server is not None
        server = self.server
        ids = [self.nodes[f"Counter.{i}"].nodeid for i in range(self.counters)]
        period = 1.0 / rate_hz
        start = time.monotonic()
        writes = 0
        groups = [ids[j : j + group] for j in range(0, len(ids), group)]
        for value in range(1, rounds + 1):
            if rng is not None:
                rng.shuffle(groups)
            for slot, nodeids in enumerate(groups):
                await asyncio.sleep(start + period * slot / len(groups) - time.monotonic())
                for nodeid in nodeids:
                    now = cast(Any, datetime.now(UTC))
                    variant = ua.Variant(float(value), ua.VariantType.Double)
                    await server.write_attribute_value(
                        nodeid, ua.DataValue(variant, SourceTimestamp=now, ServerTimestamp=now)
                    )
                    writes += 1
            start = max(start + period, time.monotonic())
        return writes

    async def _reset(self, parent: ua.NodeId) -> ua.StatusCode | list[ua.Variant]:
        # A running machine cannot be reset: the device refuses, as a real controller would.
        if await self.get("Machine.State") in (RUNNING, PAUSED):
            return _code(ua.StatusCodes.BadInvalidState)
        self.reset_calls += 1
        await self.set("Machine.State", IDLE)
        return []

    async def _load_program(self, parent: ua.NodeId, name: ua.Variant) -> ua.StatusCode | list[ua.Variant]:
        program = name.Value if isinstance(name, ua.Variant) else name
        if not isinstance(program, str) or not program:
            return _code(ua.StatusCodes.BadInvalidArgument)
        self.loaded_programs.append(program)
        await self.set("Machine.Program", program)
        return [ua.Variant(True, ua.VariantType.Boolean)]

    async def run_cycle(self, *, tick_s: float = 0.5, rng: random.Random | None = None) -> None:
        """Cycle the machine until cancelled: idle, running, (paused), finished or error, idle again."""
        rng = rng or random.Random()
        job = 0
        temp = 25.0
        hot_target = 60.0

        async def tick(n: int = 1) -> None:
            nonlocal temp
            for _ in range(n):
                await asyncio.sleep(tick_s)
                setpoint = float(await self.get("Machine.SpeedSetpoint"))
                state = await self.get("Machine.State")
                speed = setpoint if state == RUNNING else 0.0
                await self.set("Machine.SpindleSpeed", speed)
                target = hot_target if state == RUNNING else 30.0
                temp += (target - temp) * 0.15 + rng.uniform(-0.3, 0.3)
                await self.set("Spindle.Temp", round(temp, 2))

        while True:
            await self.set("Machine.State", IDLE)
            await self.set("Machine.Progress", 0.0)
            await self.set("Machine.JobId", "")
            await tick(rng.randint(4, 10))
            job += 1
            hot_target = 88.0 if rng.random() < 0.35 else 60.0
            await self.set("Machine.Program", rng.choice(PROGRAMS))
            await self.set("Machine.JobId", f"JOB-{datetime.now(UTC):%Y%m%d}-{job:04d}")
            await self.set("Machine.State", RUNNING)
            fail_at = rng.uniform(0.2, 0.9) if rng.random() < 0.15 else None
            progress = 0.0
            failed = False
            while progress < 1.0:
                await tick()
                if await self.get("Machine.State") != RUNNING:
                    break  # reset or stopped from outside
                if rng.random() < 0.03:
                    await self.set("Machine.State", PAUSED)
                    await tick(rng.randint(3, 6))
                    await self.set("Machine.State", RUNNING)
                progress = min(1.0, progress + rng.uniform(0.01, 0.04))
                await self.set("Machine.Progress", round(progress, 3))
                if fail_at is not None and progress >= fail_at:
                    failed = True
                    break
            if failed:
                await self.set("Machine.State", ERROR)
                # Wait for an operator's Reset, or clear by itself after a while.
                for _ in range(40):
                    await tick()
                    if await self.get("Machine.State") != ERROR:
                        break
                continue
            await self.set("Machine.State", FINISHED)
            count = int(await self.get("Machine.PartCount"))
            await self.set("Machine.PartCount", count + 1)
            await tick(4)


async def simulate(equipment: EquipmentConfig, state_dir: Path) -> None:
    """Serve a simulated machine on the equipment's endpoint until cancelled."""
    endpoint = getattr(equipment.connection, "endpoint", "opc.tcp://127.0.0.1:4840")
    parts = urlsplit(endpoint)
    host, port = parts.hostname or "127.0.0.1", parts.port or 4840
    # asyncua logs every request at INFO; keep the simulator's output to its own lines.
    if logging.getLogger("asyncua").level == logging.NOTSET:
        logging.getLogger("asyncua").setLevel(logging.WARNING)
    machine = MachineServer(host, port)
    await machine.start()
    log.info("opcua_simulator_started", equipment_id=equipment.id, endpoint=machine.endpoint)
    try:
        await machine.run_cycle()
    finally:
        with contextlib.suppress(Exception):
            await machine.stop()
        log.info("opcua_simulator_stopped", equipment_id=equipment.id)
