"""200 WebSocket clients on the equipment channel while the pipeline runs a burst, one of them never reading:
the others keep receiving (conflated telemetry: each ends with every tag's last value), the stalled one is
dropped, MQTT receives every value."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
from pathlib import Path

import aiohttp

from peers import GUARD_S, Broker, Daemon, Recorder, free_port, script_line, until, wait_until, write_config

R = "edge/test-site/cell-t"
CLIENTS = 200
TAGS, ROUNDS = 1000, 25


def source(script: Path, tags: int) -> str:
    tables = "".join(f'[[equipment.tags]]\nname = "t{i}"\n' for i in range(tags))
    head = '[[equipment]]\nid = "src"\ntype = "other"\ndriver = "scripted"\n'
    return f'{head}[equipment.connection]\nscript = "{script}"\n{tables}'


def masked_text_frame(text: str) -> bytes:
    """One client-to-server text frame (clients must mask)."""
    data = text.encode()
    mask = os.urandom(4)
    assert len(data) < 126
    return bytes([0x81, 0x80 | len(data)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def stalled_client(port: int) -> socket.socket:
    """A client that subscribes to the equipment channel and then never reads (a tiny receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /api/v1/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)  # only the handshake's answer, byte by byte, nothing after it
    assert head.startswith(b"HTTP/1.1 101"), head
    sock.sendall(masked_text_frame(json.dumps({"type": "subscribe", "channels": ["equipment"]})))
    return sock


def values_in(rec: Recorder) -> int:
    with rec.lock:
        msgs = list(rec.messages)
    return sum(m.payload.count(b'"tag":') for m in msgs if m.topic.endswith("/telemetry"))


async def test_two_hundred_clients_one_stalled(tmp_path: Path, broker: Broker) -> None:
    port = free_port()
    script = tmp_path / "src.jsonl"
    cfg = write_config(
        tmp_path,
        broker.port,
        source(script, TAGS),
        mqtt_extra="buffer_max_messages = 10000000",
        http=f'[http]\nlisten = "127.0.0.1:{port}"\nmax_connections = 512\nrate_limit_per_minute = 100000\n',
    )
    cfg.write_text(cfg.read_text().replace("telemetry_interval_s = 0.1", "telemetry_interval_s = 0.05"))
    rec = Recorder(broker.port, [f"{R}/equipment/+/telemetry"], clean=True)
    daemon = Daemon(cfg)
    stalled = None
    latest: list[dict[str, float]] = [{} for _ in range(CLIENTS - 1)]  # per reader: tag -> last value
    try:
        daemon.start()
        daemon.wait_log("http_listening")
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
        ) as session:
            clients = [await session.ws_connect(f"ws://127.0.0.1:{port}/api/v1/ws") for _ in range(CLIENTS - 1)]
            for ws in clients:
                await ws.send_json({"type": "subscribe", "channels": ["equipment"]})

            async def read(i: int, ws: aiohttp.ClientWebSocketResponse) -> None:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT and msg.data.startswith('{"event":"telemetry"'):
                        latest[i].update((v["tag"], v["value"]) for v in json.loads(msg.data)["data"]["values"])

            readers = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(clients)]
            stalled = await asyncio.to_thread(stalled_client, port)
            script_line(script, tag="t0", value=-1.0)  # one value first: everyone is subscribed by then
            await until(lambda: all(x.get("t0") == -1.0 for x in latest), "every reader subscribed")
            # bursts until the stalled client is dropped (its queue waits past agent.live.SLOW_AFTER_S)
            bursts = 0
            for _ in range(int(GUARD_S * 4 / 0.3)):
                script_line(script, op="burst", tags=TAGS, rounds=ROUNDS)
                bursts += 1
                await asyncio.sleep(0.3)
                if bursts % 5 == 0 and any(e.get("event") == "ws_client_dropped" for e in daemon.logs()):
                    break
            dropped = [e for e in daemon.logs() if e.get("event") == "ws_client_dropped"]
            assert len(dropped) == 1 and dropped[0]["reason"].startswith("too slow"), dropped
            total = 1 + TAGS * ROUNDS * bursts
            final = {f"t{t}": float(ROUNDS - 1 + t) for t in range(TAGS)}  # a burst's last round
            await until(lambda: all(x == final for x in latest), "every reader at the last values", GUARD_S * 4)
            await asyncio.to_thread(wait_until, lambda: values_in(rec) >= total, GUARD_S * 4, "MQTT values")
            assert values_in(rec) == total
            # the readers are still connected and served
            assert not any(ws.closed for ws in clients)
            for ws in clients:
                await ws.close()
            await asyncio.gather(*readers)
    finally:
        if stalled is not None:
            stalled.close()
        daemon.stop()
        rec.close()


def test_frame_helper_masks() -> None:
    frame = masked_text_frame("hi")
    assert frame[0] == 0x81 and frame[1] == 0x82 and len(frame) == 8
    assert struct.unpack("!B", frame[1:2])[0] & 0x80
