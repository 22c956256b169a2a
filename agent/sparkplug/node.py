"""One Sparkplug B edge node session: bdSeq (persisted in state_dir), seq 0-255, aliases, births, deaths,
data encoded from the stored stream, and the node's commands (NCMD `Node Control/Rebirth`)."""

from __future__ import annotations

import json
from typing import Any

import structlog
from google.protobuf.message import DecodeError

from agent import sparkplug
from agent.config import AgentConfig
from agent.northbound.fanout import ProfileSink
from agent.sparkplug import payload as pl
from agent.store import StoredMessage

log = structlog.get_logger("edge_agent.sparkplug")

BDSEQ_KEY = "sparkplug.bdseq"
REBIRTH = "Node Control/Rebirth"
# The equipment status as device metrics: field -> data type.
STATUS_METRICS = {field: pl.DOUBLE if field == "progress" else pl.STRING for field in sparkplug.STATUS_FIELDS}

Out = list[tuple[str, bytes]]


class SparkplugNode:
    """The edge node's state across connections; the sink asks it what to publish."""

    def __init__(self, cfg: AgentConfig, data: ProfileSink, version: str) -> None:
        self.cfg = cfg
        self.data = data
        self.version = version
        self.bdseq = 0
        self._seq = 0
        self.aliases: dict[tuple[str, str], int] = {}
        self.types: dict[tuple[str, str], int] = {}
        self.dead: set[str] = set()  # devices whose DDEATH went out: born again before their next data

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % 256
        return self._seq

    def new_session(self) -> tuple[str, bytes]:
        """Count bdSeq for a new connection (persisted before it is used) and return its NDEATH, the Will."""
        last = self.data.state_items(BDSEQ_KEY).get(BDSEQ_KEY)
        self.bdseq = (int(last) + 1) % 256 if isinstance(last, int) else 0
        self.data.set_state(BDSEQ_KEY, self.bdseq)
        return self.death()

    def death(self) -> tuple[str, bytes]:
        """The NDEATH of this connection: bdSeq only, no seq."""
        p = pl.new(None)
        pl.add_metric(p, name="bdSeq", datatype=pl.INT64, value=self.bdseq)
        return sparkplug.topic(self.cfg, "NDEATH"), p.SerializeToString()

    def births(self) -> Out:
        """NBIRTH (seq 0) and a DBIRTH per equipment, with every metric's alias and current value."""
        p = pl.new(0)
        self._seq = 0
        pl.add_metric(p, name="bdSeq", datatype=pl.INT64, value=self.bdseq)
        pl.add_metric(p, name=REBIRTH, datatype=pl.BOOLEAN, value=False)
        a = self.cfg.agent
        for key, value in (("Version", self.version), ("Site", a.site), ("Agent Id", a.id)):
            pl.add_metric(p, name=f"Properties/{key}", datatype=pl.STRING, value=value)
        out = [(sparkplug.topic(self.cfg, "NBIRTH"), p.SerializeToString())]
        self.aliases.clear()
        self.types.clear()
        self.dead.clear()
        for eq in self.cfg.equipment:
            out.append(self._dbirth(eq))
        return out

    def _alias(self, eid: str, name: str) -> int:
        key = (eid, name)
        if key not in self.aliases:
            self.aliases[key] = len(self.aliases) + 1
        return self.aliases[key]

    def _dbirth(self, eq: Any) -> tuple[str, bytes]:
        p = pl.new(self._next_seq())
        latest = self.data.latest.get(eq.id, {})
        for tag in eq.tags:
            v = latest.get(tag.name, {})
            dtype = self.types.setdefault((eq.id, tag.name), pl.datatype_of(v.get("value")))
            props = {"engUnit": tag.unit} if getattr(tag, "unit", None) else None
            pl.add_metric(
                p,
                name=tag.name,
                alias=self._alias(eq.id, tag.name),
                datatype=dtype,
                value=v.get("value"),
                timestamp=pl.ts_ms(v.get("ts")),
                properties=props,
            )
        status = self.data.statuses.get(eq.id, {})
        for field, dtype in STATUS_METRICS.items():
            name = f"Status/{field}"
            self.types[(eq.id, name)] = dtype
            pl.add_metric(p, name=name, alias=self._alias(eq.id, name), datatype=dtype, value=status.get(field))
        self.dead.discard(eq.id)
        return sparkplug.topic(self.cfg, "DBIRTH", eq.id), p.SerializeToString()

    def encode(self, msg: StoredMessage, historical: bool) -> Out:
        """What a stored Sparkplug message becomes: DDATA by alias (a DDEATH for an offline status)."""
        eid = msg.topic.rsplit("/", 1)[-1]
        eq = next((e for e in self.cfg.equipment if e.id == eid), None)
        if eq is None:
            return []  # equipment removed by a reload: not born, nothing to say about it
        body = json.loads(msg.payload)
        # `values` as today's telemetry body has it (`metrics`: rows stored by an earlier version)
        values = body.get("values") or body.get("metrics") or ()
        out: Out = []
        # A tag born before its first value (or whose values changed type) is born again with the right type.
        retyped = False
        for v in values:
            key, value = (eid, str(v.get("tag"))), v.get("value")
            if key in self.types and value is not None and pl.datatype_of(value) != self.types[key]:
                self.types[key] = pl.datatype_of(value)
                retyped = True
        if eid in self.dead or retyped:
            out.append(self._dbirth(eq))
        p = pl.new(None)
        if "status" in body:
            status = body["status"]
            if status.get("status") == "offline" and not historical:
                self.dead.add(eid)
                d = pl.new(self._next_seq())
                return [*out, (sparkplug.topic(self.cfg, "DDEATH", eid), d.SerializeToString())]
            stamp = pl.ts_ms(status.get("timestamp"))
            for field, dtype in STATUS_METRICS.items():
                alias = self.aliases.get((eid, f"Status/{field}"))
                pl.add_metric(
                    p, alias=alias, value=status.get(field), timestamp=stamp, historical=historical, value_type=dtype
                )
        for v in values:
            key = (eid, str(v.get("tag")))
            alias = self.aliases.get(key)
            if alias is None:
                continue  # a tag the config does not declare: never born, so never sent
            pl.add_metric(
                p,
                alias=alias,
                value=v.get("value") if v.get("quality") != "bad" else None,
                timestamp=pl.ts_ms(v.get("ts")),
                historical=historical,
                value_type=self.types.get(key, pl.DOUBLE),
            )
        if p.metrics:
            p.seq = self._next_seq()
            out.append((sparkplug.topic(self.cfg, "DDATA", eid), p.SerializeToString()))
        return out

    def command(self, topic: str, data: bytes) -> bool:
        """An NCMD: whether it asks for a rebirth (a malformed one is logged and ignored)."""
        if topic != sparkplug.topic(self.cfg, "NCMD"):
            return False
        try:
            p = pl.decode(data)
        except DecodeError:
            log.warning("sparkplug_command_malformed", topic=topic)
            return False
        for m in p.metrics:
            if m.name == REBIRTH and m.boolean_value:
                log.info("sparkplug_rebirth_requested")
                return True
        return False
