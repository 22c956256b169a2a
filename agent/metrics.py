"""Prometheus metrics, one registry for the whole daemon (served by the local HTTP API).

Counters carry no `_created` series (they double the series count and dashboards never use them).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent import __version__
from agent.linkstats import LINKS, driver_link
from drivers.sdk.handle import set_metrics_factory

disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)

BUILD_INFO = Gauge(
    "edge_agent_build_info", "Always 1; the running version in its label", ["version"], registry=REGISTRY
)
BUILD_INFO.labels(__version__).set(1)

# dashboards: read at scrape time (`agent.live_state.refresh_gauges`)
EQUIPMENT_STATUS = Gauge(
    "edge_agent_equipment_status",
    "1 for the equipment's current status, 0 for every other status (a state set)",
    ["equipment_id", "status"],
    registry=REGISTRY,
)
ALERTS_ACTIVE = Gauge(
    "edge_agent_alerts_active",
    "Active alerts per equipment and severity",
    ["equipment_id", "severity"],
    registry=REGISTRY,
)
STORE_OLDEST_AGE = Gauge(
    "edge_agent_store_oldest_age_seconds",
    "Age of the oldest message waiting in the durable store (0 when empty)",
    registry=REGISTRY,
)
OUTBOX_OLDEST_AGE = Gauge(
    "edge_agent_outbox_oldest_age_seconds",
    "Age of the oldest item waiting in the MPM outbox (0 when empty)",
    registry=REGISTRY,
)

# drivers
DRIVER_READS = Counter(
    "edge_agent_driver_reads_total", "Successful reads or notifications", ["equipment_id"], registry=REGISTRY
)
DRIVER_VALUES = Counter(
    "edge_agent_driver_values_total", "Tag values received from drivers", ["equipment_id"], registry=REGISTRY
)
DRIVER_ERRORS = Counter(
    "edge_agent_driver_errors_total",
    "Driver errors (bad values, failed requests)",
    ["equipment_id", "kind"],
    registry=REGISTRY,
)
DRIVER_RECONNECTS = Counter(
    "edge_agent_driver_reconnects_total",
    "Driver connection attempts after a failure",
    ["equipment_id"],
    registry=REGISTRY,
)
DRIVER_CONNECTED = Gauge(
    "edge_agent_driver_connected", "1 while the driver's link is up", ["equipment_id"], registry=REGISTRY
)
DRIVER_LATENCY = Histogram(
    "edge_agent_driver_request_seconds",
    "Latency of driver requests and polls",
    ["equipment_id"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
DRIVER_SKIPPED_TICKS = Counter(
    "edge_agent_driver_skipped_ticks_total", "Polls skipped because a poll overran", ["equipment_id"], registry=REGISTRY
)
DRIVER_DROPPED = Counter(
    "edge_agent_driver_dropped_total", "Notifications dropped by a driver's queue", ["equipment_id"], registry=REGISTRY
)

TELEMETRY_VALUES = Counter(
    "edge_agent_telemetry_values_total",
    "Values reported in telemetry (after deadband)",
    ["equipment_id"],
    registry=REGISTRY,
)

# MQTT and the store
MQTT_PUBLISHED = Counter(
    "edge_agent_mqtt_published_total", "Messages acknowledged by the broker", ["kind"], registry=REGISTRY
)
MQTT_REPLAYED = Counter(
    "edge_agent_mqtt_replayed_total", "Stored messages replayed after a reconnect", registry=REGISTRY
)
MQTT_CONNECTED = Gauge("edge_agent_mqtt_connected", "1 while connected to the broker", registry=REGISTRY)
SPARKPLUG_BORN = Gauge(
    "edge_agent_sparkplug_born",
    "1 while the Sparkplug edge node is born (its connection up and the primary host, if any, online)",
    registry=REGISTRY,
)
MQTT_CONNECTS = Counter("edge_agent_mqtt_connects_total", "Successful broker connections", registry=REGISTRY)
MQTT_ACK_SECONDS = Histogram(
    "edge_agent_mqtt_ack_seconds",
    "Publish to PUBACK round trip with the broker (one message in flight at a time is timed)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)
STORE_DEPTH = Gauge("edge_agent_store_depth", "Messages waiting in the durable store", registry=REGISTRY)
STORE_STORED = Counter("edge_agent_store_stored_total", "Messages committed to the store", ["kind"], registry=REGISTRY)
STORE_EVICTED = Counter(
    "edge_agent_store_evicted_total", "Telemetry messages evicted from a full store", registry=REGISTRY
)
STORE_ERRORS = Counter(
    "edge_agent_store_errors_total", "Store write failures (full, read-only, I/O error)", registry=REGISTRY
)
STORE_DURABLE = Gauge(
    "edge_agent_store_durable",
    "1 while the store can write state_dir; 0 while messages are held in memory",
    registry=REGISTRY,
)
STORE_HELD = Gauge(
    "edge_agent_store_held_messages", "Messages held in memory because state_dir cannot be written", registry=REGISTRY
)
STORE_LOST = Counter(
    "edge_agent_store_lost_total",
    "Messages held in memory that could neither be written nor delivered before the daemon stopped",
    ["kind"],
    registry=REGISTRY,
)
STORE_RECREATED = Counter(
    "edge_agent_store_recreated_total",
    "Store files found deleted or replaced and carried into a new file",
    registry=REGISTRY,
)

# commands
COMMANDS = Counter(
    "edge_agent_commands_total",
    "Command requests by outcome",
    ["equipment_id", "command", "outcome"],
    registry=REGISTRY,
)

# MPM
MPM_CALLS = Counter("edge_agent_mpm_calls_total", "MPM HTTP calls", ["call", "outcome"], registry=REGISTRY)
MPM_LATENCY = Histogram("edge_agent_mpm_call_seconds", "MPM HTTP call latency", ["call"], registry=REGISTRY)
OUTBOX_DEPTH = Gauge("edge_agent_outbox_depth", "Items waiting in the MPM outbox", registry=REGISTRY)
OUTBOX_DELIVERED = Counter(
    "edge_agent_outbox_delivered_total", "Outbox items delivered to MPM", ["kind"], registry=REGISTRY
)
OUTBOX_REJECTED = Counter("edge_agent_outbox_rejected_total", "Outbox items dead-lettered", ["kind"], registry=REGISTRY)
OUTBOX_DUPLICATES = Counter(
    "edge_agent_outbox_duplicates_total", "Submissions whose key was already pending or delivered", registry=REGISTRY
)
MPM_CREDENTIALS_REFUSED = Counter(
    "edge_agent_mpm_credentials_refused_total",
    "MPM answers refusing the configured credentials (the outbox pauses)",
    ["status"],
    registry=REGISTRY,
)


class PrometheusDriverMetrics:
    """The driver SDK's metrics handle, labelled with the equipment's id."""

    def __init__(self, equipment_id: str) -> None:
        self.reads = DRIVER_READS.labels(equipment_id)
        self.values_total = DRIVER_VALUES.labels(equipment_id)
        self.latency = DRIVER_LATENCY.labels(equipment_id)
        self.dropped_total = DRIVER_DROPPED.labels(equipment_id)
        self.skipped = DRIVER_SKIPPED_TICKS.labels(equipment_id)
        self.equipment_id = equipment_id

        self.link = driver_link(equipment_id)

    def read(self, values: int = 0, seconds: float | None = None) -> None:
        self.reads.inc()
        if values:
            self.values_total.inc(values)
        if seconds is not None:
            self.latency.observe(seconds)
            self.link.observe(seconds)

    def values(self, count: int) -> None:
        self.values_total.inc(count)

    def request(self, seconds: float) -> None:
        self.latency.observe(seconds)
        self.link.observe(seconds)

    def error(self, kind: str, count: int = 1) -> None:
        DRIVER_ERRORS.labels(self.equipment_id, kind).inc(count)
        for _ in range(min(count, 100)):
            self.link.error(kind)

    def dropped(self, count: int) -> None:
        self.dropped_total.inc(count)

    def skipped_ticks(self, count: int) -> None:
        self.skipped.inc(count)


class _LinkCollector(Collector):
    """Health per link (`agent.linkstats`) as gauges, read when scraped."""

    def collect(self) -> Iterator[Metric]:
        labels = ["link", "equipment_id"]
        up = GaugeMetricFamily("edge_agent_link_up", "1 while the link is up", labels=labels)
        ratio = GaugeMetricFamily(
            "edge_agent_link_uptime_ratio", "Share of the time since start the link was up", labels=labels
        )
        errors = GaugeMetricFamily(
            "edge_agent_link_errors", "Errors on the link since start (use rate() for the error rate)", labels=labels
        )
        last = GaugeMetricFamily(
            "edge_agent_link_last_error_timestamp_seconds", "Unix time of the link's last error", labels=labels
        )
        for name, stats in list(LINKS.items()):
            kind, _, eid = name.partition(":")
            values = [kind, eid]
            up.add_metric(values, 1.0 if stats.is_up else 0.0)
            ratio.add_metric(values, stats.uptime_ratio())
            errors.add_metric(values, float(stats.errors_total))
            if stats.last_error_ts is not None:
                last.add_metric(values, stats.last_error_ts)
        yield from (up, ratio, errors, last)

    def describe(self) -> Iterator[Metric]:
        return iter(())


REGISTRY.register(_LinkCollector())

set_metrics_factory(PrometheusDriverMetrics)
