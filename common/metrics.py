"""The worker's Prometheus metrics: one registry, the two histograms the sinks observe, and the
text that `GET /metrics` serves.

Counters are not kept here twice: the sinks and the poller already count what they do (for
/health), and collectors read those counts when Prometheus scrapes (agents/metrics.py,
coingecko/metrics.py). What exists only as a distribution is observed here, once per batch, never
per row: the sink is the hot path.

The registry is the project's own, not prometheus-client's global one, so no library that
registers into the global registry on import can put its metrics (or a name clash) into ours.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

from prometheus_client import (
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

__all__ = [
    "CONTENT_TYPE",
    "REGISTRY",
    "SINK_DELAY_SECONDS",
    "SINK_WRITE_SECONDS",
    "counter",
    "exposition",
    "gauge",
]

# The text format `exposition()` writes: 0.0.4, which every Prometheus reads (prometheus-client's
# own default without an Accept header too).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
REGISTRY = CollectorRegistry()
# No `*_created` series beside every histogram child: the process start time says the same.
disable_created_metrics()
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, resident memory, open fds
PlatformCollector(registry=REGISTRY)  # python_info

SINK_WRITE_SECONDS = Histogram(
    "qicore_sink_batch_write_duration_seconds",
    "Time of a sink's write transaction (rows and stored offsets, one commit) per stored batch; "
    "failed attempts are not observed.",
    ["topic"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
SINK_DELAY_SECONDS = Histogram(
    "qicore_sink_event_delay_seconds",
    "Per stored batch, from its oldest record's own time (StreamRecord.event_time(), e.g. "
    "CoinGecko's last_updated) until the batch was durable in the database: the batch's "
    "largest end-to-end delay. Includes the source's own staleness; backfilled history lands "
    "in +Inf.",
    ["topic"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
    registry=REGISTRY,
)


F = TypeVar("F", CounterMetricFamily, GaugeMetricFamily)


def _family(
    kind: type[F],
    name: str,
    documentation: str,
    labels: Iterable[str],
    values: Mapping[tuple[str, ...], float],
) -> F:
    family = kind(name, documentation, labels=list(labels))
    for label_values, value in values.items():
        family.add_metric(list(label_values), value)
    return family


def counter(
    name: str, documentation: str, labels: Iterable[str], values: Mapping[tuple[str, ...], float]
) -> CounterMetricFamily:
    """A counter family (`name` without `_total`) with one sample per label-value tuple."""
    return _family(CounterMetricFamily, name, documentation, labels, values)


def gauge(
    name: str, documentation: str, labels: Iterable[str], values: Mapping[tuple[str, ...], float]
) -> GaugeMetricFamily:
    """A gauge family with one sample per label-value tuple."""
    return _family(GaugeMetricFamily, name, documentation, labels, values)


def exposition(registry: CollectorRegistry = REGISTRY) -> bytes:
    """The registry in Prometheus' text format (`CONTENT_TYPE`)."""
    return generate_latest(registry)
