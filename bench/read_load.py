"""Read load: the web views' req/s and latency under wrk, and the sink's throughput meanwhile.

    apt-get install -y wrk        # Debian/Ubuntu (macOS: brew install wrk); a C load generator:
                                  # one in Python would take the CPU it measures on 2 cores
    .venv/bin/python -m bench.read_load [--seconds 20] [--connections 50] [--rounds 1]
                                        [--backlog 60000] [--only latest,all,history,candles]
                                        [--code DIR[,DIR...]] [--identity]
                                        [--modes combined,split,split-nice,split-idle]

One embedded broker and PostgreSQL; the fake CoinGecko (`coingecko/fake_server.py`) serves 1,000
coins, moving every `POLL_SECONDS`, and `faust -A app worker` polls it (TOP_N=1000) and sinks the
polls, as an offline run does. Before the worker starts, bitcoin gets two days of minute
snapshots up to now, so history and candles have rows to read. Each endpoint is loaded by
`wrk -c <connections> --latency` for `--seconds`:

- latest:  /prices/bitcoin (latest price and 24 h range of one coin);
- all:     /prices (every coin: 1,000 of them);
- history: /prices/bitcoin/history?limit=1000;
- candles: /prices/bitcoin/candles?interval=5m over the last day (skipped where not served);
- stream:  (only when asked for with --only) one client of the push feed /stream/prices held
           open instead of wrk: its cost to the sink (the feed reads the new rows of the keys
           each commit stored); its req/s columns are the events it received.

wrk asks for gzip (`Accept-Encoding: gzip`) as browsers and HTTP libraries do; `--identity`
asks for uncompressed answers.

Each endpoint is loaded twice. First with the worker sinking only the polls (1,000 snapshots
every POLL_SECONDS, as an offline run): req/s, p50 and p99. Then again while the sink stores a
backlog as fast as it can: the sink's throughput under that load, against its throughput
measured right before without load (the ratio is taken within the pair, measured a minute
apart), and the views' req/s and p99 meanwhile. A backlog is `--backlog` snapshots of 100 of the
coins in a day of its own long ago (so the latest prices do not move), timed from its first
committed row to its last by their commit timestamps. Answers other than 200 and socket errors
are counted in the errors column.

`--code DIR,DIR` runs the worker from each source tree in turn (e.g. an export of `main`:
`git archive main | tar -x -C /tmp/base`), alternating per round, on the same broker, database
and consumer group: a before/after comparison within one run on a machine whose speed moves.
`--modes` does the same for deployments (`start`): the views served by the sinking worker, or
by a web-only process of their own beside it (the README's advice for read-heavy use).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import psutil
from aiokafka import AIOKafkaProducer

from bench.common import (
    PRICES_TABLE,
    PRICES_TOPIC,
    Run,
    Stack,
    arguments,
    describe_machine,
    faust_worker,
    producer,
    stack,
    table,
)
from coingecko.fake_server import fake_coingecko_in_thread
from local.embedded import create_generated_topics
from models.codec import encode_record
from testkit.records import T0, coin_price, price
from testkit.workers import Worker, eventually

COINS = 1000  # tracked coins: the fixture's 7 and 993 synthetic ones
POLL_SECONDS = 10
BACKLOG_COINS = 100
HISTORY_DAYS = 2
READY_TIMEOUT = 180.0
HISTORY = "/prices/bitcoin/history?limit=1000"
ENDPOINTS = ("latest", "all", "history", "candles")  # by default; and "stream"
COLUMNS = (
    "code",
    "endpoint",
    "req/s",
    "p50 ms",
    "p99 ms",
    "errors",
    "req/s, p99 ms during a backlog",
    "sink rows/s unloaded",
    "sink rows/s loaded",
    "sink loaded/unloaded",
)


@dataclass
class Load:
    """What wrk reported for one endpoint."""

    rate: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # non-2xx answers and socket errors


def paths(now: datetime) -> dict[str, str]:
    day_ago = (now - timedelta(days=1)).replace(second=0, microsecond=0)
    since, until = day_ago.strftime("%Y-%m-%dT%H:%M:%SZ"), now.strftime("%Y-%m-%dT%H:%M:00Z")
    return {
        "latest": "/prices/bitcoin",
        "all": "/prices",
        "history": HISTORY,
        "candles": f"/prices/bitcoin/candles?interval=5m&since={since}&until={until}",
        "stream": "/stream/prices",
    }


UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([a-z]+)", text).groups()  # type: ignore[union-attr]
    return float(number) * UNIT_MS[unit]


def parse_wrk(output: str) -> Load:
    """req/s, p50/p99 and failures from `wrk --latency` output."""
    percentile = dict(re.findall(r"^ +(50|99)% +(\S+) *$", output, re.MULTILINE))
    requests = re.search(r"^\s+([0-9]+) requests in", output, re.MULTILINE)
    non_2xx = re.search(r"Non-2xx or 3xx responses: ([0-9]+)", output)
    sockets = re.search(r"Socket errors: (.*)$", output, re.MULTILINE)
    rate = re.search(r"Requests/sec:\s+([0-9.]+)", output)
    if rate is None or requests is None or len(percentile) != 2:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    socket_errors = sum(map(int, re.findall(r"[0-9]+", sockets[1]))) if sockets else 0
    return Load(
        rate=float(rate[1]),
        p50_ms=_ms(percentile["50"]),
        p99_ms=_ms(percentile["99"]),
        requests=int(requests[1]),
        errors=(int(non_2xx[1]) if non_2xx else 0) + socket_errors,
    )


async def wrk(url: str, connections: int, seconds: int, gzip: bool, demoted: list[str]) -> Load:
    """One wrk thread (it keeps up with 50 connections, and leaves more of the two cores to the
    worker), a 10 s timeout so that slow answers count in the p99; started by `demoted`."""
    command = [
        *demoted,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "--latency",
    ]
    if gzip:  # as browsers and HTTP libraries (httpx, requests, curl --compressed) ask
        command += ["-H", "Accept-Encoding: gzip"]
    process = await asyncio.create_subprocess_exec(
        *command, url, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output, _ = await process.communicate()
    return parse_wrk(output.decode())


async def sse(url: str, connections: int, seconds: int, gzip: bool, demoted: list[str]) -> Load:
    """One push-feed client for `seconds` (curl, so that the bench's own event loop does not
    parse events on the cores it measures): the events it got, as req/s and requests."""
    process = await asyncio.create_subprocess_exec(
        *(*demoted, "curl", "-sN", "--max-time", str(seconds), url),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    output, _ = await process.communicate()
    events = sum(line.startswith(b"data:") for line in output.splitlines())
    return Load(events / seconds, 0.0, 0.0, events, 0)


def backlog(number: int, rows: int) -> tuple[datetime, list[bytes]]:
    """The start of backlog `number`'s own day, and its encoded snapshots of coins 1..100."""
    start = T0 + timedelta(days=number)
    records = [
        coin_price(
            i % BACKLOG_COINS + 1, i // BACKLOG_COINS, start + timedelta(minutes=i // BACKLOG_COINS)
        )
        for i in range(rows)
    ]
    assert rows // BACKLOG_COINS < 24 * 60, "a backlog must fit in its day"
    return start, [encode_record(record) for record in records]


