"""Worker processes and the test's side of the broker, for the tests and the benchmarks: real
`faust -A app worker` processes started as users start them, in an environment no developer
setting leaks into, and a producer/group reader on the broker they use.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from prometheus_client.parser import text_string_to_metric_families

from app.settings import Settings
from generators.topics import topic_configs
from local.embedded import EmbeddedBroker, create_generated_topics, free_port
from models import StreamRecord
from models.codec import encode_record

TIMEOUT = 60.0  # generous: the suite shares two cores
STOP_TIMEOUT = 45.0  # the worker's own shutdown window, plus slack
T = TypeVar("T")


@dataclass(frozen=True)
class Sent:
    """One produced message and where the broker put it; `record` is None for junk."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    record: StreamRecord | None


@dataclass(frozen=True)
class Family:
    """One metric family of a /metrics scrape: its type and samples, keyed by the sample's name
    followed by its sorted (label, value) pairs."""

    type: str
    samples: dict[tuple[Any, ...], float]

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, *sorted(labels.items())))


@dataclass(frozen=True)
class Health:
    """A worker's /health answer."""

    code: int  # the HTTP status
    body: dict[str, Any]


def env_without_settings() -> dict[str, str]:
    """This process's environment without any app setting: a developer's own variables cannot
    leak into a worker started from it."""
    names = {name.upper() for name in Settings.model_fields}
    return {name: value for name, value in os.environ.items() if name.upper() not in names}


