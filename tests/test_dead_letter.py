"""A dead letter must be confirmed by the broker before the stored offset moves past its message
(agents/sink.py): a message the sink rejected is only safe to skip once the dead-letter topic has
it. Shown with a dead letter the broker can never take: the worker's producer refuses records
over its 1,000,000-byte request limit, and the rejected original plus its `x-*` headers is over
it, while the original itself was small enough to produce. The sink retries it for as long as it
takes, and nothing after it is stored or committed meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest

from models import CryptoPriceData
from store.offsets import SinkOffsets
from testkit.databases import count_rows
from testkit.records import prices
from testkit.workers import Kafka, Worker, eventually

pytestmark = pytest.mark.slow

PRICES = CryptoPriceData.topic.name
PRODUCER_LIMIT = 1_000_000  # Faust's producer_max_request_size, which the app leaves as it is


async def test_the_stored_offset_never_passes_a_dead_letter_the_broker_did_not_take(
    kafka: Kafka, workers: Callable[..., Worker], migrated: str
) -> None:
    worker = workers(migrated)
    before, after = prices("dlq", 2, coins=1)  # one key: one partition, in this order
    junk = b" " * PRODUCER_LIMIT  # rejected (too large for a record), and its copy too large
    sent = await kafka.send_records([before])
    sent += await kafka.send([(PRICES, before.key(), junk, None)])
    sent += await kafka.send_records([after])
    rejected = sent[1]
    assert {message.partition for message in sent} == {rejected.partition}

    async def retrying_or_past() -> dict[str, Any] | None:
        """The sink's status once it has retried the dead letter a few times, or once it has
        stored the record behind it (which it must not)."""
        try:
            status = await worker.sink_status(PRICES)
        except httpx.TransportError:  # the web server is not up yet
            return None
        retrying = status["consecutive_failures"] >= 3
        return status if retrying or await count_rows(migrated, CryptoPriceData) == 2 else None

    status = await eventually(retrying_or_past, worker, "the dead letter retried")
    connection = await asyncpg.connect(migrated)
    try:
        stored = await SinkOffsets(kafka.group_id, PRICES).read(connection)
    finally:
        await connection.close()
    assert stored.get(rejected.partition, 0) <= rejected.offset
    assert (await kafka.committed({PRICES}))[PRICES, rejected.partition] <= rejected.offset
    assert await count_rows(migrated, CryptoPriceData) <= 1  # `after` is not stored
    assert await kafka.read_all(CryptoPriceData.topic.dead_letter_name) == []
    assert status["dead_letters"] == 0
    assert "MessageSizeTooLarge" in str(status["last_error"])
