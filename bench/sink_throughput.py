"""Sink throughput, worker peak RSS and scale-out, against two baselines measured in the same run.

    .venv/bin/python -m bench.sink_throughput [--rows 200000] [--naive-rows 20000]
                                              [--only bare,naive,worker,two-workers]

One embedded broker and one embedded PostgreSQL; `crypto-prices` is created with its generated 6
partitions and pre-filled with `--rows` snapshots of 100 coins (one minute apart per coin). Each
contender gets its own consumer group and a fresh database and is timed from the first row in
the table to the last by their commit timestamps, so start-up and group joining are excluded:

- bare:        baseline (a), `bench.bare_sink` (aiokafka + the app's decode and COPY-upsert);
- naive:       baseline (b), `bench.naive_agent`, one INSERT per event, timed on `--naive-rows`;
- worker:      ours, `faust -A app worker` exactly as deployed (sinks, live tables, views);
- two-workers: two `faust -A app worker` processes of one group, started together.

Peak RSS is sampled (psutil) every 50 ms over each worker process.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from app.embedded import create_generated_topics, free_port
from app.memory import GC_THRESHOLDS
from bench.common import (
    Process,
    Run,
    Stack,
    describe_machine,
    faust_worker,
    produce,
    running,
    snapshots,
    stack,
    table,
    watch_rows,
    worker_env,
)
from models.market import CryptoPriceData

CONTENDERS = ("bare", "naive", "worker", "two-workers")


async def bare(s: Stack, rows: int) -> Run:
    dsn = await s.database()
    env = worker_env(s, dsn, "bench-bare", free_port())
    thresholds = ",".join(map(str, GC_THRESHOLDS))
    env.update(BENCH_ROWS=str(rows), BENCH_BOOTSTRAP=s.bootstrap, BENCH_GC_THRESHOLDS=thresholds)
    process = Process([sys.executable, "-m", "bench.bare_sink"], env, s.directory / "bare.log")
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
                statuses.append((await process.health())["sink"][CryptoPriceData.topic.name])
        return run, statuses


async def main(rows: int, naive_rows: int, only: set[str]) -> None:
    print(describe_machine())
    with stack() as s:
        await create_generated_topics(s.bootstrap)
        records = snapshots(rows)
        seconds = await produce(s.bootstrap, records)
        print(f"pre-filled {rows} records in {seconds:.1f}s")
        del records
        results: dict[str, Run] = {}
        notes: dict[str, str] = {}
        if "bare" in only:
            results["bare"] = await bare(s, rows)
        if "naive" in only:
            results["naive"] = (await workers(s, "bench.naive_agent", naive_rows))[0]
        if "worker" in only:
            results["worker"], _ = await workers(s, "app", rows)
        if "two-workers" in only:
            results["two-workers"], statuses = await workers(s, "app", rows, count=2)
            notes["two-workers"] = " + ".join(
                f"{st['rows_written']:,} (partitions {','.join(map(str, st['partitions']))})"
                for st in statuses
            )
        print_results(results, notes)


def print_results(results: dict[str, Run], notes: dict[str, str]) -> None:
    bare, naive = results.get("bare"), results.get("naive")
    lines = []
    for name, run in results.items():
        lines.append(
            (
                name,
                f"{run.rows - run.rows_at_first:,}",
                f"{run.rate:,.0f}",
                f"{run.rate / bare.rate:.0%}" if bare else "-",
                f"{run.rate / naive.rate:.1f}x" if naive else "-",
                f"{run.peak_rss / 2**20:.0f}",
                notes.get(name, ""),
            )
        )
    print(
        table(
            (
                "contender",
                "rows timed",
                "rows/s",
                "of (a) bare",
                "x (b) naive",
                "peak RSS MiB",
                "rows (partitions) per worker",
            ),
            lines,
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--naive-rows", type=int, default=20_000)
    parser.add_argument("--only", default=",".join(CONTENDERS))
    args = parser.parse_args()
    asyncio.run(main(args.rows, min(args.naive_rows, args.rows), set(args.only.split(","))))