BACKLOG_TIMES = f"""
    WITH rows AS (
        SELECT pg_xact_commit_timestamp(xmin) AS at FROM {PRICES_TABLE}
        WHERE last_updated >= $1 AND last_updated < $1 + interval '1 day'
    )
    SELECT count(*) AS rows,
           extract(epoch FROM min(at)) AS first,
           extract(epoch FROM max(at)) AS last,
           count(*) FILTER (WHERE at = (SELECT min(at) FROM rows)) AS at_first
    FROM rows
"""  # noqa: S608


class Sinking:
    """Produces numbered backlogs and times how fast the worker stores them."""

    def __init__(self, kafka: AIOKafkaProducer, dsn: str, rows: int) -> None:
        self.kafka, self.dsn, self.rows = kafka, dsn, rows
        self.number = 0

    async def measure(self, worker: Worker, timeout: float = 300.0) -> Run:
        self.number += 1
        start, values = await asyncio.to_thread(backlog, self.number, self.rows)
        producing = time.monotonic()
        for i, value in enumerate(values):
            key = f"coin-{i % BACKLOG_COINS + 1:04d}".encode()
            await self.kafka.send(PRICES_TOPIC, key=key, value=value)
        await self.kafka.flush()
        produced = time.monotonic() - producing
        connection = await asyncpg.connect(self.dsn)
        deadline = time.monotonic() + timeout
        try:
            while True:
                await asyncio.sleep(0.5)
                times = await connection.fetchrow(BACKLOG_TIMES, start)
                if times["rows"] >= self.rows:
                    first, last = float(times["first"]), float(times["last"])
                    if produced > 0.8 * (last - first):
                        print(
                            f"  backlog {self.number}: producing it took {produced:.1f}s of "
                            f"the sink's {last - first:.1f}s: the producer may have set the pace"
                        )
                    return Run(times["rows"], first, last, times["at_first"])
                worker.assert_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"backlog {self.number}: {times['rows']} rows stored")
        finally:
            await connection.close()


