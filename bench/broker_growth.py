"""The embedded broker alone: how its fetches slow down as a partition's stored batches pile up.

    .venv/bin/python -m bench.broker_growth [--windows 5]

No worker and no database: a bare aiokafka consumer (the worker's fetch wait) on `crypto-prices`
while records are produced as `bench.latency` produces them (10 every 10 ms, so a few records per
produced batch), timed produce -> fetched in consecutive 10 s windows, with the broker's CPU in
each. Then the same on a fresh broker whose topic was first filled with 50,000 records in large
batches: if that first window is as fast as an empty topic's, the cost grows with stored batches,
not records. Whatever these windows show, every end-to-end latency measured on this broker
inherits (docs/performance.md, section 3).
"""

from __future__ import annotations

import asyncio
import time

import psutil
from aiokafka import AIOKafkaProducer

from bench.common import (
    PRICES_TOPIC,
    arguments,
    describe_machine,
    percentile,
    produce,
    stack,
    stamped,
    table,
    timed_fetches,
)
from local.embedded import create_generated_topics
from testkit.records import snapshots

WINDOW = 10.0  # seconds
PREFILL = 50_000


async def windows(bootstrap: str, broker: psutil.Process, count: int) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    async with timed_fetches(bootstrap, "bench-broker-growth") as (kafka, latencies):
        sent = 0
        for number in range(1, count + 1):
            latencies.clear()
            cpu = broker.cpu_times()
            started = time.perf_counter()
            await send_window(kafka, sent)
            await asyncio.sleep(0.5)  # the window's last records arrive
            spent = broker.cpu_times()
            elapsed = time.perf_counter() - started
            sent += int(WINDOW * 1000)
            busy = (spent.user + spent.system - cpu.user - cpu.system) / elapsed
            rows.append(
                (
                    f"{number}",
                    f"{sent:,}",
                    f"{busy:.0%}",
                    f"{percentile(latencies, 0.5) * 1000:.1f}",
                    f"{percentile(latencies, 0.99) * 1000:.1f}",
                    f"{max(latencies) * 1000:.1f}",
                )
            )
    return rows


async def send_window(kafka: AIOKafkaProducer, sent: int) -> None:
    """10 records every 10 ms for one window, stamped with the wall-clock time of sending."""
    padding = b"x" * 300  # about the size of a price record
    start = time.perf_counter()
    for tick in range(int(WINDOW / 0.01)):
        await asyncio.sleep(max(0.0, start + tick * 0.01 - time.perf_counter()))
        for n in range(10):
            value = stamped(padding)
            await kafka.send(PRICES_TOPIC, key=str((sent + n) % 100).encode(), value=value)


async def main(count: int) -> None:
    print(describe_machine())
    headers = ("window", "produced in windows", "broker CPU", "p50 ms", "p99 ms", "max ms")
    for prefilled in (0, PREFILL):
        with stack() as s:
            await create_generated_topics(s.bootstrap)
            if prefilled:
                await produce(s.bootstrap, snapshots(prefilled))  # large batches
            assert s.broker.pid is not None
            rows = await windows(s.bootstrap, psutil.Process(s.broker.pid), count)
        print(f"\nproduce -> fetched, 1,000/s; topic pre-filled with {prefilled:,} records")
        print(table(headers, rows))


if __name__ == "__main__":
    parser = arguments(__doc__)
    parser.add_argument("--windows", type=int, default=5)
    asyncio.run(main(parser.parse_args().windows))
