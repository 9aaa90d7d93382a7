"""Worker memory while tracking 1,000 coins: do the live tables stay bounded?

    .venv/bin/python -m bench.memory [--coins 1000] [--phases 3] [--near-now] [--cycle-seconds 0]

One `faust -A app worker` (as deployed). After each phase the script waits until every row is in
the database, then one table-cleanup interval (Faust's `table_cleanup_interval`, 30 s), and
samples the worker's RSS (psutil). Two schedules of event time (`last_updated`):

- default, dated from 2024 (`testkit.records.T0`): phase 1 is an hour of polling compressed (60
  cycles of `--coins` snapshots, one minute apart); every later phase is 60 more cycles one HOUR
  apart, 60 h of event time, far past the hourly range windows' 25 h expiry: if expired windows
  were kept, the range table would grow by 60 x coins keys per phase. Faust judges a window
  stale by the wall clock, so every window here is gone at the next cleanup: this schedule shows
  that nothing else grows, not what a day of windows holds.
- `--near-now`: the steady state of a deployment. Phase 1 is a day of tracking (25 cycles one
  hour apart, ending at the current hour: the range table's full 25 windows per coin, none
  stale); every later phase is an hour of polling (60 cycles one minute apart, continuing from
  there). Flat RSS from phase 2 on is the issue-18 target "flat over an hour of 1,000 coins".

A phase's cycles are produced at once (the worker takes them as a backlog, at full speed), or
with `--cycle-seconds S` each S seconds after the last, as tracking delivers them (compressed).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

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
from models.market import CryptoPriceData
from testkit.records import T0, coin_price

CLEANUP_WAIT = 35.0  # Faust's table_cleanup_interval (30 s) plus slack

COLUMNS = (  # of the printed table
    "phase",
    "snapshots so far",
    "event-time hours so far",
    "peak RSS MiB (phase)",
    "RSS MiB after cleanup",
)


def schedule(phase: int, start: datetime, near_now: bool) -> list[datetime]:
    """The event times of a phase's 60 (or, `near_now`'s first phase, 25) polling cycles."""
    if near_now and phase == 1:
        return [start + timedelta(hours=cycle) for cycle in range(25)]
    step = timedelta(minutes=1) if phase == 1 or near_now else timedelta(hours=1)
    return [start + step * cycle for cycle in range(60)]


async def produce_cycles(
    bootstrap: str, cycles: list[list[CryptoPriceData]], cycle_seconds: float
) -> None:
    """Produce the polling cycles, each `cycle_seconds` after the one before (all at once: 0)."""
    if not cycle_seconds:
        await produce(bootstrap, [record for cycle in cycles for record in cycle])
        return
    due = time.monotonic()
    for cycle in cycles:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        await produce(bootstrap, cycle)
        due += cycle_seconds


async def main(coins: int, phases: int, near_now: bool, cycle_seconds: float) -> None:
    print(describe_machine())
    with stack() as s:
        await create_generated_topics(s.bootstrap)
        dsn = await s.database()
        worker = faust_worker(s, "app", dsn, "bench-memory")
        rows = []
        async with running(worker):
            hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
            first = hour - timedelta(hours=24) if near_now else T0
            when, total = first, 0
            for phase in range(1, phases + 1):
                times = schedule(phase, when, near_now)
                cycles = [
                    [coin_price(c, total // coins + cycle, moment) for c in range(coins)]
                    for cycle, moment in enumerate(times)
                ]
                when = times[-1] + (times[-1] - times[-2])
                total += coins * len(cycles)
                watched = asyncio.ensure_future(watch_rows(dsn, total, [worker]))
                await produce_cycles(s.bootstrap, cycles, cycle_seconds)
                run = await watched
                await asyncio.sleep(CLEANUP_WAIT)
                event_hours = (when - first).total_seconds() / 3600
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
    parser.add_argument(
        "--near-now", action="store_true", help="a day of windows ending now, then hours of polling"
    )
    parser.add_argument(
        "--cycle-seconds",
        type=float,
        default=0.0,
        help="produce each polling cycle this long after the last (default: a phase at once)",
    )
    args = parser.parse_args()
    asyncio.run(main(args.coins, args.phases, args.near_now, args.cycle_seconds))
