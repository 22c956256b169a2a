"""The rolling history window: a broker link that goes silent (packets dropped, no reset) for longer than the
keep-alive loses no Sparkplug value. What went out into the void is still stored; after the new births it
is replayed as historical."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from test_sparkplug import G, Host, metric, spb_config
from test_uns import stored

from peers import Broker, Daemon, Recorder, free_port, script_line, wait_until


class BlackHole:
    """A TCP relay to the broker whose current connections can be made to swallow everything both ways,
    keeping their sockets open (no FIN, no RST), as a dead network path does; new connections relay."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target = target_port
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._dead: set[int] = set()
        self._conns: list[tuple[socket.socket, socket.socket]] = []
        self._generation = 0
        self.refusing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._conns.append((client, upstream))
            gen = self._generation
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._relay, args=(a, b, gen), daemon=True).start()

    def _relay(self, src: socket.socket, dst: socket.socket, gen: int) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            if gen in self._dead:
                continue  # swallowed: read and dropped, nothing sent on, nothing reset
            try:
                dst.sendall(data)
            except OSError:
                return

    def swallow(self) -> None:
        """Every connection open now goes silent; later ones relay."""
        self._dead.add(self._generation)
        self._generation += 1

    def cut(self) -> None:
        """An outage: every connection closed, new ones closed at once, until `heal`."""
        self.refusing = True
        for a, b in self._conns:
            a.close()
            b.close()

    def close(self) -> None:
        self._server.close()
        for a, b in self._conns:
            a.close()
            b.close()


def test_values_sent_into_a_silent_link_arrive_as_historical(tmp_path: Path, broker: Broker) -> None:
    hole = BlackHole(broker.port)
    cfg, script = spb_config(tmp_path, hole.port)
    cfg.write_text(cfg.read_text().replace("keepalive_s = 5", "keepalive_s = 2"))
    host = Host(broker.port)
    daemon = Daemon(cfg)
    try:
        daemon.start()
        wait_until(lambda: host.of("DBIRTH", "mill-1"), what="DBIRTH")
        alias = metric(host.of("DBIRTH", "mill-1")[0].payload, "temp").alias

        def seen(historical: bool | None = None) -> set[float]:
            return {
                m.double_value
                for s in host.of("DDATA", "mill-1")
                for m in s.payload.metrics
                if m.alias == alias
                and m.double_value is not None
                and (historical is None or m.is_historical == historical)
            }

        for i in range(1, 6):
            script_line(script, tag="temp", value=float(i))
        wait_until(lambda: seen() >= {1.0, 2.0, 3.0, 4.0, 5.0}, what="values before the death")
        hole.swallow()
        for i in range(6, 16):
            script_line(script, tag="temp", value=float(i))
        # the death is noticed by the keep-alive, the node reconnects and is born again with the next bdSeq
        wait_until(lambda: len(host.of("NBIRTH")) == 2, what="births after the silent death")
        wanted = {float(i) for i in range(1, 16)}
        wait_until(lambda: seen() >= wanted, what="every value, live or historical")
        assert {float(i) for i in range(6, 16)} <= seen(historical=True), "what went into the void is historical"
        births = [metric(s.payload, "bdSeq").long_value for s in host.of("NBIRTH")]
        assert births[1] == (births[0] or 0) + 1
        assert f"spBv1.0/{G}/NDEATH/cell-t" in {s.topic for s in host.seen}, "the broker sent the Will"
    finally:
        daemon.stop()
        host.close()
        hole.close()


def test_every_profile_is_complete_across_an_outage(tmp_path: Path, broker: Broker) -> None:
    hole = BlackHole(broker.port)
    cfg, script = spb_config(tmp_path, hole.port)
    loc = "acme/plant-1/line-2"
    text = cfg.read_text().replace('profiles = ["sparkplug"]', 'profiles = ["edge-agent", "sparkplug", "uns"]')
    cfg.write_text(text.replace('driver = "scripted"', f'driver = "scripted"\nlocation = "{loc}"'))
    host = Host(broker.port)
    rec = Recorder(broker.port, ["edge/#", f"{loc}/#"])
    daemon = Daemon(cfg)
    try:
        daemon.start()
        wait_until(lambda: host.of("DBIRTH", "mill-1"), what="DBIRTH")
        alias = metric(host.of("DBIRTH", "mill-1")[0].payload, "temp").alias

        def spb() -> set[float | None]:
            return {m.double_value for s in host.of("DDATA", "mill-1") for m in s.payload.metrics if m.alias == alias}

        def uns() -> set[float]:
            return {m.json["value"] for m in rec.select(f"{loc}/mill-1/telemetry/temp")}

        def today() -> set[float]:
            telemetry = rec.select("edge/test-site/cell-t/equipment/mill-1/telemetry")
            return {v["value"] for m in telemetry for v in m.json["values"] if v["tag"] == "temp"}

        script_line(script, tag="temp", value=1.0)
        wait_until(lambda: 1.0 in spb() and 1.0 in uns() and 1.0 in today(), what="first value on every stream")
        hole.cut()
        for i in range(2, 12):
            script_line(script, tag="temp", value=float(i))
        wait_until(lambda: sum(b"11.0" in p for p in stored(tmp_path / "state")) == 3, what="every stream stored")
        hole.refusing = False
        wanted = {float(i) for i in range(1, 12)}
        wait_until(lambda: spb() >= wanted, what="the Sparkplug stream complete")
        wait_until(lambda: uns() >= wanted, what="the UNS stream complete")
        wait_until(lambda: today() >= wanted, what="today's stream complete")
        # The other profiles' messages take no seq: today's has no gap within the run (the contract's promise).
        seqs = {m.json["seq"] for m in rec.select(contains="edge/test-site/cell-t/equipment/")}
        assert sorted(seqs) == list(range(min(seqs), max(seqs) + 1)), "a gap in today's seq"
        assert all("seq" not in m.json for m in rec.select(contains=f"{loc}/mill-1/telemetry/"))
    finally:
        daemon.stop()
        host.close()
        rec.close()
        hole.close()
