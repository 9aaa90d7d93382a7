"""The sink's logic in-process, against the real embedded broker and database: a `Sink` built
from its collaborators (agents/sink.py), fed batches of real messages fetched from the broker,
with a real pool, real dead letters and the real log check. What the worker-process tests
(test_sink.py, test_reliability.py) show end to end, in a few seconds per case: rows, stored
offsets, dead letters, replays skipped, a hole sought back, a log found reset, observers before
acknowledgements.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import cast

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from faust.types import TP, Message

from agents.sink import Sink, SinkLimits, SinkStatus
from app.broker_logs import BrokerLogs
from common.metrics import REGISTRY
from models import CryptoPriceData
from models.codec import encode_record
from store.db import LazyPool
from store.offsets import SinkOffsets
from tables.live import LiveUpdates, NewestFold
from testkit.databases import assert_exactly, stored
from testkit.records import prices
from testkit.workers import Kafka

TOPIC = CryptoPriceData.topic.name
DEAD_LETTERS = CryptoPriceData.topic.dead_letter_name
GROUP = "in-process"
TIMEOUT = 60.0  # generous: the suite shares two cores
# Publication and acknowledgement right after each batch (no observers wait for more).
LIMITS = SinkLimits(batch_size=1000, live_table_update_seconds=0.0, log_check_seconds=3600.0)


@dataclass
class Batches:
    """The sink's batches as the test hands them over; records what the sink acknowledged."""

    acked: list[Message] = field(default_factory=list)

    async def take(self, limit: int, timeout: float | None = None) -> list[Message]:
        raise AssertionError("the tests call Sink.flush with the batches themselves")

    def ack(self, messages: Sequence[Message]) -> None:
        self.acked.extend(messages)


class Broker:
    """The test's consumer of the sink's topic: fetches real messages (as Faust's `Message`s)
    and stands in for the worker consumer's positions; seeks are recorded, not performed (the
    test fetches what a seek would)."""

    def __init__(self, bootstrap: str) -> None:
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self.sought: list[tuple[int, int]] = []

    async def fetch(self, partition: int, start: int, stop: int) -> list[Message]:
        """Messages `start`..`stop - 1` of a partition."""
        tp = TopicPartition(TOPIC, partition)
        self.consumer.assign([tp])
        self.consumer.seek(tp, start)
        records: list[ConsumerRecord[bytes, bytes]] = []
        async with asyncio.timeout(TIMEOUT):
            while len(records) < stop - start:
                fetched = await self.consumer.getmany(tp, timeout_ms=500)
                records += fetched.get(tp, [])
        return [
            Message(
                r.topic,
                r.partition,
                r.offset,
                r.timestamp / 1000,
                r.timestamp_type,
                r.headers,
                r.key,
                r.value,
                r.checksum,
                tp=TP(r.topic, r.partition),
            )
            for r in records[: stop - start]
        ]

    def flowing(self) -> bool:
        return True

    def generation(self) -> int:
        return 1

    def assigned(self, topic: str) -> list[int]:
        return [0]

    async def earliest(self, topic: str, partitions: Sequence[int]) -> dict[int, int]:
        tps = [TopicPartition(topic, p) for p in partitions]
        earliest = await self.consumer.beginning_offsets(tps)
        return {tp.partition: offset for tp, offset in earliest.items()}

    async def seek(self, topic: str, partition: int, offset: int) -> None:
        self.sought.append((partition, offset))


@dataclass
class Harness:
    sink: Sink
    broker: Broker
    batches: Batches
    dsn: str
    kafka: Kafka

    async def flush(self, messages: Sequence[Message]) -> None:
        """One batch through the sink, then its publication (acknowledgement)."""
        async with asyncio.timeout(TIMEOUT):  # a failure is retried forever: fail instead
            await self.sink.flush(messages)
            if self.sink.publishing is not None:
                await self.sink.publishing

    async def produced(
        self, prefix: str, count: int
    ) -> tuple[list[CryptoPriceData], list[Message]]:
        """`count` price records produced to partition 0 and fetched back as messages."""
        records = prices(prefix, count)
        await produce(self.kafka, [encode_record(r) for r in records])
        return records, await self.broker.fetch(0, 0, count)

    async def stored_offsets(self) -> dict[int, int]:
        connection = await asyncpg.connect(self.dsn)
        try:
            return await SinkOffsets(GROUP, TOPIC).read(connection)
        finally:
            await connection.close()


async def send_dead_letter(
    kafka: Kafka, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
) -> None:
    await kafka.producer.send_and_wait(DEAD_LETTERS, key=key, value=value, headers=headers)


