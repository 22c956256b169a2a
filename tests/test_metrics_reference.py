"""The generated metrics reference: current, complete against what the registry serves, every series explained."""

from __future__ import annotations

from prometheus_client import generate_latest

from agent import metrics
from agent.commission.metrics_reference import families, render
from peers import ROOT

DOC = ROOT / "docs" / "metrics.md"


def test_the_committed_metrics_reference_is_current() -> None:
    assert DOC.read_text() == render(), "docs/metrics.md is stale: run python -m agent.commission.metrics_reference"


def test_every_served_series_is_documented_with_a_meaning() -> None:
    served = {
        line.split()[2]
        for line in generate_latest(metrics.REGISTRY).decode().splitlines()
        if line.startswith("# TYPE ")
    }
    documented = {name for name, _, _, _ in families()}
    assert served - documented == set(), "served but not in docs/metrics.md"
    assert all(doc.strip() for _, _, _, doc in families())
    assert "edge_agent_sparkplug_born" in DOC.read_text()
