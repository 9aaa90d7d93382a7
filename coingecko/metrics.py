"""The poller's Prometheus metrics, read from its `PollStatus` when Prometheus scrapes: the poller
counts for /health already, so polling costs nothing more. Only the group's leader polls; on the
other processes every count stays at zero and no last-success time is exported."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from coingecko.client import OUTCOMES
from coingecko.poller import PollStatus
from common.metrics import counter, gauge


class PollerCollector(Collector):
    """`qicore_poller_*` and `qicore_coingecko_*` per poller endpoint (prices, global, ohlc)."""

    def __init__(self, status: PollStatus) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        endpoints = self.status.endpoints
        yield counter(
            "qicore_coingecko_requests",
            "CoinGecko HTTP requests of a poller endpoint by outcome (ok, rate_limited: 429, "
            "server_error: retried status, invalid_body: 200 without JSON, no_answer: timeout or "
            "connection, refused: 4xx, not retried until restart); retries count each.",
            ["endpoint", "outcome"],
            {
                (name, outcome): status.requests.calls.get(outcome, 0)
                for name, status in endpoints.items()
                for outcome in OUTCOMES
            },
        )
        yield counter(
            "qicore_coingecko_rate_limit_waits",
            "Requests of a poller endpoint that waited for the rate limiter (the plan's calls per "
            "minute, or a 429's Retry-After).",
            ["endpoint"],
            {(name,): status.requests.rate_limit_waits for name, status in endpoints.items()},
        )
        yield counter(
            "qicore_coingecko_rate_limit_wait_seconds",
            "Seconds the requests of a poller endpoint waited for the rate limiter.",
            ["endpoint"],
            {
                (name,): status.requests.rate_limit_wait_seconds
                for name, status in endpoints.items()
            },
        )
        yield counter(
            "qicore_poller_polls",
            "Poll cycles of an endpoint started (one cycle may make several requests).",
            ["endpoint"],
            {(name,): status.polls for name, status in endpoints.items()},
        )
        yield counter(
            "qicore_poller_poll_failures",
            "Poll cycles of an endpoint that ended with an error (see /health for the last one).",
            ["endpoint"],
            {(name,): status.failures for name, status in endpoints.items()},
        )
        yield counter(
            "qicore_poller_records_published",
            "Records a poller endpoint published (newer than the last published for their key).",
            ["endpoint"],
            {(name,): status.published for name, status in endpoints.items()},
        )
        yield gauge(
            "qicore_poller_last_success_timestamp_seconds",
            "Unix time of an endpoint's last call whose answer was usable (absent: none yet here).",
            ["endpoint"],
            {
                (name,): status.last_success.timestamp()
                for name, status in endpoints.items()
                if status.last_success is not None
            },
        )
