"""Fixtures shared by every test: real peers and a check that nothing is left running."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import Broker


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Fail a test that leaves threads or child processes behind."""
    threads_before = {t.ident for t in threading.enumerate()}
    yield
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


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A mosquitto on a free port, stopped at the end."""
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()
