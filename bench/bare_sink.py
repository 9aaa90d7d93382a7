"""Baseline (a), the practical limit: no Faust, a bare aiokafka consumer and the same write.

Run by `bench.sink_throughput` and `bench.latency` as a subprocess (like the workers it is
compared with; `bench.common.bare_sink` starts it). Large fetches (`fetch_max_bytes`,
`max_partition_fetch_bytes`, `getmany(max_records=...)`), the app's own decode
(`models.codec.decode_record`: pydantic, Decimals exact) and the app's own write
(`store.writer.RecordWriter`: COPY into staging + INSERT ... ON CONFLICT DO NOTHING, each row
built as its record is decoded, as the sink builds it) in one transaction per fetched batch, with
the worker's garbage-collector thresholds (`app.memory`) and fetch wait
(BROKER_FETCH_MAX_WAIT_MS), passed as `BENCH_GC_THRESHOLDS` and `BENCH_FETCH_MAX_WAIT_MS` so that
nothing of Faust is imported. Stops after `BENCH_ROWS` messages, or when it is stopped.
"""

from __future__ import annotations

import asyncio
import gc
import os

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from models.codec import decode_record
from models.market import CryptoPriceData
from store.writer import RecordWriter


async def main() -> None:
    gc.set_threshold(*map(int, os.environ["BENCH_GC_THRESHOLDS"].split(",")))
    target = int(os.environ.get("BENCH_ROWS", "0")) or None  # None: until stopped
    topic = CryptoPriceData.topic.name
    group = os.environ.get("BENCH_GROUP")
    consumer = AIOKafkaConsumer(
        bootstrap_servers=os.environ["BENCH_BOOTSTRAP"],
        enable_auto_commit=False,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=16 * 1024 * 1024,
        fetch_max_wait_ms=int(os.environ["BENCH_FETCH_MAX_WAIT_MS"]),
        **(group_settings(group) if group else {}),
    )
    await consumer.start()
    writer = RecordWriter(CryptoPriceData)
    row_of = writer.row
    connection = await asyncpg.connect(os.environ["DATABASE_URL"])
    try:
        if group:
            consumer.subscribe([topic])
        else:
            partitions = range(CryptoPriceData.topic.partitions)
            consumer.assign([TopicPartition(topic, p) for p in partitions])
            await consumer.seek_to_beginning()
        seen = 0
        while target is None or seen < target:
            fetched = await consumer.getmany(timeout_ms=500, max_records=10_000)
            rows = [
                row_of(decode_record(CryptoPriceData, message.value))
                for messages in fetched.values()
                for message in messages
            ]
            if rows:
                async with connection.transaction():
                    await writer.insert_rows(connection, rows)
                seen += len(rows)
    finally:
        await connection.close()
        await consumer.stop()


def group_settings(group: str) -> dict[str, object]:
    """A member of `group` with the worker's timeouts, reading from the start."""
    return {
        "group_id": group,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": round(float(os.environ["BROKER_SESSION_TIMEOUT"]) * 1000),
        "heartbeat_interval_ms": round(float(os.environ["BROKER_HEARTBEAT_INTERVAL"]) * 1000),
    }


if __name__ == "__main__":
    asyncio.run(main())