async def bitcoin_history(kafka: AIOKafkaProducer, now: datetime) -> None:
    """Two days of minute snapshots of bitcoin up to `now`, produced before the worker starts."""
    minutes = HISTORY_DAYS * 24 * 60
    for minute in range(minutes, 0, -1):
        at = now.replace(second=0, microsecond=0) - timedelta(minutes=minute)
        usd = f"{60000 + (minute * 7919) % 2000}.{minute % 100:02d}"
        await kafka.send(
            PRICES_TOPIC, key=b"bitcoin", value=encode_record(price("bitcoin", usd, at))
        )
    await kafka.flush()


async def ready(worker: Worker, urls: dict[str, str], sink: Worker) -> dict[str, str]:
    """Wait until the worker serves every coin and bitcoin's history (which `sink` stores); the
    endpoints it serves."""

    seen: dict[str, object] = {}

    async def check() -> bool | None:
        sink.assert_alive()
        async with httpx.AsyncClient(timeout=10) as client:
            try:
                seen["coins"] = (await client.get(f"{worker.url}/prices")).json().get("count")
                seen["history"] = (await client.get(worker.url + HISTORY)).json().get("count")
            except (httpx.HTTPError, ValueError):
                return None
        # One fixture coin has no price (CoinGecko sends such coins): it is never stored.
        return (seen["coins"] == COINS - 1 and seen["history"] == 1000) or None

    try:
        await eventually(check, worker, "every coin and bitcoin's history", READY_TIMEOUT)
    except AssertionError:
        raise TimeoutError(f"the worker serves {seen} after {READY_TIMEOUT:.0f}s") from None
    served = {}
    async with httpx.AsyncClient(timeout=10) as client:
        for name, path in urls.items():
            async with client.stream("GET", worker.url + path) as answer:  # the feed never ends
                pass
            if answer.status_code == 200:
                served[name] = path
            else:
                print(f"  {name}: {path} answers {answer.status_code}; skipped")
    return served


async def settled(workers: list[Worker], busy: float = 40.0, timeout: float = 60.0) -> None:
    """Wait until each worker uses under `busy` % of a core for a second: requests a load left
    queued (aiohttp finishes them after wrk has gone) must not count as "unloaded"."""
    measured = [psutil.Process(worker.popen.pid) for worker in workers]
    deadline = time.monotonic() + timeout

    async def busiest() -> float:
        for process in measured:
            process.cpu_percent()
        await asyncio.sleep(1.0)
        return max(process.cpu_percent() for process in measured)

    while await busiest() >= busy:
        if time.monotonic() > deadline:
            print(f"  the worker stayed busy for {timeout:.0f}s; measuring anyway")
            return


def in_directory(code: Path | None) -> contextlib.AbstractContextManager[object]:
    """Start the worker from `code` (cwd: `python -m` puts it first on sys.path, ahead of the
    editable install's finder); None is this checkout."""
    return contextlib.chdir(code) if code is not None else contextlib.nullcontext()


