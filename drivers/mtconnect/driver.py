"""The MTConnect driver: `/probe` at connect, then `/current`, then `/sample?from=<next>` on and on.

Observations are handed over in sequence order, each at most once and none left out: the next sequence
is kept in the state folder (see `cursor`), a restarted agent (new instanceId) is resynced from
`/current`, and observations the agent's buffer dropped before they were read are logged and counted.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from datetime import datetime
from typing import Any, ClassVar

import aiohttp

from drivers.mtconnect.config import MTConnectConnection, MTConnectTag
from drivers.mtconnect.cursor import Cursor, Lost, Start, plan
from drivers.mtconnect.documents import (
    AgentError,
    DataItem,
    Device,
    Observation,
    Streams,
    parse_probe,
    parse_streams,
    typed_value,
)
from drivers.mtconnect.machine import Machine
from drivers.sdk import (
    Checkpoint,
    CommandBase,
    CommandError,
    CommandResult,
    DataError,
    DeviceAlerts,
    Driver,
    DriverContext,
    EquipmentConfig,
    Event,
    Reading,
    StatusFact,
    utcnow,
)

MAX_BODY = 64 * 1024 * 1024  # a response larger than this is not an agent's


class MTConnectDriver(Driver):
    """One device of an MTConnect agent, read-only."""

    name: ClassVar[str] = "mtconnect"
    connection_model = MTConnectConnection
    tag_model = MTConnectTag
    command_kinds: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def check_equipment(cls, equipment: EquipmentConfig) -> list[tuple[tuple[str | int, ...], str]]:
        return [
            (("commands", j), f"command {c.name!r}: MTConnect is read-only, the mtconnect driver runs no commands")
            for j, c in enumerate(equipment.commands)
        ]

    def __init__(self, equipment: EquipmentConfig, context: DriverContext) -> None:
        super().__init__(equipment, context)
        self.conn: MTConnectConnection = equipment.connection
        base = self.conn.url + (f"/{self.conn.device}" if self.conn.device else "")
        self.base = base
        self.cursor = Cursor(context.state_dir / "mtconnect" / f"{equipment.id}.json", base)
        self.session: aiohttp.ClientSession | None = None
        self.device: Device | None = None
        self.machine: Machine | None = None
        self.tags: dict[str, list[MTConnectTag]] = {}  # data item id -> the tags reading it
        self.sources: dict[str, str] = {}  # condition item id -> the name its alerts carry
        self.lost = 0  # observations the agent dropped before we read them, since this driver started
        self._fact: StatusFact | None = None
        # A `[equipment.status] tag` takes status from that tag, as for any driver: then no facts are given.
        self._facts = equipment.status is None or equipment.status.tag is None
        # positions handed over, each with the checkpoint that says when what came before it is stored
        self._marks: deque[tuple[asyncio.Future[bool], tuple[str, int]]] = deque()
        self._marked: tuple[str, int] | None = None  # the position of the last checkpoint

    async def connect(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.conn.timeout_s)
        self.session = aiohttp.ClientSession(timeout=timeout, auto_decompress=True)
        try:
            _, device = parse_probe(await self._get("probe"), self.conn.device)
        except BaseException:
            await self.close()
            raise
        self._adopt(device)

    def _adopt(self, device: Device) -> None:
        """Bind the tags and status roles to the device model."""
        self.device = device
        status = self.equipment.status
        self.machine = Machine(device, dict(status.map) if status else {}, self.conn.process_id_item)
        self.tags = {}
        for tag in self.equipment.tags:
            item = device.find(tag.item)
            if item is None:
                self.log.warning("tag_item_unknown", tag=tag.name, item=tag.item, device=device.name)
                continue
            self.tags.setdefault(item.id, []).append(tag)
            if tag.unit is None and item.units:
                self.log.info("tag_unit_not_set", tag=tag.name, item=item.id, units=item.units)
        self.sources = {}
        for item in device.items.values():
            if item.category == "CONDITION":
                tags = self.tags.get(item.id)
                self.sources[item.id] = tags[0].name if tags else item.name or item.id

    async def close(self) -> None:
        # A position the pipeline has not confirmed yet (its last flush comes after the drivers stop) is
        # saved when it is, by its checkpoint's callback.
        if self.session is not None:
            session, self.session = self.session, None
            await session.close()

    async def send_command(self, command: CommandBase, params: dict[str, Any]) -> CommandResult:
        raise CommandError(f"command {command.name!r}: MTConnect is read-only", "unsupported")

    # -- HTTP

    async def _get(self, path: str) -> bytes:
        """GET `<base>/<path>`; an MTConnectError body is returned as is (the parser raises it)."""
        assert self.session is not None
        started = time.monotonic()
        url = f"{self.base}/{path}"
        try:
            async with self.session.get(url) as resp:
                body = await resp.content.read(MAX_BODY + 1)
                if len(body) > MAX_BODY:
                    raise DataError(f"{url}: response larger than {MAX_BODY} bytes")
                if resp.status != 200 and b"MTConnectError" not in body[:4096]:
                    raise ConnectionError(f"{url}: HTTP {resp.status}")
        except (aiohttp.ClientError, TimeoutError) as err:
            raise ConnectionError(f"{url}: {type(err).__name__} {err}".strip()) from err
        self.metrics.request(time.monotonic() - started)
        return body

    async def _streams(self, path: str) -> Streams:
        assert self.device is not None
        return parse_streams(await self._get(path), self.device.items)

    # -- the stream

    async def events(self) -> Any:
        for ev in await self._start():
            yield ev
        yield self._checkpoint()
        interval = self.conn.poll_interval_ms / 1000
        while True:
            started = time.monotonic()
            events, more = await self._sample()
            for ev in events:
                yield ev
            if self.cursor.position() != self._marked:  # it moved (even if nothing in it was for us)
                yield self._checkpoint()
            await asyncio.sleep(0 if more else max(0.0, interval - (time.monotonic() - started)))

    # -- the saved position: written once the pipeline says what came before it is stored

    def _checkpoint(self) -> Checkpoint:
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        position = self._marked = self.cursor.position()
        if position is not None:
            self._marks.append((done, position))
            # Saved as soon as confirmed: a daemon killed between the store's commit and this write
            # is the only moment that reads one delivery again.
            done.add_done_callback(self._confirmed)
        return Checkpoint(done)

    def _confirmed(self, done: asyncio.Future[bool]) -> None:
        self._save_confirmed()

    def _save_confirmed(self) -> None:
        confirmed = None
        while self._marks and self._marks[0][0].done():
            confirmed = self._marks.popleft()[1]
        if confirmed is not None:
            self._save(confirmed)

    def _save(self, position: tuple[str, int]) -> None:
        try:
            self.cursor.save(position)
        except OSError as err:
            self.log.warning("cursor_not_saved", path=str(self.cursor.path), error=str(err))

    async def _start(self) -> list[Event]:
        """Where to begin: resume from the saved cursor, or resync from /current."""
        current = await self._streams("current")
        saved = self.cursor.load()
        start, lost = plan(saved, current.header)
        if start is Start.RESUME and saved is not None:
            prime = current
            if saved[1] != current.header.next_sequence:
                try:  # the machine as it was at the cursor: what follows it comes from /sample
                    prime = await self._streams(f"current?at={saved[1] - 1}")
                except AgentError as err:
                    self.log.info("resume_state_at_unavailable", error=str(err))
            self.cursor.set(saved[0], saved[1])
            self.log.info("stream_resumed", instance_id=saved[0], next_sequence=saved[1])
            return self._apply(prime, readings=False, whole=True)
        if start is Start.RESTARTED:
            assert saved is not None
            self.log.info("agent_restarted", instance_id=current.header.instance_id, previous=saved[0])
        elif start is Start.WRAPPED and lost is not None:
            self._lost(lost)
        else:
            self.log.info("stream_started", instance_id=current.header.instance_id)
        return self._resync(current)

    def _resync(self, current: Streams) -> list[Event]:
        """Take the agent's /current as the whole state and go on after it."""
        self.cursor.set(current.header.instance_id, current.header.next_sequence)
        return self._apply(current, readings=True, whole=True)

    def _lost(self, lost: Lost) -> None:
        self.lost += lost.count
        self.metrics.dropped(lost.count)
        self.metrics.error("buffer_wrapped")
        self.log.warning("observations_lost", first=lost.first, last=lost.last, count=lost.count)

    async def _sample(self) -> tuple[list[Event], bool]:
        """One /sample from the cursor: its events, and whether the agent has more already."""
        instance, nxt = self.cursor.instance_id, self.cursor.next
        try:
            doc = await self._streams(f"sample?from={nxt}&count={self.conn.count}")
        except AgentError as err:
            if err.code != "OUT_OF_RANGE":
                raise
            doc = None
        if doc is None or doc.header.instance_id != instance:
            current = await self._streams("current")
            start, lost = plan((instance or "", nxt or 0), current.header)
            if start is Start.RESTARTED:
                self.log.info("agent_restarted", instance_id=current.header.instance_id, previous=instance)
            elif lost is not None:
                self._lost(lost)
            return self._resync(current), False
        assert nxt is not None
        if doc.header.first_sequence > nxt:  # an agent that starts at its buffer instead of refusing
            self._lost(Lost(nxt, doc.header.first_sequence - 1))
        self.cursor.set(doc.header.instance_id, doc.header.next_sequence)
        return self._apply(doc, readings=True), doc.header.next_sequence <= doc.header.last_sequence

    def _apply(self, doc: Streams, *, readings: bool, whole: bool = False) -> list[Event]:
        """Events for a document's observations, in sequence order: readings of the tags (unless priming),
        a status fact whenever the status changed, a condition's alerts whenever its active set changed.

        A `whole` document (/current) is the entire state: every condition item's alerts are given.
        """
        assert self.machine is not None and self.device is not None
        machine, out = self.machine, list[Event]()
        if whole:
            machine.reset_conditions()
        changed: set[str] = set(machine.conditions) if whole else set()
        values = 0
        for obs in doc.observations:
            if readings and obs.item_id in self.tags:
                out.extend(self._readings(self.device.items[obs.item_id], obs))
                values += 1
            if machine.apply(obs):
                changed.add(obs.item_id)
            if not whole and obs.item_id in machine.status_items:
                self._changes(out, changed, obs.ts)
        if whole:
            self._changes(out, changed, doc.observations[-1].ts if doc.observations else utcnow())
        self.metrics.read(values=values)
        return out

    def _changes(self, out: list[Event], changed: set[str], ts: datetime) -> None:
        """Append the alerts of the changed conditions, and the status if it changed."""
        assert self.machine is not None
        for item_id in sorted(changed):
            out.append(DeviceAlerts(self.sources.get(item_id, item_id), self.machine.alerts(item_id), ts))
        changed.clear()
        if not self._facts:
            return
        fact = self.machine.status()
        if fact != self._fact:
            self._fact = fact
            out.append(fact)

    def _readings(self, item: DataItem, obs: Observation) -> list[Reading]:
        value: object
        if obs.level is not None:  # a condition read as a tag: its level
            value, quality = (None, "bad") if obs.level == "Unavailable" else (obs.level.upper(), "good")
        else:
            value, quality = typed_value(item, obs.value)
            if quality == "bad" and obs.value != "UNAVAILABLE":
                self.metrics.error("bad_value")
        return [Reading(tag.name, tag.scaled(value), obs.ts, quality) for tag in self.tags[item.id]]
