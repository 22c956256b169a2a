"""Both deaths on an unclean exit: with today's contract and the Sparkplug edge node on at once, a daemon that
dies without a goodbye leaves `R/state` offline (the contract's Will) and an NDEATH whose bdSeq matches its
NBIRTH (the specification's Will). MQTT gives one connection one Will, so the edge node has its own."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from test_sparkplug import G, Host, metric

from peers import Broker, Daemon, Recorder, script_line, scripted_equipment, wait_until, write_config

R = "edge/test-site/cell-t"


def both_profiles(tmp: Path, port: int) -> tuple[Path, Path]:
    script = tmp / "script.jsonl"
    script.touch()
    extra = f'profiles = ["edge-agent", "sparkplug"]\n[mqtt.sparkplug]\ngroup_id = "{G}"\n'
    return write_config(tmp, port, scripted_equipment("mill-1", script), mqtt_extra=extra), script


def test_sigkill_leaves_the_state_offline_and_the_ndeath_with_its_bdseq(tmp_path: Path, broker: Broker) -> None:
    cfg, _ = both_profiles(tmp_path, broker.port)
    host = Host(broker.port)
    rec = Recorder(broker.port, [f"{R}/state"])
    late: Recorder | None = None
    daemon = Daemon(cfg)
    try:
        daemon.start()
        wait_until(lambda: host.of("NBIRTH"), what="NBIRTH")
        born = metric(host.of("NBIRTH")[-1].payload, "bdSeq").long_value
        rec.wait_for(lambda ms: any(json.loads(m.payload)["online"] for m in ms), "the retained birth")
        daemon.kill()
        wait_until(lambda: host.of("NDEATH"), what="the NDEATH Will")
        assert metric(host.of("NDEATH")[-1].payload, "bdSeq").long_value == born
        rec.wait_for(lambda ms: not json.loads(ms[-1].payload)["online"], "the R/state Will")
        late = Recorder(broker.port, [f"{R}/state"])
        late.wait_for(lambda ms: ms and ms[-1].retain and not json.loads(ms[-1].payload)["online"], "retained offline")
    finally:
        daemon.stop()
        host.close()
        rec.close()
        if late is not None:
            late.close()


def test_a_clean_stop_says_both_goodbyes_and_a_reload_keeps_the_node_one_session(
    tmp_path: Path, broker: Broker
) -> None:
    cfg, script = both_profiles(tmp_path, broker.port)
    host = Host(broker.port)
    rec = Recorder(broker.port, [f"{R}/state"])
    daemon = Daemon(cfg)
    try:
        daemon.start()
        wait_until(lambda: host.of("NBIRTH"), what="NBIRTH")
        # A changed [mqtt] setting restarts both connections: the node ends its session and starts the next.
        cfg.write_text(cfg.read_text().replace("keepalive_s = 5", "keepalive_s = 6"))
        daemon.send(signal.SIGHUP)
        wait_until(lambda: len(host.of("NBIRTH")) == 2, what="born again after the reload")
        bdseqs = [metric(s.payload, "bdSeq").long_value or 0 for s in host.of("NBIRTH")]
        deaths = [metric(s.payload, "bdSeq").long_value or 0 for s in host.of("NDEATH")]
        assert deaths == bdseqs[:1] and bdseqs[1] == bdseqs[0] + 1
        script_line(script, tag="temp", value=7.0)
        wait_until(lambda: host.of("DDATA", "mill-1"), what="data after the reload")
        assert daemon.stop() == 0
        wait_until(lambda: len(host.of("NDEATH")) == 2, what="the NDEATH of the clean stop")
        assert metric(host.of("NDEATH")[-1].payload, "bdSeq").long_value == bdseqs[1]
        rec.wait_for(lambda ms: ms and not json.loads(ms[-1].payload)["online"], "R/state offline")
    finally:
        daemon.stop()
        host.close()
        rec.close()
