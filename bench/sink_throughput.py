"""Sink throughput, CPU, peak RSS and scale-out, against a peer and two baselines of the same run.

    .venv/bin/python -m bench.sink_throughput [--rows 200000] [--naive-rows 20000]
                                              [--only bare,bare-group,quix,naive,worker,
                                                      two-workers,public]
                                              [--rounds 1] [--session-timeout S] [--near-now]

One embedded broker and one embedded PostgreSQL; `crypto-prices` is created with its generated 6
partitions and pre-filled with `--rows` snapshots of 100 coins (one minute apart per coin, from
2024-05-01). Each contender gets its own consumer group and a fresh database and is timed two ways
from the rows' commit timestamps: steady state, from the first row in the table to the last
(start-up and group joining excluded), and as a user waits for it, from spawning its process to the
last row (start-up, group join, table recovery and first fetch included); with the time to the first
row, the longest pause between two commits (Quix commits every 5 s: rows that miss its first
checkpoint wait for the next, and a run of this size can end on that wait or not), the process's CPU
time (user + system, all threads) when the last row is in, per row and as a multiple of bare's per
row in the same round; and how its main thread (the event loop)
spent the steady state, from `/proc` schedstat: running on a CPU, queued for one (runnable, on a
busy machine), or asleep (waiting on I/O, a lock or the GIL):

- bare:        baseline (a), `bench.bare_sink` (aiokafka + the app's decode and COPY-upsert);
- bare-group:  the same in a consumer group of its own, with the worker's session timeout: the
               broker's join hold and nothing else above (a), the limit of any group member;
- quix:        the peer, Quix Streams' `PostgreSQLSink` (`bench.quix_sink`, pinned in a venv of
               its own under .data/, made on first use from bench/quix-requirements.txt);
- naive:       baseline (b), `bench.naive_agent`, one INSERT per event, timed on `--naive-rows`;
- worker:      ours, `faust -A app worker` exactly as deployed (sinks, live tables, views);
- two-workers: two `faust -A app worker` processes of one group, started together;
- public:      the public-route prototype, `faust -A bench.public_sink worker` (a plain aiokafka
               consumer seeking to the stored offsets, inside a Faust worker); not run by default.

`--near-now` dates the snapshots so that the last one is now (a catch-up of the last
`rows / 100` minutes) instead of from 2024-05-01: the live tables' hourly ranges then do the work
of a recent backlog (snapshots older than the views' 24 hours open no window).

`--session-timeout S` gives every group member (all but bare, which takes its partitions without a
group) the session timeout S (heartbeats at S/4) instead of the 2 s of the tests and `faust -A app
up` (`EmbeddedBroker.GROUP_TIMEOUTS`): the embedded broker holds every group join for half of it
(at least 1 s), the largest part of their time to the first row.

Peak RSS is sampled (psutil) every 50 ms over each worker process. `--rounds N` runs the
contenders N times in turn (alternating; fresh database and group each time) and prints every
round and the medians, each ratio taken within its own round: on a shared 2-core VM single runs
move by ±30 %, and CPU seconds per row move far less than rows/s.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import (
    Run,
    Stack,
    arguments,
    backlog,
    bare_sink,
    compile_project,
    describe_machine,
    faust_worker,
    produce,
    running,
    stack,
    table,
    watch_rows,
)
from local.embedded import create_generated_topics, free_port
from models.dsl import quote_ident
from models.market import CryptoPriceData
from testkit.workers import Process, env_without_settings, worker_env

CONTENDERS = ("bare", "bare-group", "quix", "naive", "worker", "two-workers")  # also: public
QUIX_REQUIREMENTS = Path(__file__).with_name("quix-requirements.txt")
QUIX_VENV = Path(__file__).parent.parent / ".data" / "bench-quix-venv"

COLUMNS = (  # of the printed table
    "contender",
    "rows/s start→all",
    "of (a) bare",
    "of bare-group",
    "x quix",
    "rows/s after first row",
    "of (a) bare",
    "first row s",
    "longest pause s",
    "CPU s (µs/row)",
    "CPU/row of bare",
    "peak RSS MiB",
    "main thread run/queued/idle %",
    "x (b) naive",
    "rows (partitions) per worker",
)


async def bare(s: Stack, rows: int, timeouts: dict[str, str] | None = None) -> Run:
    """Baseline (a), without a group; with `timeouts`, in a fresh group that has them."""
    dsn = await s.database()
    group = None if timeouts is None else f"bench-bare-{time.monotonic_ns()}"
    started = time.time()
    # Until stopped: its CPU time is taken when the rows are in.
    process = bare_sink(s, dsn, group=group, timeouts=timeouts)
    async with running(process):
        return await watch_rows(dsn, rows, [process], started_at=started)


def quix_python() -> Path:
    """The interpreter of Quix's own venv, made (or brought up to the pinned requirements)."""
    python = QUIX_VENV / "bin" / "python"
    stamp = QUIX_VENV / "installed-requirements.txt"
    wanted = QUIX_REQUIREMENTS.read_text()
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(QUIX_VENV)], check=True)
    if not stamp.exists() or stamp.read_text() != wanted:
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, "-r", str(QUIX_REQUIREMENTS)], check=True)
        stamp.write_text(wanted)
    return python


async def quix(s: Stack, rows: int, timeouts: dict[str, str]) -> Run:
    """The peer: Quix Streams' PostgreSQLSink into a table of its own (`bench.quix_sink`)."""
    python = await asyncio.to_thread(quix_python)
    dsn = await s.database()
    group = f"bench-quix-{time.monotonic_ns()}"
    env = worker_env(
        env_without_settings(),
        s.broker,
        dsn,
        group,
        s.directory,
        free_port(),
        {
            "BENCH_BOOTSTRAP": s.bootstrap,
            "PYTHONPATH": str(Path(__file__).parent.parent),
            **timeouts,
        },
    )
    log_path = s.directory / f"quix-{time.monotonic_ns()}.log"
    started = time.time()
    process = Process([str(python), "-m", "bench.quix_sink"], env, log_path)
    async with running(process):
        table = quote_ident("quix_prices")
        await wait_for_table(dsn, process)
        return await watch_rows(dsn, rows, [process], table=table, started_at=started)


