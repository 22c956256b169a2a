"""OPC UA end to end: the whole daemon versus a bare asyncua client, against one server process, in one run.

    .venv/bin/python bench/bench_opcua.py [--vars 1000] [--rates 0,2,10] [--seconds 20] [--warmup 5]
        [--publishing-ms 50] [--sampling-ms MS] [--queue-size N] [--bare-queue 0] [--group 20] [--burst]
        [--shuffle] [--stock-server] [--profile FILE] [--server-profile FILE] [--json]

    # issue 18: every change with default tag settings at the shipped publishing interval
    .venv/bin/python bench/bench_opcua.py --publishing-ms 100 --rates 10

Peers, all on loopback and started by the bench:
- an asyncua server in its own process; every variable changes `rate` times a second, written `--group`
  at a time, the groups spread evenly over each period (`--burst`: all at the start of the period;
  `--shuffle`: the groups in another order every period, so a variable's changes come 0 to 2 periods
  apart), each write stamped with its own SourceTimestamp, so lag covers the whole path from the write on;
- mosquitto (as tests/peers.py starts it) and `edge-agent run` (`python -m agent run`, as tests/peers.py
  starts it) with one OPC UA equipment subscribed to every variable, `telemetry_interval_s = 0.05`;
- `mosquitto_sub -v` counting telemetry values, each line stamped on receipt by a reader thread;
- a bare asyncua client in its own process subscribed to the same items, sampling interval 0 and queue
  size `--bare-queue` (0: the server's largest, every change): the ceiling.

Per rate (0 Hz measures the idle cost), after a warm-up, a measuring window. Values are attributed to a
window by their source timestamp (whole milliseconds, as telemetry carries them) on both sides. Printed:
values/s delivered on MQTT as a share of the bare client's, the daemon's CPU (user+system, % of one core,
and per 1,000 values/s; the bare client's per 1,000 values/s beside it; `daemon_loop` is the daemon's
main thread), lag p50/p95 from source timestamp to MQTT receipt (split at the telemetry message's build
time) and the bare client's lag to its own receipt, and the daemon's peak RSS (VmHWM) over an import
baseline (a process importing what the daemon imports). `--profile FILE` runs the daemon under cProfile.

Settings: publishing interval 50 ms, the telemetry interval: the server then delivers once per
telemetry interval and the daemon flushes each delivery on arrival, so the batching window adds no
lag of its own (with 10 ms the server delivers five times per flush, and each value waits for the
next flush instead). The daemon's tags carry no sampling interval or queue size unless given
(`--sampling-ms`, `--queue-size`): the driver's defaults (sampling 0, the queue derived from the
revised intervals). The asyncua server does not sample: it revises every sampling interval to the
publishing interval and reports each write.

Targets checked per moving phase: the earlier ones (share >= 95%, CPU <= 3% of a core per 1,000
values/s, lag p95 <= 60 ms at 2 Hz), and issue 18's against the bare client in the same run (values
>= 99% of its, CPU <= 0.5x its, lag p95 <= its + 60 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

NS = "urn:edge-agent:bench"
AGENT_ID, SITE, EQUIPMENT = "cell-o", "bench", "opc-1"
TOPIC = f"edge/{SITE}/{AGENT_ID}/equipment/+/telemetry"
PROBE = f"edge/{SITE}/{AGENT_ID}/equipment/probe/telemetry"
BASELINE_IMPORTS = "agent.supervisor, agent.http, agent.mpm_bridge, drivers.opcua"
GUARD_S = 60.0
TARGETS = {"share": 0.95, "cpu_per_1k": 3.0, "rss_growth_mib": 15.0, "lag_p95_ms_2hz": 60.0}
# Issue 18, against the bare client in the same run: share of its values, its CPU, added lag p95 (ms).
VS_BARE = {"share": 0.99, "cpu_ratio": 0.5, "lag_p95_added_ms": 60.0}


# ---- the server process ----------------------------------------------------------------------------


async def serve(port: int, count: int, group: int, burst: bool, stock: bool, shuffle: bool) -> None:
    """`count` Double variables; stdin `RATE r` sets how often each changes, `STATS` prints write counts."""
    import random

    from asyncua import Server, ua
    from asyncua.server.monitored_item_service import MonitoredItemValues

    if not stock:
        # asyncua deep-copies every written value once per monitored item, against a caller mutating it
        # later: ~75% of this server's CPU, which kept it well short of 10 Hz. Every write here is a new
        # DataValue that nothing mutates, so keeping the reference changes nothing on the wire.
        def keep(self: MonitoredItemValues, cur_val: ua.DataValue) -> None:
            self.old_dvalue, self.current_dvalue = self.current_dvalue, cur_val

        MonitoredItemValues.set_current_datavalue = keep  # type: ignore[method-assign]

    logging.getLogger("asyncua").setLevel(logging.CRITICAL)
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}")
    idx = await server.register_namespace(NS)
    folder = await server.nodes.objects.add_folder(ua.NodeId.from_string(f"ns={idx};s=Bench"), "Bench")
    ids = []
    for i in range(count):
        node = await folder.add_variable(ua.NodeId.from_string(f"ns={idx};s=V{i}"), f"V{i}", 0.0)
        ids.append(node.nodeid)
    await server.start()
    state = {"rate": 0.0, "writes": 0, "ticks": 0, "late": 0}
    changed = asyncio.Event()

    async def commands() -> None:
        reader = asyncio.StreamReader()
        await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := (await reader.readline()).decode().split():
            if line[0] == "RATE":
                state["rate"] = float(line[1])
                changed.set()
            elif line[0] == "STATS":
                print(json.dumps({k: state[k] for k in ("writes", "ticks", "late")}), flush=True)
        changed.set()
        state["rate"] = -1.0  # stdin closed: the bench is gone

    task = asyncio.create_task(commands())
    print(f"READY {port}", flush=True)
    tick = 0
    starts = list(range(0, len(ids), group))
    rng = random.Random(18)
    while state["rate"] >= 0:
        if state["rate"] == 0:
            changed.clear()
            await changed.wait()
            continue
        period = 1.0 / state["rate"]
        next_at = time.monotonic()
        rate = state["rate"]
        while state["rate"] == rate:
            tick += 1
            start = next_at
            if shuffle:
                rng.shuffle(starts)
            for slot, j in enumerate(starts):
                # Paced: group after group spread over the period (burst: all at once, yielding between
                # groups so the publish loop still runs, as it would beside a server's sampling engine).
                delay = 0.0 if burst else start + period * slot / len(starts) - time.monotonic()
                await asyncio.sleep(max(0.0, delay))
                for i in range(j, min(j + group, len(ids))):
                    # Stamped per write: the lag measured downstream starts when this value exists.
                    now = cast(Any, datetime.now(UTC))  # asyncua's DateTime alias is a datetime
                    value = ua.Variant(float(tick * 100_000 + i), ua.VariantType.Double)
                    dv = ua.DataValue(value, SourceTimestamp=now, ServerTimestamp=now)
                    await server.write_attribute_value(ids[i], dv)
                    state["writes"] += 1
            state["ticks"] += 1
            next_at += period
            delay = next_at - time.monotonic()
            if delay < 0:
                state["late"] += 1
                next_at = time.monotonic()  # overloaded: skip rather than queue ticks
            await asyncio.sleep(max(0.0, delay))
    task.cancel()
    await server.stop()


# ---- the bare client process -----------------------------------------------------------------------


async def bare(endpoint: str, count: int, publishing_ms: float, sampling_ms: float, queue: int) -> None:
    """The ceiling: asyncua alone, one subscription, iterator mode; counts values per millisecond of source time."""
    from asyncua import Client, ua
    from asyncua.common.subscription import DataChangeEvent

    logging.getLogger("asyncua").setLevel(logging.CRITICAL)
    client = Client(endpoint)
    await client.connect()
    buckets: collections.Counter[int] = collections.Counter()
    lags: list[tuple[float, float]] = []
    try:
        idx = (await client.get_namespace_array()).index(NS)
        sub = await client.create_subscription(publishing_ms, None, queue_maxsize=4 * count + 16)
        nodes = [client.get_node(f"ns={idx};s=V{i}") for i in range(count)]
        await sub.subscribe_data_change(nodes, queuesize=queue, sampling_interval=ua.Double(sampling_ms))

        async def consume() -> None:
            n = 0
            async for ev in sub:
                if type(ev) is not DataChangeEvent:
                    continue
                ts = ev.data.monitored_item.Value.SourceTimestamp
                if ts is None:
                    continue
                # Counted by source timestamp, like the MQTT side: no edge effects from different lags.
                at = (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).timestamp()
                buckets[int(at * 1000)] += 1  # whole milliseconds, as the telemetry's `ts` carries them
                n += 1
                if n % 10 == 0:
                    lags.append((at, time.time() - at))

        task = asyncio.create_task(consume())
        print("READY", flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # any line or EOF: report and stop
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        print(json.dumps({"buckets": buckets, "lags": lags}), flush=True)
        with contextlib.suppress(Exception):
            await sub.delete()
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


# ---- the measuring side ----------------------------------------------------------------------------


class Sub:
    """`mosquitto_sub -v` on the telemetry topics; a thread stamps each line with time.time() on receipt."""

    def __init__(self, port: int) -> None:
        self.lines: list[tuple[float, bytes]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        exe = shutil.which("mosquitto_sub")
        self.proc: subprocess.Popen[bytes] | None = None
        self.paho: Any = None
        if exe:
            self.proc = subprocess.Popen(
                [exe, "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-v", "-t", TOPIC],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            assert self.proc.stdout is not None
            self.thread = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
            self.thread.start()
        else:
            self._start_paho(port)
        try:
            self._probe(port)
        except BaseException:
            self.close()
            raise

    def _read(self, out: IO[bytes]) -> None:
        lines, lock = self.lines, self.lock
        for line in out:
            now = time.time()
            if line.startswith(PROBE.encode()):
                self.subscribed.set()
            else:
                with lock:
                    lines.append((now, line))

    def _probe(self, port: int) -> None:
        """Publish probes on a matching topic until one comes back: the subscription is in place."""
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        client.connect("127.0.0.1", port)
        client.loop_start()
        try:
            deadline = time.monotonic() + GUARD_S
            while not self.subscribed.wait(0.2):
                if time.monotonic() > deadline:
                    raise RuntimeError("telemetry subscriber did not subscribe")
                client.publish(PROBE, b'{"values":[]}', qos=0)
        finally:
            client.disconnect()
            client.loop_stop()

    def _start_paho(self, port: int) -> None:
        """Fallback without mosquitto-clients: a paho subscriber (slower, stamps in its network thread)."""
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            now = time.time()
            if msg.topic == PROBE:
                self.subscribed.set()
                return
            with self.lock:
                self.lines.append((now, msg.topic.encode() + b" " + bytes(msg.payload)))

        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        client.on_message = on_message
        client.on_connect = lambda c, *a: c.subscribe(TOPIC, qos=1)
        client.connect("127.0.0.1", port)
        client.loop_start()
        self.paho = client

    @property
    def kind(self) -> str:
        return "mosquitto_sub" if self.proc is not None else "paho"

    def values(self) -> int:
        with self.lock:
            return sum(line.count(b'"tag":') for _, line in self.lines)

    def parse(self) -> list[tuple[float, float, float]]:
        """Every value received: (source time, message build time, receipt time), in seconds."""
        with self.lock:
            lines = list(self.lines)
        out: list[tuple[float, float, float]] = []
        parsed: dict[str, float] = {}
        for received, line in lines:
            payload = json.loads(line.split(b" ", 1)[1])
            built = datetime.fromisoformat(payload["timestamp"]).timestamp()
            for v in payload["values"]:
                ts = v["ts"]
                at = parsed.get(ts)
                if at is None:
                    at = parsed[ts] = datetime.fromisoformat(ts).timestamp()
                out.append((at, built, received))
        return out

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.thread.join(10)
        if self.paho is not None:
            self.paho.disconnect()
            self.paho.loop_stop()


def start_role(*args: str, profile: str | None = None) -> subprocess.Popen[str]:
    """This file in another role, stdin/stdout as pipes, waiting for its READY line."""
    prefix = ["-m", "cProfile", "-o", str(Path(profile).resolve())] if profile else []
    proc = subprocess.Popen(
        [sys.executable, *prefix, __file__, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        stop(proc)
        raise RuntimeError(f"{args[0]} did not start: {line!r}")
    return proc


def ask(proc: subprocess.Popen[str], line: str, reply: bool = False) -> Any:
    """Send a line to a role's stdin; with `reply`, read its JSON answer."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline()) if reply else None