@pytest.fixture
async def harness(kafka: Kafka, migrated: str) -> AsyncIterator[Harness]:
    broker = Broker(kafka.bootstrap)
    await broker.consumer.start()
    database = LazyPool(migrated, 2)
    logs = BrokerLogs([kafka.bootstrap], "test-log-check", {})
    batches = Batches()
    sink = Sink(
        CryptoPriceData,
        consumer_group=GROUP,
        database=database,
        batches=batches,
        positions=broker,
        look_at_logs=partial(logs.look, TOPIC),
        dead_letters=partial(send_dead_letter, kafka),
        status=SinkStatus(topic=TOPIC, table=CryptoPriceData.table.name),
        limits=LIMITS,
    )
    yield Harness(sink, broker, batches, migrated, kafka)
    await database.close()
    await logs.close()
    await broker.consumer.stop()


def observed(histogram: str) -> tuple[float, float]:
    """(count, sum) of the crypto-prices sink's observations of one of common.metrics'
    histograms so far (every sink of the process shares them, by topic)."""
    labels = {"topic": TOPIC}
    count = REGISTRY.get_sample_value(f"{histogram}_count", labels) or 0.0
    return count, REGISTRY.get_sample_value(f"{histogram}_sum", labels) or 0.0


WRITES = "qicore_sink_batch_write_duration_seconds"
DELAYS = "qicore_sink_event_delay_seconds"


async def produce(kafka: Kafka, values: Sequence[bytes], partition: int = 0) -> None:
    for value in values:
        await kafka.producer.send_and_wait(TOPIC, value=value, key=b"k", partition=partition)


async def test_a_batch_is_stored_with_its_offsets_and_acknowledged(harness: Harness) -> None:
    records = prices("stored", 12)
    await produce(harness.kafka, [encode_record(r) for r in records[:7]], partition=0)
    await produce(harness.kafka, [encode_record(r) for r in records[7:]], partition=3)
    batch = await harness.broker.fetch(0, 0, 7) + await harness.broker.fetch(3, 0, 5)
    writes, delays = observed(WRITES), observed(DELAYS)

    await harness.flush(batch)

    assert_exactly(await stored(harness.dsn, CryptoPriceData), records)
    assert await harness.stored_offsets() == {0: 7, 3: 5}
    assert harness.batches.acked == batch
    status = harness.sink.status
    assert (status.rows_written, status.batches) == (12, 1)
    # One observation per batch: its write, and the delay of its oldest record until durable.
    assert observed(WRITES)[0] == writes[0] + 1
    count, total = observed(DELAYS)
    assert status.last_write_at is not None and count == delays[0] + 1
    oldest = min(record.event_time() for record in records)
    assert total - delays[1] == pytest.approx((status.last_write_at - oldest).total_seconds())


async def test_a_replay_writes_nothing_and_dead_letters_nothing_again(harness: Harness) -> None:
    good = prices("replayed", 3)
    values = [encode_record(good[0]), b"not json", encode_record(good[1]), encode_record(good[2])]
    await produce(harness.kafka, values)
    batch = await harness.broker.fetch(0, 0, 4)

    await harness.flush(batch)
    await harness.flush(batch)  # a consumer-group reset delivers it again

    assert_exactly(await stored(harness.dsn, CryptoPriceData), good)
    assert await harness.stored_offsets() == {0: 4}
    dead = await harness.kafka.read_all(DEAD_LETTERS)
    assert [(value, headers["x-original-offset"]) for _, _, _, value, headers in dead] == [
        (b"not json", b"1")
    ]
    status = harness.sink.status
    assert (status.dead_letters, status.replayed_skipped, status.rows_written) == (1, 4, 3)
    assert status.batches == 2  # the replay is a transaction too, which stores no row


async def test_a_hole_is_not_written_past_and_the_partition_is_sought_back(
    harness: Harness,
) -> None:
    records, everything = await harness.produced("hole", 10)

    await harness.flush(everything[:4] + everything[6:])  # offsets 4 and 5 went missing

    assert_exactly(await stored(harness.dsn, CryptoPriceData), records[:4])
    assert await harness.stored_offsets() == {0: 4}
    assert harness.broker.sought == [(0, 4)]
    assert harness.sink.status.holes_refetched == 1

    await harness.flush(await harness.broker.fetch(0, 4, 10))  # what the seek fetches again

    assert_exactly(await stored(harness.dsn, CryptoPriceData), records)
    assert await harness.stored_offsets() == {0: 10}


async def test_offsets_stored_from_another_log_start_over_instead_of_skipping_it(
    harness: Harness,
) -> None:
    # The stored offsets say partition 0 is at 50 of another cluster's log (a database restored
    # next to a new broker): without the log check, offsets 0..4 would be skipped as replays.
    connection = await asyncpg.connect(harness.dsn)
    try:
        async with connection.transaction():
            await SinkOffsets(GROUP, TOPIC).lock(connection, [0], {0: 50}, {}, "another-cluster")
    finally:
        await connection.close()
    records, batch = await harness.produced("reset", 5)

    await harness.flush(batch)

    assert_exactly(await stored(harness.dsn, CryptoPriceData), records)
    assert await harness.stored_offsets() == {0: 5}
    assert harness.sink.status.log_resets == 1


