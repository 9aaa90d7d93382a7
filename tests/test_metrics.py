"""The Prometheus collectors in-process (agents/metrics.py, coingecko/metrics.py): what they
read at scrape time, in the text format `/metrics` serves, parsed back with prometheus-client's
own parser. The scrape of a running worker is in test_polling_worker.py and test_bad_input.py."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from faust.types import TP
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from agents.metrics import LAG_HELP, SinkCollector, consumer_lag
from agents.sink import SinkStatuses
from coingecko.client import OUTCOMES
from coingecko.fake_server import FakeCoinGecko, body, rate_limited
from coingecko.metrics import PollerCollector
from common.metrics import exposition
from models import RECORDS, CryptoOHLCVData, CryptoPriceData
from testkit.pollers import BrokerTopics, make_poller
from testkit.web import serve_views

PRICES = CryptoPriceData.topic.name


def scrape(collector: Collector) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name -> {sorted labels: value}, from the text format."""
    registry = CollectorRegistry()
    registry.register(collector)
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(exposition(registry).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def families(collector: Collector) -> dict[str, tuple[str, str]]:
    """Family name -> (type, help)."""
    registry = CollectorRegistry()
    registry.register(collector)
    text = exposition(registry).decode()
    return {f.name: (f.type, f.documentation) for f in text_string_to_metric_families(text)}


def test_sink_counters_are_read_from_the_statuses_at_every_scrape() -> None:
    statuses = SinkStatuses()
    for record in RECORDS:
        statuses.add(record)
    prices = statuses.sinks[PRICES]
    prices.rows_written, prices.duplicates_skipped, prices.dead_letters = 40, 2, 1
    prices.batches = 3
    collector = SinkCollector(statuses)
    labels = (("table", "crypto_prices"), ("topic", PRICES))

    first = scrape(collector)
    assert first["qicore_sink_rows_written_total"][labels] == 40
    assert first["qicore_sink_duplicates_total"][labels] == 2
    assert first["qicore_sink_dead_letters_total"][labels] == 1
    assert first["qicore_sink_batches_total"][labels] == 3
    assert len(first["qicore_sink_rows_written_total"]) == len(RECORDS)
    assert "qicore_sink_last_write_timestamp_seconds" not in first  # nothing written yet

    prices.rows_written += 5
    prices.last_write_at = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    second = scrape(collector)
    assert second["qicore_sink_rows_written_total"][labels] == 45
    assert second["qicore_sink_last_write_timestamp_seconds"] == {
        labels: prices.last_write_at.timestamp()
    }
    kinds = families(collector)
    assert kinds["qicore_sink_rows_written"][0] == "counter"
    assert kinds["qicore_sink_consecutive_failures"][0] == "gauge"


async def test_poller_requests_are_counted_by_endpoint_and_outcome(
    fake_coingecko: FakeCoinGecko, topics: BrokerTopics
) -> None:
    poller = make_poller(fake_coingecko, topics)  # two attempts per call
    fake_coingecko.fail("/global", rate_limited(retry_after=1))
    fake_coingecko.fail("/coins/bitcoin/ohlc", body('{"error": "coin not found"}', status=404))
    collector = PollerCollector(poller.status)
    assert "qicore_poller_last_success_timestamp_seconds" not in scrape(collector)

    await poller.poll_global()  # a 429, then the retry (after the pause) succeeds
    await poller.poll_prices()
    await poller.poll_ohlc()  # bitcoin's candles are refused; the others come

    samples = scrape(collector)
    requests = samples["qicore_coingecko_requests_total"]

    def count(endpoint: str, outcome: str) -> float:
        return requests[("endpoint", endpoint), ("outcome", outcome)]

    assert (count("global", "rate_limited"), count("global", "ok")) == (1, 1)
    assert count("prices", "ok") == fake_coingecko.count("/coins/markets") + (
        fake_coingecko.count("/simple/price")
    )
    assert count("ohlc", "refused") == 1
    candles = sum(1 for r in fake_coingecko.requests if r.path.endswith("/ohlc"))
    assert count("ohlc", "ok") == candles - 1
    assert {outcome for (_, (_, outcome)) in requests} == set(OUTCOMES)
    waits = samples["qicore_coingecko_rate_limit_waits_total"]
    assert waits[(("endpoint", "global"),)] == 1  # the retry waited for the 429's pause
    assert waits[(("endpoint", "prices"),)] == 0
    assert samples["qicore_coingecko_rate_limit_wait_seconds_total"][(("endpoint", "global"),)] > 0
    polls = samples["qicore_poller_polls_total"]
    assert polls == {(("endpoint", name),): 1 for name in ("prices", "global", "ohlc")}
    assert samples["qicore_poller_poll_failures_total"][(("endpoint", "ohlc"),)] == 1
    last = samples["qicore_poller_last_success_timestamp_seconds"]
    global_status = poller.status.endpoints["global"]
    assert global_status.last_success is not None
    assert last[(("endpoint", "global"),)] == global_status.last_success.timestamp()
    ohlc_status = poller.status.endpoints["ohlc"]  # its cycle failed on bitcoin, not the others
    assert ohlc_status.last_success is not None and ohlc_status.last_error is not None
    assert last[(("endpoint", "ohlc"),)] == ohlc_status.last_success.timestamp()
    published = samples["qicore_poller_records_published_total"]
    assert published[(("endpoint", "prices"),)] == topics.published - (
        published[(("endpoint", "global"),)] + published[(("endpoint", "ohlc"),)]
    )


def test_consumer_lag_uses_the_larger_end_offset_of_assigned_committed_partitions() -> None:
    candles = CryptoOHLCVData.topic.name
    assigned = {TP(PRICES, 0), TP(PRICES, 1), TP(PRICES, 2), TP(candles, 0)}
    listed = {TP(PRICES, 0): 101, TP(PRICES, 1): 40}  # Tansu's ListOffsets: too low for 0
    fetched = {TP(PRICES, 0): 200, TP(PRICES, 2): 9, TP(PRICES, 5): 70}
    committed = {TP(PRICES, 0): 150, TP(PRICES, 1): 40, TP(PRICES, 2): 9, TP(PRICES, 5): 1}

    registry = CollectorRegistry()

    class Lag(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            yield consumer_lag(assigned, (listed, fetched), committed)

    registry.register(Lag())
    text = exposition(registry).decode()
    (family,) = text_string_to_metric_families(text)
    assert family.name == "qicore_consumer_lag_messages" and family.type == "gauge"
    assert family.documentation == LAG_HELP and "Tansu" in LAG_HELP
    lag = {(s.labels["topic"], s.labels["partition"]): s.value for s in family.samples}
    # Partition 5 is not assigned here; the candles' partition has no commit from this process.
    assert lag == {(PRICES, "0"): 50, (PRICES, "1"): 0, (PRICES, "2"): 0}


async def test_the_view_serves_every_family_in_the_text_format(
    migrated: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET /metrics of the assembled app, in-process (no consumer: no lag sample, no error)."""
    async with serve_views(migrated, monkeypatch) as client:
        answer = await client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    found = {family.name: family for family in text_string_to_metric_families(answer.text)}
    for name in (
        "qicore_sink_rows_written",
        "qicore_sink_batch_write_duration_seconds",
        "qicore_sink_event_delay_seconds",
        "qicore_coingecko_requests",
        "qicore_poller_polls",
        "process_cpu_seconds",
    ):
        assert name in found, name
    topics = {s.labels["topic"] for s in found["qicore_sink_rows_written"].samples}
    assert topics == {record.topic.name for record in RECORDS}
    assert found["qicore_consumer_lag_messages"].samples == []
