"""The Grafana dashboard and the Prometheus alert rules in grafana/: well formed, over metrics the daemon
serves (read from a running daemon's /metrics), and the rules checked and unit-tested by promtool."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from peers import GUARD_S, ROOT, Broker, Daemon, free_port, require_tool, script_line, scripted_equipment, write_config

GRAFANA = ROOT / "grafana"
DASHBOARD = GRAFANA / "edge-agent-dashboard.json"
RULES = GRAFANA / "edge-agent-alerts.yml"
NAME = re.compile(r"\bedge_agent_[a-zA-Z0-9_]+")
# Prometheus's own series a rule may use besides the daemon's
PROMETHEUS_SERIES = {"up"}


def exported(port: int) -> set[str]:
    """Every series name /metrics serves or declares (a family without samples yet still has its TYPE)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=GUARD_S) as resp:
        text = resp.read().decode()
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            if kind == "counter":
                names.add(name if name.endswith("_total") else f"{name}_total")
            if kind == "histogram":
                names.update(f"{name}_{s}" for s in ("bucket", "sum", "count"))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def dashboard_exprs(dash: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    for var in dash["templating"]["list"]:
        if var.get("definition"):
            exprs.append(var["definition"])
    return exprs


def rule_exprs() -> list[str]:
    return re.findall(r"^\s+expr: (.+)$", RULES.read_text(), flags=re.M)


def test_dashboard_is_grafana_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for needed in ("equipment state", "alerts", "store", "mpm delivery", "driver errors"):
        assert needed in titles, needed
    for p in dash["panels"]:
        grid = p["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("h", "w", "x", "y")) and grid["x"] + grid["w"] <= 24, p["title"]
        assert p["type"] in {"timeseries", "state-timeline", "stat", "table", "bargauge", "gauge"}, p["type"]
        assert p["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)) and all(t["expr"] for t in p["targets"]), p["title"]
    state = next(p for p in dash["panels"] if p["type"] == "state-timeline")
    assert "edge_agent_equipment_status" in state["targets"][0]["expr"]


def test_dashboard_and_rules_use_only_exported_metrics(tmp_path: Path, broker: Broker) -> None:
    port = free_port()
    script = tmp_path / "press.jsonl"
    cfg = write_config(
        tmp_path, broker.port, scripted_equipment("press-1", script), http=f'[http]\nlisten = "127.0.0.1:{port}"\n'
    )
    daemon = Daemon(cfg).start()
    try:
        daemon.wait_log("http_listening")
        script_line(script, tag="state", value=1)
        names = exported(port)
    finally:
        daemon.stop()
    used = {n for expr in dashboard_exprs(json.loads(DASHBOARD.read_text())) for n in NAME.findall(expr)}
    assert used, "the dashboard uses no edge_agent metric"
    assert not used - names, f"the dashboard uses metrics the daemon does not export: {sorted(used - names)}"
    in_rules = {n for expr in rule_exprs() for n in NAME.findall(expr)}
    assert not in_rules - names, f"rules use metrics the daemon does not export: {sorted(in_rules - names)}"
    others = {w for expr in rule_exprs() for w in re.findall(r"\b([a-z_]+)\{", expr) if not w.startswith("edge_agent")}
    assert others <= PROMETHEUS_SERIES, others


def test_rules_pass_promtool() -> None:
    promtool = require_tool("promtool")  # Debian's prometheus, installed by scripts/test.sh
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=GUARD_S)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 7 rules found" in check.stdout
    unit = subprocess.run(
        [promtool, "test", "rules", "edge-agent-alerts.test.yml"],
        capture_output=True,
        text=True,
        timeout=GUARD_S,
        cwd=GRAFANA,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