MODES = ("combined", "split", "split-nice", "split-idle")
NICE = 10
# How the load generator is started in each mode: as the web process is scheduled.
DEMOTED = {"split-nice": ["nice", "-n", str(NICE)], "split-idle": ["chrt", "--idle", "0"]}


def start(s: Stack, dsn: str, code: Path | None, coingecko: str, mode: str) -> list[Worker]:
    """The worker processes of `mode`, the one serving the views first.

    combined:   one `faust -A app worker` polls, sinks and serves (Procfile's `web`);
    split:      a web-only process (SINK_TOPICS=none POLLER_ENABLED=false, Procfile.topics'
                `web`) serves the views from the database, and a process with WEB_ENABLED=false
                polls and sinks (Procfile's `worker`), in the same consumer group as combined;
    split-nice: split, with the web process at nice 10 (and the load generator: it stands for
                clients on other machines), so that on a machine with fewer cores than busy
                processes the scheduler gives the sink, PostgreSQL and the broker the CPU first;
    split-idle: split, with the web process and the load generator in the SCHED_IDLE class
                (Linux: they run only when no other process wants a core).
    """
    poll = {
        "COINGECKO_BASE_URL": coingecko,
        "COINGECKO_CALLS_PER_MINUTE": "600",
        "TOP_N": str(COINS),
        "PRICE_POLL_SECONDS": str(POLL_SECONDS),
    }
    with in_directory(code):
        if mode == "combined":
            return [faust_worker(s, "app", dsn, "bench-read-load", **poll)]
        sink = faust_worker(s, "app", dsn, "bench-read-load", WEB_ENABLED="false", **poll)
        web = faust_worker(
            s,
            "app",
            dsn,
            "bench-read-load",
            SINK_TOPICS="none",
            POLLER_ENABLED="false",
            TOP_N=str(COINS),
        )
    if mode == "split-nice":
        psutil.Process(web.popen.pid).nice(NICE)
    if mode == "split-idle":  # its threads made later inherit the class from the main thread
        os.sched_setscheduler(web.popen.pid, os.SCHED_IDLE, os.sched_param(0))
    return [web, sink]


async def one_worker(
    s: Stack,
    dsn: str,
    code: Path | None,
    mode: str,
    coingecko: str,
    sinking: Sinking,
    urls: dict[str, str],
    only: list[str],
    connections: int,
    seconds: int,
    gzip: bool,
) -> list[tuple[object, ...]]:
    """Start the worker(s) of `mode`, load each endpoint in turn (the sink timed unloaded, then
    loaded)."""
    workers = start(s, dsn, code, coingecko, mode)
    web, sink = workers[0], workers[-1]
    name = code.name if code is not None else "this checkout"
    if mode != "combined":
        name = f"{name}, {mode}"
    rows: list[tuple[object, ...]] = []
    try:
        served = await ready(web, {key: urls[key] for key in only}, sink)
        for endpoint, path in served.items():
            await settled(workers)
            unloaded = await sinking.measure(sink)
            await settled(workers)
            load_with = sse if endpoint == "stream" else wrk
            url, demoted = web.url + path, DEMOTED.get(mode, [])
            load = await load_with(url, connections, seconds, gzip, demoted)  # polls sinking
            loading = asyncio.ensure_future(load_with(url, connections, seconds, gzip, demoted))
            await asyncio.sleep(2)  # wrk's connections open and warm up
            loaded = await sinking.measure(sink)
            during = await loading
            errors = load.errors + during.errors
            rows.append(
                (
                    name,
                    endpoint,
                    f"{load.rate:,.0f}",
                    f"{load.p50_ms:.1f}",
                    f"{load.p99_ms:.1f}",
                    f"{errors:,} of {load.requests + during.requests:,}" if errors else "0",
                    f"{during.rate:,.0f}, {during.p99_ms:.1f}",
                    f"{unloaded.rate:,.0f}",
                    f"{loaded.rate:,.0f}",
                    f"{loaded.rate / unloaded.rate:.0%}",
                )
            )
            print(table(COLUMNS, rows[-1:]).split("\n")[-1], flush=True)
    finally:
        for worker in workers:
            await asyncio.to_thread(worker.close)
    return rows


