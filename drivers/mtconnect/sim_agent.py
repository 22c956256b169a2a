"""A simulated MTConnect agent: a ring buffer of numbered observations served over HTTP as `/probe`,
`/current` (also `?at=`) and `/sample?from=&count=`, in the 1.x or 2.x namespace.

It is written from the standard's description of the documents, not from the driver's parser. `restart`
gives it a new instanceId and an empty buffer, as a restarted agent has; the buffer is small enough to
wrap when the machine runs while nobody reads.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from xml.sax.saxutils import escape, quoteattr

from aiohttp import web


@dataclass(frozen=True, slots=True)
class Item:
    """A data item of the simulated device, and the component it sits in."""

    id: str
    name: str
    category: str  # SAMPLE, EVENT, CONDITION
    type: str
    component: str  # component id
    units: str | None = None
    sub_type: str | None = None

    @property
    def element(self) -> str:
        """The observation's element name: the type in Pascal case (POSITION -> Position)."""
        return "".join(part.capitalize() for part in self.type.split("_"))


@dataclass(frozen=True, slots=True)
class Obs:
    """One observation in the buffer; a condition has a level (Normal, Warning, Fault, Unavailable)."""

    seq: int
    item: Item
    ts: str
    value: str
    level: str | None = None
    code: str | None = None


def _stamp() -> str:
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond:06d}Z"


def _apply(state: dict[str, list[Obs]], obs: Obs) -> None:
    """What the agent's current state becomes with `obs`: one value per item, a list of active conditions."""
    if obs.level is None:
        state[obs.item.id] = [obs]
        return
    active = [o for o in state.get(obs.item.id, []) if o.level in ("Warning", "Fault")]
    if obs.level in ("Warning", "Fault"):
        state[obs.item.id] = [o for o in active if o.code != obs.code] + [obs]
    elif obs.level == "Normal" and obs.code:
        active = [o for o in active if o.code != obs.code]
        state[obs.item.id] = active or [Obs(obs.seq, obs.item, obs.ts, "", "Normal")]
    else:
        state[obs.item.id] = [obs]  # a Normal without a code, or Unavailable, replaces them all


