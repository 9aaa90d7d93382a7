"""Poller helpers for the tests: a poller wired to the local CoinGecko fake, publishing to the real
broker under a per-test topic prefix."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from app.settings import Settings
from coingecko.client import CoinGeckoClient, RateLimiter
from coingecko.fake_server import FakeCoinGecko
from coingecko.poller import Poller, PollStatus
from local.embedded import EmbeddedBroker
from models.codec import decode_record, encode_record
from models.dsl import StreamRecord

# The coins of coingecko/fixtures/coins_markets.json, in its order.
FIXTURE_COINS = [
    "bitcoin",
    "ethereum",
    "tether",
    "wrapped-bitcoin-x",
    "pepe-cash",
    "quiet-ledger",
    "ghost-token",
]


class BrokerTopics:
    """Publishes like the app (topic of the record, key, encoded value) under a per-test prefix,
    so tests sharing the session broker never read each other's messages."""

    def __init__(self, broker: EmbeddedBroker) -> None:
        self.bootstrap = f"127.0.0.1:{broker.port}"
        self.prefix = f"t{uuid.uuid4().hex[:8]}-"
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap)
        self.published = 0

    async def publish(self, records: Sequence[StreamRecord]) -> None:
        pending = [
            await self.producer.send(self.prefix + r.topic.name, encode_record(r), key=r.key())
            for r in records
        ]
        for future in pending:
            await future
        self.published += len(records)

    async def read(self, record_type: type[StreamRecord]) -> list[tuple[bytes, Any]]:
        """Every message on the record's topic so far: (key, decoded record)."""
        topic = self.prefix + record_type.topic.name
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            await consumer.topics()  # a metadata request: the topic may be new
            partitions = consumer.partitions_for_topic(topic) or set()
            consumer.assign([TopicPartition(topic, p) for p in partitions])
            messages: list[tuple[bytes, Any]] = []
            while batch := await consumer.getmany(timeout_ms=500):
                for records in batch.values():
                    messages += [(m.key, decode_record(record_type, m.value)) for m in records]
            return messages
        finally:
            await consumer.stop()


def make_poller(
    fake: FakeCoinGecko, kafka: BrokerTopics, limiter: RateLimiter | None = None, **overrides: Any
) -> Poller:
    """A poller of the fake's coins publishing to `kafka`; `limiter` replaces the plan's (a
    tight one makes a minute's rate limit a fraction of a second)."""
    values: dict[str, Any] = {
        "coingecko_base_url": fake.base_url,
        "coingecko_calls_per_minute": 1000,
        "coingecko_api_key": None,
        "coingecko_plan": None,
        "coins": ",".join([*FIXTURE_COINS, "no-such-coin"]),
        "top_n": 100,
        "ohlc_days": 1,
        **overrides,
    }
    client = CoinGeckoClient(Settings(**values), limiter=limiter, backoff_base=0.01, max_attempts=2)
    return Poller(Settings(**values), client, kafka.publish, status=PollStatus())
