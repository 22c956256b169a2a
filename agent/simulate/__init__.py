"""`edge-agent simulate`: the built-in peers that a config's equipment and `[mpm]` point at."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog

from agent.config import AgentConfig, EquipmentConfig, load_config
from agent.errors import ConfigError
from agent.logging import configure as configure_logging
from drivers.sdk.registry import get_simulator

log = structlog.get_logger("edge_agent.simulate")


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def simulators_for(cfg: AgentConfig) -> list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]]:
    """(name, coroutine factory) for every peer this config needs."""
    out: list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]] = []
    for eq in cfg.equipment:
        simulate = get_simulator(eq.driver)
        if simulate is None:
            log.warning("no_simulator", equipment_id=eq.id, driver=eq.driver)
            continue
        out.append((f"sim[{eq.id}]", _bind(simulate, eq, cfg.agent.state_dir)))
    if cfg.mpm is not None and _is_loopback(cfg.mpm.base_url):
        from agent.simulate.mpm_emulator import simulate_mpm

        section = cfg.mpm
        out.append(("sim[mpm]", lambda: simulate_mpm(section)))
    return out


def _bind(fn: Any, eq: EquipmentConfig, state_dir: Path) -> Callable[[], Coroutine[Any, Any, None]]:
    return lambda: fn(eq, state_dir)


async def serve(cfg: AgentConfig) -> bool:
    """Run every simulator until SIGTERM/SIGINT; False when one failed (a port it cannot bind)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    cfg.agent.state_dir.mkdir(parents=True, exist_ok=True)
    tasks: list[asyncio.Task[Any]] = []
    for name, factory in simulators_for(cfg):
        tasks.append(asyncio.create_task(factory(), name=name))
        log.info("simulator_started", simulator=name)
    log.info("simulating", simulators=len(tasks))
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    failed = False
    for t in tasks:
        if t.done() and not t.cancelled():
            # A simulator only returns when it could not serve: an exception, or a return of its own.
            failed = True
            err = t.exception()
            log.error("simulator_failed", simulator=t.get_name(), error=str(err) if err else "stopped")
    for t in [waiter, *tasks]:
        t.cancel()
    with contextlib.suppress(Exception):
        await asyncio.gather(*tasks, return_exceptions=True)
    log.info("simulators_stopped")
    return not failed


def run_simulators(path: Path) -> int:
    """`edge-agent simulate`."""
    try:
        cfg = load_config(path)
    except ConfigError as err:
        for line in err.problems:
            print(line)
        return 2
    configure_logging(cfg.agent.log_level, cfg.agent.log_format)
    return 0 if asyncio.run(serve(cfg)) else 1
