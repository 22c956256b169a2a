"""Real peers for tests: a mosquitto broker, an MQTT recorder, the daemon as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
GUARD_S = 30.0


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = GUARD_S, what: str = "condition") -> Any:
    """Poll `predicate` until it is truthy; fail after the (generous) guard."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


def metric_total(http_port: int, name: str, **labels: str) -> float:
    """The sum of a daemon's /metrics samples called `name` whose labels include `labels`."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=GUARD_S) as resp:
        text = resp.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


async def until(predicate: Callable[[], Any], what: str = "condition", timeout: float = GUARD_S) -> Any:
    """`wait_until` for async tests: poll `predicate` until it returns something truthy and return that."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def require_tool(name: str) -> str:
    """The path of a required external tool; under CI a missing one fails, elsewhere it skips."""
    import pytest

    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is required under CI=true but is not installed")
        pytest.skip(f"{name} is not installed")
    return path


class Broker:
    """A mosquitto process on a free loopback port, which tests may stop and start again."""

    def __init__(self, workdir: Path, extra_conf: str = "", port: int | None = None, *, anonymous: bool = True) -> None:
        self.exe = require_tool("mosquitto")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra_conf = extra_conf
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = workdir / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'true' if anonymous else 'false'}",
            "persistence true",
            f"persistence_location {workdir}/",
            "max_queued_messages 0",
            "max_inflight_messages 0",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
        ]
        if os.geteuid() == 0:
            lines.append("user root")
        self.conf.write_text("\n".join(lines) + "\n" + extra_conf)

    def start(self) -> None:
        log = open(self.workdir / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=log, stderr=log)
        log.close()
        wait_until(self._listening, what=f"mosquitto on port {self.port}")

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"mosquitto exited: {(self.workdir / 'mosquitto.log').read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its persistence file) and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=GUARD_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    properties: Any

    @property
    def json(self) -> Any:
        return json.loads(self.payload)


