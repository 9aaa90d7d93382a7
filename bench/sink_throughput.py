"""Sink throughput, worker peak RSS and scale-out, against two baselines measured in the same run.

    .venv/bin/python -m bench.sink_throughput [--rows 200000] [--naive-rows 20000]
                                              [--only bare,naive,worker,two-workers,public]
                                              [--rounds 1]

One embedded broker and one embedded PostgreSQL; `crypto-prices` is created with its generated 6
partitions and pre-filled with `--rows` snapshots of 100 coins (one minute apart per coin). Each
contender gets its own consumer group and a fresh database and is timed from the first row in
the table to the last by their commit timestamps, so start-up and group joining are excluded:

- bare:        baseline (a), `bench.bare_sink` (aiokafka + the app's decode and COPY-upsert);
- naive:       baseline (b), `bench.naive_agent`, one INSERT per event, timed on `--naive-rows`;
- worker:      ours, `faust -A app worker` exactly as deployed (sinks, live tables, views);
- two-workers: two `faust -A app worker` processes of one group, started together;
- public:      the public-route prototype, `faust -A bench.public_sink worker` (a plain aiokafka
               consumer seeking to the stored offsets, inside a Faust worker); not run by default.

Peak RSS is sampled (psutil) every 50 ms over each worker process. `--rounds N` runs the
contenders N times in turn (fresh database and group each time) and prints every round and the
medians, each ratio taken within its own round: on a shared 2-core VM single runs move by ±30 %.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from bench.common import (
    Run,
    Stack,
    arguments,
    bare_sink,
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
from testkit.records import snapshots

CONTENDERS = ("bare", "naive", "worker", "two-workers")  # the default; also: public

COLUMNS = (  # of the printed table
    "contender",
    "rows timed",
    "rows/s",
    "of (a) bare",
    "x (b) naive",
    "peak RSS MiB",
    "rows (partitions) per worker",
)


async def bare(s: Stack, rows: int) -> Run:
    dsn = await s.database()
    process = bare_sink(s, dsn, rows)
    async with running(process):
        return await watch_rows(dsn, rows, [process])


async def workers(
    s: Stack, module: str, rows: int, count: int = 1
) -> tuple[Run, list[dict[str, Any]]]:
    """`count` workers of one fresh group; their runs and their sinks' /health status."""
    dsn = await s.database()
    group = f"bench-{module.replace('.', '-')}-{count}-{time.monotonic_ns()}"
    processes = [faust_worker(s, module, dsn, group) for _ in range(count)]
    async with running(*processes):
        run = await watch_rows(dsn, rows, processes)
        statuses = []
        if module == "app":  # the naive agent serves no /health
            for process in processes:
                statuses.append((await process.health()).body["sink"][CryptoPriceData.topic.name])
        return run, statuses


async def main(rows: int, naive_rows: int, only: set[str], rounds: int) -> None:
    print(describe_machine())
    with stack() as s:
        await create_generated_topics(s.bootstrap)
        records = snapshots(rows)
        seconds = await produce(s.bootstrap, records)
        print(f"pre-filled {rows} records in {seconds:.1f}s")
        del records
        every_round: list[dict[str, Run]] = []
        notes: dict[str, str] = {}
        for number in range(1, rounds + 1):
            results: dict[str, Run] = {}
            if "bare" in only:
                results["bare"] = await bare(s, rows)
            if "naive" in only:
                results["naive"] = (await workers(s, "bench.naive_agent", naive_rows))[0]
            if "worker" in only:
                results["worker"], _ = await workers(s, "app", rows)
            if "public" in only:
                results["public"], _ = await workers(s, "bench.public_sink", rows)
            if "two-workers" in only:
                results["two-workers"], statuses = await workers(s, "app", rows, count=2)
                notes["two-workers"] = " + ".join(
                    f"{st['rows_written']:,} (partitions {','.join(map(str, st['partitions']))})"
                    for st in statuses
                )
            every_round.append(results)
            print(f"round {number}:")
            print_results([results], notes)
        if rounds > 1:
            print(f"median of {rounds} rounds (each ratio from its own round; range in brackets):")
            print_results(every_round, notes)


def print_results(rounds: list[dict[str, Run]], notes: dict[str, str]) -> None:
    """One row per contender; over several rounds, the medians and their ranges."""

    def shown(values: list[float], form: str) -> str:
        middle = format(statistics.median(values), form)
        if len(values) == 1:
            return middle
        return f"{middle} [{format(min(values), form)}-{format(max(values), form)}]"

    lines = []
    for name in rounds[0]:
        runs = [results[name] for results in rounds]
        of_bare = [r[name].rate / r["bare"].rate for r in rounds if "bare" in r]
        of_naive = [r[name].rate / r["naive"].rate for r in rounds if "naive" in r]
        lines.append(
            (
                name,
                f"{statistics.median(run.rows - run.rows_at_first for run in runs):,.0f}",
                shown([run.rate for run in runs], ",.0f"),
                shown(of_bare, ".0%") if of_bare else "-",
                shown(of_naive, ".1f") + "x" if of_naive else "-",
                f"{max(run.peak_rss for run in runs) / 2**20:.0f}",
                notes.get(name, ""),
            )
        )
    print(table(COLUMNS, lines))


if __name__ == "__main__":
    parser = arguments(__doc__)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--naive-rows", type=int, default=20_000)
    parser.add_argument("--only", default=",".join(CONTENDERS))
    parser.add_argument("--rounds", type=int, default=1, help="run every contender N times")
    args = parser.parse_args()
    only = set(args.only.split(","))
    asyncio.run(main(args.rows, min(args.naive_rows, args.rows), only, args.rounds))
