"""Stored offsets are bound to the log they came from (store/offsets.py), end to end: a real
`faust -A app worker`, real embedded brokers, a real PostgreSQL.

In each scenario a partition's new log starts again at offset 0, below the offsets the database
stored from the old one: without the binding, the sink took every new record for a replay and
stored none. What must hold: every record of the new log is stored exactly, no row is
duplicated, and the restart is logged once per partition and counted on /health.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from generators.topics import topic_configs
from local.embedded import EmbeddedBroker
from models import CryptoPriceData
from testkit.databases import assert_exactly, stored
from testkit.records import prices
from testkit.workers import Kafka, Sent, Worker, eventually

pytestmark = pytest.mark.slow
PRICES = CryptoPriceData.topic.name
RESTARTED = re.compile(r"sink crypto-prices: partition (\d+) is not the log its stored offsets")


def assert_below_stored(sent: Sequence[Sent], old_log: Sequence[Sent]) -> None:
    """The new log's records all sit below the offsets stored from the old log (every message of
    which is stored): each would pass for a replay."""
    ends: dict[int, int] = {}
    for message in old_log:
        ends[message.partition] = max(ends.get(message.partition, 0), message.offset + 1)
    assert all(message.offset < ends[message.partition] for message in sent)


def a_day_later(records: Sequence[CryptoPriceData]) -> list[CryptoPriceData]:
    """New snapshots of the same coins: the same keys, so the same partitions, fewer of them in
    each partition than before."""
    return [
        r.model_copy(update={"last_updated": r.last_updated + timedelta(days=1)}) for r in records
    ]


async def all_stored(dsn: str, count: int) -> int | None:
    rows = len(await stored(dsn, CryptoPriceData))
    return rows if rows == count else None


def assert_restarts_reported(worker: Worker, status: dict[str, Any], partitions: set[int]) -> None:
    """One warning per partition found on another log, as many as /health counts."""
    warned = [int(partition) for partition in RESTARTED.findall(worker.output)]
    assert sorted(warned) == sorted(set(warned)), worker.output
    assert set(warned) == partitions
    assert status["log_resets"] == len(partitions)
    assert status["duplicates_skipped"] == 0


async def test_a_topic_recreated_under_a_running_worker_is_stored_from_its_start(
    kafka: Kafka, workers: Callable[..., Worker], migrated: str, app_id: str
) -> None:
    worker = workers(migrated, {"SINK_LOG_CHECK_SECONDS": "2"})
    before = prices("before", 300)
    old_log = await kafka.send_records(before)
    await kafka.wait_committed(old_log, worker)

    config = next(config for config in topic_configs() if config.name == PRICES)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([PRICES])
        await admin.create_topics(
            [NewTopic(PRICES, config.partitions, 1, topic_configs=config.config)]
        )
    finally:
        await admin.close()
    after = a_day_later(before[:100])
    sent = await kafka.send_records(after)
    assert_below_stored(sent, old_log)

    await eventually(lambda: all_stored(migrated, len(before) + len(after)), worker, "new rows")
    assert_exactly(await stored(migrated, CryptoPriceData), before + after)
    status = await worker.sink_status(PRICES)
    assert_restarts_reported(worker, status, {message.partition for message in sent})
    assert await worker.terminate() == 0


async def test_a_worker_moved_to_a_new_broker_stores_the_new_brokers_records(
    kafka: Kafka,
    workers: Callable[..., Worker],
    migrated: str,
    app_id: str,
    bare_env: dict[str, str],
    tmp_path: Path,
) -> None:
    first = workers(migrated)
    old = prices("moving", 300)
    old_log = await kafka.send_records(old)
    await kafka.wait_committed(old_log, first)
    assert await first.terminate() == 0

    # The same database and consumer group, another broker (BROKER_URL changed).
    with EmbeddedBroker(log_path=tmp_path / "new-broker.log") as new_broker:
        other = Kafka(f"127.0.0.1:{new_broker.port}", app_id)
        await other.start()
        moved = Worker(bare_env, new_broker, migrated, app_id, tmp_path)
        try:
            new = a_day_later(old[:100])
            sent = await other.send_records(new)
            assert_below_stored(sent, old_log)
            await other.wait_committed(sent, moved)
            assert_exactly(await stored(migrated, CryptoPriceData), old + new)
            status = await moved.sink_status(PRICES)
            assert "cluster id" in moved.output
            assert_restarts_reported(moved, status, {message.partition for message in sent})
            assert await moved.terminate() == 0
        finally:
            moved.kill()
            await other.stop()
