"""Waiting with a timeout without asyncio.wait_for, which in Python 3.11 can swallow a cancellation that
races the awaited result (gh-86296): a task told to stop would then go on."""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until `event` is set or `timeout` passes; True when it was set."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(max(0.0, timeout)):
            await event.wait()
    except TimeoutError:
        return False
    return True
