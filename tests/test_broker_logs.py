"""What the broker says about a partition's log, read from the real embedded broker."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from app.broker_logs import BrokerLogs
from local.embedded import EmbeddedBroker
from store.offsets import Mark, fingerprint

TOPIC = "logs-under-test"
STAMP = 1_700_000_000_000  # a record timestamp, ms


async def create_topic(broker: EmbeddedBroker, partitions: int, topic: str = TOPIC) -> str:
    """`topic` with `partitions` partitions; the broker's bootstrap address."""
    bootstrap = f"127.0.0.1:{broker.port}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
    return bootstrap


@pytest.fixture
async def produced(own_broker: EmbeddedBroker) -> AsyncIterator[list[Mark]]:
    """Three messages in partition 0 of a two-partition topic, as marks."""
    bootstrap = await create_topic(own_broker, 2)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    marks = []
    try:
        for i in range(3):
            key, value = b"coin", f"snapshot {i}".encode()
            sent = await (await producer.send(TOPIC, key=key, value=value, partition=0))
            marks.append(Mark(sent.offset, fingerprint(sent.timestamp, key, value)))
    finally:
        await producer.stop()
    yield marks


@pytest.fixture
async def logs(own_broker: EmbeddedBroker) -> AsyncIterator[BrokerLogs]:
    logs = BrokerLogs([f"127.0.0.1:{own_broker.port}"], "test-log-check", {})
    yield logs
    await logs.close()


async def test_the_message_at_a_checkpoint_is_found_as_it_was_produced(
    logs: BrokerLogs, produced: list[Mark], own_broker: EmbeddedBroker
) -> None:
    found = await logs.look(TOPIC, {0: produced[1], 1: None})
    assert {log.cluster_id for log in found.values()} == {own_broker.cluster_id}
    assert (found[0].earliest, found[0].at_checkpoint) == (0, produced[1])
    assert found[0].end >= 1  # the embedded broker's high-water mark may lag the end
    assert (found[1].earliest, found[1].end, found[1].at_checkpoint) == (0, 0, None)


async def test_a_checkpoint_past_the_end_of_the_log_finds_nothing(
    logs: BrokerLogs, produced: list[Mark]
) -> None:
    beyond = Mark(produced[-1].offset + 5, produced[-1].digest)
    assert (await logs.look(TOPIC, {0: beyond}))[0].at_checkpoint is None
    # The same clients look again, at another offset.
    assert (await logs.look(TOPIC, {0: produced[0]}))[0].at_checkpoint == produced[0]


async def test_a_look_finds_the_checkpoints_in_the_log_beside_one_past_its_end(
    logs: BrokerLogs, produced: list[Mark]
) -> None:
    """Partitions with a message at the checkpoint are fetched one at a time, those past their
    end together: each answer is its own partition's."""
    beyond = Mark(3, produced[0].digest)  # partition 1 is empty
    found = await logs.look(TOPIC, {0: produced[2], 1: beyond})
    assert (found[0].at_checkpoint, found[1].at_checkpoint) == (produced[2], None)


async def test_every_partition_looked_at_finds_its_own_checkpoint(
    logs: BrokerLogs, own_broker: EmbeddedBroker
) -> None:
    """Each partition's first message at its checkpoint, also where the fetch brought many."""
    topic = "logs-of-three-partitions"
    bootstrap = await create_topic(own_broker, 3, topic)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    marks: dict[int, list[Mark]] = {0: [], 1: [], 2: []}
    try:
        for partition, sent_marks in marks.items():
            for i in range(50):
                key, value = b"coin", f"partition {partition} snapshot {i}".encode()
                sent = await (await producer.send(topic, key=key, value=value, partition=partition))
                sent_marks.append(Mark(sent.offset, fingerprint(sent.timestamp, key, value)))
    finally:
        await producer.stop()
    found = await logs.look(topic, {0: marks[0][10], 1: marks[1][0], 2: marks[2][49]})
    assert {p: log.at_checkpoint for p, log in found.items()} == {
        0: marks[0][10],
        1: marks[1][0],
        2: marks[2][49],
    }


async def test_a_message_in_the_middle_of_a_record_batch_is_found_as_it_was_produced(
    logs: BrokerLogs, own_broker: EmbeddedBroker
) -> None:
    """The broker sends whole record batches; the look must take the record at its offset, not
    the batch's first (one batch of 2,000 messages, ~200 KB, the wanted one at 1,500)."""
    bootstrap = await create_topic(own_broker, 1)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_batch_size=1 << 20)
    await producer.start()
    try:
        batch = producer.create_batch()
        for i in range(2000):
            value = f"snapshot {i:096d}".encode()
            assert batch.append(key=b"coin", value=value, timestamp=STAMP + i)
        sent = await (await producer.send_batch(batch, TOPIC, partition=0))
    finally:
        await producer.stop()
    wanted = sent.offset + 1500
    found = await logs.look(TOPIC, {0: Mark(wanted, b"unknown")})
    checkpoint = found[0].at_checkpoint
    assert checkpoint is not None
    expected = fingerprint(STAMP + 1500, b"coin", f"snapshot {1500:096d}".encode())
    assert checkpoint == Mark(wanted, expected)
