"""What every benchmark needs: its own broker and PostgreSQL, timing of rows and fetches, and the
worker processes of `testkit` (shared with the tests) started the way the benchmarks start them.
A benchmark measures, it never asserts on what it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path

import asyncpg
import faust
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from app.memory import GC_THRESHOLDS
from app.settings import Settings, load_settings
from local.embedded import EmbeddedBroker, embedded_postgres, free_port
from models.codec import encode_record
from models.dsl import quote_ident
from models.market import CryptoPriceData
from testkit.databases import create_database
from testkit.records import snapshots
from testkit.workers import Process, Worker, env_without_settings, worker_env

PRICES_TOPIC = CryptoPriceData.topic.name
WORKER_FETCH_MAX_WAIT_MS = Settings.model_fields["broker_fetch_max_wait_ms"].default
PRICES_TABLE = quote_ident(CryptoPriceData.table.name)
T0 = datetime(2024, 5, 1, tzinfo=UTC)


@dataclass
class Stack:
    """A running embedded broker and PostgreSQL server, in one temporary directory."""

    directory: Path
    broker: EmbeddedBroker
    server_dsn: str

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.broker.port}"

    async def database(self) -> str:
        """A fresh database with the app's schema; its DSN."""
        return await create_database(self.server_dsn, "bench", migrated=True)


@contextlib.contextmanager
def stack() -> Iterator[Stack]:
    """A broker and a PostgreSQL server that records commit times (for `watch_rows`)."""
    with tempfile.TemporaryDirectory(prefix="qicore-bench-") as tmp:
        directory = Path(tmp)
        pgdata = directory / "postgres"
        with embedded_postgres(pgdata):  # initdb; the setting needs a restart
            pass
        with (pgdata / "postgresql.conf").open("a") as conf:
            conf.write("track_commit_timestamp = on\n")
        with (
            EmbeddedBroker(log_path=directory / "broker.log") as broker,
            embedded_postgres(pgdata) as server_dsn,
        ):
            yield Stack(directory, broker, server_dsn)


def producer(bootstrap: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=1024 * 1024, acks=1
    )


async def produce(bootstrap: str, records: Sequence[CryptoPriceData]) -> float:
    """Produce all records keyed by coin (as the poller does); seconds it took."""
    started = time.perf_counter()
    kafka = producer(bootstrap)
    await kafka.start()
    try:
        pending = [
            await kafka.send(PRICES_TOPIC, key=r.coin_id.encode(), value=encode_record(r))
            for r in records
        ]
        await asyncio.gather(*pending)
    finally:
        await kafka.stop()
    return time.perf_counter() - started


BACKLOG_COINS = 100


