"""Fixtures shared by every test: real peers and a check that nothing is left running."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import Broker

# Property-based fuzzing of outside-input parsers: a fixed, bounded profile by default (and in CI); a longer
# random one by hand with HYPOTHESIS_PROFILE=long.
settings.register_profile(
    "ci", max_examples=150, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("long", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class _PendingTasks(logging.Handler):
    """Catches asyncio's "Task was destroyed but it is pending!" for tasks a test left running."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "Task was destroyed but it is pending" in record.getMessage():
            self.found.append(record.getMessage()[:300])


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Fail a test that leaves tasks, threads or child processes behind."""
    threads_before = {t.ident for t in threading.enumerate()}
    pending = _PendingTasks()
    logging.getLogger("asyncio").addHandler(pending)
    yield
    gc.collect()
    logging.getLogger("asyncio").removeHandler(pending)
    assert not pending.found, f"test left asyncio tasks running: {pending.found}"
    me = psutil.Process(os.getpid())
    children = [c for c in me.children(recursive=True) if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    for c in children:
        c.kill()
    extra = []
    for _ in range(100):
        extra = [
            t
            for t in threading.enumerate()
            if t.ident not in threads_before and t.is_alive() and (not t.daemon or t.name.startswith("paho"))
        ]
        if not extra:
            break
        threading.Event().wait(0.05)
    assert not children, f"test left processes running: {[c.cmdline() for c in children]}"
    assert not extra, f"test left threads running: {[t.name for t in extra]}"


@pytest.fixture(autouse=True)
async def no_pending_tasks() -> AsyncIterator[None]:
    """Fail an async test whose tasks are still running when it ends."""
    yield
    for _ in range(20):
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
        if not others:
            return
        await asyncio.sleep(0.01)
    for t in others:
        t.cancel()
    pytest.fail(f"test left asyncio tasks running: {[t.get_name() + ' ' + repr(t.get_coro())[:120] for t in others]}")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A mosquitto on a free port, stopped at the end."""
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()
