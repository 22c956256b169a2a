"""The local HTTP API under a connection flood, with the open-file limit a plain systemd unit gets.

2,000 slow clients and 2,000 wrong keys must not take the daemon off its broker, stop its file drops or
fill its log: HTTP connections are capped, descriptors are kept in reserve, and every limit is logged
once when it begins, not once per refused connection.
"""

from __future__ import annotations

import asyncio
import http.client
import random
import resource
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import psutil
import pytest
from test_http import ENV, KEYS, call, http_section
from test_http_hostile import daemon_connections, healthy, keyed_get, read_until_closed

from peers import (
    GUARD_S,
    Broker,
    Daemon,
    LoopThread,
    MpmPeer,
    Recorder,
    free_port,
    require_tool,
    wait_until,
    write_config,
)

R = "edge/test-site/cell-t"
CSV = (
    "process_id,feature,nominal,measured,lower_tol,upper_tol,unit\n"
    "PROC-777,bore_d,10.0,10.02,-0.05,0.05,mm\n"
    "PROC-777,slot_w,5.0,5.08,-0.05,0.05,mm\n"
)
NOFILE = 1024  # what a systemd unit without LimitNOFILE runs with
LOG_BOUND = 200_000  # bytes of daemon log the whole flood may cost, start-up included


@pytest.fixture
def mpm() -> Iterator[MpmPeer]:
    peer = MpmPeer()
    yield peer
    peer.close()


@pytest.fixture
def many_files() -> Iterator[None]:
    """This test process holds thousands of client sockets: raise its own soft limit for the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 16384)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Flood(LoopThread):
    """`count` slow clients: each keeps a connection open, sending one header byte every `every_s`, and
    comes back one to two seconds after the server closes it."""

    def __init__(self, port: int, count: int, every_s: float = 3.0) -> None:
        super().__init__("flood")
        self.port = port
        self.every_s = every_s
        self.connects = 0
        self.cut = 0  # connections the server closed after several bytes: held, then timed out
        self.stopping: asyncio.Event | None = None
        self.tasks: list[asyncio.Task[None]] = self.run(self._start(count))

    async def _start(self, count: int) -> list[asyncio.Task[None]]:
        self.stopping = asyncio.Event()
        return [asyncio.ensure_future(self._client()) for _ in range(count)]

    async def _client(self) -> None:
        assert self.stopping is not None
        head = b"GET /api/v1/equipment HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 4000
        while not self.stopping.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(1.0)
                continue
            self.connects += 1
            try:
                for sent, byte in enumerate(head, 1):
                    writer.write(bytes([byte]))
                    try:
                        async with asyncio.timeout(self.every_s):
                            await reader.read(1)  # anything, or the close: this client is done
                        self.cut += sent >= 3
                        break
                    except TimeoutError:
                        pass
            except OSError:
                pass
            finally:
                writer.close()
            await asyncio.sleep(random.uniform(1.0, 2.0))

    async def _stop(self) -> None:
        assert self.stopping is not None
        self.stopping.set()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def close(self) -> None:
        self.run(self._stop())
        self.stop_loop()


def config(tmp: Path, broker: Broker, mpm: MpmPeer, port: int) -> Path:
    body = f"""
[mpm]
base_url = "{mpm.base_url}"
auth = "none"
rate_limit_per_minute = 1000000