async def wait_for_table(dsn: str, process: Process) -> None:
    """Quix creates its table with its first batch: until then there is nothing to count."""
    connection = await asyncpg.connect(dsn)
    try:
        while not await connection.fetchval("SELECT to_regclass('quix_prices') IS NOT NULL"):
            process.assert_alive()
            await asyncio.sleep(0.05)
    finally:
        await connection.close()


async def workers(
    s: Stack, module: str, rows: int, timeouts: dict[str, str], count: int = 1
) -> tuple[Run, list[dict[str, Any]]]:
    """`count` workers of one fresh group; their runs and their sinks' /health status."""
    dsn = await s.database()
    group = f"bench-{module.replace('.', '-')}-{count}-{time.monotonic_ns()}"
    started = time.time()
    processes = [faust_worker(s, module, dsn, group, **timeouts) for _ in range(count)]
    async with running(*processes):
        run = await watch_rows(dsn, rows, processes, started_at=started)
        statuses = []
        if module == "app":  # the naive agent serves no /health
            for process in processes:
                statuses.append((await process.health()).body["sink"][CryptoPriceData.topic.name])
        return run, statuses


async def main(
    rows: int,
    naive_rows: int,
    only: set[str],
    rounds: int,
    session_timeout: float | None,
    near_now: bool,
) -> None:
    print(describe_machine())
    timeouts = {}
    if session_timeout is not None:
        timeouts = {
            "BROKER_SESSION_TIMEOUT": f"{session_timeout:g}",
            "BROKER_HEARTBEAT_INTERVAL": f"{session_timeout / 4:g}",
        }
    compile_project()
    with stack() as s:
        await create_generated_topics(s.bootstrap)
        records = backlog(rows, near_now)
        seconds = await produce(s.bootstrap, records)
        print(f"pre-filled {rows} records in {seconds:.1f}s")
        del records
        every_round: list[dict[str, Run]] = []
        notes: dict[str, str] = {}
        for number in range(1, rounds + 1):
            results: dict[str, Run] = {}
            if "bare" in only:
                results["bare"] = await bare(s, rows)
            if "bare-group" in only:
                results["bare-group"] = await bare(s, rows, timeouts)
            if "quix" in only:
                results["quix"] = await quix(s, rows, timeouts)
            if "naive" in only:
                results["naive"] = (await workers(s, "bench.naive_agent", naive_rows, timeouts))[0]
            if "worker" in only:
                results["worker"], _ = await workers(s, "app", rows, timeouts)
            if "public" in only:
                results["public"], _ = await workers(s, "bench.public_sink", rows, timeouts)
            if "two-workers" in only:
                results["two-workers"], statuses = await workers(s, "app", rows, timeouts, count=2)
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

    def ratio(name: str, to: str, rate: str, form: str, suffix: str = "") -> str:
        values = [getattr(r[name], rate) / getattr(r[to], rate) for r in rounds if to in r]
        return shown(values, form) + suffix if values else "-"

    lines = []
    for name in rounds[0]:
        runs = [results[name] for results in rounds]
        cpu = statistics.median(run.cpu_seconds for run in runs)
        per_row = statistics.median(run.cpu_per_row * 1e6 for run in runs)
        lines.append(
            (
                name,
                shown([run.rate_from_start for run in runs], ",.0f"),
                ratio(name, "bare", "rate_from_start", ".0%"),
                ratio(name, "bare-group", "rate_from_start", ".0%"),
                ratio(name, "quix", "rate_from_start", ".2f", "x"),
                shown([run.rate for run in runs], ",.0f"),
                ratio(name, "bare", "rate", ".0%"),
                shown([run.first_row_after for run in runs], ".1f"),
                shown([run.longest_pause for run in runs], ".1f"),
                f"{cpu:.1f} ({per_row:.1f})",
                ratio(name, "bare", "cpu_per_row", ".2f", "x"),
                f"{max(run.peak_rss for run in runs) / 2**20:.0f}",
                main_thread(runs),
                ratio(name, "naive", "rate", ".1f", "x"),
                notes.get(name, ""),
            )
        )
    print(table(COLUMNS, lines))


def main_thread(runs: list[Run]) -> str:
    """Medians of the main thread's shares of the steady state: running, waiting runnable for a
    CPU (a busy machine), and the rest, asleep (waiting on the database, the broker or the GIL).
    """
    shares = [run.main_thread for run in runs if run.main_thread is not None]
    if not shares:
        return "-"
    running = statistics.median(r for r, _ in shares) * 100
    queued = statistics.median(q for _, q in shares) * 100
    return f"{running:.0f}/{queued:.0f}/{100 - running - queued:.0f}"


if __name__ == "__main__":
    parser = arguments(__doc__)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--naive-rows", type=int, default=20_000)
    parser.add_argument("--only", default=",".join(CONTENDERS))
    parser.add_argument("--rounds", type=int, default=1, help="run every contender N times")
    parser.add_argument("--session-timeout", type=float, help="seconds, for the worker and Quix")
    parser.add_argument("--near-now", action="store_true", help="the last snapshot dated now")
    args = parser.parse_args()
    only = set(args.only.split(","))
    naive_rows = min(args.naive_rows, args.rows)
    asyncio.run(main(args.rows, naive_rows, only, args.rounds, args.session_timeout, args.near_now))
