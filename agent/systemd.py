"""sd_notify without a library: one datagram to $NOTIFY_SOCKET; a no-op when it is unset."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

from agent.waits import wait_event


def notify(message: str) -> bool:
    """Send `message` (e.g. "READY=1") to systemd; False when not run by systemd or on failure."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(message.encode())
        return True
    except OSError:
        return False


def watchdog_interval_s() -> float | None:
    """Half of WATCHDOG_USEC in seconds, when systemd asked for watchdog pings (for this process)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    with contextlib.suppress(ValueError):
        return max(0.05, int(usec) / 2_000_000)
    return None


async def watchdog(stop: asyncio.Event) -> None:
    """Ping the watchdog from the event loop, so a blocked loop stops the pings and systemd restarts us."""
    interval = watchdog_interval_s()
    if interval is None:
        return
    while not stop.is_set():
        notify("WATCHDOG=1")
        await wait_event(stop, interval)