[[equipment]]
id = "cmm-1"
type = "cmm"
driver = "file_drop"
[equipment.connection]
directory = "drops"
processed_dir = "processed"
failed_dir = "failed"
stable_s = 0.5
rescan_s = 0.5
"""
    (tmp / "drops").mkdir(exist_ok=True)
    return write_config(tmp, broker.port, body, http=http_section(port))


def log_time(entry: dict[str, str]) -> float:
    return datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()


def test_flood_leaves_broker_drops_and_log_intact(
    tmp_path: Path, broker: Broker, mpm: MpmPeer, many_files: None
) -> None:
    prlimit = require_tool("prlimit")
    port = free_port()
    cfg = config(tmp_path, broker, mpm, port)
    daemon = Daemon(cfg, env=ENV, prefix=[prlimit, f"--nofile={NOFILE}", "--"]).start()
    rec = Recorder(broker.port, [f"{R}/equipment/+/quality"])
    flood: Flood | None = None
    try:
        daemon.wait_log("http_listening", max_connections=256)
        assert daemon.proc is not None
        proc = psutil.Process(daemon.proc.pid)
        assert proc.rlimit(psutil.RLIMIT_NOFILE) == (NOFILE, NOFILE)
        guesser = http.client.HTTPConnection("127.0.0.1", port, timeout=GUARD_S, source_address=("127.0.0.2", 0))
        assert keyed_get(guesser, KEYS["viewer"])[0] == 200  # kept alive through the flood

        flood = Flood(port, 2000)
        fds: list[int] = []

        def held() -> bool:
            fds.append(proc.num_fds())
            return daemon_connections(daemon, port) >= 256 and flood is not None and flood.connects > 1000

        wait_until(held, what="the flood holding every HTTP connection")
        # 2,000 wrong keys: the address is throttled after ten
        answers = [keyed_get(guesser, f"guess-{i}")[0] for i in range(2000)]
        assert answers[:10] == [401] * 10 and set(answers[10:]) == {429}
        guesser.close()
        fds.append(proc.num_fds())
        # the broker restarts: the daemon is back on it within its backoff (1 s cap) plus a loaded machine's slack
        broker.stop()
        daemon.wait_log("mqtt_down")
        broker.start()
        broker_up = time.time()
        up = daemon.wait_log("mqtt_up", count=2)[-1]
        assert log_time(up) - broker_up < 10.0, "the reconnect waited for descriptors"
        # a drop file is processed and its quality result published and delivered
        (tmp_path / "drops" / "part-flood.csv").write_text(CSV)
        rec.wait_for(
            lambda ms: [m for m in rec.select("/quality") if m.json.get("mpm_delivery") == "delivered"],
            "the drop's quality result delivered",
        )
        # the connections the flood got in are cut by the header timeout, not held for ever
        wait_until(lambda: flood is not None and flood.cut >= 100, what="held connections timed out")
        fds.append(proc.num_fds())
        assert max(fds) <= NOFILE * 3 // 4 + 8, f"HTTP took descriptors kept for the rest: {max(fds)}"
        assert flood.connects > 2000  # refused clients kept coming back
        flood.close()
        flood = None
        wait_until(lambda: healthy(port), what="the API open again")
        assert call(port, "GET", "/api/v1/equipment", KEYS["admin"])[0] == 200
        assert daemon.stop() == 0
    finally:
        if flood is not None:
            flood.close()
        rec.close()
        daemon.kill()
    text = daemon.log_path.read_text(errors="replace")
    assert len(text.encode()) < LOG_BOUND, f"log grew to {len(text)} bytes"
    assert "Traceback" not in text and "out of system resource" not in text and "Too many open files" not in text
    events = [e.get("event") for e in daemon.logs()]
    # thousands of refused connections; a line when the house fills, at most about once per header-timeout
    # cycle (the slow clients let in together are cut together), never one per refusal
    assert 1 <= events.count("http_accept_limited") <= 20, events.count("http_accept_limited")
    assert events.count("http_auth_throttled") == 1


def test_out_of_descriptors_pauses_accepting_and_logs_once(tmp_path: Path, broker: Broker) -> None:
    prlimit = require_tool("prlimit")
    port = free_port()
    cfg = write_config(tmp_path, broker.port, http=http_section(port))
    daemon = Daemon(cfg, env=ENV).start()
    waiting: list[socket.socket] = []
    try:
        daemon.wait_log("http_listening")
        assert daemon.proc is not None
        pid = daemon.proc.pid
        hard = psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE)[1]
        # no descriptor left: the next accept fails (or gets one too close to the limit)
        subprocess.run([prlimit, f"--pid={pid}", f"--nofile={psutil.Process(pid).num_fds()}:{hard}"], check=True)
        waiting = [socket.create_connection(("127.0.0.1", port), timeout=GUARD_S) for _ in range(100)]
        for sock in waiting:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        limited = daemon.wait_log("http_accept_limited")
        assert limited[0]["reason"] in ("EMFILE", "descriptors_low"), limited
        time.sleep(3.0)  # three retry periods while still short, to show that they add no lines
        subprocess.run([prlimit, f"--pid={pid}", f"--nofile=1024:{hard}"], check=True)
        # the connections waited in the kernel's backlog and are answered once descriptors are back; only
        # the one accepted when descriptors were found short was closed unanswered
        answers = [read_until_closed(sock) for sock in waiting]
        refused = answers.count(b"")
        assert refused <= 1 and all(a.startswith(b"HTTP/1.1 200") for a in answers if a), answers
        assert daemon.wait_log("http_accept_restored")[0]["refused"] == refused
        events = [e.get("event") for e in daemon.logs()]
        assert events.count("http_accept_limited") == 1 and events.count("http_accept_restored") == 1
        text = daemon.log_path.read_text()
        assert "Traceback" not in text and "out of system resource" not in text
        assert daemon.stop() == 0
    finally:
        for sock in waiting:
            sock.close()
        daemon.kill()
