"""The worker's Prometheus collectors, registered in `common.metrics.REGISTRY` on import (by the
`/metrics` view, tables/views.py): the sinks' counters, the poller's (coingecko/metrics.py) and
the consumer's lag per partition. Each reads, when Prometheus scrapes, what the code already keeps
(`SINK_STATUS`, `POLL_STATUS`, Faust's `Monitor`), so a scrape costs the scrape and a row costs
nothing more. Every process serves its own: its sinks' partitions, and the poller's counts on the
group's leader only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Set
from operator import attrgetter

from faust.exceptions import ConsumerNotStarted
from faust.types import TP, AppT
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from agents.sink import SinkStatuses
from agents.sinks import SINK_STATUS
from app.main import app
from coingecko.metrics import PollerCollector
from coingecko.poller import POLL_STATUS
from common.metrics import REGISTRY, counter, gauge

log = logging.getLogger(__name__)

BROKER_TIMEOUT = 2.0  # seconds a scrape waits for the broker's end offsets
LAG_HELP = (
    "Messages of an assigned partition not yet committed by this consumer group: the partition's "
    "end offset less the group's committed offset (from this process's commits). The end "
    "offset is the larger of the broker's ListOffsets answer at the scrape and the high-water "
    "mark of this process's latest fetch of it. On Kafka and Redpanda both are right. On the "
    "embedded Tansu 0.6 broker (faust -A app up, the tests) ListOffsets advances per produced "
    "batch, not per record, and only the fetch's high-water mark is right: there the lag is "
    "right while the consumer fetches, and reads low while it does not (a stalled sink)."
)


# (metric, SinkStatus attribute, help) of the sinks' counters, each a `qicore_sink_*_total`.
SINK_COUNTERS = (
    (
        "qicore_sink_rows_written",
        "rows_written",
        "Rows a sink inserted into its table (committed).",
    ),
    (
        "qicore_sink_duplicates",
        "duplicates_skipped",
        "Records a sink stored that were in its table already (same primary key).",
    ),
    (
        "qicore_sink_dead_letters",
        "dead_letters",
        "Messages a sink could not decode, published to its dead-letter topic.",
    ),
    ("qicore_sink_batches", "batches", "Batches a sink committed (one write transaction each)."),
    (
        "qicore_sink_replayed_skipped",
        "replayed_skipped",
        "Messages below a partition's stored offset (stored before), skipped.",
    ),
    (
        "qicore_sink_holes_refetched",
        "holes_refetched",
        "Times a sink sought a partition back to its stored offset over a hole.",
    ),
    (
        "qicore_sink_log_resets",
        "log_resets",
        "Partitions found on another log than their stored offsets, stored again.",
    ),
)


class SinkCollector(Collector):
    """`qicore_sink_*` per sink (labels: topic, table) from its `SinkStatus`."""

    def __init__(self, statuses: SinkStatuses) -> None:
        self.statuses = statuses

    def collect(self) -> Iterator[Metric]:
        sinks = self.statuses.sinks.values()
        labels = ["topic", "table"]

        def each(value: Callable[..., float]) -> dict[tuple[str, ...], float]:
            return {(sink.topic, sink.table): value(sink) for sink in sinks}

        for name, attribute, documentation in SINK_COUNTERS:
            yield counter(name, documentation, labels, each(attrgetter(attribute)))
        yield gauge(
            "qicore_sink_consecutive_failures",
            "Failed attempts of the batch a sink is retrying now (0: none).",
            labels,
            each(lambda sink: sink.consecutive_failures),
        )
        yield gauge(
            "qicore_sink_last_write_timestamp_seconds",
            "Unix time a sink last committed a batch (absent: none yet here).",
            labels,
            {
                (sink.topic, sink.table): sink.last_write_at.timestamp()
                for sink in sinks
                if sink.last_write_at is not None
            },
        )


def consumer_lag(
    assigned: Set[TP],
    ends: Iterable[Mapping[TP, int]],
    committed: Mapping[TP, int],
) -> Metric:
    """`qicore_consumer_lag_messages` of the assigned partitions with an end offset (the largest
    of `ends`) and an offset committed by this process."""
    values: dict[tuple[str, ...], float] = {}
    for tp in sorted(assigned):
        end = max((known[tp] for known in ends if tp in known), default=None)
        if end is not None and tp in committed:
            values[tp.topic, str(tp.partition)] = end - committed[tp]
    return gauge("qicore_consumer_lag_messages", LAG_HELP, ["topic", "partition"], values)


class ConsumerLagCollector(Collector):
    """The lag from what Faust's `Monitor` keeps anyway (the high-water mark of each fetch,
    `tp_end_offsets`, and each commit, `tp_committed_offsets`) and the broker's end offsets,
    asked for once per scrape (`refresh`): a fetch's high-water mark alone stops moving when the
    consumer stops fetching, exactly when the lag matters."""

    def __init__(self, faust_app: AppT) -> None:
        self.app = faust_app
        self.listed: Mapping[TP, int] = {}

    def _assigned(self) -> Set[TP]:
        try:
            return self.app.consumer.assignment()
        except ConsumerNotStarted:
            return set()

    async def refresh(self) -> None:
        """Ask the broker for the assigned partitions' end offsets (ListOffsets); if it does not
        answer within BROKER_TIMEOUT, the lag is the fetches' alone."""
        self.listed = {}
        assigned = self._assigned()
        if not assigned:
            return
        try:
            async with asyncio.timeout(BROKER_TIMEOUT):
                self.listed = await self.app.consumer.highwaters(*assigned)
        except Exception as error:  # any failure: this scrape goes without; the kind is logged
            log.warning("metrics: the broker's end offsets: %s", type(error).__name__)

    def collect(self) -> Iterator[Metric]:
        monitor = self.app.monitor
        ends = (self.listed, monitor.tp_end_offsets)
        yield consumer_lag(self._assigned(), ends, monitor.tp_committed_offsets)


CONSUMER_LAG = ConsumerLagCollector(app)
REGISTRY.register(SinkCollector(SINK_STATUS))
REGISTRY.register(PollerCollector(POLL_STATUS))
REGISTRY.register(CONSUMER_LAG)
