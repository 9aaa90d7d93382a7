"""The live tables (tables/live.py) write each update to the changelog partition of the record
it came from, the partition Faust assigns together with it: a real worker, broker and database.

Records are produced onto chosen partitions, not where the producer's hash of their key would put
them, so a table routed by any hash (of the record's key, of the table's JSON key, of a window's
key) instead of by the source partition fails here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from models import CryptoMarketAnalytics
from models.codec import encode_record
from models.market import PARTITIONS
from testkit.records import T0, prices
from testkit.workers import Kafka, Sent, Worker, eventually

pytestmark = pytest.mark.slow


async def test_table_writes_land_on_the_changelog_partition_of_their_source_record(
    kafka: Kafka, workers: Callable[[str], Worker], migrated: str, app_id: str
) -> None:
    coins = 2 * PARTITIONS
    # Dated within the last hours: older snapshots open no hourly range window (no view reads it).
    recent = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    records = [
        price.model_copy(update={"last_updated": price.last_updated - T0 + recent})
        for price in prices("coin", 4 * coins, coins=coins)
    ]
    partition_of = {f"coin-{i}": (i * 5 + 1) % PARTITIONS for i in range(coins)}
    analytics = [
        CryptoMarketAnalytics(
            timestamp=T0 + timedelta(minutes=i),
            total_market_cap=Decimal("2.5E+12"),
            btc_dominance=Decimal("52.1"),
            markets=1000 + i,
        )
        for i in range(3)
    ]
    analytics_partition = PARTITIONS - 2
    worker = workers(migrated)
    sent = []
    for record, partition in [
        *((price, partition_of[price.coin_id]) for price in records),
        *((market, analytics_partition) for market in analytics),
    ]:
        key, value = record.key(), encode_record(record)
        where = await kafka.producer.send_and_wait(
            record.topic.name, key=key, value=value, partition=partition
        )
        sent.append(Sent(record.topic.name, where.partition, where.offset, key, value, record))
    # Stored and given to the tables (so their changelogs exist: reading one before the worker
    # declared it would make the broker create it with its default partition count).
    await kafka.wait_committed(sent, worker)

    expected = {
        "latest-prices": partition_of,
        "price-ranges": partition_of,
        "latest-analytics": {"coingecko": analytics_partition},
    }

    async def changelogs() -> dict[str, dict[str, set[int]]] | None:
        """Per table, the partitions each key (a window's: its coin) was written to."""
        written: dict[str, dict[str, set[int]]] = {}
        for table in expected:
            keys = written[table] = {}
            for partition, _, key, _, _ in await kafka.read_all(f"{app_id}-{table}-changelog"):
                assert key is not None
                decoded = json.loads(key)
                name = decoded if isinstance(decoded, str) else decoded[0]  # [key, window]
                keys.setdefault(name, set()).add(partition)
        complete = all(written[table].keys() == keys.keys() for table, keys in expected.items())
        return written if complete else None

    written = await eventually(changelogs, worker, "every key in every table's changelog")
    for table, keys in expected.items():
        assert written[table] == {name: {partition} for name, partition in keys.items()}, table
    assert await worker.terminate() == 0
