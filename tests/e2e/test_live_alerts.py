"""Active alerts over HTTP and in /metrics, the metrics dashboards use, and health per link in /healthz."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from peers import GUARD_S, Broker, Daemon, free_port, script_line, scripted_equipment, wait_until, write_config


def get(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=GUARD_S) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=GUARD_S) as resp:
        text = resp.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def sample(metrics: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float | None:
    for have, value in metrics.get(name, []):
        if all(have.get(k) == v for k, v in labels.items()):
            return value
    return None


def alerts(port: int) -> list[dict[str, Any]]:
    status, body = get(port, "/api/v1/alerts")
    assert status == 200, body
    return body["alerts"]  # type: ignore[no-any-return]


def test_alerts_listed_while_active_across_a_restart_and_counted(tmp_path: Path, broker: Broker) -> None:
    port = free_port()
    script = tmp_path / "press.jsonl"
    cfg = write_config(
        tmp_path, broker.port, scripted_equipment("press-1", script), http=f'[http]\nlisten = "127.0.0.1:{port}"\n'
    )
    daemon = Daemon(cfg).start()
    try:
        daemon.wait_log("http_listening")
        script_line(script, tag="state", value=1)
        script_line(script, tag="job", value="JOB-7")
        script_line(script, tag="temp", value=85.0)
        active = wait_until(lambda: alerts(port), what="the alert listed")
        assert len(active) == 1
        a = active[0]
        assert (a["equipment_id"], a["tag"], a["severity"], a["value"]) == ("press-1", "temp", "critical", 85.0)
        assert a["since"] and a["alert_id"] and a["message"] == "Spindle overheating"
        # `edge-agent status --watch` shows it beside its equipment
        from agent.cli_status import _fetch, table

        watched = table(_fetch(f"http://127.0.0.1:{port}", None, alerts=True), details=True)
        assert "ALERT press-1: Spindle overheating" in watched
        m = scrape(port)
        assert sample(m, "edge_agent_alerts_active", equipment_id="press-1", severity="critical") == 1
        # across a restart: the same alert, the same id and since
        assert daemon.stop() == 0
        daemon = Daemon(cfg).start()
        daemon.wait_log("http_listening")
        again = wait_until(lambda: alerts(port), what="the alert listed after the restart")
        assert [(x["alert_id"], x["since"]) for x in again] == [(a["alert_id"], a["since"])]
        # cleared: gone from the list and the gauge
        script_line(script, tag="temp", value=70.0)
        wait_until(lambda: alerts(port) == [], what="the alert cleared")
        m = scrape(port)
        assert sample(m, "edge_agent_alerts_active", equipment_id="press-1", severity="critical") == 0
    finally:
        daemon.stop()


def test_metrics_for_dashboards_and_health_per_link(tmp_path: Path, broker: Broker) -> None:
    port = free_port()
    script = tmp_path / "press.jsonl"
    down = tmp_path / "lathe.down"
    body = scripted_equipment("press-1", script) + scripted_equipment(
        "lathe-1", tmp_path / "lathe.jsonl", down_file=down
    )
    cfg = write_config(tmp_path, broker.port, body, http=f'[http]\nlisten = "127.0.0.1:{port}"\n')
    down.write_text("")
    daemon = Daemon(cfg).start()
    try:
        daemon.wait_log("http_listening")
        script_line(script, tag="state", value=1)
        m = wait_until(
            lambda: (
                (x := scrape(port))
                and sample(x, "edge_agent_equipment_status", equipment_id="press-1", status="running") == 1
                and x
            ),
            what="press-1 running in the state set",
        )
        from agent import __version__

        assert sample(m, "edge_agent_build_info", version=__version__) == 1
        states = [
            (labels["status"], v)
            for labels, v in m["edge_agent_equipment_status"]
            if labels["equipment_id"] == "press-1"
        ]
        assert sum(v for _, v in states) == 1 and len(states) > 2, states
        assert not any(name.endswith("_created") for name in m), [n for n in m if n.endswith("_created")]
        assert sample(m, "edge_agent_store_oldest_age_seconds") is not None
        assert sample(m, "edge_agent_link_up", link="broker", equipment_id="") == 1
        assert get(port, "/healthz")[1]["components"]["mqtt"]["link"]["errors_total"] == 0  # connecting is no error
        # the broker's request duration: publish to PUBACK, in /healthz and as a histogram
        assert wait_until(lambda: get(port, "/healthz")[1]["components"]["mqtt"]["link"]["duration_s"]["count"])
        assert (sample(scrape(port), "edge_agent_mqtt_ack_seconds_count") or 0) > 0
        assert sample(m, "edge_agent_link_up", link="driver", equipment_id="press-1") == 1

        # The lathe cannot connect: down, errors counted with the last one and when, uptime ratio 0.
        lathe = wait_until(
            lambda: (
                (d := get(port, "/healthz")[1]["components"]["drivers"]["lathe-1"])["link"]["errors_total"] >= 1 and d
            ),
            what="lathe link errors",
        )
        assert lathe["link"]["uptime_ratio"] == 0 and lathe["link"]["up"] is False
        assert "down file" in lathe["link"]["last_error"] and lathe["link"]["last_error_at"]
        assert lathe["link"]["errors_per_min"] > 0
        press = get(port, "/healthz")[1]["components"]["drivers"]["press-1"]["link"]
        assert press["up"] is True and press["uptime_ratio"] > 0.5 and press["errors_total"] == 0
        m = scrape(port)
        assert sample(m, "edge_agent_link_up", link="driver", equipment_id="lathe-1") == 0
        assert (sample(m, "edge_agent_link_errors", link="driver", equipment_id="lathe-1") or 0) >= 1
        assert sample(m, "edge_agent_link_last_error_timestamp_seconds", link="driver", equipment_id="lathe-1")

        # The broker goes away: messages wait in the store and their age grows; the broker link is down.
        broker.stop()
        wait_until(lambda: get(port, "/healthz")[1]["components"]["mqtt"]["status"] == "down", what="mqtt down")
        script_line(script, tag="state", value=0)
        wait_until(
            lambda: (sample(scrape(port), "edge_agent_store_oldest_age_seconds") or 0) >= 0.5,
            what="the oldest waiting message ages",
        )
        mqtt = get(port, "/healthz")[1]["components"]["mqtt"]["link"]
        assert mqtt["up"] is False and mqtt["errors_total"] >= 1 and mqtt["last_error_at"]
        assert sample(scrape(port), "edge_agent_link_up", link="broker", equipment_id="") == 0
        broker.start()
        wait_until(lambda: sample(scrape(port), "edge_agent_store_oldest_age_seconds") == 0, what="the store drained")
        up_again = get(port, "/healthz")[1]["components"]["mqtt"]["link"]
        assert up_again["up"] is True and 0 < up_again["uptime_ratio"] < 1
    finally:
        daemon.stop()


def test_device_raised_alerts_are_listed_and_counted(tmp_path: Path) -> None:
    """An alert the device raises itself (DeviceAlerts, e.g. an MTConnect condition) is an active alert too."""
    from datetime import UTC, datetime

    from agent import metrics
    from agent.config import load_config
    from agent.live_state import BacklogClock, active_alerts, refresh_gauges
    from agent.monitor import Monitor
    from agent.store import Store
    from drivers.sdk.events import DeviceAlerts

    cfg = load_config(write_config(tmp_path, free_port(), scripted_equipment("press-1", tmp_path / "p.jsonl")))
    store = Store(tmp_path / "state")
    store.open()
    try:
        monitor = Monitor(cfg, store)
        monitor.on_event("press-1", DeviceAlerts("controller", {"E7": ("warning", "door open")}, datetime.now(UTC)))
        [alert] = active_alerts(monitor)
        assert (alert["tag"], alert["value"], alert["severity"], alert["message"]) == (
            "controller",
            "E7",
            "warning",
            "door open",
        )
        assert alert["since"] and alert["alert_id"]
        refresh_gauges(monitor, BacklogClock(store), None)
        assert metrics.ALERTS_ACTIVE.labels("press-1", "warning")._value.get() == 1
        monitor.on_event("press-1", DeviceAlerts("controller", {}, datetime.now(UTC)))
        assert active_alerts(monitor) == []
    finally:
        store.close()
