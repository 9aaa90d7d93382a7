"""The poller inside real workers (`faust -A app worker`): first polls at start, exact BTC/ETH
quotes in the stored rows, and /health on a process that does not poll. CoinGecko is the
project's fake server (real HTTP); broker and database are the embedded ones."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx
import pytest

from coingecko.fake_server import FakeCoinGecko, serve_fake_coingecko
from coingecko.parse import loads_exact
from models import RECORDS, CryptoPriceData
from testkit.databases import count_rows, stored
from testkit.workers import Family, Kafka, Worker, eventually

pytestmark = pytest.mark.slow


async def health(worker: Worker) -> dict[str, Any] | None:
    try:
        return (await worker.health()).body
    except (httpx.TransportError, ValueError):  # not listening yet
        return None


async def scrape_while_records_flow(worker: Worker, dsn: str, fake: FakeCoinGecko) -> None:
    """The only worker's /metrics: its sinks' rows-written counters are the rows in the database,
    the poller's requests are the fake's, the histograms have observations and the lag of the
    partitions it committed comes down to zero."""

    async def written_is_stored() -> dict[str, Family] | None:
        metrics = await worker.metrics()
        rows = metrics["qicore_sink_rows_written"]
        for record in RECORDS:
            labels = {"topic": record.topic.name, "table": record.table.name}
            if rows.value("qicore_sink_rows_written_total", **labels) != await count_rows(
                dsn, record
            ):
                return None
        lag = metrics["qicore_consumer_lag_messages"].samples
        return metrics if lag and set(lag.values()) == {0} else None

    metrics = await eventually(written_is_stored, worker, "rows written = rows stored, no lag")
    for record in RECORDS:
        topic = record.topic.name
        batches = metrics["qicore_sink_batches"].value(
            "qicore_sink_batches_total", topic=topic, table=record.table.name
        )
        writes = metrics["qicore_sink_batch_write_duration_seconds"]
        assert writes.type == "histogram"
        count = writes.value("qicore_sink_batch_write_duration_seconds_count", topic=topic)
        assert batches and count == batches
        delays = metrics["qicore_sink_event_delay_seconds"]
        assert (delays.value("qicore_sink_event_delay_seconds_count", topic=topic) or 0) >= 1
    requests = metrics["qicore_coingecko_requests"]

    def calls(endpoint: str, outcome: str = "ok") -> float | None:
        return requests.value("qicore_coingecko_requests_total", endpoint=endpoint, outcome=outcome)

    assert calls("prices") == fake.count("/coins/markets") + fake.count("/simple/price")
    assert calls("global") == fake.count("/global")
    assert calls("ohlc") == sum(1 for r in fake.requests if r.path.endswith("/ohlc"))
    assert calls("prices", "server_error") == 0
    last = metrics["qicore_poller_last_success_timestamp_seconds"]
    for endpoint in ("prices", "global", "ohlc"):
        assert last.value("qicore_poller_last_success_timestamp_seconds", endpoint=endpoint)


async def test_the_leader_polls_at_start_and_every_process_tells_how_fresh_the_polls_are(
    migrated: str, kafka: Kafka, workers: Callable[..., Worker]
) -> None:
    async with serve_fake_coingecko() as fake:
        # The workers' poll intervals are an hour (testkit/workers.py): every row here comes from
        # the first poll of each endpoint, at start.
        extra = {"COINGECKO_BASE_URL": fake.base_url, "COINGECKO_CALLS_PER_MINUTE": "1000"}
        first = workers(migrated, extra)

        async def every_table_filled() -> list[int] | None:
            counts = [await count_rows(migrated, record) for record in RECORDS]
            return counts if all(counts) else None

        await eventually(every_table_filled, first, "rows from every endpoint")
        assert fake.count("/coins/markets") >= 1 and fake.count("/global") >= 1
        assert fake.count("/coins/bitcoin/ohlc") >= 1
        await scrape_while_records_flow(first, migrated, fake)

        # btc_price/eth_price are exactly what the fake's /simple/price served.
        prices = (await stored(migrated, CryptoPriceData)).values()
        ids = sorted({str(row["coin_id"]) for row in prices})
        async with httpx.AsyncClient() as client:
            answer = await client.get(
                f"{fake.base_url}/simple/price",
                params={"ids": ",".join(ids), "vs_currencies": "btc,eth"},
            )
        assert "e-" in answer.text  # tiny quotes in exponent notation, as CoinGecko writes them
        served = loads_exact(answer.text)
        for row in prices:
            quote = served[row["coin_id"]]
            assert (row["btc_price"], row["eth_price"]) == (quote["btc"], quote["eth"]), row
        assert all(row["btc_price"] is not None for row in prices)

        second = workers(migrated, extra)

        async def one_leader() -> list[dict[str, Any]] | None:
            bodies = [await health(first), await health(second)]
            if None in bodies:
                return None
            leaders = [body["poller"]["polls_here"] for body in bodies if body]
            return [body for body in bodies if body] if leaders.count(True) == 1 else None

        bodies = await eventually(one_leader, second, "one polling process of two")
        leader, idle = sorted(bodies, key=lambda body: not body["poller"]["polls_here"])
        assert leader["poller"]["process"] != idle["poller"]["process"]
        # The process that does not poll still tells when the polls last arrived, from the
        # database: the newest stored price is the newest the fake served.
        fresh = idle["poller"]["stored"]
        newest = max(
            row["last_updated"] for row in prices if isinstance(row["last_updated"], datetime)
        )
        assert datetime.fromisoformat(fresh["crypto_prices"]["newest"]) == newest
        for record in RECORDS:
            assert fresh[record.table.name]["newest"] is not None
            assert fresh[record.table.name]["stored_at"] is not None
            assert fresh[record.table.name]["stored_age_seconds"] >= 0