def stop(proc: subprocess.Popen[Any]) -> None:
    """Close its stdin (a role's signal to finish), then SIGTERM if it lingers, SIGKILL as a last resort."""
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    for step in (proc.terminate, proc.kill):
        try:
            proc.wait(10)
            return
        except subprocess.TimeoutExpired:
            step()
    proc.wait()


def import_baseline() -> float:
    """RSS (bytes) of a Python process that has imported what the daemon imports, measured from outside."""
    import psutil

    code = f"import {BASELINE_IMPORTS}; print('READY', flush=True); import sys; sys.stdin.read()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])},
    )
    try:
        assert proc.stdout is not None
        if not proc.stdout.readline().startswith("READY"):
            raise RuntimeError("import baseline process failed")
        return float(psutil.Process(proc.pid).memory_info().rss)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(GUARD_S)


def write_config(
    tmp: Path,
    broker_port: int,
    endpoint: str,
    count: int,
    publishing_ms: float,
    sampling_ms: float | None,
    queue_size: int | None,
) -> Path:
    extra = "" if sampling_ms is None else f"sampling_interval_ms = {sampling_ms:g}\n"
    extra += "" if queue_size is None else f"queue_size = {queue_size}\n"
    tags = "".join(f'[[equipment.tags]]\nname = "v{i}"\nnode = "nsu={NS};s=V{i}"\n{extra}' for i in range(count))
    text = f"""
[agent]
id = "{AGENT_ID}"
site = "{SITE}"
state_dir = "state"
log_level = "info"
reconnect_max_s = 1
[mqtt]
url = "mqtt://127.0.0.1:{broker_port}"
telemetry_interval_s = 0.05
status_heartbeat_s = 3600
[http]
listen = "127.0.0.1:0"
[[equipment]]
id = "{EQUIPMENT}"
type = "plc"
driver = "opcua"
[equipment.connection]
endpoint = "{endpoint}"
publishing_interval_ms = {publishing_ms:g}
{tags}"""
    path = tmp / "agent.toml"
    path.write_text(text)
    return path


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_s(proc: Any) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def main_thread_cpu_s(proc: Any) -> float:
    """CPU seconds of a process's main thread (the daemon's event loop; paho's network thread is another)."""
    return sum(float(t.user_time + t.system_time) for t in proc.threads() if t.id == proc.pid)


