"""What the end-to-end latency cannot go below on this machine: its two ingredients alone.

    .venv/bin/python -m bench.latency_floor [--count 300]

No worker. On the same embedded stack as `bench.latency`, at 10 per second (the quiet-stream
case, where every record is its own transaction):

- commit: one single-row INSERT transaction at a time into a fresh table; PostgreSQL returns from
  COMMIT once the WAL is flushed to disk (fsync), so this is the machine's durable-commit latency;
- fetch: a bare aiokafka consumer (same 50 ms fetch wait as the worker) on `crypto-prices` (6
  partitions), produce -> consume, timestamps from this process's clock.

`bench.latency` measures produce -> committed through the worker; whatever tail these two show,
the worker's numbers inherit (docs/performance.md, section 3).
"""

from __future__ import annotations

import asyncio
import time

import asyncpg

from bench.common import (
    PRICES_TOPIC,
    arguments,
    describe_machine,
    percentile,
    stack,
    stamped,
    table,
    timed_fetches,
)
from local.embedded import create_generated_topics

INTERVAL = 0.1  # seconds between records: 10 per second


async def commit_latencies(dsn: str, count: int) -> list[float]:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute("CREATE TABLE bench_commit (id int PRIMARY KEY)")
        latencies = []
        for n in range(count):
            started = time.perf_counter()
            async with connection.transaction():
                await connection.execute("INSERT INTO bench_commit VALUES ($1)", n)
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(INTERVAL)
        return latencies
    finally:
        await connection.close()


async def fetch_latencies(bootstrap: str, count: int) -> list[float]:
    async with timed_fetches(bootstrap, "bench-latency-floor") as (kafka, latencies):
        start = time.perf_counter()
        for n in range(count):
            await asyncio.sleep(max(0.0, start + n * INTERVAL - time.perf_counter()))
            await kafka.send(PRICES_TOPIC, key=str(n % 100).encode(), value=stamped())
        deadline = time.perf_counter() + 10
        while len(latencies) < count and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        return list(latencies)


def row(name: str, values: list[float]) -> tuple[str, ...]:
    return (
        name,
        f"{len(values)}",
        f"{percentile(values, 0.5) * 1000:.1f}",
        f"{percentile(values, 0.99) * 1000:.1f}",
        f"{max(values) * 1000:.1f}",
        f"{sum(value > 0.05 for value in values)}",
    )


async def main(count: int) -> None:
    print(describe_machine())
    with stack() as s:
        await create_generated_topics(s.bootstrap)
        commits = await commit_latencies(await s.database(), count)
        fetches = await fetch_latencies(s.bootstrap, count)
    print(
        table(
            ("path, 10/s", "samples", "p50 ms", "p99 ms", "max ms", "over 50 ms"),
            [row("PostgreSQL commit (fsync)", commits), row("produce -> fetch", fetches)],
        )
    )


if __name__ == "__main__":
    parser = arguments(__doc__)
    parser.add_argument("--count", type=int, default=300)
    asyncio.run(main(parser.parse_args().count))
