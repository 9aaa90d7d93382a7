"""Prototype of the public route (docs/architecture.md): a sink without Faust's consumer.

`faust -A bench.public_sink worker`: a Faust app whose only work is a mode Service (so it starts
and stops with the worker) running a plain aiokafka consumer of its own group. The database's
stored offsets (`sink_offsets`) decide where each assigned partition continues: the consumer
seeks there on every assignment, and every batch's rows and next offsets are written in one
transaction exactly as the sink writes them (`store.offsets`, `store.writer`). Kafka commits are
only a hint, made every `broker_commit_interval` as Faust does.

Left out, because the prototype only measures the fetch-and-store path: dead letters (the
benchmark's records are all valid), the live tables (their changelogs are co-partitioned with
the partitions Faust assigns; this consumer's group assigns its own), /health and the retry loop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import asyncpg
import mode
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from bench.common import plain_app
from models.codec import decode_record
from models.market import CryptoPriceData
from store.offsets import Mark, SinkOffsets, continue_sequences, fingerprint
from store.writer import RecordWriter

app, settings = plain_app()
TOPIC = CryptoPriceData.topic.name


class SeekToStored(ConsumerRebalanceListener):
    """On every assignment, continue each partition where the database says."""

    def __init__(self, sink: PublicSink) -> None:
        self.sink = sink

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        """Nothing to hand over: a batch is stored before the next getmany() can rebalance."""

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        await self.sink.seek_stored([tp for tp in assigned if tp.topic == TOPIC])


@app.service
class PublicSink(mode.Service):
    """Fetches `TOPIC` with its own consumer and stores it as the sink does."""

    consumer: AIOKafkaConsumer
    pool: asyncpg.Pool

    async def on_start(self) -> None:
        self.writer = RecordWriter(CryptoPriceData)
        self.offsets = SinkOffsets(app.conf.id, TOPIC)
        self.known: set[int] = set()  # partitions whose stored offset exists
        self.pool = await asyncpg.create_pool(settings.database_dsn, min_size=1, max_size=2)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=[f"{url.host}:{url.port}" for url in app.conf.broker],
            group_id=f"{app.conf.id}-public-sink",
            enable_auto_commit=False,
            max_poll_records=settings.sink_batch_size,
            fetch_max_wait_ms=settings.broker_fetch_max_wait_ms,
        )
        await self.consumer.start()
        self.consumer.subscribe([TOPIC], listener=SeekToStored(self))

    async def on_stop(self) -> None:
        await self.consumer.stop()
        await self.pool.close()

    async def lock_stored(
        self, connection: asyncpg.Connection, partitions: list[int]
    ) -> dict[int, int]:
        """The stored offsets, locked; a partition never stored starts at its earliest offset."""
        new = [TopicPartition(TOPIC, p) for p in partitions if p not in self.known]
        earliest = await self.consumer.beginning_offsets(new) if new else {}
        starts = {tp.partition: offset for tp, offset in earliest.items()}
        stored = await self.offsets.lock(connection, partitions, starts, {})
        self.known.update(partitions)
        return stored

    async def seek_stored(self, assigned: list[TopicPartition]) -> None:
        async with self.pool.acquire() as connection, connection.transaction():
            stored = await self.lock_stored(connection, [tp.partition for tp in assigned])
        for tp in assigned:
            self.consumer.seek(tp, stored[tp.partition])

    @mode.Service.task
    async def fetch_and_store(self) -> None:
        committed_at, to_commit = time.monotonic(), {}
        while not self.should_stop:
            fetched = await self.consumer.getmany(
                timeout_ms=1000, max_records=settings.sink_batch_size
            )
            delivered = [
                (r.partition, r.offset, decode_record(CryptoPriceData, r.value))
                for records in fetched.values()
                for r in records
            ]
            if not delivered:
                continue
            partitions = sorted({partition for partition, _, _ in delivered})
            async with self.pool.acquire() as connection, connection.transaction():
                stored = await self.lock_stored(connection, partitions)
                continuation = continue_sequences(delivered, stored)
                await self.writer.insert(connection, continuation.accepted)
                last = {
                    r.partition: Mark(r.offset, fingerprint(r.timestamp, r.key, r.value))
                    for records in fetched.values()
                    for r in records
                    if continuation.next_offsets.get(r.partition) == r.offset + 1
                }
                await self.offsets.advance(connection, continuation.next_offsets, last)
            for partition, offset in continuation.holes.items():
                self.consumer.seek(TopicPartition(TOPIC, partition), offset)
            to_commit.update(continuation.next_offsets)
            if to_commit and time.monotonic() - committed_at >= app.conf.broker_commit_interval:
                await self.consumer.commit(
                    {TopicPartition(TOPIC, p): o for p, o in to_commit.items()}
                )
                committed_at, to_commit = time.monotonic(), {}
