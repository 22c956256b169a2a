"""OPC UA driver (asyncua): one subscription, notifications taken in whole batches, security, writes and methods.

asyncua's iterator mode wraps every value in a queued event object of its own, which cost more CPU than
the rest of the daemon's path per value; the subscription here queues each notification's item list
as it arrives, bounded in values, and `events()` walks the lists. The session's Publish responses are
decoded by drivers/opcua_publish.py, which reads data changes straight from the bytes.

Recovery is left to the supervisor: a lost session makes `events()` raise, the supervisor leaves the
context and re-enters it with backoff. asyncua's own auto-reconnect re-creates monitored items from the
node ids it cached: against a server restarted with its namespaces registered in another order it
reported itself connected and then delivered nothing for an `nsu=` tag, without a word. A fresh connect
resolves every `nsu=` URI again and re-reads the data types that writes are coerced to.

Every change the server reports is delivered without per-tag tuning: items are sampled as fast as the
server can (sampling interval 0) and get a server-side queue sized from the intervals the server revised
(`derived_queue_size`), so no value is conflated inside a publishing interval. A value the server flags
with the Overflow bit (its queue for the item overflowed) is counted (`overflows`, and the driver errors
of kind server_overflow), and each transition logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from asyncua import Client, Node, ua
from asyncua.client.ua_session import UaSession
from asyncua.common.subscription import Subscription, SubscriptionItemData
from asyncua.crypto import security_policies, uacrypto
from asyncua.observer import Observer
from cryptography import x509
from pydantic import Field, field_validator, model_validator

from agent import metrics
from agent.config import CommandBase, EquipmentConfig, SecretHolder, TagBase
from agent.errors import CommandError
from agent.model import CommandResult, Event, Reading, utcnow
from drivers.base import Driver, DriverContext, refuse_unknown, validate_write
from drivers.opcua_publish import DataChanges, Item, PublishDecodeError, items_of, overflowed_handles
from drivers.opcua_publish import install as install_publish_decoder
from drivers.registry import register_driver

NODE_RE = re.compile(r"^(?:nsu=(?P<uri>[^;]+);|ns=(?P<ns>\d+);)?(?P<kind>[isgb])=(?P<ident>.+)$", re.DOTALL)
# Status tags keep at least this many values, so a state that lasts less than a publishing interval is
# reported even where the derived queue is shorter (a long sampling interval).
STATUS_QUEUE_SIZE = 10
# A derived server-side queue holds every sample of one publishing interval and of a publish response
# this late on top (at least one more publishing interval): the client keeps one PublishRequest in
# flight (asyncua does), so while it is busy (a collection, a slow disk commit, a retransmitted TCP
# segment: 200 ms at the least on Linux) the server keeps sampling into the queue with nowhere to send.
LATE_PUBLISH_MS = 1000.0
# At least 2 (one late interval at one sample per interval); at most 1,000: a second of samples at 1 kHz,
# and a bound on what one item may hold in the server's memory (servers cap it lower or higher anyway).
MIN_QUEUE_SIZE, MAX_QUEUE_SIZE = 2, 1000
# A server revising the sampling interval to 0 reports changes as they happen, at no rate it tells:
# assume changes no closer together than this.
EXCEPTION_SAMPLING_MS = 10.0
# Overflow flagged by the server: "no longer overflowing" after this long without a flagged value.
OVERFLOW_QUIET_S = 10.0
# `reset` is a method call too, the one command the daemon lets run while the equipment is in error.
METHOD_KINDS = ("method", "reset")
ASYNCUA_LOGGER = "asyncua"

_INT_RANGES: dict[ua.VariantType, tuple[int, int]] = {
    ua.VariantType.SByte: (-(2**7), 2**7 - 1),
    ua.VariantType.Byte: (0, 2**8 - 1),
    ua.VariantType.Int16: (-(2**15), 2**15 - 1),
    ua.VariantType.UInt16: (0, 2**16 - 1),
    ua.VariantType.Int32: (-(2**31), 2**31 - 1),
    ua.VariantType.UInt32: (0, 2**32 - 1),
    ua.VariantType.Int64: (-(2**63), 2**63 - 1),
    ua.VariantType.UInt64: (0, 2**64 - 1),
}
_FLOATS = (ua.VariantType.Float, ua.VariantType.Double)
_PLAIN = (int, float, str, bool, type(None), datetime, bytes)
_PLAIN_TYPES = frozenset(_PLAIN)


def derived_queue_size(publishing_ms: float, sampling_ms: float | None) -> int:
    """The server-side queue for an item sampled every `sampling_ms` in a subscription publishing every
    `publishing_ms` (both as the server revised them): every sample of a publishing interval and of a
    late publish on top, bounded to MIN_QUEUE_SIZE..MAX_QUEUE_SIZE.

    A sampling interval of 0 (the server reports changes as they happen), an unknown one, or one the
    server left negative (-1: "the publishing interval") is read as EXCEPTION_SAMPLING_MS or the
    publishing interval respectively.
    """
    if sampling_ms is None or not math.isfinite(sampling_ms) or sampling_ms == 0:
        sampling_ms = EXCEPTION_SAMPLING_MS
    elif sampling_ms < 0:
        sampling_ms = publishing_ms
    span = publishing_ms + max(publishing_ms, LATE_PUBLISH_MS)
    return max(MIN_QUEUE_SIZE, min(MAX_QUEUE_SIZE, math.ceil(span / sampling_ms)))


def check_node_id(text: str) -> str:
    """Validate `ns=2;s=X`, `i=85`, `nsu=urn:x;s=X` (also g= and b=); return it unchanged."""
    m = NODE_RE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a node id (ns=<index>;s=<name>, i=, g=, b=, or nsu=<uri>;s=<name>)")
    try:
        ua.NodeId.from_string(f"ns={m['ns'] or 0};{m['kind']}={m['ident']}")
    except Exception as err:
        raise ValueError(f"{text!r} is not a valid node id: {err}") from None
    return text.strip()


# ---- config models ---------------------------------------------------------------------------------


class OpcUaConnection(SecretHolder):
    """`[equipment.connection]` of an OPC UA equipment."""

    __secrets__ = ("password",)
    endpoint: str
    security_policy: Literal["None", "Basic256Sha256"] = "None"
    security_mode: Literal["None", "Sign", "SignAndEncrypt"] | None = None
    certificate_file: Path | None = None
    private_key_file: Path | None = None
    server_certificate_file: Path | None = None
    application_uri: str | None = None
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    publishing_interval_ms: float = Field(100.0, gt=0)
    timeout_s: float = Field(4.0, gt=0)
    watchdog_interval_s: float = Field(1.0, gt=0)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme != "opc.tcp" or not parts.hostname:
            raise ValueError("must be opc.tcp://host:port")
        try:
            _ = parts.port
        except ValueError as err:
            raise ValueError("has an invalid port") from err
        return v

    @model_validator(mode="after")
    def _security(self) -> OpcUaConnection:
        if self.security_policy == "None":
            if self.security_mode not in (None, "None"):
                raise ValueError(f"security_mode {self.security_mode} needs security_policy Basic256Sha256")
        elif self.security_mode == "None":
            raise ValueError("security_policy Basic256Sha256 needs security_mode Sign or SignAndEncrypt")
        if (self.certificate_file is None) != (self.private_key_file is None):
            raise ValueError("give certificate_file and private_key_file together (or neither, to generate them)")
        if (self.password_file or self.password_env) and not self.username:
            raise ValueError("a password needs a username")
        return self

    @property
    def mode(self) -> str:
        """The effective message security mode."""
        if self.security_policy == "None":
            return "None"
        return self.security_mode or "SignAndEncrypt"

    @property
    def secure(self) -> bool:
        return self.security_policy != "None"


class OpcUaTag(TagBase):
    """An OPC UA tag: a variable node, monitored in the equipment's subscription."""

    node: str
    # Unset: 0, the server's fastest (on change where it can).
    sampling_interval_ms: float | None = Field(None, ge=0)
    # Unset: derived from the intervals the server revised (derived_queue_size).
    queue_size: int | None = Field(None, ge=1)

    @field_validator("node")
    @classmethod
    def _node(cls, v: str) -> str:
        return check_node_id(v)


