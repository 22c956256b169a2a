"""WebSocket /api/v1/ws: authentication, channels, events, close reasons, heartbeat."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent import ws as ws_module
from agent.config import load_config
from agent.config_holder import ConfigHolder
from agent.http import HttpApi, HttpDeps
from agent.monitor import Monitor
from agent.store import Store
from peers import GUARD_S, Broker, Daemon, free_port, script_line, scripted_equipment, write_config

KEYS = {"viewer": "view-key-123", "admin": "admin-key-789"}
ENV = {f"EA_TEST_{role.upper()}_KEY": key for role, key in KEYS.items()}


def http_section(port: int) -> str:
    keys = "".join(
        f'[[http.api_keys]]\nname = "{role}-key"\nkey_env = "EA_TEST_{role.upper()}_KEY"\nrole = "{role}"\n'
        for role in KEYS
    )
    return f'[http]\nlisten = "127.0.0.1:{port}"\n{keys}'


@pytest.fixture
def daemon(tmp_path: Path, broker: Broker) -> Any:
    port = free_port()
    script = tmp_path / "press.jsonl"
    cfg = write_config(tmp_path, broker.port, scripted_equipment("press-1", script), http=http_section(port))
    d = Daemon(cfg, env=ENV).start()
    d.wait_log("http_listening")
    d.port, d.script = port, script  # type: ignore[attr-defined]
    yield d
    d.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=GUARD_S)) as s:
        yield s


def url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/api/v1/ws"


async def event(ws: aiohttp.ClientWebSocketResponse, name: str, **match: Any) -> dict[str, Any]:
    """The next event called `name` whose data has `match`; other events are skipped."""
    async with asyncio.timeout(GUARD_S):
        while True:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
            got = msg.json()
            data = got.get("data") or {}
            if got["event"] == name and all(data.get(k) == v for k, v in match.items()):
                return got  # type: ignore[no-any-return]


async def closed(ws: aiohttp.ClientWebSocketResponse) -> tuple[int, str]:
    """The close code and reason, skipping events still on the way."""
    async with asyncio.timeout(GUARD_S):
        while True:
            msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return int(ws.close_code or 0), str(msg.extra or "")


async def test_auth_refused_and_accepted(daemon: Any, session: aiohttp.ClientSession) -> None:
    port = daemon.port
    # a wrong key in the header: refused at the upgrade
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await session.ws_connect(url(port), headers={"Authorization": "Bearer wrong-key"})
    assert refused.value.status == 401
    # a wrong key in the first message: closed 4401 with the reason
    ws = await session.ws_connect(url(port))
    await ws.send_json({"type": "auth", "key": "wrong-key"})
    assert await closed(ws) == (4401, "unknown API key")
    # anything else first: closed 4401 saying what to send
    ws = await session.ws_connect(url(port))
    await ws.send_json({"type": "subscribe", "channels": ["equipment"]})
    code, reason = await closed(ws)
    assert code == 4401 and "authenticate first" in reason
    # the right key in the first message, or in the header
    ws = await session.ws_connect(url(port))
    await ws.send_json({"type": "auth", "key": KEYS["viewer"]})
    welcome = await event(ws, "welcome")
    assert welcome["data"]["role"] == "viewer" and welcome["data"]["caller"] == "viewer-key"
    await ws.close()
    ws = await session.ws_connect(url(port), headers={"X-API-Key": KEYS["admin"]})
    assert (await event(ws, "welcome"))["data"]["role"] == "admin"
    await ws.close()


async def test_subscribe_events_unsubscribe_and_bad_messages(daemon: Any, session: aiohttp.ClientSession) -> None:
    port, script = daemon.port, daemon.script
    ws = await session.ws_connect(url(port), headers={"Authorization": f"Bearer {KEYS['viewer']}"})
    await event(ws, "welcome")
    await ws.send_json({"type": "subscribe", "channels": ["equipment"]})
    assert (await event(ws, "subscribed"))["data"] == {"channels": ["equipment"]}
    first = await event(ws, "equipmentStatus", equipment_id="press-1")  # the current state first
    assert "values" in first["data"]
    script_line(script, tag="state", value=1)
    script_line(script, tag="temp", value=40.0)
    seen: dict[str, dict[str, Any]] = {}
    async with asyncio.timeout(GUARD_S):
        while len(seen) < 2:  # telemetry may come before or after the status it moved
            got = (await ws.receive()).json()
            if got["event"] == "telemetry" and any(v["tag"] == "temp" for v in got["data"]["values"]):
                seen["telemetry"] = got
            if got["event"] == "equipmentStatus" and got["data"]["status"] == "running":
                seen["status"] = got
    assert {"tag", "value", "ts", "quality"} <= set(seen["telemetry"]["data"]["values"][0])
    await ws.send_json({"type": "ping"})
    await event(ws, "pong")

    # alerts only: the status change before the alert is not sent any more
    await ws.send_json({"type": "subscribe", "channels": ["alerts"]})
    await event(ws, "subscribed", channels=["alerts", "equipment"])
    await ws.send_json({"type": "unsubscribe", "channels": ["equipment"]})
    await event(ws, "subscribed", channels=["alerts"])
    script_line(script, tag="state", value=0)
    script_line(script, tag="temp", value=90.0)
    async with asyncio.timeout(GUARD_S):
        while True:
            got = (await ws.receive()).json()
            assert got["event"] == "qualityAlert", got
            if got["data"]["state"] == "active" and got["data"]["value"] == 90.0:
                break
    script_line(script, tag="temp", value=20.0)
    cleared = await event(ws, "qualityAlert", state="cleared")
    assert cleared["data"]["tag"] == "temp"

    # a late subscriber to alerts is told what is active
    script_line(script, tag="temp", value=95.0)
    await event(ws, "qualityAlert", state="active", value=95.0)
    late = await session.ws_connect(url(port), headers={"Authorization": f"Bearer {KEYS['viewer']}"})
    await late.send_json({"type": "subscribe", "channels": ["alerts", "system"]})
    active = await event(late, "qualityAlert", state="active")
    assert active["data"]["since"] and active["data"]["equipment_id"] == "press-1"
    health = await event(late, "systemHealth")
    assert "drivers" in health["data"]["components"]
    # a link going down is a systemAlert on the system channel
    script_line(script, op="disconnect", error="cable pulled")
    down = await event(late, "systemAlert", component="driver:press-1", status="down")
    assert down["data"]["previous"] == "up" and down["data"]["timestamp"]

    # bad messages close with a reason naming the culprit
    await ws.send_json({"type": "subscribe", "channels": ["nope"]})
    code, reason = await closed(ws)
    assert code == 4400 and "'nope'" in reason
    await late.send_str("{not json")
    code, reason = await closed(late)
    assert code == 4400 and "not valid JSON" in reason, reason


async def test_heartbeat_closes_a_silent_client(
    tmp_path: Path, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process, with the ping interval shortened: a client that answers pings stays, a silent one
    is closed after two unanswered pings."""
    monkeypatch.setattr(ws_module, "PING_INTERVAL_S", 0.1)
    port = free_port()
    cfg = load_config(write_config(tmp_path, free_port(), http=f'[http]\nlisten = "127.0.0.1:{port}"\n'))
    store = Store(tmp_path / "state")
    store.open()
    deps = HttpDeps(
        config=ConfigHolder(cfg),
        router=None,  # type: ignore[arg-type]
        monitor=Monitor(cfg, store),
        health=lambda: ({"status": "ok", "components": {}}, True),
        refresh_metrics=lambda: None,
        dead_letters=lambda: None,
    )
    api = HttpApi(deps)
    await api.start()
    try:
        alive = await session.ws_connect(url(port))  # answers pings while it reads (aiohttp's autoping)
        silent = await session.ws_connect(url(port), autoping=False)
        heard: asyncio.Queue[Any] = asyncio.Queue()

        async def read_alive() -> None:
            async for msg in alive:
                await heard.put(msg.json())

        reader = asyncio.create_task(read_alive())
        # the silent client reads (so it sees the pings) but never answers them
        async with asyncio.timeout(GUARD_S):
            pings = 0
            while True:
                msg = await silent.receive()
                if msg.type == aiohttp.WSMsgType.PING:
                    pings += 1
                    continue
                if msg.type == aiohttp.WSMsgType.TEXT:
                    continue
                break
        assert silent.close_code == 4408 and "2 pings unanswered" in str(msg.extra), (msg, silent.close_code)
        assert pings == 2
        # the answering client is still served
        await alive.send_json({"type": "ping"})
        async with asyncio.timeout(GUARD_S):
            while (await heard.get())["event"] != "pong":
                pass
        await alive.close()
        await reader
    finally:
        await api.stop()
        store.close()
