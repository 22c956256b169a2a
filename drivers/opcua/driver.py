"""OpcUaDriver (asyncua): one subscription, notifications taken in whole batches, security, writes and methods.

Recovery is left to the supervisor: a lost session makes `events()` raise, the supervisor leaves the
context and re-enters it with backoff. asyncua's own auto-reconnect re-creates monitored items from the
node ids it cached: against a server restarted with its namespaces registered in another order it
reported itself connected and then delivered nothing for an `nsu=` tag, without a word. A fresh connect
resolves every `nsu=` URI again and re-reads the data types that writes are coerced to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from asyncua import Client, ua

from drivers.opcua.config import METHOD_KINDS, OpcUaCommand, OpcUaConnection, OpcUaTag, resolve_node_id
from drivers.opcua.convert import (
    PLAIN_TYPES,
    ArgumentError,
    call_arguments,
    plain,
    quality_of,
    to_reading,
    variant_type,
    write_value,
)
from drivers.opcua.publish import Item
from drivers.opcua.security import explain, set_user, setup_security
from drivers.opcua.subscription import Monitoring
from drivers.sdk import (
    CommandBase,
    CommandError,
    CommandResult,
    Driver,
    DriverContext,
    EquipmentConfig,
    Event,
    Reading,
    refuse_unknown,
    register_driver,
    utcnow,
    validate_write,
)

ASYNCUA_LOGGER = "asyncua"


@register_driver
class OpcUaDriver(Monitoring, Driver):
    """An OPC UA server: tags by subscription, commands by write or method call."""

    name = "opcua"
    connection_model = OpcUaConnection
    tag_model = OpcUaTag
    command_model = OpcUaCommand
    command_kinds: ClassVar[frozenset[str]] = frozenset({"write", "method", "reset", "load_process"})

    def __init__(self, equipment: EquipmentConfig, context: DriverContext) -> None:
        super().__init__(equipment, context)
        self.conn: OpcUaConnection = equipment.connection
        self.tags: list[OpcUaTag] = list(equipment.tags)
        refs = set(equipment.status.tag_refs().values()) if equipment.status else set()
        self.status_tags = {t.name for t in self.tags if t.name in refs}
        self.client: Client | None = None
        self.node_ids: dict[str, ua.NodeId] = {}  # resolved node ids by tag name ("cmd:<name>:object" too)
        self.unavailable: dict[str, str] = {}  # tag name -> why it reads bad
        self._init_monitoring()
        self._types: dict[str, ua.VariantType] = {}
        self._inputs: dict[str, list[ua.Argument]] = {}
        self._initial: list[Reading] = []
        self._lost: BaseException | None = None
        self._closing = False
        self._scale_warned: set[str] = set()
        self._reported: dict[str, str] = {}

    # -- config hooks

    @classmethod
    def validate_command(
        cls, equipment: EquipmentConfig, command: CommandBase, params: dict[str, Any]
    ) -> dict[str, Any]:
        """`write`: {value}; `method` and `reset`: {args: [...]} (optional)."""
        if command.kind == "write":
            return validate_write(equipment, command, params)
        if command.kind in METHOD_KINDS:
            refuse_unknown(command.name, params, {"args"})
            args = params.get("args", [])
            if not isinstance(args, list):
                raise CommandError(f"command {command.name!r}: parameter 'args' must be a list", "bad_parameters")
            for i, arg in enumerate(args):
                if not isinstance(arg, (str, int, float, bool)):
                    raise CommandError(
                        f"command {command.name!r}: args[{i}] must be a number, text or boolean", "bad_parameters"
                    )
                if isinstance(arg, float) and not math.isfinite(arg):
                    raise CommandError(f"command {command.name!r}: args[{i}] must be finite", "bad_parameters")
            return {"args": args}
        return super().validate_command(equipment, command, params)

    # -- lifecycle

    async def __aenter__(self) -> OpcUaDriver:
        await self.connect()
        return self

    async def connect(self) -> None:
        """Open the session, resolve every node id, subscribe; raise ConnectionError with the cause."""
        quiet = logging.getLogger(ASYNCUA_LOGGER)
        # asyncua logs an ERROR traceback per failed request while a server is down; the driver logs
        # the transition itself. An explicitly configured level is left alone.
        if quiet.level == logging.NOTSET:
            quiet.setLevel(logging.CRITICAL)
        if self.client is not None:
            await self._teardown()  # a second connect replaces the session, never leaks it
        self._closing = False
        self._lost = None
        conn = self.conn
        client = Client(conn.endpoint, timeout=conn.timeout_s, watchdog_intervall=conn.watchdog_interval_s)
        client.uaclient.observer = self._counters
        client.connection_lost_callback = self._on_lost
        self.client = client
        try:
            await setup_security(client, conn, self.context.state_dir, self.equipment.id, self.log)
            set_user(client, conn)
            await client.connect()
            await self._resolve(client)
            await self._subscribe(client)
        except BaseException as err:
            await self._teardown()
            if isinstance(err, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                raise
            raise ConnectionError(await explain(err, conn)) from err
        now = utcnow()
        self._initial = [Reading(t.name, None, now, "bad") for t in self.tags if t.name in self.unavailable]
        self._log_availability()
        # debug: the supervisor logs the up transition; this adds what was found on the server.
        self.log.debug(
            "connected",
            endpoint=conn.endpoint,
            security=f"{conn.security_policy}/{conn.mode}",
            tags=len(self.tags),
            unavailable=len(self.unavailable),
            publishing_interval_ms=self.publishing_ms,
            queue_sizes=sorted(set(self.queue_sizes.values())),
        )

    async def close(self) -> None:
        """Delete the subscription and close the session; never raises."""
        self._closing = True
        await self._teardown()

    async def _teardown(self) -> None:
        client, sub = self.client, self.subscription
        self.client = None
        self.subscription = None
        if sub is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.conn.timeout_s):
                    await sub.delete()
        if client is not None:
            try:
                async with asyncio.timeout(self.conn.timeout_s):
                    await client.disconnect()
            except Exception:
                # A dead link: drop the socket; nothing more to tell the server.
                with contextlib.suppress(Exception):
                    client.disconnect_socket()

    async def _on_lost(self, exc: Exception) -> None:
        self._lost = exc

    def _lost_error(self, why: str) -> ConnectionError:
        # Not logged here: the supervisor logs the transition once, with this message as its error.
        cause = f"{why}: {self._lost}" if self._lost is not None else why
        return ConnectionError(f"OPC UA server {self.conn.endpoint}: connection lost ({cause})")

    def _node_texts(self) -> dict[str, str]:
        """The configured node ids by key: tag names, and `cmd:<name>:object`/`:method` of method commands."""
        nodes = {t.name: t.node for t in self.tags}
        for cmd in self.equipment.commands:
            if cmd.kind in METHOD_KINDS:
                nodes[f"cmd:{cmd.name}:object"], nodes[f"cmd:{cmd.name}:method"] = cmd.object, cmd.method
        return nodes

    async def _resolve(self, client: Client) -> None:
        """Resolve tag and command node ids against the server's namespace array (it may have changed)."""
        namespaces = await client.get_namespace_array()
        self.node_ids.clear()
        self.unavailable.clear()
        self._types.clear()
        self._inputs.clear()
        for key, text in self._node_texts().items():
            try:
                self.node_ids[key] = resolve_node_id(text, namespaces)
            except LookupError as err:
                self.unavailable[key] = str(err)

    def _log_availability(self) -> None:
        """Log a node becoming unavailable or available again once, not at every reconnect."""
        nodes = self._node_texts()
        for key, why in self.unavailable.items():
            if self._reported.get(key) != why:
                name = key.split(":")[1] if key.startswith("cmd:") else key
                kind = "command_unavailable" if key.startswith("cmd:") else "tag_unavailable"
                self.log.warning(
                    kind, **{"command" if key.startswith("cmd:") else "tag": name}, node=nodes.get(key), reason=why
                )
                self.metrics.error("node")
        for key in set(self._reported) - set(self.unavailable):
            self.log.info("node_available", node=nodes.get(key), key=key)
        self._reported = dict(self.unavailable)

    # -- events

    async def events(self) -> AsyncIterator[Event]:
        """Initial bad readings for unavailable tags, then every data change; raise when the session is lost."""
        sub = self.subscription
        if sub is None:
            raise ConnectionError(f"OPC UA server {self.conn.endpoint}: not connected")
        handles = self.handles
        batches = sub.batches
        ready = sub.ready
        convert = self._reading
        # Most values of a busy subscription: good, time-stamped, plain, of a tag without scale or offset.
        direct = {h: t.name for h, t in handles.items() if t.scale is None and t.offset is None}
        plain_types = PLAIN_TYPES
        initial, self._initial = self._initial, []
        if handles:
            # Bad readings for unavailable tags go with the initial values (the first notification), as
            # one delivery: the monitor derives status once from all of it.
            while not batches and not sub.closed:
                ready.clear()
                await ready.wait()
        for reading in initial:
            yield reading
        # From here to the next wait, nothing awaits: what is queued (every value of a publish response)
        # is handed over before the event loop turns.
        while True:
            if not batches:
                if sub.closed:
                    break
                ready.clear()
                await ready.wait()
                continue
            entry = batches.popleft()
            if isinstance(entry, ua.StatusCode):
                raise self._lost_error(entry.name)
            sub.pending -= len(entry)
            for item in entry:
                handle, raw, status, ts = item
                name = direct.get(handle)
                if name is not None and not status and type(raw) in plain_types and ts is not None and ts.tzinfo:
                    yield Reading(name, raw, ts, "good")  # what _reading gives, without its checks
                    continue
                tag = handles.get(handle)
                if tag is not None:
                    yield convert(tag, item)
        if not self._closing:
            raise self._lost_error("subscription closed")

    def _reading(self, tag: OpcUaTag, item: Item) -> Reading:
        return to_reading(tag, item, self._unscalable)

    def _unscalable(self, tag: OpcUaTag, raw: Any) -> None:
        # A text, boolean or array node behind a scaled tag: the config expects a number. Warned once.
        if tag.name not in self._scale_warned:
            self._scale_warned.add(tag.name)
            self.log.warning(
                "tag_type_unexpected",
                tag=tag.name,
                node=tag.node,
                value_type=type(raw).__name__,
                reason="scale/offset need a number",
            )

    # -- commands

    async def send_command(self, command: CommandBase, params: dict[str, Any]) -> CommandResult:
        """Write a tag or call a method; the server's status code decides success."""
        client = self.client
        if client is None:
            raise ConnectionError(f"OPC UA server {self.conn.endpoint}: not connected")
        try:
            if command.kind == "write":
                return await self._write(client, command, params["value"])
            if command.kind in METHOD_KINDS:
                assert isinstance(command, OpcUaCommand)
                return await self._call(client, command, list(params.get("args", [])))
        except ua.UaStatusCodeError as err:
            name = ua.StatusCode(err.code).name
            return CommandResult(False, f"the server refused {command.name!r}: {name}", {"status": name})
        if command.kind == "load_process":
            return CommandResult(
                False, "load_process is carried out by the daemon through the parameter write commands"
            )
        return CommandResult(False, f"command kind {command.kind!r} is not supported by the OPC UA driver")

    async def _write(self, client: Client, command: CommandBase, value: Any) -> CommandResult:
        tag = self.equipment.tag(command.tag or "")
        node_id = self.node_ids.get(tag.name) if tag is not None else None
        if tag is None or node_id is None:
            why = self.unavailable.get(tag.name, "unknown tag") if tag is not None else "unknown tag"
            return CommandResult(False, f"tag {command.tag!r} cannot be written: {why}", {"status": "BadNodeIdUnknown"})
        vtype = self._types.get(tag.name)
        if vtype is None:
            dv = (await client.read_attributes([client.get_node(node_id)], ua.AttributeIds.DataType))[0]
            if quality_of(dv.StatusCode) != "good":
                name = dv.StatusCode.name if dv.StatusCode else "Bad"
                return CommandResult(
                    False, f"tag {tag.name!r} ({tag.node}): cannot read its data type: {name}", {"status": name}
                )
            vtype = variant_type(dv.Value.Value if dv.Value else None)
            if vtype is None:
                return CommandResult(
                    False,
                    f"tag {tag.name!r} ({tag.node}): its data type {dv.Value.Value if dv.Value else None}"
                    " cannot be written",
                    {"status": "BadTypeMismatch"},
                )
            self._types[tag.name] = vtype
        try:
            raw = write_value(tag, value, vtype)
        except ValueError as err:
            return CommandResult(False, str(err), {"status": "BadTypeMismatch"})
        code = (
            await client.uaclient.write_attributes(
                [node_id], [ua.DataValue(ua.Variant(raw, vtype))], ua.AttributeIds.Value
            )
        )[0]
        if code.is_good():
            return CommandResult(True, f"wrote {raw!r} to {tag.name}", {"value": raw, "status": code.name})
        self.log.info("write_refused", tag=tag.name, node=tag.node, status=code.name)
        return CommandResult(False, f"the server refused the write to {tag.name}: {code.name}", {"status": code.name})

    async def _call(self, client: Client, command: OpcUaCommand, args: list[Any]) -> CommandResult:
        obj = self.node_ids.get(f"cmd:{command.name}:object")
        method = self.node_ids.get(f"cmd:{command.name}:method")
        if obj is None or method is None:
            why = self.unavailable.get(f"cmd:{command.name}:object") or self.unavailable.get(
                f"cmd:{command.name}:method"
            )
            return CommandResult(
                False, f"method {command.name!r} cannot be called: {why}", {"status": "BadNodeIdUnknown"}
            )
        inputs = self._inputs.get(command.name)
        if inputs is None:
            inputs = await self._input_arguments(client, method)
            self._inputs[command.name] = inputs
        try:
            variants = call_arguments(command.name, args, inputs)
        except ArgumentError as err:
            return CommandResult(False, str(err), {"status": err.status})
        request = ua.CallMethodRequest(ObjectId=obj, MethodId=method, InputArguments=variants)
        result = (await client.uaclient.call([request]))[0]
        code = result.StatusCode
        outputs = [plain(v.Value) for v in (result.OutputArguments or [])]
        if code.is_good():
            return CommandResult(True, f"{command.name} done", {"status": code.name, "outputs": outputs})
        bad_args = [f"args[{i}]: {c.name}" for i, c in enumerate(result.InputArgumentResults or []) if not c.is_good()]
        detail = f" ({', '.join(bad_args)})" if bad_args else ""
        self.log.info("method_refused", command=command.name, status=code.name)
        return CommandResult(
            False, f"the server refused {command.name}: {code.name}{detail}", {"status": code.name, "outputs": outputs}
        )

    async def _input_arguments(self, client: Client, method: ua.NodeId) -> list[ua.Argument]:
        try:
            prop = await client.get_node(method).get_child("0:InputArguments")
            value = await prop.read_value()
        except ua.UaStatusCodeError:
            return []  # no declared inputs: arguments go as given
        return list(value) if isinstance(value, list) else []
