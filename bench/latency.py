"""End-to-end latency, produce -> row committed in PostgreSQL, at steady rates, against a baseline.

    .venv/bin/python -m bench.latency [--seconds 20] [--only bare,worker]

Contenders, each on a fresh embedded broker and PostgreSQL of its own (the embedded broker's
fetches get slower as a partition's stored batches accumulate, so each contender must start from
the same empty broker; docs/performance.md, section 3):

- bare:   baseline (a) of `bench.sink_throughput`, `bench.bare_sink`: a bare aiokafka consumer
          with the worker's fetch wait, the app's decode and the app's write, one transaction per
          fetch: the latency of the same work without Faust;
- worker: one `faust -A app worker` (as deployed, live tables included).

Records are produced at a steady 1,000/s (10 every 10 ms) and 10/s (1 every 100 ms), on an
absolute schedule, each with `last_updated` = the wall-clock time at which it is handed to the
producer (microseconds; the key stays unique).

How commit time is observed: a statement-level AFTER INSERT trigger on `crypto_prices` (added by
this benchmark only, not by the schema) calls `pg_notify` with the inserted rows' `last_updated`.
PostgreSQL delivers a notification only when the transaction commits, so its arrival at this
process is "the row is committed and visible". Both timestamps come from this process's clock.
The method's own overhead is one trigger call and one notification per batch (both contenders
write one INSERT per batch), well under a millisecond; it is included in the numbers.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import asyncpg
from aiokafka import AIOKafkaProducer

from bench.common import (
    PRICES_TABLE,
    PRICES_TOPIC,
    Stack,
    arguments,
    bare_sink,
    describe_machine,
    faust_worker,
    percentile,
    producer,
    running,
    stack,
    table,
)
from local.embedded import create_generated_topics
from models.codec import encode_record
from testkit.records import coin_price
from testkit.workers import Process

CHANNEL = "bench_landed"
# Epoch microseconds of the inserted rows, in notifications of at most 400 values (the payload
# limit is 8,000 bytes).
TRIGGER = f"""
CREATE FUNCTION bench_notify_landed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE chunk text;
BEGIN
  FOR chunk IN
    SELECT string_agg((extract(epoch FROM last_updated) * 1000000)::bigint::text, ',')
    FROM (SELECT last_updated, (row_number() OVER ()) / 400 AS part FROM landed) AS numbered
    GROUP BY part
  LOOP
    PERFORM pg_notify('{CHANNEL}', chunk);
  END LOOP;
  RETURN NULL;
END $$;
CREATE TRIGGER bench_notify_landed AFTER INSERT ON {PRICES_TABLE}
  REFERENCING NEW TABLE AS landed FOR EACH STATEMENT EXECUTE FUNCTION bench_notify_landed();
"""  # noqa: S608 (constants only)


class Landed:
    """Latency of every row, from the notifications."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.since = time.time()  # rows produced earlier (by a previous phase) do not count

    def restart(self) -> None:
        self.latencies.clear()
        self.since = time.time()

    def on_notify(self, connection: object, pid: int, channel: str, payload: str) -> None:
        now = time.time()
        produced = (int(value) / 1e6 for value in payload.split(","))
        self.latencies += [now - at for at in produced if at >= self.since]


async def measure(s: Stack, contender: str, rate: int, seconds: float) -> dict[str, float]:
    dsn = await s.database()
    listener = await asyncpg.connect(dsn)
    await listener.execute(TRIGGER)
    landed = Landed()
    await listener.add_listener(CHANNEL, landed.on_notify)
    process: Process
    if contender == "worker":
        process = faust_worker(s, "app", dsn, f"bench-latency-{rate}")
    else:
        process = bare_sink(s, dsn)
    kafka = producer(s.bootstrap)
    await kafka.start()
    per_tick, tick = (10, 0.01) if rate >= 100 else (1, 1 / rate)
    sent = 0
    try:
        async with running(process):
            # Warm up until a fresh row made it through: the contender has joined, caught up with
            # the topic (it starts at the topic's beginning) and is fetching.
            landed.restart()
            while not landed.latencies:
                process.assert_alive()
                await send(kafka, 0, 0)
                await asyncio.sleep(0.5)
            await asyncio.sleep(1.0)
            landed.restart()
            start = time.perf_counter()
            ticks = int(seconds / tick)
            for n in range(ticks):
                await asyncio.sleep(max(0.0, start + n * tick - time.perf_counter()))
                for _ in range(per_tick):
                    await send(kafka, sent % 100, sent // 100 + 1)
                    sent += 1
            deadline = time.perf_counter() + 30
            while len(landed.latencies) < sent and time.perf_counter() < deadline:
                await asyncio.sleep(0.05)
            if len(landed.latencies) < sent:
                print(process.log_path.read_text(errors="replace")[-4000:])
    finally:
        await kafka.stop()
        await listener.close()
    values = landed.latencies
    return {
        "sent": sent,
        "landed": len(values),
        "p50": percentile(values, 0.5) * 1000,
        "p99": percentile(values, 0.99) * 1000,
        "max": max(values) * 1000,
    }


async def send(kafka: AIOKafkaProducer, coin: int, cycle: int) -> None:
    record = coin_price(coin, cycle, datetime.now(UTC))
    await kafka.send(PRICES_TOPIC, key=record.coin_id.encode(), value=encode_record(record))


async def main(seconds: float, contenders: list[str]) -> None:
    print(describe_machine())
    phases = ((1000, seconds), (10, max(seconds, 30.0)))  # (records per second, seconds)
    results: dict[tuple[str, int], dict[str, float]] = {}
    for contender in contenders:
        with stack() as s:
            await create_generated_topics(s.bootstrap)
            for rate, duration in phases:
                results[contender, rate] = await measure(s, contender, rate, duration)
    rows = []
    for rate, _ in phases:
        for contender in contenders:
            r = results[contender, rate]
            rows.append(
                (
                    f"{rate:,}/s",
                    contender,
                    f"{r['sent']:,}",
                    f"{r['landed']:,}",
                    f"{r['p50']:.1f}",
                    f"{r['p99']:.1f}",
                    f"{r['max']:.1f}",
                )
            )
    print(table(("rate", "contender", "sent", "committed", "p50 ms", "p99 ms", "max ms"), rows))
    if {"bare", "worker"} <= set(contenders):
        for rate, _ in phases:
            worker, bare = results["worker", rate], results["bare", rate]
            print(
                f"{rate:,}/s: the worker's p99 is {worker['p99'] - bare['p99']:+.1f} ms "
                f"({worker['p99'] / bare['p99']:.2f}x) the bare baseline's"
            )


if __name__ == "__main__":
    parser = arguments(__doc__)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--only", default="bare,worker", help="contenders, in order")
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.only.split(",")))
