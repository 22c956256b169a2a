"""The generated metrics reference (docs/metrics.md), written from the daemon's one Prometheus registry.

`python -m agent.commission.metrics_reference` rewrites it; tests/test_metrics_reference.py fails when it is
stale or when a series the daemon serves is missing from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.metrics import MetricWrapperBase

from agent import metrics
from agent.commission.reference import write_doc

HEADER = """\
# Metrics reference

Generated from the daemon's registry by `python -m agent.commission.metrics_reference`; do not edit by hand.
Every series `GET /metrics` serves (Prometheus text format; `[http] metrics_auth` decides whether it needs a
key), with its type, labels and meaning. Counters carry no `_created` series. A histogram is served as
`<name>_bucket`, `<name>_sum` and `<name>_count`. The Grafana dashboard and the alert rules in `grafana/`
use these names.
"""


def families() -> Iterator[tuple[str, str, tuple[str, ...], str]]:
    """(served name, type, label names, help) of every metric family, sorted by name."""
    rows: list[tuple[str, str, tuple[str, ...], str]] = []
    collectors: list[Any] = [v for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)]
    collectors.append(metrics._LinkCollector())
    for collector in collectors:
        # label names: the wrapper's, or the family's (neither is in prometheus_client's public API)
        own = tuple(getattr(collector, "_labelnames", ()))
        found = collector.describe() if isinstance(collector, MetricWrapperBase) else collector.collect()
        for family in found:
            labels = own or tuple(getattr(family, "_labelnames", ()))
            name = f"{family.name}_total" if family.type == "counter" else family.name
            rows.append((name, family.type, labels, family.documentation))
    yield from sorted(set(rows))


def render() -> str:
    """The whole reference as Markdown."""
    out = [HEADER, "| series | type | labels | meaning |", "|---|---|---|---|"]
    for name, kind, labels, doc in families():
        cells = [f"`{name}`", kind, ", ".join(f"`{label}`" for label in labels), doc]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the reference to docs/metrics.md (or the path given)."""
    return write_doc(render, "agent.commission.metrics_reference", "metrics.md", argv)


if __name__ == "__main__":
    raise SystemExit(main())