def hwm_bytes(pid: int) -> float:
    """Peak resident set size of a live process (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) * 1024
    return float("nan")


def summarize(
    window: tuple[float, float, float, dict[str, float], dict[str, float], dict[str, int], dict[str, int], float],
    values: list[tuple[float, float, float]],
    bare_buckets: dict[int, int],
    bare_lags: list[list[float]],
) -> dict[str, Any]:
    """One measuring window: values with a source timestamp inside it, on each side."""
    rate, t0, t1, cpu0, cpu1, s0, s1, rss_max = window
    span = t1 - t0
    mine = [v for v in values if t0 <= v[0] < t1]
    # Telemetry `ts` is cut to whole milliseconds: these lags read up to 1 ms long next to the bare client's.
    lags = [received - at for at, _, received in mine]
    upstream = [made - at for at, made, _ in mine]  # server, asyncua, driver, monitor and the batching window
    sent = [received - made for _, made, received in mine]  # store, MQTT, broker, subscriber
    bare_count = sum(n for k, n in bare_buckets.items() if t0 <= k / 1000 < t1)
    blags = [lag for at, lag in bare_lags if t0 <= at < t1]
    cpu = {k: 100 * (cpu1[k] - cpu0[k]) / span for k in cpu0}
    rate_s = len(mine) / span
    nan = float("nan")
    return {
        "rate_hz": rate,
        "server_writes_s": (s1["writes"] - s0["writes"]) / span,
        "server_late_ticks": s1["late"] - s0["late"],
        "bare_values_s": bare_count / span,
        "daemon_values_s": rate_s,
        "share": rate_s / (bare_count / span) if bare_count else nan,
        "daemon_cpu_pct": cpu["daemon"],
        "daemon_cpu_pct_per_1k": cpu["daemon"] / (rate_s / 1000) if rate_s else nan,
        "bare_cpu_pct_per_1k": cpu["bare"] / (bare_count / span / 1000) if bare_count else nan,
        "cpu_ratio": cpu["daemon"] / cpu["bare"] if cpu["bare"] else nan,
        "cpu_pct": cpu,
        "lag_p50_ms": 1000 * statistics.median(lags) if lags else nan,
        "lag_p95_ms": 1000 * percentile(lags, 0.95),
        "lag_max_ms": 1000 * max(lags) if lags else nan,
        "to_build_p50_ms": 1000 * statistics.median(upstream) if upstream else nan,
        "to_build_p95_ms": 1000 * percentile(upstream, 0.95),
        "build_to_receipt_p50_ms": 1000 * statistics.median(sent) if sent else nan,
        "build_to_receipt_p95_ms": 1000 * percentile(sent, 0.95),
        "bare_lag_p50_ms": 1000 * statistics.median(blags) if blags else nan,
        "bare_lag_p95_ms": 1000 * percentile(blags, 0.95),
        "daemon_rss_max_mib": rss_max / 2**20,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import psutil

    from peers import Broker, Daemon, free_port

    rates = [float(r) for r in args.rates.split(",") if r]
    results: dict[str, Any] = {
        "vars": args.vars,
        "publishing_interval_ms": args.publishing_ms,
        "sampling_interval_ms": args.sampling_ms,
        "queue_size": args.queue_size,
        "bare_queue": args.bare_queue,
        "server_shuffle": args.shuffle,
        "server_group": args.group,
        "server_burst": args.burst,
        "stock_server": args.stock_server,
        "window_s": args.seconds,
        "loadavg_start": os.getloadavg(),
    }
    baseline = import_baseline()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        broker = Broker(tmp / "broker")
        server: subprocess.Popen[str] | None = None
        bare_proc: subprocess.Popen[str] | None = None
        daemon: Daemon | None = None
        sub: Sub | None = None
        try:
            broker.start()
            assert broker.proc is not None
            port = free_port()
            endpoint = f"opc.tcp://127.0.0.1:{port}"
            server_args = ["--serve", str(port), "--vars", str(args.vars), "--group", str(args.group)]
            server_args += ["--burst"] if args.burst else []
            server_args += ["--stock-server"] if args.stock_server else []
            server_args += ["--shuffle"] if args.shuffle else []
            server = start_role(*server_args, profile=args.server_profile)
            sub = Sub(broker.port)
            results["subscriber"] = sub.kind
            cfg = write_config(
                tmp, broker.port, endpoint, args.vars, args.publishing_ms, args.sampling_ms, args.queue_size
            )
            daemon = Daemon(cfg)
            if args.profile:
                start_profiled(daemon, str(Path(args.profile).resolve()))
            else:
                daemon.start()
            assert daemon.proc is not None
            dproc = psutil.Process(daemon.proc.pid)
            # The subscription's initial values: every item is monitored and the whole path is open.
            deadline = time.monotonic() + GUARD_S
            while sub.values() < args.vars:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the daemon delivered {sub.values()} of {args.vars} initial values")
                time.sleep(0.1)
            bare_proc = start_role(
                "--bare", endpoint, "--vars", str(args.vars),
                "--publishing-ms", str(args.publishing_ms), "--sampling-ms", str(args.sampling_ms or 0),
                "--bare-queue", str(args.bare_queue),
            )  # fmt: skip
            procs = {
                "daemon": dproc,
                "bare": psutil.Process(bare_proc.pid),
                "server": psutil.Process(server.pid),
                "mosquitto": psutil.Process(broker.proc.pid),
            }
            if sub.proc is not None:
                procs["mosquitto_sub"] = psutil.Process(sub.proc.pid)
            windows = []
            for rate in rates:
                ask(server, f"RATE {rate:g}")
                time.sleep(args.warmup if rate > 0 else 1.0)
                s0 = ask(server, "STATS", reply=True)
                cpu0 = {k: cpu_s(p) for k, p in procs.items()}
                cpu0["daemon_loop"] = main_thread_cpu_s(dproc)
                t0 = time.time()
                rss_max = 0.0
                while time.time() < t0 + args.seconds:
                    rss_max = max(rss_max, float(dproc.memory_info().rss))
                    time.sleep(0.1)
                t1 = time.time()
                cpu1 = {k: cpu_s(p) for k, p in procs.items()}
                cpu1["daemon_loop"] = main_thread_cpu_s(dproc)
                s1 = ask(server, "STATS", reply=True)
                windows.append((rate, t0, t1, cpu0, cpu1, s0, s1, rss_max))
            ask(server, "RATE 0")
            time.sleep(2.0)  # values of the last window still on their way
            hwm = hwm_bytes(dproc.pid)
            rss_end = float(dproc.memory_info().rss)
            ask(bare_proc, "STOP")
            assert bare_proc.stdout is not None
            bare_out = json.loads(bare_proc.stdout.readline())
            logs = daemon.logs()
            dropped = sum(int(e.get("dropped", 0)) for e in logs if e.get("event") == "notifications_dropped")
            overflow_logs = sum(1 for e in logs if e.get("event") == "server_queue_overflow")
        finally:
            if bare_proc is not None:
                stop(bare_proc)
            if daemon is not None:
                with contextlib.suppress(Exception):
                    daemon.stop()
                daemon.kill()
            if sub is not None:
                sub.close()
            if server is not None:
                stop(server)
            broker.stop()
    values = sub.parse()
    bare_buckets = {int(k): n for k, n in bare_out["buckets"].items()}
    results["phases"] = [summarize(w, values, bare_buckets, bare_out["lags"]) for w in windows]
    results["import_baseline_mib"] = baseline / 2**20
    results["daemon_peak_rss_mib"] = hwm / 2**20
    results["daemon_end_rss_mib"] = rss_end / 2**20
    results["rss_growth_peak_mib"] = (hwm - baseline) / 2**20
    results["rss_growth_end_mib"] = (rss_end - baseline) / 2**20
    results["notifications_dropped"] = dropped
    results["server_queue_overflow_logs"] = overflow_logs
    results["loadavg_end"] = os.getloadavg()
    return results


def start_profiled(daemon: Any, prof: str) -> None:
    """What Daemon.start does, with the daemon under cProfile (statistics written on its clean exit)."""
    log = open(daemon.log_path, "ab")
    daemon.proc = subprocess.Popen(
        [sys.executable, "-m", "cProfile", "-o", prof, "-m", "agent", "run", "--config", str(daemon.config)],
        stdout=log,
        stderr=log,
        env=daemon.env,
        cwd=str(daemon.config.parent),
    )
    log.close()
    daemon.wait_log("started")


def report(r: dict[str, Any]) -> None:
    la0, la1 = r["loadavg_start"], r["loadavg_end"]
    tag_settings = (
        "default tag settings"
        if r["sampling_interval_ms"] is None and r["queue_size"] is None
        else (f"sampling_interval_ms={r['sampling_interval_ms']}, queue_size={r['queue_size']}")
    )
    print(
        f"# {r['vars']} variables, publishing_interval_ms={r['publishing_interval_ms']:g}, {tag_settings},"
        f" bare client queue {r['bare_queue']},"
        f" server writes {r['server_group']} at a time, {'in a burst' if r['server_burst'] else 'spread'}"
        f"{', shuffled' if r['server_shuffle'] else ''}"
        f"{' (stock asyncua)' if r['stock_server'] else ''},"
        f" {r['window_s']:g} s windows, subscriber {r['subscriber']}, cpus={os.cpu_count()},"
        f" load average {la0[0]:.2f} {la0[1]:.2f} {la0[2]:.2f} -> {la1[0]:.2f} {la1[1]:.2f} {la1[2]:.2f}"
    )
    head = "rate,srv w/s,bare v/s,agent v/s,share,cpu%,bare cpu%,cpu%/1k,bare/1k,p50,p95,bare50,bare95".split(",")
    print(" ".join(f"{h:>9}" for h in head) + "   lag split p50/p95 (ms) and other cpu%")
    for p in r["phases"]:
        moving = p["rate_hz"] > 0  # the idle phase has no rate to compare or divide by
        cells = [
            f"{p['rate_hz']:g} Hz",
            f"{p['server_writes_s']:.0f}",
            f"{p['bare_values_s']:.0f}",
            f"{p['daemon_values_s']:.0f}",
            f"{p['share']:.1%}" if moving else "-",
            f"{p['daemon_cpu_pct']:.1f}",
            f"{p['cpu_pct']['bare']:.1f}",
            f"{p['daemon_cpu_pct_per_1k']:.2f}" if moving else "-",
            f"{p['bare_cpu_pct_per_1k']:.2f}" if moving else "-",
            f"{p['lag_p50_ms']:.1f}",
            f"{p['lag_p95_ms']:.1f}",
            f"{p['bare_lag_p50_ms']:.1f}",
            f"{p['bare_lag_p95_ms']:.1f}",
        ]
        split = (
            f"source->built {p['to_build_p50_ms']:.0f}/{p['to_build_p95_ms']:.0f},"
            f" built->received {p['build_to_receipt_p50_ms']:.0f}/{p['build_to_receipt_p95_ms']:.0f}"
        )
        others = " ".join(f"{k}={v:.1f}" for k, v in p["cpu_pct"].items() if k != "daemon")
        print(" ".join(f"{c:>9}" for c in cells) + f"   {split}; {others}")
    print(
        f"daemon RSS: import baseline {r['import_baseline_mib']:.1f} MiB, peak {r['daemon_peak_rss_mib']:.1f} MiB"
        f" (growth {r['rss_growth_peak_mib']:.1f} MiB), at end {r['daemon_end_rss_mib']:.1f} MiB"
        f" (growth {r['rss_growth_end_mib']:.1f} MiB); notifications dropped: {r['notifications_dropped']};"
        f" server queue overflow episodes: {r['server_queue_overflow_logs']}"
    )
    checks = [("RSS growth <= 15 MiB", r["rss_growth_peak_mib"] <= TARGETS["rss_growth_mib"])]
    for p in r["phases"]:
        if p["rate_hz"] <= 0:
            continue
        checks.append((f"share {p['rate_hz']:g} Hz >= 95%", p["share"] >= TARGETS["share"]))
        checks.append((f"cpu/1k {p['rate_hz']:g} Hz <= 3%", p["daemon_cpu_pct_per_1k"] <= TARGETS["cpu_per_1k"]))
        if p["rate_hz"] == 2:
            checks.append(("lag p95 2 Hz <= 60 ms", p["lag_p95_ms"] <= TARGETS["lag_p95_ms_2hz"]))
        hz = f"{p['rate_hz']:g} Hz"
        checks.append((f"{hz} values >= 99% of bare", p["share"] >= VS_BARE["share"]))
        checks.append((f"{hz} CPU <= 0.5x bare ({p['cpu_ratio']:.2f}x)", p["cpu_ratio"] <= VS_BARE["cpu_ratio"]))
        added = p["lag_p95_ms"] - p["bare_lag_p95_ms"]
        checks.append((f"{hz} lag p95 <= bare + 60 ms ({added:+.1f})", added <= VS_BARE["lag_p95_added_ms"]))
    print("targets: " + ", ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in checks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vars", type=int, default=1000)
    parser.add_argument("--rates", default="0,2,10", help="change rates in Hz (0: idle, the fixed cost)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring window per rate")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds at a new rate before measuring")
    parser.add_argument("--publishing-ms", type=float, default=50.0)
    parser.add_argument("--sampling-ms", type=float, help="every tag's sampling_interval_ms (default: none set)")
    parser.add_argument("--queue-size", type=int, help="every tag's queue_size (default: none set)")
    parser.add_argument("--bare-queue", type=int, default=0, help="the bare client's queue size (0: server's max)")
    parser.add_argument("--group", type=int, default=20, help="the server writes this many variables per step")
    parser.add_argument("--burst", action="store_true", help="all steps at the start of each period, not spread")
    parser.add_argument("--shuffle", action="store_true", help="the steps in another order every period")
    parser.add_argument("--stock-server", action="store_true", help="keep asyncua's per-item copy of each write")
    parser.add_argument("--profile", metavar="FILE", help="run the daemon under cProfile, statistics to FILE")
    parser.add_argument("--server-profile", metavar="FILE", help="the same for the OPC UA server")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--bare", metavar="ENDPOINT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.vars, max(1, args.group), args.burst, args.stock_server, args.shuffle))
    elif args.bare:
        asyncio.run(bare(args.bare, args.vars, args.publishing_ms, args.sampling_ms or 0.0, args.bare_queue))
    else:
        results = run(args)
        report(results)
        if args.json:
            print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
