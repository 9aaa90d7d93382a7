"""Where the sink's CPU goes: the worker and the bare loop profiled over the same data, by category.

    .venv/bin/python -m bench.sink_profile [--rows 200000] [--rounds 1] [--near-now] [--raw DIR]

The setup of `bench.sink_throughput` (one embedded broker and PostgreSQL, `--rows` snapshots of 100
coins pre-filled into the 6 partitions of `crypto-prices`, from 2024 or, `--near-now`, ending now),
then, alternating for `--rounds`, the bare loop (`bench.bare_sink`) and `faust -A app worker`, each
from spawn to its last row with py-spy (a dev dependency) attached as soon as the process exists:
`py-spy record --gil --threads --rate 250`, so a sample is Python work of a thread that holds the
GIL, start-up imports included (the first few milliseconds of the interpreter's own start, before
py-spy attaches, are not). Each sample's stack falls into the first category below whose frames it
contains, and a category is shown as GIL-held microseconds per stored row (samples / rate / rows),
the rounds' median. What is left of a thread is "other": the event loop, Faust's and mode's
services, timers.
`--raw DIR` keeps py-spy's raw stacks (one file per process and round) for a closer look.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.common import (
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
from local.embedded import create_generated_topics
from testkit.workers import Process

SAMPLES_PER_SECOND = 250
# First match wins, in this order: a lazy import while sinking is an import, a decode is a decode
# wherever it is called from. Each entry: name, and substrings of py-spy's frames
# ("function (path:line)"); a path names the room of the project it is in. The only messages a
# worker produces in this benchmark are its tables' changelogs (no record is dead-lettered).
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("imports (start-up, lazy ones too)", ("(<frozen importlib._bootstrap",)),
    ("decode (pydantic, the DSL's validators)", ("models/codec.py", "models/types.py")),
    ("COPY rows built (RecordWriter.row)", ("row (<string>", "RecordWriter.unique")),
    (
        "live tables: fold, table writes, changelog produce",
        (
            "tables/live.py",
            "faust/tables/",
            "faust/topics.py",
            "faust/transport/producer.py",
            "aiokafka/producer/",
        ),
    ),
    ("the write: COPY, SQL, stored offsets", ("asyncpg/", "store/")),
    (
        "consuming: aiokafka, Faust's consumer thread, hand-off, acks, commits",
        ("aiokafka/", "faust/transport/", "app/bulk.py", "mode/threads.py"),
    ),
    ("the sink's own loop (batches, observers)", ("agents/sink.py", "bench/bare_sink.py")),
)
OTHER = "other: event loop, Faust's and mode's services"


def category(stack: str) -> str:
    for name, frames in CATEGORIES:
        if any(frame in stack for frame in frames):
            return name
    return OTHER


def read_samples(raw: Path) -> Counter[str]:
    """Samples per category of one py-spy raw file ("thread;frame;...;frame count" lines)."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        counts[category(stack)] += int(count)
    return counts


def py_spy() -> str:
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if found is None:
        raise SystemExit("py-spy is not installed: it comes with the dev extras (./dev lint)")
    return found


async def profiled(s: Stack, contender: str, rows: int, raw: Path) -> tuple[Counter[str], float]:
    """One contender from spawn to its last row under py-spy: samples per category, CPU seconds."""
    dsn = await s.database()
    process: Process
    if contender == "bare":
        process = bare_sink(s, dsn)
    else:
        process = faust_worker(s, "app", dsn, f"bench-profile-{time.monotonic_ns()}")
    spy = subprocess.Popen(
        [
            py_spy(),
            "record",
            "--pid",
            str(process.popen.pid),
            "--rate",
            str(SAMPLES_PER_SECOND),
            "--gil",
            "--threads",
            "--format",
            "raw",
            "--output",
            str(raw),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    async with running(process):
        run = await watch_rows(dsn, rows, [process])
        spy.send_signal(signal.SIGINT)  # py-spy writes its file and exits; the process is next
        await asyncio.to_thread(spy.wait, 60)
    return read_samples(raw), run.cpu_seconds


async def main(rows: int, rounds: int, near_now: bool, keep: Path | None) -> None:
    print(describe_machine())
    compile_project()
    with stack() as s, tempfile.TemporaryDirectory(prefix="qicore-profile-") as tmp:
        directory = keep or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        await create_generated_topics(s.bootstrap)
        await produce(s.bootstrap, backlog(rows, near_now))
        per_row: dict[str, list[Counter[str]]] = {"bare": [], "worker": []}
        cpu: dict[str, list[float]] = {"bare": [], "worker": []}
        for number in range(1, rounds + 1):
            for contender in per_row:
                raw = directory / f"{contender}-{number}.txt"
                samples, seconds = await profiled(s, contender, rows, raw)
                scale = 1e6 / SAMPLES_PER_SECOND / rows
                per_row[contender].append(Counter({k: v * scale for k, v in samples.items()}))
                cpu[contender].append(seconds / rows * 1e6)
                print(f"round {number}, {contender}: {sum(samples.values())} samples", flush=True)
        print(f"µs per row (GIL held), median of {rounds} round(s), {rows:,} rows:")
        print(breakdown(per_row, cpu))


def breakdown(per_row: dict[str, list[Counter[str]]], cpu: dict[str, list[float]]) -> str:
    def median(contender: str, name: str) -> float:
        return statistics.median(counts[name] for counts in per_row[contender])

    def total(contender: str) -> float:
        return statistics.median(sum(counts.values()) for counts in per_row[contender])

    lines = []
    for name in [name for name, _ in CATEGORIES] + [OTHER]:
        bare, worker = median("bare", name), median("worker", name)
        lines.append((name, f"{bare:.1f}", f"{worker:.1f}", f"{worker - bare:+.1f}"))
    bare, worker = total("bare"), total("worker")
    lines.append(("**all samples**", f"{bare:.1f}", f"{worker:.1f}", f"{worker - bare:+.1f}"))
    bare, worker = statistics.median(cpu["bare"]), statistics.median(cpu["worker"])
    lines.append(
        (
            "CPU (user + system, psutil)",
            f"{bare:.1f}",
            f"{worker:.1f}",
            f"{worker - bare:+.1f} ({worker / bare:.2f}x)",
        )
    )
    return table(("category", "bare µs/row", "worker µs/row", "worker - bare"), lines)


if __name__ == "__main__":
    parser = arguments(__doc__)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--near-now", action="store_true", help="the last snapshot dated now")
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw stacks in this directory")
    args = parser.parse_args()
    asyncio.run(main(args.rows, args.rounds, args.near_now, args.raw))