class Recorder:
    """An MQTT 5 subscriber with a persistent session that records everything it receives."""

    def __init__(
        self,
        port: int,
        topics: list[str],
        client_id: str | None = None,
        clean: bool = False,
        *,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.messages: list[Received] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"recorder-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        self.topics = topics
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.reconnect_delay_set(0.1, 0.5)
        if username:
            self.client.username_pw_set(username, password)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect_async("127.0.0.1", port, 30, clean_start=clean, properties=props)
        self.client.loop_start()
        wait_until(self.connected.is_set, what="recorder connected")

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:
            # retainAsPublished: see the retain flag as the publisher set it, not as mosquitto forwards it
            client.subscribe([(t, SubscribeOptions(qos=1, retainAsPublished=True)) for t in self.topics])
            self.connected.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain), msg.properties))

    def select(self, suffix: str = "", contains: str = "") -> list[Received]:
        """Messages whose topic ends with `suffix` and contains `contains`."""
        with self.lock:
            return [m for m in self.messages if m.topic.endswith(suffix) and contains in m.topic]

    def wait_for(
        self, predicate: Callable[[list[Received]], Any], what: str = "messages", timeout: float = GUARD_S
    ) -> Any:
        def check() -> Any:
            with self.lock:
                snapshot = list(self.messages)
            return predicate(snapshot)

        return wait_until(check, timeout, what)

    def publish(self, topic: str, payload: Any, retain: bool = False, properties: Properties | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        info = self.client.publish(topic, data, qos=1, retain=retain, properties=properties)
        info.wait_for_publish(GUARD_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Daemon:
    """`edge-agent run` as a subprocess, its JSON log lines collected."""

    def __init__(self, config: Path, env: dict[str, str] | None = None, prefix: list[str] | None = None) -> None:
        """`prefix` is put before the command line, e.g. `["prlimit", "--nofile=1024", "--"]`."""
        self.config = config
        self.prefix = list(prefix or [])
        self.log_path = config.parent / f"daemon-{uuid.uuid4().hex[:6]}.log"
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), self.env.get("PYTHONPATH", "")])
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> Daemon:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "agent", "run", "--config", str(self.config)],
            stdout=log,
            stderr=log,
            env=self.env,
            cwd=str(self.config.parent),
        )
        log.close()
        if wait:
            self.wait_log("started")
        return self

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "raw", "line": line})
        return out

    def wait_log(self, event: str, count: int = 1, **fields: Any) -> list[dict[str, Any]]:
        def found() -> list[dict[str, Any]] | None:
            if self.proc is not None and self.proc.poll() is not None and event not in ("stopped",):
                raise AssertionError(f"daemon exited with {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            hits = [e for e in self.logs() if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())]
            return hits if len(hits) >= count else None

        return wait_until(found, what=f"log event {event} {fields}")  # type: ignore[no-any-return]

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal and wait; return the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=GUARD_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
            raise AssertionError("daemon did not stop within the guard") from None
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def script_line(path: Path, **item: Any) -> None:
    """Append one line to a scripted driver's script."""
    with open(path, "a") as fh:
        fh.write(json.dumps(item) + "\n")


def write_config(
    tmp: Path,
    broker_port: int,
    body: str = "",
    *,
    agent_extra: str = "",
    mqtt_extra: str = "",
    http: str | None = None,
) -> Path:
    """A daemon config in `tmp` with short backoff caps, talking to the test broker."""
    http_section = http if http is not None else f'[http]\nlisten = "127.0.0.1:{free_port()}"\n'
    text = f"""
[agent]
id = "cell-t"
site = "test-site"
state_dir = "state"
log_level = "info"
reconnect_max_s = 1
driver_modules = ["scripted_driver"]
{agent_extra}

[mqtt]
url = "mqtt://127.0.0.1:{broker_port}"
topic_prefix = "edge"
telemetry_interval_s = 0.1
status_heartbeat_s = 60
keepalive_s = 5
{mqtt_extra}

{http_section}
{body}
"""
    path = tmp / "agent.toml"
    path.write_text(text)
    return path


def scripted_equipment(eid: str, script: Path, extra: str = "", down_file: Path | None = None) -> str:
    """An [[equipment]] table for the scripted driver with a status map and a few tags."""
    down = f'down_file = "{down_file}"\n' if down_file else ""
    return f"""
[[equipment]]
id = "{eid}"
type = "cnc_mill"
driver = "scripted"
[equipment.connection]
script = "{script}"
{down}[equipment.status]
tag = "state"
map = {{ "0" = "idle", "1" = "running", "2" = "paused", "3" = "error" }}
progress_tag = "progress"
operation_tag = "program"
process_id_tag = "job"
[[equipment.tags]]
name = "state"
[[equipment.tags]]
name = "progress"
[[equipment.tags]]
name = "program"
[[equipment.tags]]
name = "job"
[[equipment.tags]]
name = "temp"
unit = "degC"
deadband = 0.5
[[equipment.tags]]
name = "setpoint"
[[equipment.alerts]]
tag = "temp"
above = 80.0
clear_below = 75.0
severity = "critical"
message = "Spindle overheating"
[[equipment.commands]]
name = "set_speed"
kind = "write"
tag = "setpoint"
min = 0
max = 24000
[[equipment.commands]]
name = "refused"
kind = "write"
tag = "setpoint"
refuse = true
[[equipment.commands]]
name = "reset"
kind = "reset"
{extra}
"""


class LoopThread:
    """An asyncio loop in its own thread, for async peers used by synchronous tests."""

    def __init__(self, name: str) -> None:
        import asyncio

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(GUARD_S)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a control method on the emulator's loop and return its result."""

        async def go() -> Any:
            return fn(*args, **kwargs)

        return self.run(go())

    def stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(GUARD_S)
        self.loop.close()


class MpmPeer(LoopThread):
    """The built-in MPM emulator served from its own thread and event loop, for tests of the daemon."""

    def __init__(self, *, ssl_context: Any = None, **kwargs: Any) -> None:
        from agent.simulate.mpm_emulator import MPMEmulator

        super().__init__("mpm-emulator")
        self.emu = MPMEmulator(**kwargs)
        self.base_url: str = self.run(self.emu.start("127.0.0.1", 0, ssl_context=ssl_context))

    def close(self) -> None:
        self.run(self.emu.stop())
        self.stop_loop()


class OpcUaPeer(LoopThread):
    """The simulated OPC UA machine served from its own thread, for tests of the daemon."""

    def __init__(self, **kwargs: Any) -> None:
        from drivers.opcua.sim import MachineServer

        super().__init__("opcua-server")
        self.server = MachineServer(port=free_port(), **kwargs)
        self.run(self.server.start())

    def close(self) -> None:
        self.run(self.server.stop())
        self.stop_loop()


class ModbusPeer(LoopThread):
    """A Modbus TCP device (the simulator's SimServer) served from its own thread, for tests of the daemon."""

    def __init__(self, ranges: dict[str, Any]) -> None:
        from drivers.modbus.sim import SimServer

        super().__init__("modbus-server")
        self.sim = SimServer(ranges)
        self.port: int = self.run(self.sim.start_tcp())

    def close(self) -> None:
        self.run(self.sim.stop())
        self.stop_loop()


class SocatPair:
    """A `socat` pty pair: one program opens `a`, the other `b`."""

    def __init__(self, folder: Path) -> None:
        self.exe = require_tool("socat")
        self.a = folder / "device-side.tty"
        self.b = folder / "host-side.tty"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = socat_pty_args(self.exe, self.a, self.b)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.a.exists() and self.b.exists(), what="socat's pty links")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(GUARD_S)
            self.proc = None
        for link in (self.a, self.b):
            link.unlink(missing_ok=True)


