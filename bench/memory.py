"""Worker memory while tracking 1,000 coins: do the live tables stay bounded?

    .venv/bin/python -m bench.memory [--coins 1000] [--phases 3]

One `faust -A app worker` (as deployed). Phase 1 is an hour of polling compressed: 60 cycles of
`--coins` snapshots, one minute apart in event time (`last_updated`). Every later phase is 60 more
cycles one HOUR apart, i.e. 60 h of event time, far past the hourly range windows' 25 h expiry:
if expired windows were kept, the range table would grow by 60 x coins keys per phase. After
each phase the script waits until every row is in the database, then one table-cleanup interval
(Faust's `table_cleanup_interval`, 30 s), and samples the worker's RSS (psutil).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from bench.common import (
    arguments,
    describe_machine,
    faust_worker,
    produce,
    running,
    stack,
    table,
    watch_rows,
)
from local.embedded import create_generated_topics
from testkit.records import T0, coin_price

CLEANUP_WAIT = 35.0  # Faust's table_cleanup_interval (30 s) plus slack

COLUMNS = (  # of the printed table
    "phase",
    "snapshots so far",
    "event-time hours so far",
    "peak RSS MiB (phase)",
    "RSS MiB after cleanup",
)


async def main(coins: int, phases: int) -> None:
    print(describe_machine())
    with stack() as s:
        await create_generated_topics(s.bootstrap)
        dsn = await s.database()
        worker = faust_worker(s, "app", dsn, "bench-memory")
        rows = []
        async with running(worker):
            when, total = T0, 0
            for phase in range(1, phases + 1):
                step = timedelta(minutes=1) if phase == 1 else timedelta(hours=1)
                records = []
                for cycle in range(60):
                    records += [coin_price(c, total // coins + cycle, when) for c in range(coins)]
                    when += step
                await produce(s.bootstrap, records)
                total += len(records)
                run = await watch_rows(dsn, total, [worker])
                await asyncio.sleep(CLEANUP_WAIT)
                event_hours = (when - T0).total_seconds() / 3600
                rows.append(
                    (
                        phase,
                        f"{total:,}",
                        f"{event_hours:.0f}",
                        f"{run.peak_rss / 2**20:.0f}",
                        f"{worker.rss() / 2**20:.0f}",
                    )
                )
                print(rows[-1], flush=True)
        print(table(COLUMNS, rows))


if __name__ == "__main__":
    parser = arguments(__doc__)
    parser.add_argument("--coins", type=int, default=1000)
    parser.add_argument("--phases", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.coins, args.phases))