class OpcUaCommand(CommandBase):
    """`write` (a tag), `method` or `reset` (`object` + `method` node ids), or `load_process`."""

    object: str | None = None
    method: str | None = None

    @field_validator("object", "method")
    @classmethod
    def _node(cls, v: str | None) -> str | None:
        return None if v is None else check_node_id(v)

    @model_validator(mode="after")
    def _fields(self) -> OpcUaCommand:
        if self.kind == "write" and not self.tag:
            raise ValueError("a write command needs a tag")
        if self.kind in METHOD_KINDS and not (self.object and self.method):
            raise ValueError(f"a {self.kind} command needs object and method node ids")
        if self.kind not in METHOD_KINDS and (self.object or self.method):
            raise ValueError("object and method belong to method and reset commands")
        return self


# ---- helpers ---------------------------------------------------------------------------------------


def quality_of(code: ua.StatusCode | None) -> str:
    """The contract's quality for an OPC UA status code."""
    if code is None or code.value == 0:
        return "good"
    if code.is_good():
        return "good"
    return "uncertain" if code.is_uncertain() else "bad"


def plain(value: Any) -> Any:
    """An OPC UA value as plain Python (JSON-friendly after json_safe)."""
    if type(value) in _PLAIN:
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, ua.LocalizedText):
        return value.Text
    if isinstance(value, ua.QualifiedName):
        return value.Name
    if isinstance(value, ua.NodeId):
        return value.to_string()
    if isinstance(value, ua.StatusCode):
        return value.name
    if isinstance(value, ua.Variant):
        return plain(value.Value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (int, float, str)):
        return value
    return str(value)