def socat_pty_args(exe: str, a: Path, b: Path) -> list[str]:
    """socat linking two raw ptys at `a` and `b`."""
    return [exe, "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"]


class AsyncSocatPair:
    """A `socat` pty pair for async tests: one side opens `a`, the other `b`; stop and start again to cut
    the line and bring it back."""

    def __init__(self, folder: Path) -> None:
        self.exe = require_tool("socat")
        self.a = folder / "a.tty"
        self.b = folder / "b.tty"
        self.log = folder / "socat.log"
        self.proc: Any = None  # asyncio.subprocess.Process

    async def start(self) -> None:
        import asyncio

        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *socat_pty_args(self.exe, self.a, self.b),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GUARD_S
        while not (self.a.exists() and self.b.exists()):
            assert self.proc.returncode is None, self.log.read_text()
            assert loop.time() < deadline, "socat did not link the pty pair"
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        import asyncio

        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.terminate()
        try:
            async with asyncio.timeout(GUARD_S):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
        # Never leave a link that could point at a pty number the system hands out again.
        for link in (self.a, self.b):
            link.unlink(missing_ok=True)


class PrinterPeer(LoopThread):
    """The virtual Marlin printer served on one end of a socat pair from its own thread."""

    def __init__(self, folder: Path, **options: Any) -> None:
        import asyncio

        from drivers.printer.sim import VirtualPrinter

        super().__init__("virtual-printer")
        self.pair = SocatPair(folder)
        self.pair.start()
        self.printer = VirtualPrinter(**options)

        async def serve() -> Any:
            return asyncio.ensure_future(self.printer.serve_path(self.pair.a))

        self.task = self.run(serve())

    @property
    def port(self) -> Path:
        """Where the host (the daemon) opens the line."""
        return self.pair.b

    def close(self) -> None:
        import contextlib

        async def cancel() -> None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task

        self.run(cancel())
        self.pair.stop()
        self.stop_loop()