def worker_env(
    base_env: Mapping[str, str],
    broker: EmbeddedBroker,
    dsn: str,
    app_id: str,
    directory: Path,
    web_port: int,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A worker's environment: its group, broker and database, fast group rebalances, its own web
    port and data directory, and a poller that only logs an error now and then (a closed port,
    hour-long intervals). `base_env` must hold no app setting (`env_without_settings`)."""
    return {
        **base_env,
        "APP_ID": app_id,
        "BROKER_URL": broker.url,
        "DATABASE_URL": dsn,
        **EmbeddedBroker.GROUP_TIMEOUTS,
        "WEB_PORT": str(web_port),
        "DATA_DIR": str(directory / f"data-{app_id}-{web_port}"),
        "COINGECKO_BASE_URL": f"http://127.0.0.1:{free_port()}/api/v3",
        "PRICE_POLL_SECONDS": "3600",
        "GLOBAL_POLL_SECONDS": "3600",
        "OHLC_POLL_SECONDS": "3600",
        **(extra or {}),
    }


def faust_command(*args: str, module: str = "app") -> list[str]:
    """`faust -A <module> <args>` with this interpreter."""
    return [sys.executable, "-m", "faust", "-A", module, *args]


class Process:
    """A child process whose combined output goes to a file that can be read while it runs."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        self._measured = psutil.Process(self.popen.pid)

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def assert_alive(self) -> None:
        assert self.popen.poll() is None, (
            f"{self.argv[2:]} exited ({self.popen.returncode}):\n{self.excerpt()}"
        )

    def excerpt(self) -> str:
        """The log's first error and its tail: a crash's cause comes first, and its shutdown
        noise (cancelled agents, a stopped producer) can fill any tail."""
        output = self.output
        tail = max(0, len(output) - 5000)
        found = [i for i in map(output.find, ("[ERROR]", "[CRITICAL]", "Traceback")) if i >= 0]
        start = output.rfind("\n", 0, min(found)) + 1 if found else tail
        if start >= tail:  # the first error is within the tail
            return output[tail:]
        return f"{output[start : start + 5000]}\n[…]\n{output[tail:]}"

    async def wait_until(
        self, ready: Callable[[str], bool], what: str, timeout: float = TIMEOUT
    ) -> None:
        """Poll the output until `ready`; fail early with the log if the process dies."""

        async def check() -> bool | None:
            return True if ready(self.output) else None

        await eventually(check, self, what, timeout)

    def rss(self) -> int:
        """Resident memory in bytes; 0 once the process is gone."""
        try:
            return int(self._measured.memory_info().rss)
        except psutil.Error:
            return 0

    def cpu_seconds(self) -> float:
        """User + system CPU time so far, all threads; 0 once the process is gone."""
        try:
            times = self._measured.cpu_times()
        except psutil.Error:
            return 0.0
        return float(times.user + times.system)

    async def stop(self, signum: signal.Signals = signal.SIGTERM) -> int:
        """Send `signum` and wait for the exit status (within the worker's shutdown window)."""
        self.popen.send_signal(signum)
        return await asyncio.to_thread(self.popen.wait, STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, nothing is flushed or committed."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    def close(self) -> None:
        """Stop it if still running: SIGTERM first (so `up` stops its services too), then kill."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()


class Worker(Process):
    """`faust -A <module> worker -l info`, as users (and the Procfile) start it.

    `base_env` must hold no app setting (`env_without_settings`); each worker gets its own web
    port and data directory.
    """

    def __init__(
        self,
        base_env: Mapping[str, str],
        broker: EmbeddedBroker,
        dsn: str,
        app_id: str,
        directory: Path,
        extra: Mapping[str, str] | None = None,
        module: str = "app",
    ) -> None:
        port = free_port()
        super().__init__(
            faust_command("worker", "-l", "info", module=module),
            worker_env(base_env, broker, dsn, app_id, directory, port, extra),
            directory / f"worker-{port}.log",
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['WEB_PORT']}"

    async def health(self) -> Health:
        """The worker's /health answer: 200 when healthy, 503 (still with its JSON) when not."""
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.get(f"{self.url}/health")
        return Health(answer.status_code, answer.json())

    async def table_entry(self, table: str, key: str) -> dict[str, Any] | None:
        """`key`'s entry in this worker's live table `table`, or None while there is none (or
        the web server is not up yet)."""
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                answer = await client.get(f"{self.url}/table/{table}/{key}/")
        except httpx.TransportError:
            return None
        if answer.status_code != 200:
            return None
        entry: dict[str, Any] = answer.json()
        return entry

    async def sink_status(self, topic: str) -> dict[str, Any]:
        """This sink's SINK_STATUS entry, as the worker's /health view serves it."""
        status: dict[str, Any] = (await self.health()).body["sink"][topic]
        return status

    async def metrics(self) -> dict[str, Family]:
        """The worker's /metrics, parsed by prometheus-client's own parser: family name ->
        (type, {sample name and sorted label pairs: value})."""
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.get(f"{self.url}/metrics")
        answer.raise_for_status()
        assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
        return {
            family.name: Family(
                family.type,
                {
                    (sample.name, *sorted(sample.labels.items())): sample.value
                    for sample in family.samples
                },
            )
            for family in text_string_to_metric_families(answer.text)
        }

    async def terminate(self) -> int:
        return await self.stop(signal.SIGTERM)


class FaustNamedAssignor(RoundRobinPartitionAssignor):
    """Round robin under the name of Faust's assignor: the broker remembers a group's protocol
    and refuses a member that speaks another one."""

    name = "faust"


class Kafka:
    """The test's side of the broker: topics, a producer, and the group's committed offsets."""

    def __init__(self, bootstrap: str, group_id: str) -> None:
        self.bootstrap = bootstrap
        self.group_id = group_id
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        # Not subscribed, so it never joins the group; it only reads the group's commits.
        # (AIOKafkaAdminClient.list_consumer_group_offsets cannot decode Tansu's reply.)
        self.group = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False
        )

    async def start(self) -> None:
        # The generated partition counts, before anything is produced (no auto-created topics).
        await create_generated_topics(self.bootstrap)
        await self.producer.start()
        await self.group.start()

    async def stop(self) -> None:
        await self.producer.stop()
        await self.group.stop()

    async def send(
        self, items: Sequence[tuple[str, bytes | None, bytes | None, StreamRecord | None]]
    ) -> list[Sent]:
        """Produce (topic, key, value, record) in order; return where each landed."""
        deliveries = [
            await self.producer.send(topic, key=key, value=value, headers=[("origin", b"test")])
            for topic, key, value, _ in items
        ]
        metadata = await asyncio.gather(*deliveries)
        return [
            Sent(topic, meta.partition, meta.offset, key, value, record)
            for (topic, key, value, record), meta in zip(items, metadata, strict=True)
        ]

    async def send_records(self, records: Sequence[StreamRecord]) -> list[Sent]:
        return await self.send([(r.topic.name, r.key(), encode_record(r), r) for r in records])

    async def send_paced(
        self,
        records: Sequence[StreamRecord],
        seconds: float,
        chunks: int = 40,
        sent: list[Sent] | None = None,
    ) -> list[Sent]:
        """Produce in `chunks` equal parts spread over about `seconds`: records keep arriving
        while a fault is injected, as they do in production. Each confirmed chunk is added to
        `sent` as it goes, so a test can check what was sent so far."""
        size = -(-len(records) // chunks)
        sent = [] if sent is None else sent
        for start in range(0, len(records), size):
            sent += await self.send_records(records[start : start + size])
            await asyncio.sleep(seconds / chunks)
        return sent

    def partitions(self, topics: set[str]) -> list[TopicPartition]:
        return [
            TopicPartition(config.name, partition)
            for config in topic_configs()
            if config.name in topics
            for partition in range(config.partitions)
        ]

    async def committed(self, topics: set[str]) -> dict[tuple[str, int], int]:
        """The group's committed offset (next to read) per partition; 0 where none yet."""
        return {
            (tp.topic, tp.partition): (await self.group.committed(tp)) or 0
            for tp in self.partitions(topics)
        }

    async def wait_committed(self, sent: list[Sent], worker: Worker) -> dict[tuple[str, int], int]:
        """Wait until the group has committed past every message in `sent`."""
        ends: dict[tuple[str, int], int] = {}
        for message in sent:
            where = (message.topic, message.partition)
            ends[where] = max(ends.get(where, 0), message.offset + 1)
        topics = {message.topic for message in sent}

        async def done() -> dict[tuple[str, int], int] | None:
            committed = await self.committed(topics)
            return committed if all(committed[tp] >= end for tp, end in ends.items()) else None

        return await eventually(done, worker, "offsets committed past every produced message")

    async def rewind_group(self, topics: set[str]) -> None:
        """Commit offset 0 on every partition for the group, as `rpk group seek --to start`
        does. Like it, only while no worker is in the group: this consumer joins the group (the
        broker accepts commits only from a member) and takes every partition."""
        timeouts = EmbeddedBroker.GROUP_TIMEOUTS
        rewinder = AIOKafkaConsumer(
            *topics,
            bootstrap_servers=self.bootstrap,
            group_id=self.group_id,
            enable_auto_commit=False,
            session_timeout_ms=round(float(timeouts["BROKER_SESSION_TIMEOUT"]) * 1000),
            heartbeat_interval_ms=round(float(timeouts["BROKER_HEARTBEAT_INTERVAL"]) * 1000),
            partition_assignment_strategy=(FaustNamedAssignor,),
        )
        await rewinder.start()
        try:
            partitions = set(self.partitions(topics))
            deadline = asyncio.get_running_loop().time() + TIMEOUT
            while rewinder.assignment() != partitions:
                assert asyncio.get_running_loop().time() < deadline, rewinder.assignment()
                await asyncio.sleep(0.2)
            await rewinder.commit({tp: 0 for tp in partitions})
        finally:
            await rewinder.stop()

    async def read_all(
        self, topic: str
    ) -> list[tuple[int, int, bytes | None, bytes | None, dict[str, bytes]]]:
        """Every message of a topic: (partition, offset, key, value, headers)."""
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=self.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        messages = []
        try:
            while batch := await consumer.getmany(timeout_ms=1500):
                for records in batch.values():
                    messages += [
                        (r.partition, r.offset, r.key, r.value, dict(r.headers)) for r in records
                    ]
        finally:
            await consumer.stop()
        return messages


async def eventually(
    check: Callable[[], Awaitable[T | None]], process: Process, what: str, timeout: float = TIMEOUT
) -> T:
    """Poll `check` until it returns something other than None; fail if the process dies."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (result := await check()) is None:
        process.assert_alive()
        assert asyncio.get_running_loop().time() < deadline, f"no {what}:\n{process.excerpt()}"
        await asyncio.sleep(0.25)
    return result