# What an observer's write saw: each coin's newest record given, how many were undecodable,
# rows in the table then, messages acknowledged then.
Seen = tuple[dict[str, CryptoPriceData], int, int, int]


def observe(harness: Harness) -> list[Seen]:
    """The live tables' observer (tables.live.LiveUpdates) on the harness's sink, newest record
    per coin, with a write that records what it was given and what was stored and acknowledged
    at that moment."""
    seen: list[Seen] = []

    async def write(fold: NewestFold) -> None:
        rows = len(await stored(harness.dsn, CryptoPriceData))
        newest = {
            coin: cast(CryptoPriceData, record) for coin, (_, _, record) in fold.newest.items()
        }
        seen.append((newest, fold.undecodable, rows, len(harness.batches.acked)))

    fold = partial(NewestFold, "coin_id", "last_updated")
    harness.sink.observers.append(LiveUpdates(TOPIC, fold, write))
    return seen


async def test_observers_get_a_batch_once_it_is_stored_and_before_it_is_acknowledged(
    harness: Harness,
) -> None:
    good = prices("observed", 4, coins=3)
    values = [encode_record(good[0]), b"not json", *map(encode_record, good[1:])]
    await produce(harness.kafka, values)
    batch = await harness.broker.fetch(0, 0, 5)
    seen = observe(harness)

    await harness.flush(batch)

    newest = {"observed-0": good[3], "observed-1": good[1], "observed-2": good[2]}
    assert seen == [(newest, 1, 4, 0)]
    assert harness.batches.acked == batch


class Failing:
    """An observer whose every call to fold a record raises."""

    def __init__(self) -> None:
        self.calls = 0
        self.written = 0

    def start_batch(self) -> Callable[[Message, object], None]:
        def add(message: Message, record: object) -> None:
            self.calls += 1
            raise ValueError("a bug in an observer")

        return add

    def batch_stored(self) -> None:
        pass

    def take(self) -> Callable[[], Awaitable[None]]:
        async def write() -> None:
            self.written += 1

        return write


async def test_an_observer_that_fails_on_a_record_stops_neither_the_sink_nor_other_observers(
    harness: Harness,
) -> None:
    records, batch = await harness.produced("failing", 3)
    failing = Failing()
    harness.sink.observers.append(failing)
    seen = observe(harness)

    await harness.flush(batch)

    assert_exactly(await stored(harness.dsn, CryptoPriceData), records)
    assert seen == [({record.coin_id: record for record in records}, 0, 3, 0)]
    assert (failing.calls, failing.written) == (1, 1)  # left out for the rest of the batch
    assert harness.batches.acked == batch


async def test_stored_batches_reach_the_observers_together_when_publication_is_due(
    harness: Harness,
) -> None:
    records, batch = await harness.produced("together", 6)
    seen = observe(harness)
    harness.sink.limits = replace(LIMITS, live_table_update_seconds=3600.0)

    await harness.flush(batch[:2])
    await harness.flush(batch[2:])
    assert (seen, harness.batches.acked) == ([], [])  # stored, not yet due
    harness.sink.limits = LIMITS
    await harness.flush([])  # due now

    assert seen == [({record.coin_id: record for record in records}, 0, 6, 0)]
    assert harness.batches.acked == batch


async def test_a_write_retried_after_failures_folds_and_dead_letters_each_message_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL itself refuses the batch's first two inserts (a trigger on a sequence, which
    a rollback does not undo); the retries must not decode, fold or dead-letter anything twice."""
    good = prices("retried", 4, coins=3)
    values = [encode_record(good[0]), b"not json", *map(encode_record, good[1:])]
    await produce(harness.kafka, values)
    batch = await harness.broker.fetch(0, 0, 5)
    seen = observe(harness)
    monkeypatch.setattr("agents.sink.backoff", lambda failures: 0.0)
    connection = await asyncpg.connect(harness.dsn)
    try:
        await connection.execute(
            f"""
            CREATE SEQUENCE refusals;
            CREATE FUNCTION refuse_twice() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF nextval('refusals') <= 2 THEN RAISE EXCEPTION 'refused on purpose'; END IF;
                RETURN NULL;
            END $$;
            CREATE TRIGGER refuse_twice BEFORE INSERT ON {CryptoPriceData.table.name}
                FOR EACH STATEMENT EXECUTE FUNCTION refuse_twice();
            """
        )
        await harness.flush(batch)
        attempts = await connection.fetchval("SELECT last_value FROM refusals")
    finally:
        await connection.close()

    assert attempts == 3  # two refused, the third stored
    assert_exactly(await stored(harness.dsn, CryptoPriceData), good)
    newest = {"retried-0": good[3], "retried-1": good[1], "retried-2": good[2]}
    assert seen == [(newest, 1, 4, 0)]  # one fold of the batch, its one bad message counted once
    status = harness.sink.status
    assert (status.dead_letters, status.rows_written, status.consecutive_failures) == (1, 4, 0)
    assert "refused on purpose" in (status.last_error or "")
    assert harness.batches.acked == batch