def backlog(rows: int, near_now: bool) -> list[CryptoPriceData]:
    """`rows` snapshots of BACKLOG_COINS coins, a minute apart per coin: from 2024-05-01, or
    (`near_now`) ending now, a recent backlog whose last 24 hours the live tables' ranges keep."""
    start = T0
    if near_now:
        start = datetime.now(UTC) - timedelta(minutes=rows // BACKLOG_COINS)
    return snapshots(rows, BACKLOG_COINS, start)


@dataclass
class Run:
    """When rows started and finished arriving (commit times), when the processes were started,
    their peak RSS and the CPU time they had used when the last row was in."""

    rows: int
    first_commit_at: float
    last_commit_at: float
    rows_at_first: int  # rows of the first transaction: they arrived at the start of the timing
    peak_rss: int = 0
    started_at: float = float("nan")  # wall-clock time just before the processes were spawned
    cpu_seconds: float = float("nan")  # the processes' user + system time, start to last row
    # From the first row seen to the last: the share of the wall time the processes' main threads
    # (their event loops) ran on a CPU, and waited runnable for one (mean over the processes);
    # the rest they slept, waiting on I/O, a lock or the GIL. None: not measured.
    main_thread: tuple[float, float] | None = None
    # The longest time between two commits after the first: a stall (Quix's next 5 s checkpoint,
    # a rebalance) shows here; 0 with a single commit.
    longest_pause: float = float("nan")

    @property
    def rate(self) -> float:
        """Rows per second from the first committed row to the last: start-up is excluded
        (NaN when every row came with the first transaction: there is no rate to tell)."""
        if self.rows == self.rows_at_first:
            return float("nan")
        return (self.rows - self.rows_at_first) / max(
            self.last_commit_at - self.first_commit_at, 1e-9
        )

    @property
    def rate_from_start(self) -> float:
        """Rows per second from spawning the processes to the last row: what a user waits for
        (start-up, group join, table recovery and the first fetch included)."""
        return self.rows / max(self.last_commit_at - self.started_at, 1e-9)

    @property
    def first_row_after(self) -> float:
        """Seconds from spawning the processes to the first committed row."""
        return self.first_commit_at - self.started_at

    @property
    def cpu_per_row(self) -> float:
        """CPU seconds (user + system, all processes) per stored row, start-up included."""
        return self.cpu_seconds / self.rows


@dataclass(frozen=True)
class ThreadTime:
    """Nanoseconds a thread has run on a CPU and waited, runnable, for one (`/proc` schedstat):
    on a shared machine the second tells waiting for a CPU from waiting for I/O."""

    running: int
    queued: int
    at: float  # time.perf_counter() when read


def main_thread_time(pid: int) -> ThreadTime | None:
    """The process's main thread's `ThreadTime`; None if the process is gone (or not Linux)."""
    try:
        running, queued, _ = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    except (OSError, ValueError):
        return None
    return ThreadTime(int(running), int(queued), time.perf_counter())


def thread_shares(
    since: Sequence[ThreadTime | None], until: Sequence[ThreadTime | None]
) -> tuple[float, float] | None:
    """Mean shares of the wall time between two readings spent running and queued for a CPU."""
    shares = [
        ((b.running - a.running) / wall, (b.queued - a.queued) / wall)
        for a, b in zip(since, until, strict=True)
        if a is not None and b is not None and (wall := (b.at - a.at) * 1e9) > 0
    ]
    if not shares:
        return None
    return statistics.mean(r for r, _ in shares), statistics.mean(q for _, q in shares)


def commit_times(table: str) -> str:
    """Every row's commit time, from `track_commit_timestamp` (stack() turns it on), and the
    longest time between two commits after the first."""
    return f"""
        WITH rows AS (SELECT pg_xact_commit_timestamp(xmin) AS at FROM {table}),
             pauses AS (SELECT at - lag(at) OVER (ORDER BY at) AS pause
                        FROM (SELECT DISTINCT at FROM rows) AS commits)
        SELECT count(*) AS rows,
               extract(epoch FROM min(at)) AS first,
               extract(epoch FROM max(at)) AS last,
               count(*) FILTER (WHERE at = (SELECT min(at) FROM rows)) AS at_first,
               (SELECT coalesce(extract(epoch FROM max(pause)), 0) FROM pauses) AS longest_pause
        FROM rows
    """  # noqa: S608


async def watch_rows(
    dsn: str,
    target: int,
    processes: Sequence[Process],
    timeout: float = 900.0,
    *,
    table: str = PRICES_TABLE,
    started_at: float = float("nan"),
) -> Run:
    """Wait until `target` rows are in `table` (quoted), sampling RSS every 50 ms; time the rows
    by their commit timestamps, and take the processes' CPU time once they are all in, and their
    main threads' `ThreadTime` from the first count that sees rows to the last. Polling COUNT(*)
    often enough to time the run would itself load the database (~20 ms of a core per count at
    200k rows): it is only polled every half second."""
    connection = await asyncpg.connect(dsn)
    peak = 0
    since: list[ThreadTime | None] | None = None
    deadline = time.perf_counter() + timeout
    try:
        while True:
            for _ in range(10):  # a baseline script exits when done: count at once
                if any(process.popen.poll() is not None for process in processes):
                    break
                peak = max([peak, *(process.rss() for process in processes)])
                await asyncio.sleep(0.05)
            count = await connection.fetchval(f"SELECT count(*) FROM {table}")  # noqa: S608
            if count >= target:
                cpu = sum(process.cpu_seconds() for process in processes)
                until = [main_thread_time(process.popen.pid) for process in processes]
                times = await connection.fetchrow(commit_times(table))
                first, last = float(times["first"]), float(times["last"])
                run = Run(times["rows"], first, last, times["at_first"], peak, started_at, cpu)
                run.main_thread = thread_shares(since, until) if since else None
                run.longest_pause = float(times["longest_pause"])
                return run
            if since is None and count:
                since = [main_thread_time(process.popen.pid) for process in processes]
            for process in processes:
                process.assert_alive()  # exited before every row was in
            if time.perf_counter() > deadline:
                raise TimeoutError(f"only {count} of {target} rows after {timeout:.0f}s")
    finally:
        await connection.close()


def bare_sink(
    stack: Stack,
    dsn: str,
    rows: int | None = None,
    group: str | None = None,
    timeouts: Mapping[str, str] | None = None,
) -> Process:
    """Baseline (a), `bench.bare_sink`: everything the worker does to a record but Faust, with the
    worker's garbage-collector thresholds and fetch wait; stops after `rows` (None: when stopped).
    With a `group`, it joins that consumer group instead of taking every partition itself, with
    the worker's session timeout and heartbeat or `timeouts` (BROKER_SESSION_TIMEOUT, ...).
    """
    extra = {
        **(timeouts or {}),
        "BENCH_BOOTSTRAP": stack.bootstrap,
        "BENCH_GC_THRESHOLDS": ",".join(map(str, GC_THRESHOLDS)),
        "BENCH_FETCH_MAX_WAIT_MS": str(WORKER_FETCH_MAX_WAIT_MS),
    }
    if rows is not None:
        extra["BENCH_ROWS"] = str(rows)
    if group is not None:
        extra["BENCH_GROUP"] = group
    base = env_without_settings()
    env = worker_env(base, stack.broker, dsn, "bench-bare", stack.directory, free_port(), extra)
    log_path = stack.directory / f"bare-{time.monotonic_ns()}.log"
    return Process([sys.executable, "-m", "bench.bare_sink"], env, log_path)


def faust_worker(stack: Stack, module: str, dsn: str, app_id: str, **extra: str) -> Worker:
    """`faust -A <module> worker -l info`, as the Procfile starts it."""
    base = env_without_settings()
    return Worker(base, stack.broker, dsn, app_id, stack.directory, extra, module)


@contextlib.asynccontextmanager
async def running(*processes: Process) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for process in processes:
            await asyncio.to_thread(process.close)


def stamped(padding: bytes = b"") -> bytes:
    """A message value that starts with the wall-clock time it is made (for `timed_fetches`)."""
    return f"{time.time()} ".encode() + padding


@contextlib.asynccontextmanager
async def timed_fetches(
    bootstrap: str, group_id: str
) -> AsyncIterator[tuple[AIOKafkaProducer, list[float]]]:
    """A started producer, and the list to which a bare aiokafka consumer of `crypto-prices` (the
    worker's fetch wait, from the end) appends produce -> fetched seconds for every `stamped`
    message; ready once the consumer is past its group join and first fetches."""
    consumer = AIOKafkaConsumer(
        PRICES_TOPIC,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        auto_offset_reset="latest",
        fetch_max_wait_ms=WORKER_FETCH_MAX_WAIT_MS,
    )
    kafka = producer(bootstrap)
    await kafka.start()
    await consumer.start()
    latencies: list[float] = []

    async def consume() -> None:
        async for message in consumer:
            stamp = (message.value or b"").split(b" ")[0]
            # The broker's wrong "latest" offset can start a new group inside older records.
            if stamp.replace(b".", b"").isdigit():
                latencies.append(time.time() - float(stamp))

    consuming = asyncio.ensure_future(consume())
    try:
        while not consumer.assignment():
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        yield kafka, latencies
    finally:
        consuming.cancel()
        await consumer.stop()
        await kafka.stop()


def arguments(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's command line, described by the first line of its module docstring."""
    return argparse.ArgumentParser(description=(doc or "").split("\n")[0])


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def compile_project() -> None:
    """Bytecode for the project's own modules, as an installed deployment has it (pip compiles
    what it installs). This environment sets PYTHONDONTWRITEBYTECODE, so without it every
    contender's start compiled them from source (~65 ms of a worker's CPU); Python still reads
    bytecode that exists, and ignores it once its source changes."""
    root = Path(__file__).resolve().parent.parent
    for package in sorted(root.glob("*/__init__.py")):
        if package.parent.name != "tests":
            compileall.compile_dir(package.parent, quiet=1)


def describe_machine() -> str:
    memory = psutil.virtual_memory().total / 2**30
    versions = ", ".join(
        f"{name} {metadata.version(name)}"
        for name in ("faust-streaming", "aiokafka", "asyncpg", "pydantic", "pydantic_core")
    )
    return (
        f"{platform.platform()}; {os.cpu_count()} CPUs; {memory:.1f} GiB; "
        f"Python {platform.python_version()}; {versions}"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, ready to paste into docs/performance.md."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def plain_app() -> tuple[faust.App, Settings]:
    """A plain Faust app (Faust's own consumer) for the benchmark's own workers
    (`faust -A bench.<module> worker`), from the environment `faust_worker` gives them."""
    settings = load_settings()
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)  # Faust makes only the last level
    app = faust.App(
        settings.app_id,
        broker=settings.broker_url,
        store="memory://",
        autodiscover=False,
        datadir=str(Path(settings.data_dir) / "faust"),  # not `<app id>-data` in the cwd
        topic_partitions=CryptoPriceData.topic.partitions,
        broker_session_timeout=settings.broker_session_timeout,
        broker_heartbeat_interval=settings.broker_heartbeat_interval,
        web_port=settings.web_listen_port,
    )
    return app, settings