def coerce(value: Any, vtype: ua.VariantType, what: str) -> Any:
    """Convert a parameter to a node's builtin data type; ValueError names what does not fit."""
    name = vtype.name
    if vtype == ua.VariantType.Boolean:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{what}: {value!r} is not a Boolean (true/false or 0/1)")
    if vtype in _INT_RANGES:
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, float):
            if not math.isfinite(value) or not value.is_integer():
                raise ValueError(f"{what}: {value!r} is not an integer, the node's data type is {name}")
            value = int(value)
        if not isinstance(value, int):
            raise ValueError(f"{what}: {value!r} is not a number, the node's data type is {name}")
        low, high = _INT_RANGES[vtype]
        if not low <= value <= high:
            raise ValueError(f"{what}: {value} does not fit the node's data type {name} ({low}..{high})")
        return value
    if vtype in _FLOATS:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
            if vtype == ua.VariantType.Float and math.isfinite(out) and abs(out) > 3.4028234663852886e38:
                raise ValueError(f"{what}: {value} does not fit the node's data type Float")
            return out
        raise ValueError(f"{what}: {value!r} is not a number, the node's data type is {name}")
    if vtype == ua.VariantType.String:
        if isinstance(value, str):
            return value
        raise ValueError(f"{what}: {value!r} is not text, the node's data type is String")
    raise ValueError(f"{what}: writing the data type {name} is not supported")


def _variant_type(datatype: Any) -> ua.VariantType | None:
    """The builtin VariantType of a DataType node id, or None for structured/custom types."""
    if isinstance(datatype, ua.NodeId) and datatype.NamespaceIndex == 0 and isinstance(datatype.Identifier, int):
        if 1 <= datatype.Identifier <= 25:
            return ua.VariantType(datatype.Identifier)
        if datatype.Identifier == 29:  # Enumeration subtypes travel as Int32
            return ua.VariantType.Int32
    return None


def _certificate_uri(path: Path) -> str | None:
    """The application URI (subjectAltName URI) a certificate carries."""
    data = path.read_bytes()
    cert = (
        x509.load_pem_x509_certificate(data)
        if data.lstrip().startswith(b"-----")
        else x509.load_der_x509_certificate(data)
    )
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


_HINTS = (
    (("BadUserAccessDenied", "BadIdentityToken"), "the server refused the user: check username and password"),
    (("BadSecurityPolicyRejected",), "the server offers no endpoint with this security_policy/security_mode"),
    (
        ("BadCertificate", "BadSecurityChecksFailed", "BadNonceInvalid"),
        "certificate or signature check failed: check server_certificate_file and that the server trusts"
        " our certificate",
    ),
    (("BadTcpEndpointUrlInvalid",), "the server does not know this endpoint URL"),
)


def _hint(name: str) -> str:
    for prefixes, hint in _HINTS:
        if name.startswith(prefixes):
            return hint
    return ""


class _Counters(Observer):
    """asyncua observer: request latency, publish responses and the values they carried."""

    def __init__(self, equipment_id: str) -> None:
        self.latency = metrics.DRIVER_LATENCY.labels(equipment_id)
        self.reads = metrics.DRIVER_READS.labels(equipment_id)
        self.values = metrics.DRIVER_VALUES.labels(equipment_id)
        self.produced = 0

    def observe_request(self, request: Any) -> AbstractContextManager[None]:
        # Publish requests are long polls; their duration says nothing about the device.
        if isinstance(request, ua.PublishRequest):
            return nullcontext()
        return super().observe_request(request)

    def on_request(self, request_type: str, duration: float, error: BaseException | None) -> None:
        self.latency.observe(duration)

    def on_notification(self, subscription_id: int | None, event_count: int) -> None:
        self.produced += event_count
        self.reads.inc()
        self.values.inc(event_count)  # once per publish response, as the other drivers count per poll


