"""What the broker says about a partition's log right now: the cluster's id, the partition's
earliest and end offsets, and the message at a given offset. The sinks compare it with what they
stored (`store.offsets.other_log`) to tell a log they continue from a new one under the same
topic name.

Its own clients, apart from Faust's consumer: looking at a partition must not move the position
Faust fetches from, and only the admin client's Metadata answer carries the cluster id (aiokafka
0.14 drops it from its cluster metadata, and speaks Metadata only up to v5, so Kafka's topic ids,
from v10 on, are not available at all).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import OffsetOutOfRangeError
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth, server_list
from faust.types import AppT

from store.offsets import BrokerLog, Mark, fingerprint

# A message below the end offset is fetched at once. One at or past it is waited for this long
# (the embedded broker answers a fetch past the end with nothing, not with an error).
ABSENT_AFTER = 1.0  # seconds
# A message the broker reports (below its high-water mark) but has not delivered in this long:
# the look fails, and is retried, rather than calling the message missing.
FETCH_TIMEOUT = 30.0  # seconds
DEFAULT_PORT = 9092


def client_options(app: AppT, purpose: str) -> dict[str, Any]:
    """aiokafka client arguments for the app's broker, with the app's credentials."""
    conf = app.conf
    return {
        "bootstrap_servers": server_list(conf.broker, DEFAULT_PORT),
        "client_id": f"{conf.broker_client_id}-{purpose}",
        **credentials_to_aiokafka_auth(conf.broker_credentials),
    }


class BrokerLogs:
    """One admin client and one group-less consumer, started at the first look."""

    def __init__(self, servers: list[str], client_id: str, auth: Mapping[str, Any]) -> None:
        """`auth`: aiokafka's security arguments."""
        self.options = {"bootstrap_servers": servers, "client_id": client_id, **auth}
        self.lock = asyncio.Lock()  # one look at a time: the consumer's assignment is per look
        self.admin: AIOKafkaAdminClient | None = None
        self.consumer: AIOKafkaConsumer | None = None

    @classmethod
    def of(cls, app: AppT) -> BrokerLogs:
        """For the app's broker, with the app's credentials."""
        options = client_options(app, "log-check")
        return cls(options.pop("bootstrap_servers"), options.pop("client_id"), options)

    async def start(self) -> None:
        """Start the clients now rather than at the first look."""
        async with self.lock:
            await self._clients()

    async def _clients(self) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
        if self.admin is None or self.consumer is None:
            admin = AIOKafkaAdminClient(**self.options)
            consumer = AIOKafkaConsumer(
                **self.options,
                enable_auto_commit=False,
                auto_offset_reset="none",
                fetch_max_wait_ms=100,
                max_partition_fetch_bytes=1,  # the least a fetch returns: see `_fetch`
            )
            await admin.start()
            try:
                await consumer.start()
            except BaseException:
                await admin.close()
                raise
            self.admin, self.consumer = admin, consumer
        return self.admin, self.consumer

    async def look(
        self, topic: str, checkpoints: Mapping[int, Mark | None]
    ) -> dict[int, BrokerLog]:
        """The log of each partition of `topic` in `checkpoints`, with the message found at its
        checkpoint's offset (when it has one the broker still holds)."""
        async with self.lock:
            admin, consumer = await self._clients()
            cluster_id = (await admin.describe_cluster()).get("cluster_id")
            tps = [TopicPartition(topic, partition) for partition in checkpoints]
            earliest = await consumer.beginning_offsets(tps)
            end = await consumer.end_offsets(tps)
            wanted = {
                tp: mark.offset
                for tp in tps
                if (mark := checkpoints[tp.partition]) is not None and mark.offset >= earliest[tp]
            }
            found = await self._fetch(consumer, wanted, end)
        return {
            tp.partition: BrokerLog(cluster_id, earliest[tp], end[tp], found.get(tp)) for tp in tps
        }

    async def _fetch(
        self,
        consumer: AIOKafkaConsumer,
        wanted: Mapping[TopicPartition, int],
        end: Mapping[TopicPartition, int],
    ) -> dict[TopicPartition, Mark]:
        """The first message at or after each wanted offset; none where the log ends before.

        One partition at a time, each fetch returning the least it may: the record batch at the
        offset, which a broker sends whole for the first partition of a fetch however small the
        limit (Kafka's KIP-74), where fetching up to 1 MiB of every partition (aiokafka's
        default) made each look a burst of thousands of records that the allocators kept: RSS
        grew by ~10 MiB an hour while tracking 1,000 coins (docs/performance.md, section 5). Past
        a fetch's first partition Kafka sends only the limit, a partial batch that aiokafka
        refuses (RecordTooLargeError), hence one partition per fetch. Those with nothing at the
        offset by their end offset are waited for together (ABSENT_AFTER once, not once each):
        they have no batch to cut."""
        found: dict[TopicPartition, Mark] = {}
        for tp, offset in wanted.items():
            if end[tp] > offset:
                found.update(await self._fetch_together(consumer, {tp: offset}, end))
        if absent := {tp: offset for tp, offset in wanted.items() if end[tp] <= offset}:
            found.update(await self._fetch_together(consumer, absent, end))
        return found

    async def _fetch_together(
        self,
        consumer: AIOKafkaConsumer,
        wanted: Mapping[TopicPartition, int],
        end: Mapping[TopicPartition, int],
    ) -> dict[TopicPartition, Mark]:
        """`_fetch` of the wanted partitions in one assignment."""
        consumer.assign(list(wanted))
        try:
            for tp, offset in wanted.items():
                consumer.seek(tp, offset)
            found: dict[TopicPartition, Mark] = {}
            pending = set(wanted)
            loop = asyncio.get_running_loop()
            started = loop.time()
            while pending:
                try:
                    fetched = await consumer.getmany(*pending, timeout_ms=200)
                except OffsetOutOfRangeError as error:  # past the end (Kafka, Redpanda)
                    pending -= set(error.args[0])
                    continue
                for tp, records in fetched.items():
                    first = records[0]
                    digest = fingerprint(first.timestamp, first.key, first.value)
                    found[tp] = Mark(first.offset, digest)
                    pending.discard(tp)
                waited = loop.time() - started
                if waited > ABSENT_AFTER and all(end[tp] <= wanted[tp] for tp in pending):
                    break
                if waited > FETCH_TIMEOUT:
                    raise TimeoutError(f"messages of {sorted(pending)} not delivered")
            return found
        finally:
            # Nothing assigned between looks: a consumer left fetching in the background held
            # the next look up by a fetch round (~300 ms, measured on the embedded broker).
            consumer.unsubscribe()

    async def close(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        if self.admin is not None:
            await self.admin.close()
        self.admin = self.consumer = None