class SimAgent:
    """The agent: a device model, a ring buffer, sequence numbers and an instanceId."""

    def __init__(
        self,
        device: str,
        items: list[Item],
        components: dict[str, str],
        *,
        buffer_size: int = 4096,
        version: str = "2.0",
    ) -> None:
        self.device = device
        self.uuid = f"{device}-uuid"
        self.items = {i.id: i for i in items}
        self.components = components  # id -> element name (Controller, Linear, ...)
        self.buffer_size = buffer_size
        self.version = version
        self.requests: list[str] = []  # the query of every streams request, for tests
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.restart()

    def restart(self) -> None:
        """Start over as a restarted agent does: a new instanceId, sequences from 1, every item UNAVAILABLE."""
        self.instance_id = str(int(time.time() * 1000) % 10**9 + getattr(self, "restarts", 0))
        self.restarts = getattr(self, "restarts", 0) + 1
        self.buffer: deque[Obs] = deque()
        self.base: dict[str, list[Obs]] = {}  # the state just before the buffer's first observation
        self.state: dict[str, list[Obs]] = {}
        self.next_seq = 1
        for item in self.items.values():
            if item.category == "CONDITION":
                self.add(item.id, "", level="Unavailable")
            else:
                self.add(item.id, "UNAVAILABLE")

    # -- observations

    def add(self, item_id: str, value: object, *, level: str | None = None, code: str | None = None) -> int:
        """Append an observation; the oldest leaves the buffer when it is full. Returns its sequence."""
        obs = Obs(self.next_seq, self.items[item_id], _stamp(), str(value), level, code)
        self.next_seq += 1
        self.buffer.append(obs)
        _apply(self.state, obs)
        while len(self.buffer) > self.buffer_size:
            _apply(self.base, self.buffer.popleft())
        return obs.seq

    @property
    def first_seq(self) -> int:
        return self.buffer[0].seq if self.buffer else self.next_seq

    def state_at(self, at: int) -> dict[str, list[Obs]]:
        """The state as it was once observation `at` had been added."""
        state = {k: list(v) for k, v in self.base.items()}
        for obs in self.buffer:
            if obs.seq > at:
                break
            _apply(state, obs)
        return state

    # -- documents

    def _ns(self, kind: str) -> str:
        return f"urn:mtconnect.org:MTConnect{kind}:{self.version}"

    def _header(self, **extra: int) -> str:
        attrs = " ".join(f'{k}="{v}"' for k, v in extra.items())
        return (
            f'<Header creationTime="{_stamp()[:19]}Z" sender="sim" instanceId="{self.instance_id}" '
            f'version="{self.version}.0" bufferSize="{self.buffer_size}" {attrs}/>'
        )

    def probe(self) -> str:
        parts = [f'<?xml version="1.0" encoding="UTF-8"?>\n<MTConnectDevices xmlns="{self._ns("Devices")}">']
        parts.append(self._header(assetBufferSize=1024, assetCount=0))
        parts.append(f'<Devices><Device id="dev" name="{self.device}" uuid="{self.uuid}"><Components>')
        for cid, element in self.components.items():
            parts.append(f'<{element} id="{cid}"><DataItems>')
            for i in self.items.values():
                if i.component == cid:
                    extra = (f' units="{i.units}"' if i.units else "") + (
                        f' subType="{i.sub_type}"' if i.sub_type else ""
                    )
                    parts.append(
                        f'<DataItem id="{i.id}" name="{i.name}" category="{i.category}" type="{i.type}"{extra}/>'
                    )
            parts.append(f"</DataItems></{element}>")
        parts.append("</Components></Device></Devices></MTConnectDevices>")
        return "".join(parts)

    def streams(self, observations: list[Obs], **header: int) -> str:
        """An MTConnectStreams document: one ComponentStream per component, its groups in sequence order."""
        parts = [f'<?xml version="1.0" encoding="UTF-8"?>\n<MTConnectStreams xmlns="{self._ns("Streams")}">']
        parts.append(self._header(**header))
        parts.append(f'<Streams><DeviceStream name="{self.device}" uuid="{self.uuid}">')
        by_component: dict[str, dict[str, list[Obs]]] = {}
        for obs in sorted(observations, key=lambda o: o.seq):
            group = {"SAMPLE": "Samples", "EVENT": "Events"}.get(obs.item.category, "Condition")
            by_component.setdefault(obs.item.component, {}).setdefault(group, []).append(obs)
        for cid, groups in by_component.items():
            parts.append(f'<ComponentStream component="{self.components[cid]}" componentId="{cid}">')
            for group, members in groups.items():
                parts.append(f"<{group}>")
                for o in members:
                    name = o.level or o.item.element
                    attrs = (
                        f'dataItemId="{o.item.id}" timestamp="{o.ts}" sequence="{o.seq}" name={quoteattr(o.item.name)}'
                    )
                    if o.level is not None:
                        attrs += f' type="{o.item.type}"' + (f" nativeCode={quoteattr(o.code)}" if o.code else "")
                    parts.append(f"<{name} {attrs}>{escape(o.value)}</{name}>")
                parts.append(f"</{group}>")
            parts.append("</ComponentStream>")
        parts.append("</DeviceStream></Streams></MTConnectStreams>")
        return "".join(parts)

    def error(self, code: str, text: str) -> str:
        return (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<MTConnectError xmlns="{self._ns("Error")}">{self._header()}'
            f'<Errors><Error errorCode="{code}">{escape(text)}</Error></Errors></MTConnectError>'
        )

    def _seqs(self) -> dict[str, int]:
        return {"firstSequence": self.first_seq, "lastSequence": self.next_seq - 1}

    def current(self, at: int | None = None) -> tuple[int, str]:
        if at is None:
            state, nxt = self.state, self.next_seq
        elif not self.first_seq <= at < self.next_seq:
            return 400, self.error("OUT_OF_RANGE", f"'at' must be between {self.first_seq} and {self.next_seq - 1}")
        else:
            state, nxt = self.state_at(at), at + 1
        observations = [o for values in state.values() for o in values]
        return 200, self.streams(observations, nextSequence=nxt, **self._seqs())

    def sample(self, start: int | None, count: int) -> tuple[int, str]:
        start = self.first_seq if start is None else start
        if not self.first_seq <= start <= self.next_seq:
            return 400, self.error("OUT_OF_RANGE", f"'from' must be between {self.first_seq} and {self.next_seq}")
        chosen = [o for o in self.buffer if start <= o.seq < start + count]
        nxt = chosen[-1].seq + 1 if len(chosen) == count else self.next_seq
        return 200, self.streams(chosen, nextSequence=nxt, **self._seqs())

    # -- HTTP

    async def _handle(self, request: web.Request) -> web.Response:
        path = request.match_info["path"].strip("/").split("/")
        if len(path) == 2 and path[0] in (self.device, self.uuid):
            path = path[1:]
        if len(path) != 1 or path[0] not in ("probe", "current", "sample"):
            return self._xml(404, self.error("UNSUPPORTED", f"no such request {request.path}"))
        q = request.query
        try:
            at = int(q["at"]) if "at" in q else None
            start = int(q["from"]) if "from" in q else None
            count = int(q.get("count", "100"))
        except ValueError:
            return self._xml(400, self.error("INVALID_REQUEST", "query values must be integers"))
        if path[0] == "probe":
            return self._xml(200, self.probe())
        self.requests.append(f"{path[0]}?{request.query_string}")
        status, body = self.current(at) if path[0] == "current" else self.sample(start, max(1, count))
        return self._xml(status, body)

    def _xml(self, status: int, body: str) -> web.Response:
        return web.Response(status=status, text=body, content_type="application/xml")

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on `host:port` (0: a free one); returns the base URL."""
        app = web.Application()
        app.router.add_get("/{path:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
