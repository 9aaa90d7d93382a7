"""Two process types of one deployment side by side, as `Procfile.topics` runs them: a price
sink that does not poll, and a poller that sinks the candles and the analytics. Each is a
consumer group of its own (app/settings.py `consumer_group`), sinks only its topics, and every
record lands once; the process without the poller never calls CoinGecko."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest

from coingecko.fake_server import FakeCoinGecko
from models import CryptoMarketAnalytics, CryptoOHLCVData, CryptoPriceData
from models.dsl import StreamRecord
from testkit.databases import Rows, assert_exactly, stored
from testkit.records import T0, candle, prices
from testkit.workers import Kafka, Worker, eventually

pytestmark = pytest.mark.slow

MARKETS = "/coins/markets"
PREFIX = "scoped"


def analytics(count: int) -> list[CryptoMarketAnalytics]:
    return [
        CryptoMarketAnalytics(
            timestamp=T0 + timedelta(minutes=i),
            total_market_cap=Decimal(f"{i}123456789012345678.5"),
            btc_dominance=Decimal(f"-0.{i}1"),
            source=f"{PREFIX}-{i % 3}",
        )
        for i in range(count)
    ]


async def ours(dsn: str, record: type[StreamRecord]) -> Rows:
    """The rows of `record`'s table that the test sent (the poller stores the fake's too)."""
    key = record.topic.key_field
    return {
        k: row for k, row in (await stored(dsn, record)).items() if str(row[key]).startswith(PREFIX)
    }


async def test_scoped_process_types_sink_only_their_topics_once_and_only_the_poller_polls(
    kafka: Kafka,
    workers: Callable[..., Worker],
    migrated: str,
    app_id: str,
    fakes: tuple[FakeCoinGecko, FakeCoinGecko],
) -> None:
    not_polling, polling = fakes
    fast_polls = {"PRICE_POLL_SECONDS": "1", "COINGECKO_CALLS_PER_MINUTE": "1000"}
    price_sink = workers(
        migrated,
        {
            "SINK_TOPICS": "crypto-prices",
            "POLLER_ENABLED": "false",
            "COINGECKO_BASE_URL": not_polling.base_url,  # it would poll here, if it polled
            **fast_polls,
        },
    )
    poller = workers(
        migrated,
        {
            "SINK_TOPICS": "crypto-ohlcv,market-analytics",
            "COINGECKO_BASE_URL": polling.base_url,
            **fast_polls,
        },
    )
    sent_prices, sent_candles, sent_analytics = (
        prices(PREFIX, 300),
        [candle(i, PREFIX, coins=4) for i in range(40)],
        analytics(30),
    )
    sent = await kafka.send_records([*sent_prices, *sent_candles, *sent_analytics])

    async def all_stored() -> bool | None:
        counts = [
            len(await ours(migrated, record))
            for record in (CryptoPriceData, CryptoOHLCVData, CryptoMarketAnalytics)
        ]
        done = counts == [len(sent_prices), len(sent_candles), len(sent_analytics)]
        return True if done and polling.count(MARKETS) >= 3 else None

    await eventually(all_stored, poller, "every record stored and three polls")
    assert_exactly(await ours(migrated, CryptoPriceData), sent_prices)
    assert_exactly(await ours(migrated, CryptoOHLCVData), sent_candles)
    assert_exactly(await ours(migrated, CryptoMarketAnalytics), sent_analytics)

    async def health(worker: Worker) -> dict[str, Any] | None:
        try:
            return (await worker.health()).body
        except httpx.TransportError:
            return None

    sinks = await eventually(lambda: health(price_sink), price_sink, "/health")
    polls = await eventually(lambda: health(poller), poller, "/health")
    everything = list(range(6))
    assert {t: s["partitions"] for t, s in sinks["sink"].items()} == {"crypto-prices": everything}
    assert {t: s["partitions"] for t, s in polls["sink"].items()} == {
        "crypto-ohlcv": everything,
        "market-analytics": everything,
    }
    assert sinks["poller"]["polls_here"] is False
    assert polls["poller"]["polls_here"] is True
    assert not_polling.requests == []  # never called CoinGecko, not even to connect

    # Each process type commits in its own consumer group (APP_ID plus its scope).
    for group, worker in (
        (f"{app_id}.crypto-prices", price_sink),
        (f"{app_id}.poller.crypto-ohlcv.market-analytics", poller),
    ):
        scoped = Kafka(kafka.bootstrap, group)
        await scoped.group.start()
        try:
            mine = [m for m in sent if m.topic in worker.env["SINK_TOPICS"].split(",")]
            await scoped.wait_committed(mine, worker)
        finally:
            await scoped.group.stop()

    # Each process declares only the live tables its sinks fill: no changelog topic nobody fills.
    changelogs = {n for n in await kafka.group.topics() if n.endswith("-changelog")}
    assert {n for n in changelogs if n.startswith(f"{app_id}.")} == {
        f"{app_id}.crypto-prices-latest-prices-changelog",
        f"{app_id}.crypto-prices-price-ranges-changelog",
        f"{app_id}.poller.crypto-ohlcv.market-analytics-latest-analytics-changelog",
    }
    # Without the price tables the poller's process answers from the database, as the other.
    coin = sent_prices[0].coin_id
    async with httpx.AsyncClient(timeout=10) as client:
        answers = [
            (await client.get(f"{worker.url}/prices")).json()["prices"]
            for worker in (price_sink, poller)
        ]
        one = [(await client.get(f"{w.url}/prices/{coin}")).json() for w in (price_sink, poller)]
    sent_coins = {p.coin_id for p in sent_prices}
    with_sent = [{c: p for c, p in answer.items() if c in sent_coins} for answer in answers]
    assert set(with_sent[1]) == sent_coins and with_sent[0] == with_sent[1]
    assert one[0] == one[1] and one[1]["price"]["coin_id"] == coin

    # The poller's prices reached the price sink: the two groups meet through the topic.
    assert len(await stored(migrated, CryptoPriceData)) > len(sent_prices)
    connection = await asyncpg.connect(migrated)
    try:
        groups = await connection.fetch("SELECT DISTINCT consumer_group, topic FROM sink_offsets")
    finally:
        await connection.close()
    # Stored offsets stay under APP_ID whatever group fetched: one sequence per partition.
    assert sorted((g["consumer_group"], g["topic"]) for g in groups) == [
        (app_id, "crypto-ohlcv"),
        (app_id, "crypto-prices"),
        (app_id, "market-analytics"),
    ]