async def main(
    codes: list[Path | None],
    modes: list[str],
    rounds: int,
    only: list[str],
    connections: int,
    seconds: int,
    rows: int,
    gzip: bool,
) -> None:
    print(describe_machine())
    accept = "Accept-Encoding: gzip" if gzip else "no Accept-Encoding"
    print(f"load: wrk -t1 -c{connections} -d{seconds}s, {accept}; sink backlogs of {rows:,} rows")
    now = datetime.now(UTC)
    urls = paths(now)
    with (
        stack() as s,
        fake_coingecko_in_thread(tick=POLL_SECONDS, extra_coins=COINS - 7) as coingecko,
    ):
        await create_generated_topics(s.bootstrap)
        dsn = await s.database()
        kafka = producer(s.bootstrap)
        await kafka.start()
        try:
            await bitcoin_history(kafka, now)
            sinking = Sinking(kafka, dsn, rows)
            every: list[tuple[object, ...]] = []
            for number in range(1, rounds + 1):
                for code, mode in [(code, mode) for code in codes for mode in modes]:
                    source = code or "this checkout"
                    print(f"round {number}, {mode}, worker from {source}:", flush=True)
                    print(table(COLUMNS, []), flush=True)
                    every += await one_worker(
                        s,
                        dsn,
                        code,
                        mode,
                        coingecko,
                        sinking,
                        urls,
                        only,
                        connections,
                        seconds,
                        gzip,
                    )
        finally:
            await kafka.stop()
    print("all rounds:")
    print(table(COLUMNS, every))
    if rounds > 1:
        print_medians(every)


def print_medians(rows: list[tuple[object, ...]]) -> None:
    """Median req/s and p99 and sink ratio per code and endpoint over the rounds."""
    groups: dict[tuple[object, object], list[tuple[object, ...]]] = {}
    for row in rows:
        groups.setdefault((row[0], row[1]), []).append(row)

    def middle(group: list[tuple[object, ...]], column: int) -> float:
        return statistics.median(float(str(r[column]).strip("%").replace(",", "")) for r in group)

    print("medians:")
    print(
        table(
            ("code", "endpoint", "req/s", "p99 ms", "sink loaded/unloaded"),
            [
                (
                    code,
                    endpoint,
                    f"{middle(g, 2):,.0f}",
                    f"{middle(g, 4):.1f}",
                    f"{middle(g, 9):.0f}%",
                )
                for (code, endpoint), g in groups.items()
            ],
        )
    )


if __name__ == "__main__":
    parser = arguments(__doc__)
    parser.add_argument("--seconds", type=int, default=20, help="wrk's duration per endpoint")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--backlog", type=int, default=60_000, help="rows per sink measurement")
    parser.add_argument("--only", default=",".join(ENDPOINTS))
    parser.add_argument(
        "--identity", action="store_true", help="no Accept-Encoding: gzip (uncompressed answers)"
    )
    parser.add_argument("--code", default="", help="source trees to run the worker from, in turn")
    parser.add_argument(
        "--modes", default="combined", help=f"deployments to load in turn: {', '.join(MODES)}"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench.read_load needs wrk: apt-get install -y wrk (macOS: brew install wrk)")
    trees: list[Path | None] = [Path(p).resolve() for p in args.code.split(",") if p] or [None]
    selected = [name for name in args.only.split(",") if name]
    deployments = [mode for mode in args.modes.split(",") if mode]
    if unknown := set(deployments) - set(MODES):
        sys.exit(f"unknown --modes {', '.join(sorted(unknown))}: {', '.join(MODES)}")
    asyncio.run(
        main(
            trees,
            deployments,
            args.rounds,
            selected,
            args.connections,
            args.seconds,
            args.backlog,
            not args.identity,
        )
    )
