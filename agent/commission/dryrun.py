"""`edge-agent test`: a dry run. Each equipment is connected once with its real driver, every tag read once,
and the daemon's own monitor derives the status and builds the MQTT messages, which are printed, not sent.

Nothing is published, written to a device, or taken from a drop folder (a tagless driver such as
`file_drop` is only connected). Exit 1 names every tag that could not be read and every equipment that
could not be reached; exit 2 is a bad config.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from agent.cli_status import load_with_credentials
from agent.config import AgentConfig, EquipmentConfig, config_path, load_config
from agent.errors import ConfigError
from agent.model import ConnectionState, QualityResult, Reading, Unchanged
from agent.monitor import Monitor
from agent.monitor_state import MemorySink
from agent.store_rows import Encoded
from drivers.sdk.driver import DriverContext
from drivers.sdk.registry import get_driver

#: How long the remaining tags may take once the first value arrived.
SETTLE_S = 5.0


class CaptureSink(MemorySink):
    """The monitor's sink: every message it would store for MQTT, kept as (topic, payload, retain)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[tuple[str, Any, bool]] = []

    def append(
        self,
        kind: str,
        topic: str,
        payload: dict[str, Any],
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
    ) -> int:
        self.messages.append((topic, payload, retain))
        return len(self.messages)

    def append_encoded(self, items: Iterable[Encoded]) -> None:
        for _kind, topic, body, _qos, retain in items:
            # The store closes the object after adding "seq" (see Store.append_encoded).
            self.messages.append((topic, json.loads(body + "}"), retain))


@dataclass
class Outcome:
    """What one equipment gave."""

    equipment_id: str
    readings: dict[str, Reading] = field(default_factory=dict)
    error: str | None = None  # why it could not be connected
    reasons: dict[str, str] = field(default_factory=dict)  # tag -> why it is bad, from the driver's log

    def bad_tags(self, eq: EquipmentConfig) -> list[str]:
        """Every configured tag the device refused or gave a bad value for, with why. A tag that merely had
        no value yet (nothing refused it) is not bad: the report shows it as `-`."""
        out = []
        for t in eq.tags:
            r = self.readings.get(t.name)
            why = self.reasons.get(t.name)
            if why or (r is not None and r.quality == "bad"):
                out.append(f"{eq.id}.{t.name}: {why or 'quality bad'}")
        return out


async def read_once(eq: EquipmentConfig, state_dir: Path, monitor: Monitor, timeout: float) -> Outcome:
    """Connect `eq`'s driver, feed its events to `monitor` until every tag has a value (or `timeout`)."""
    out = Outcome(eq.id)
    driver = get_driver(eq.driver)(eq, DriverContext(state_dir=state_dir))
    wanted = {t.name for t in eq.tags}
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout) as deadline:
            await driver.connect()
            monitor.on_event(eq.id, ConnectionState(True))
            if wanted:
                async for ev in driver.events():
                    if isinstance(ev, QualityResult):
                        continue  # never taken: a dry run leaves drop folders alone
                    monitor.on_event(eq.id, ev)
                    if isinstance(ev, Reading):
                        if not out.readings:
                            # A driver may leave a tag out while it has no value (a printer's progress
                            # when idle): after the first value, the rest get a few more polls.
                            settle = loop.time() + SETTLE_S
                            deadline.reschedule(min(deadline.when() or settle, settle))
                        out.readings[ev.tag] = ev
                    if wanted <= set(out.readings) or isinstance(ev, Unchanged):
                        break
    except TimeoutError:
        if not out.readings and wanted:
            out.error = f"no answer within {timeout:g} s"
    except (ConnectionError, OSError) as err:
        out.error = str(err) or type(err).__name__
    finally:
        with contextlib.suppress(Exception):
            await driver.close()
    return out


def reasons_from(logs: Sequence[Mapping[str, Any]], equipment_id: str) -> dict[str, str]:
    """Tag -> why, from the warnings a driver logged about its tags (the log is the driver's own words)."""
    out: dict[str, str] = {}
    for entry in logs:
        tag = entry.get("tag")
        if (
            entry.get("equipment_id") == equipment_id
            and isinstance(tag, str)
            and entry.get("log_level")
            in (
                "warning",
                "error",
            )
        ):
            out[tag] = str(entry.get("reason") or entry.get("error") or entry.get("event"))
    return out


async def dry_run(
    cfg: AgentConfig, only: list[str] | None, timeout: float, state_dir: Path, logs: Sequence[Mapping[str, Any]]
) -> tuple[int, list[str]]:
    """Print what every chosen equipment gives; return (exit code, lines naming each problem)."""
    chosen = [eq for eq in cfg.equipment if not only or eq.id in only]
    sink = CaptureSink()
    monitor = Monitor(cfg.model_copy(update={"equipment": chosen}), sink)
    stop = asyncio.Event()
    runner = asyncio.create_task(monitor.run(stop))
    problems = [f"unknown equipment {e!r}" for e in only or [] if e not in {q.id for q in cfg.equipment}]
    outcomes = [await read_once(eq, state_dir, monitor, timeout) for eq in chosen]
    await asyncio.sleep(0)  # let the monitor settle the last delivery
    stop.set()
    await runner
    for eq, outcome in zip(chosen, outcomes, strict=True):
        outcome.reasons = reasons_from(logs, eq.id)
        print(f"== {eq.id} ({eq.driver})")
        if outcome.error:
            print(f"   UNREACHABLE: {outcome.error}")
            problems.append(f"{eq.id}: unreachable: {outcome.error}")
            continue
        for t in eq.tags:
            r = outcome.readings.get(t.name)
            shown = "-" if r is None else f"{json.dumps(r.value, default=str)} ({r.quality})"
            print(f"   {t.name:<24} {shown}{'  ' + t.unit if t.unit and r is not None else ''}")
        snap = monitor.snapshot(eq.id) or {}
        print(f"   status: {snap.get('status')}")
        problems += outcome.bad_tags(eq)
    print("== MQTT messages that would be published (nothing was sent; the store adds seq):")
    for topic, payload, retain in sink.messages:
        print(f"{topic}{' (retained)' if retain else ''} {json.dumps(payload, sort_keys=True, default=str)}")
    return (1 if problems else 0), problems


def run_test(args: argparse.Namespace) -> int:
    """`edge-agent test`."""
    path = config_path(args.config)
    try:
        cfg = load_config(path) if not args.credentials else load_with_credentials(path, Path(args.credentials))
    except ConfigError as err:
        for line in err.problems:
            print(line)
        return 2
    state = cfg.agent.state_dir
    with tempfile.TemporaryDirectory(prefix="edge-agent-test-") as tmp:
        # The real state dir where it is usable (an OPC UA client certificate the server trusts lives there).
        state_dir = state if state.is_dir() and os.access(state, os.W_OK) else Path(tmp)
        # The dry run prints its own report: the log is captured, and the drivers' warnings name bad tags.
        with capture_logs() as logs:
            code, problems = asyncio.run(dry_run(cfg, args.equipment, args.timeout, state_dir, logs))
    for line in problems:
        print(f"BAD {line}")
    print("OK: every tag read" if code == 0 else f"{len(problems)} problem(s)")
    return code
