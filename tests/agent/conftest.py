"""Fixtures of the MPM tests: the emulator and a client to it, configured by each module's
`API_KEY` and `CLIENT_OPTIONS` (short backoffs)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from agent.mpm import MPMClient
from agent.simulate.mpm_emulator import MPMEmulator


@pytest.fixture
async def emulator(request: pytest.FixtureRequest) -> AsyncIterator[MPMEmulator]:
    emu = MPMEmulator(api_key=request.module.API_KEY)
    await emu.start()
    yield emu
    await emu.stop()


@pytest.fixture
async def client(request: pytest.FixtureRequest, emulator: MPMEmulator) -> AsyncIterator[MPMClient]:
    assert emulator.base_url
    async with MPMClient(emulator.base_url, api_key=request.module.API_KEY, **request.module.CLIENT_OPTIONS) as c:
        yield c