class _BatchSubscription(Subscription):
    """A subscription that queues each notification's item list whole, not one asyncua event per value."""

    def __init__(
        self,
        session: UaSession,
        params: ua.CreateSubscriptionParameters,
        maxsize: int,
        on_dropped: Callable[[int], None],
        on_values: Callable[[list[int]], None],
    ) -> None:
        # asyncua's own per-event queue stays empty: publish_callback below replaces its delivery.
        super().__init__(session, params, None, queue_maxsize=1)
        # Item lists of data changes, and a bad status code where the server or the client ended it.
        self.batches: deque[list[Item] | ua.StatusCode] = deque()
        self.pending = 0  # values in `batches`
        self.maxsize = maxsize
        self.closed = False
        self.ready = asyncio.Event()
        self._on_dropped = on_dropped
        self._on_values = on_values

    async def create_items(self, requests: list[ua.MonitoredItemCreateRequest]) -> list[ua.MonitoredItemCreateResult]:
        """Create monitored items and return the server's results whole (its revised parameters too)."""
        params = ua.CreateMonitoredItemsParameters(
            SubscriptionId=self.subscription_id, ItemsToCreate=requests, TimestampsToReturn=ua.TimestampsToReturn.Both
        )
        results = await self.server.create_monitored_items(params)
        for request, result in zip(requests, results, strict=True):
            if result.StatusCode.is_good():
                # What asyncua keeps to create the item again (its stale-subscription watchdog).
                asked = request.RequestedParameters
                data = SubscriptionItemData()
                data.node = Node(self.server, request.ItemToMonitor.NodeId)
                data.attribute = request.ItemToMonitor.AttributeId
                data.client_handle = asked.ClientHandle
                data.server_handle = result.MonitoredItemId
                data.queuesize = asked.QueueSize
                data.sampling_interval = asked.SamplingInterval
                data.monitoring_mode = request.MonitoringMode
                self._monitored_items[asked.ClientHandle] = data
        return results

    async def resize_queues(self, sizes: dict[int, int]) -> dict[int, int]:
        """Ask the server for other queue sizes (by client handle); return the sizes it granted."""
        items = [self._monitored_items[h] for h in sizes]
        params = ua.ModifyMonitoredItemsParameters(
            SubscriptionId=self.subscription_id,
            TimestampsToReturn=ua.TimestampsToReturn.Both,
            ItemsToModify=[
                ua.MonitoredItemModifyRequest(
                    MonitoredItemId=item.server_handle,
                    RequestedParameters=ua.MonitoringParameters(
                        ClientHandle=item.client_handle,
                        SamplingInterval=item.sampling_interval,
                        QueueSize=sizes[handle],
                        DiscardOldest=True,
                    ),
                )
                for handle, item in zip(sizes, items, strict=True)
            ],
        )
        results = await self.server.modify_monitored_items(params)
        granted: dict[int, int] = {}
        for (handle, size), item, result in zip(sizes.items(), items, results, strict=True):
            if result.StatusCode.is_good():
                item.queuesize = size
                granted[handle] = int(result.RevisedQueueSize) or size
        return granted

    async def publish_callback(self, publish_result: ua.PublishResult) -> None:
        self.last_publish_at = time.monotonic()
        message = publish_result.NotificationMessage
        data = message.NotificationData
        if data is None:
            return
        self.last_sequence_number = int(message.SequenceNumber)
        if not data:
            return  # a keep-alive
        values = 0
        overflowed: list[int] = []
        for notif in data:
            if type(notif) is DataChanges:
                items = notif.items
                overflowed += notif.overflowed
            elif isinstance(notif, ua.DataChangeNotification):  # decoded by asyncua (not via the session)
                items = items_of(notif)
                overflowed += overflowed_handles(items)
            else:
                items = []
                if isinstance(notif, ua.StatusChangeNotification):
                    if notif.Status is not None and notif.Status.is_bad():
                        self.batches.append(notif.Status)
            if items:
                self.batches.append(items)
                values += len(items)
        if values:
            self.pending += values
            if self.pending > self.maxsize:
                self._trim(self.pending - self.maxsize)
            self._on_values(overflowed)
        self.ready.set()
        self._observe(lambda: self.server.observer.on_notification(self.subscription_id, values))

    def _trim(self, excess: int) -> None:
        """Drop the oldest `excess` values (never a status), so a slow consumer costs bounded memory."""
        batches = self.batches
        held: list[ua.StatusCode] = []
        dropped = 0
        while dropped < excess and batches:
            entry = batches.popleft()
            if isinstance(entry, ua.StatusCode):
                held.append(entry)
                continue
            n = min(len(entry), excess - dropped)
            if n < len(entry):
                batches.appendleft(entry[n:])
            dropped += n
        for status in reversed(held):
            batches.appendleft(status)
        self.pending -= dropped
        self._on_dropped(dropped)

    def _close_iterator(self) -> None:
        # Called by delete(): the consumer drains what is queued, then ends.
        super()._close_iterator()
        self.closed = True
        self.ready.set()


