"""CPU per row of a batch write, client and PostgreSQL backend: this checkout's `RecordWriter`
against another checkout's, in one process, alternating.

    .venv/bin/python -m bench.writer_cpu --baseline /work/main [--dsn postgresql://...]
                                         [--rounds 10] [--batches 4] [--batch-size 5000]

The baseline's `store/writer.py` is loaded from its file (with this checkout's `models`), so a
change to the writer is measured on the same data, server and connection as what it replaces.
Each round empties `crypto_prices` and writes `--batches` batches of `testkit.records.snapshots`
with one contender, then the same with the other (the first contender alternates between
rounds); per contender it takes this process's CPU (`time.process_time`) and the PostgreSQL
backend's (`/proc/<pg_backend_pid()>/stat` utime + stime, so the server must be local). Both run
on the same cores, so their sum is the cost of a write. Without `--dsn`, an embedded PostgreSQL
in a temporary directory. Prints every round and the medians (and checks only that every row
was inserted).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg

from bench.common import PRICES_TABLE, arguments, describe_machine, table
from local.embedded import embedded_postgres
from models.market import CryptoPriceData
from store import writer as current
from store.db import create_pool
from testkit.databases import fresh_database
from testkit.records import snapshots

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def load_writer(checkout: Path) -> ModuleType:
    """`store/writer.py` of another checkout, as a module of its own."""
    spec = importlib.util.spec_from_file_location("baseline_writer", checkout / "store/writer.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def backend_cpu(pid: int) -> float:
    """CPU seconds (user + system) the PostgreSQL backend `pid` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class Sample:
    client: float
    backend: float

    @property
    def total(self) -> float:
        return self.client + self.backend


async def write_all(
    pool: asyncpg.Pool, writer: Any, batches: list[list[CryptoPriceData]], backend: int
) -> Sample:
    """Store every batch into an emptied table; the CPU the writes took, per row, in µs."""
    await pool.execute(f"TRUNCATE {PRICES_TABLE}")
    client, server = time.process_time(), backend_cpu(backend)
    for batch in batches:
        result = await writer.write(pool, batch)
        assert result.inserted == len(batch)
    rows = sum(map(len, batches))
    return Sample(
        (time.process_time() - client) / rows * 1e6, (backend_cpu(backend) - server) / rows * 1e6
    )


async def measure(dsn: str, baseline: ModuleType, rounds: int, batches: int, size: int) -> None:
    records = snapshots(batches * size)
    chunks = [records[start : start + size] for start in range(0, len(records), size)]
    writers = {
        "baseline": baseline.RecordWriter(CryptoPriceData),
        "this checkout": current.RecordWriter(CryptoPriceData),
    }
    # A session of one's own per contender (their staging tables may share a name), so one
    # backend to read each.
    pools = {name: await create_pool(dsn, min_size=1, max_size=1) for name in writers}
    try:
        backends = {
            name: await pool.fetchval("SELECT pg_backend_pid()") for name, pool in pools.items()
        }
        for name, writer in writers.items():  # warm-up: staging tables, plans, caches
            await write_all(pools[name], writer, chunks, backends[name])
        samples: dict[str, list[Sample]] = {name: [] for name in writers}
        for number in range(rounds):
            order = list(writers) if number % 2 == 0 else list(reversed(writers))
            for name in order:
                sample = await write_all(pools[name], writers[name], chunks, backends[name])
                samples[name].append(sample)
                print(
                    f"round {number + 1} {name}: client {sample.client:.2f} + backend "
                    f"{sample.backend:.2f} = {sample.total:.2f} µs/row",
                    flush=True,
                )
    finally:
        for pool in pools.values():
            await pool.close()

    def summary(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    print(describe_machine())
    print(f"{rounds} rounds of {batches} x {size} rows; CPU µs per row, median (range)")
    print(
        table(
            ["writer", "client", "backend", "total"],
            [
                [
                    name,
                    summary([s.client for s in runs]),
                    summary([s.backend for s in runs]),
                    summary([s.total for s in runs]),
                ]
                for name, runs in samples.items()
            ],
        )
    )


async def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout to compare with")
    parser.add_argument("--dsn", help="a local PostgreSQL server (default: an embedded one)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=5000)
    options = parser.parse_args()
    baseline = load_writer(options.baseline)
    with contextlib.ExitStack() as resources:
        server_dsn = options.dsn or resources.enter_context(
            embedded_postgres(Path(resources.enter_context(tempfile.TemporaryDirectory())))
        )
        async with fresh_database(server_dsn, "bench", migrated=True) as dsn:
            await measure(dsn, baseline, options.rounds, options.batches, options.batch_size)


if __name__ == "__main__":
    asyncio.run(main())