# ---- the driver ------------------------------------------------------------------------------------


@register_driver
class OpcUaDriver(Driver):
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
        self.subscription: _BatchSubscription | None = None
        self.node_ids: dict[str, ua.NodeId] = {}  # resolved node ids by tag name ("cmd:<name>:object" too)
        self.unavailable: dict[str, str] = {}  # tag name -> why it reads bad
        self.handles: dict[int, OpcUaTag] = {}
        self.dropped = 0
        self.queue_maxsize = 0
        self.publishing_ms = self.conn.publishing_interval_ms  # as the server revised it
        self.queue_sizes: dict[str, int] = {}  # tag name -> the server-side queue size granted
        self.overflows = 0  # values the server flagged with the Overflow bit, this session
        self.overflowing = False
        self.undecodable = 0  # Publish responses that could not be decoded (their values are lost)
        self.overflow_quiet_s = OVERFLOW_QUIET_S
        self._overflow_at = 0.0
        self._types: dict[str, ua.VariantType] = {}
        self._inputs: dict[str, list[ua.Argument]] = {}
        self._initial: list[Reading] = []
        self._counters = _Counters(equipment.id)
        self._lost: BaseException | None = None
        self._closing = False
        self._scale_warned: set[str] = set()
        self._reported: dict[str, str] = {}
        self._dropped_metric = metrics.DRIVER_DROPPED.labels(equipment.id)
        self._errors_metric = metrics.DRIVER_ERRORS

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
            await self._setup_security(client)
            if conn.username:
                client.set_user(conn.username)
                password = conn.secret("password")
                if password:
                    client.set_password(password)
            await client.connect()
            await self._resolve(client)
            await self._subscribe(client)
        except BaseException as err:
            await self._teardown()
            if isinstance(err, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                raise
            raise ConnectionError(await self._explain(err)) from err
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

    def _describe(self, err: BaseException) -> str:
        """One clear sentence for a failed connect, naming the endpoint and the cause; no secrets."""
        where = f"OPC UA server {self.conn.endpoint}"
        if isinstance(err, ua.UaStatusCodeError):
            name = ua.StatusCode(err.code).name
            hint = _hint(name)
            return f"{where} refused the connection: {name}" + (f" ({hint})" if hint else "")
        if isinstance(err, ua.UaError) and "certificate mismatch" in str(err).lower():
            return f"{where} presented a certificate that differs from server_certificate_file (pinned)"
        if isinstance(err, (asyncio.TimeoutError, TimeoutError)):
            if self.conn.secure:
                return (
                    f"{where} did not answer within {self.conn.timeout_s:g} s (with security on, a wrong "
                    "server_certificate_file or an untrusted client certificate looks like this)"
                )
            return f"{where} did not answer within {self.conn.timeout_s:g} s"
        if isinstance(err, ConnectionRefusedError):
            return f"{where} is unreachable: connection refused"
        if isinstance(err, ConnectionError) and str(err) in ("", "Connection is not open"):
            return f"{where} closed the connection" + (
                " during the secure-channel handshake (check security_policy/security_mode and server_certificate_file)"
                if self.conn.secure
                else " (does it accept security None? it may offer only secure endpoints)"
            )
        if isinstance(err, OSError):
            return f"{where} is unreachable: {err.strerror or err}"
        if isinstance(err, _ConfigFault):
            return str(err)
        return f"{where}: connect failed: {type(err).__name__}: {err}"

    async def _probe_endpoints(self) -> list[ua.EndpointDescription] | None:
        """The server's endpoints over an unauthenticated channel, to explain a refusal; None if unknown."""
        probe = Client(self.conn.endpoint, timeout=self.conn.timeout_s)
        try:
            async with asyncio.timeout(self.conn.timeout_s):
                return await probe.connect_and_get_server_endpoints()
        except Exception:
            return None

    async def _explain(self, err: BaseException) -> str:
        """A failed connect in one sentence; asks the server's endpoints where that makes it precise."""
        conn = self.conn
        message = self._describe(err)
        if isinstance(err, ua.UaError) and "no matching endpoints" in str(err).lower():
            endpoints = await self._probe_endpoints() or []
            offered = ", ".join(
                sorted(
                    {f"{e.SecurityPolicyUri.rsplit('#', 1)[-1]}/{e.SecurityMode.name.rstrip('_')}" for e in endpoints}
                )
            )
            wanted = f"security_policy {conn.security_policy} / security_mode {conn.mode}"
            return f"OPC UA server {conn.endpoint} offers no endpoint with {wanted} (it offers: {offered or 'unknown'})"
        if (
            conn.secure
            and conn.server_certificate_file is not None
            and isinstance(err, (TimeoutError, ConnectionError))
        ):
            probed = await self._probe_endpoints()
            if probed:
                with contextlib.suppress(Exception):
                    pinned = uacrypto.der_from_x509(await uacrypto.load_certificate(str(conn.server_certificate_file)))
                    if all(e.ServerCertificate and e.ServerCertificate[: len(pinned)] != pinned for e in probed):
                        return (
                            f"OPC UA server {conn.endpoint} presents a certificate that differs from "
                            f"server_certificate_file {conn.server_certificate_file} (pinned)"
                        )
        return message

    async def _setup_security(self, client: Client) -> None:
        conn = self.conn
        if not conn.secure:
            return
        cert, key = conn.certificate_file, conn.private_key_file
        if cert is None or key is None:
            folder = self.context.state_dir / "opcua"
            cert, key = folder / f"{self.equipment.id}-cert.der", folder / f"{self.equipment.id}-key.pem"
            if not (cert.exists() and key.exists()):
                client.application_uri = (
                    conn.application_uri or f"urn:{socket.gethostname()}:edge-agent:{self.equipment.id}"
                )
                await client.setup_self_signed_certificate(key, cert)
                with contextlib.suppress(OSError):
                    key.chmod(0o600)
                self.log.info(
                    "client_certificate_generated", certificate=str(cert), application_uri=client.application_uri
                )
        for path, field in ((cert, "certificate_file"), (key, "private_key_file")):
            if not path.is_file():
                raise _ConfigFault(f"{field} {path} does not exist")
        try:
            uri = _certificate_uri(cert)
        except (OSError, ValueError) as err:
            raise _ConfigFault(f"certificate_file {cert} is not a certificate: {err}") from err
        if conn.application_uri and uri and conn.application_uri != uri:
            raise _ConfigFault(f"application_uri {conn.application_uri} differs from the URI in {cert} ({uri})")
        # The server checks that the session's application URI is the one in our certificate.
        client.application_uri = uri or conn.application_uri or client.application_uri
        server_cert: str | None = None
        if conn.server_certificate_file is not None:
            if not conn.server_certificate_file.is_file():
                raise _ConfigFault(f"server_certificate_file {conn.server_certificate_file} does not exist")
            server_cert = str(conn.server_certificate_file)
        mode = getattr(ua.MessageSecurityMode, conn.mode)
        await client.set_security(
            security_policies.SecurityPolicyBasic256Sha256,
            str(cert),
            str(key),
            server_certificate=server_cert,
            mode=mode,
        )

    async def _resolve(self, client: Client) -> None:
        """Resolve tag and command node ids against the server's namespace array (it may have changed)."""
        namespaces = await client.get_namespace_array()
        self.node_ids.clear()
        self.unavailable.clear()
        self._types.clear()
        self._inputs.clear()

        def resolve(text: str) -> ua.NodeId:
            m = NODE_RE.match(text)
            assert m is not None  # validated by the config model
            if m["uri"] is not None:
                try:
                    index = namespaces.index(m["uri"])
                except ValueError:
                    raise LookupError(f"namespace {m['uri']} is not on the server") from None
            else:
                index = int(m["ns"] or 0)
            return ua.NodeId.from_string(f"ns={index};{m['kind']}={m['ident']}")

        for tag in self.tags:
            try:
                self.node_ids[tag.name] = resolve(tag.node)
            except LookupError as err:
                self.unavailable[tag.name] = str(err)
        for cmd in self.equipment.commands:
            if cmd.kind in METHOD_KINDS:
                for part in ("object", "method"):
                    try:
                        self.node_ids[f"cmd:{cmd.name}:{part}"] = resolve(getattr(cmd, part))
                    except LookupError as err:
                        self.unavailable[f"cmd:{cmd.name}:{part}"] = str(err)

    async def _subscribe(self, client: Client) -> None:
        """One subscription; a monitored item per resolvable tag; bad tags become bad readings."""
        conn = self.conn
        monitored = [t for t in self.tags if t.name in self.node_ids]
        self.handles = {}
        self.queue_sizes = {}
        self._initial = []
        self._counters.produced = 0
        self.dropped = 0
        self.overflows = 0
        self.overflowing = False
        sub = await self._create_subscription(client, conn.publishing_interval_ms)
        requests = []
        for handle, tag in enumerate(monitored, start=1):
            rv = ua.ReadValueId(NodeId=self.node_ids[tag.name], AttributeId=ua.AttributeIds.Value)
            sampling = self._sampling_ms(tag)
            # A first guess: sampled as asked, or at the publishing interval when asked for 0.
            params = ua.MonitoringParameters(
                ClientHandle=handle,
                SamplingInterval=sampling,
                QueueSize=self._queue_size(tag, sampling or self.publishing_ms),
                DiscardOldest=True,  # on overflow the newest values stay; order is kept either way
            )
            requests.append(
                ua.MonitoredItemCreateRequest(
                    ItemToMonitor=rv, MonitoringMode=ua.MonitoringMode.Reporting, RequestedParameters=params
                )
            )
            self.handles[handle] = tag
        results = await sub.create_items(requests) if requests else []
        granted: dict[int, int] = {}
        resize: dict[int, int] = {}
        for request, result in zip(requests, results, strict=True):
            handle = request.RequestedParameters.ClientHandle
            if not result.StatusCode.is_good():
                tag = self.handles.pop(handle)
                self.unavailable[tag.name] = f"{result.StatusCode.name}"
                continue
            # The queue the revised sampling interval needs; only a guess that missed costs a round trip.
            want = self._queue_size(self.handles[handle], result.RevisedSamplingInterval)
            granted[handle] = int(result.RevisedQueueSize) or request.RequestedParameters.QueueSize
            if want != request.RequestedParameters.QueueSize:
                resize[handle] = want
        if resize:
            try:
                granted.update(await sub.resize_queues(resize))
            except ua.UaStatusCodeError as err:
                # A server without ModifyMonitoredItems keeps the first guess; values still flow.
                self.log.info("queue_resize_refused", items=len(resize), status=ua.StatusCode(err.code).name)
        self.queue_sizes = {self.handles[h].name: size for h, size in granted.items()}
        sub.maxsize = self.queue_maxsize = self._queue_maxsize(sum(granted.values()))
        now = utcnow()
        for tag in self.tags:
            why = self.unavailable.get(tag.name)
            if why is not None:
                self._initial.append(Reading(tag.name, None, now, "bad"))
        self._log_availability()

    async def _create_subscription(self, client: Client, period_ms: float) -> _BatchSubscription:
        """What Client.create_subscription does, with the batch-queueing subscription."""
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=period_ms,
            RequestedLifetimeCount=10000,
            RequestedMaxKeepAliveCount=client.get_keepalive_count(period_ms),
            MaxNotificationsPerPublish=10000,
            PublishingEnabled=True,
            Priority=0,
        )
        session = client.uaclient.session
        install_publish_decoder(session, self._note_undecodable)
        # The client-side bound is set once the items' queues are known.
        sub = _BatchSubscription(session, params, self._queue_maxsize(0), self._note_dropped, self._note_values)
        # Set before init: a failing connect tears it down like any other.
        self.subscription = sub
        results = await sub.init()
        revised = client.get_subscription_revised_params(params, results)
        if revised:
            await sub.update(revised)
        interval = results.RevisedPublishingInterval
        self.publishing_ms = interval if math.isfinite(interval) and interval > 0 else period_ms
        # The client's stale-subscription watchdog re-creates what it finds here.
        client._subscriptions.append(sub)
        return sub

    def _log_availability(self) -> None:
        """Log a node becoming unavailable or available again once, not at every reconnect."""
        nodes = {t.name: t.node for t in self.tags}
        for cmd in self.equipment.commands:
            if cmd.kind in METHOD_KINDS:
                nodes[f"cmd:{cmd.name}:object"], nodes[f"cmd:{cmd.name}:method"] = cmd.object, cmd.method
        for key, why in self.unavailable.items():
            if self._reported.get(key) != why:
                name = key.split(":")[1] if key.startswith("cmd:") else key
                kind = "command_unavailable" if key.startswith("cmd:") else "tag_unavailable"
                self.log.warning(
                    kind, **{"command" if key.startswith("cmd:") else "tag": name}, node=nodes.get(key), reason=why
                )
                self._errors_metric.labels(self.equipment.id, "node").inc()
        for key in set(self._reported) - set(self.unavailable):
            self.log.info("node_available", node=nodes.get(key), key=key)
        self._reported = dict(self.unavailable)

    def _queue_maxsize(self, queued: int) -> int:
        # One publish response may carry every queued value of every item at once; the client-side
        # queue must hold all of them (twice, for a consumer one response behind), or the oldest are
        # dropped (counted and logged).
        return max(1000, 2 * queued + 16)

    def _queue_size(self, tag: OpcUaTag, sampling_ms: float | None) -> int:
        """The tag's `queue_size`, else derived from the (revised) intervals; status tags keep a floor."""
        if tag.queue_size is not None:
            return tag.queue_size
        size = derived_queue_size(self.publishing_ms, sampling_ms)
        return max(size, STATUS_QUEUE_SIZE) if tag.name in self.status_tags else size

    def _sampling_ms(self, tag: OpcUaTag) -> float:
        # 0: the server's fastest practical rate, on change where it can; the queue takes the rest.
        return tag.sampling_interval_ms if tag.sampling_interval_ms is not None else 0.0

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
        plain_types = _PLAIN_TYPES
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

    def _lost_error(self, why: str) -> ConnectionError:
        # Not logged here: the supervisor logs the transition once, with this message as its error.
        cause = f"{why}: {self._lost}" if self._lost is not None else why
        return ConnectionError(f"OPC UA server {self.conn.endpoint}: connection lost ({cause})")

    def _note_values(self, overflowed: list[int]) -> None:
        """A publish response with values: count those the server flagged Overflow; log the transitions."""
        now = time.monotonic()
        if overflowed:
            self.overflows += len(overflowed)
            self._errors_metric.labels(self.equipment.id, "server_overflow").inc(len(overflowed))
            self._overflow_at = now
            if not self.overflowing:
                self.overflowing = True
                names = sorted({self.handles[h].name for h in overflowed if h in self.handles})
                self.log.warning(
                    "server_queue_overflow",
                    values=len(overflowed),
                    tags=names[:10],
                    queue_sizes={n: self.queue_sizes.get(n) for n in names[:10]},
                    reason="the server's queue for these items overflowed: values were lost before they were sent",
                )
        elif self.overflowing and now - self._overflow_at >= self.overflow_quiet_s:
            self.overflowing = False
            self.log.info("server_queue_overflow_ended", overflows=self.overflows)

    def _note_undecodable(self, err: PublishDecodeError) -> None:
        # asyncua skips the response and goes on; its values are lost. Counted; logged once per session.
        if self.undecodable == 0:
            self.log.warning("publish_response_undecodable", error=str(err))
        self.undecodable += 1
        self._errors_metric.labels(self.equipment.id, "decode").inc()

    def _note_dropped(self, n: int) -> None:
        if self.dropped == 0:
            self.log.warning("notifications_dropped", dropped=n, queue_maxsize=self.queue_maxsize)
        self.dropped += n
        self._dropped_metric.inc(n)

    def _reading(self, tag: OpcUaTag, item: Item) -> Reading:
        _, raw, status, ts = item
        quality = "good" if status < 0x40000000 else quality_of(ua.StatusCode(ua.UInt32(status)))
        if ts is None:
            ts = utcnow()
        elif ts.tzinfo is None:
            ts = ts.replace(tzinfo=UTC)
        value = raw if type(raw) in _PLAIN else plain(raw)
        if (tag.scale is not None or tag.offset is not None) and value is not None:
            if type(value) not in (int, float):
                # A text, boolean or array node behind a scaled tag: the config expects a number.
                if tag.name not in self._scale_warned:
                    self._scale_warned.add(tag.name)
                    self.log.warning(
                        "tag_type_unexpected",
                        tag=tag.name,
                        node=tag.node,
                        value_type=type(raw).__name__,
                        reason="scale/offset need a number",
                    )
                return Reading(tag.name, None, ts, "bad")
            value = tag.scaled(value)
        return Reading(tag.name, value, ts, quality)

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
            vtype = _variant_type(dv.Value.Value if dv.Value else None)
            if vtype is None:
                return CommandResult(
                    False,
                    f"tag {tag.name!r} ({tag.node}): its data type {dv.Value.Value if dv.Value else None}"
                    " cannot be written",
                    {"status": "BadTypeMismatch"},
                )
            self._types[tag.name] = vtype
        raw = value
        if (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and (tag.scale is not None or tag.offset is not None)
        ):
            raw = tag.unscaled(value)
        try:
            raw = coerce(raw, vtype, f"tag {tag.name!r}")
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
        variants: list[ua.Variant] = []
        if inputs:
            if len(args) != len(inputs):
                return CommandResult(
                    False,
                    f"method {command.name!r} takes {len(inputs)} argument(s), got {len(args)}",
                    {"status": "BadArgumentsMissing" if len(args) < len(inputs) else "BadTooManyArguments"},
                )
            for i, (arg, spec) in enumerate(zip(args, inputs, strict=True)):
                vtype = _variant_type(spec.DataType)
                if vtype is None:
                    variants.append(ua.Variant(arg))
                    continue
                try:
                    variants.append(ua.Variant(coerce(arg, vtype, f"args[{i}] ({spec.Name or 'argument'})"), vtype))
                except ValueError as err:
                    return CommandResult(False, f"method {command.name!r}: {err}", {"status": "BadTypeMismatch"})
        else:
            variants = [ua.Variant(a) for a in args]
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


class _ConfigFault(Exception):
    """A connection setting that cannot work (a missing certificate file)."""
