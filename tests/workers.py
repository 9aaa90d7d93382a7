"""End-to-end test helpers: real `faust -A app worker` processes, the test's side of the broker,
and exact comparisons of what the database holds with what was produced.

Shared by the tests that run worker processes (sink, reliability); the fixtures built on these
live in `conftest.py`.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor

from app.embedded import EmbeddedBroker, create_generated_topics, free_port
from models import CryptoPriceData, StreamRecord
from models.codec import encode_record
from models.dsl import quote_ident
from schema.topics import topic_configs

TIMEOUT = 60.0  # generous: the suite shares two cores
STOP_TIMEOUT = 45.0  # the worker's own shutdown window, plus slack
T0 = datetime(2024, 5, 1, tzinfo=UTC)
T = TypeVar("T")
Rows = dict[tuple[object, ...], dict[str, object]]


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
class Health:
    """A worker's /health answer."""

    code: int  # the HTTP status
    body: dict[str, Any]


class Worker:
    """`faust -A app worker`, as users start it, logging to a file the test can read.

    `base_env` must hold no app setting (the `bare_env` fixture), so a developer's own variables
    cannot leak in; each worker gets its own web port and data directory.
    """

    def __init__(
        self,
        base_env: Mapping[str, str],
        broker: EmbeddedBroker,
        dsn: str,
        app_id: str,
        directory: Path,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        port = free_port()
        self.log_path = directory / f"worker-{port}.log"
        self.env = {
            **base_env,
            "APP_ID": app_id,
            "BROKER_URL": broker.url,
            "DATABASE_URL": dsn,
            "BROKER_SESSION_TIMEOUT": "4",
            "BROKER_HEARTBEAT_INTERVAL": "1",
            "WEB_PORT": str(port),
            "DATA_DIR": str(directory / f"data-{port}"),
            # The poller gets a closed port and long intervals: it only logs an error now and then.
            "COINGECKO_BASE_URL": f"http://127.0.0.1:{free_port()}/api/v3",
            "PRICE_POLL_SECONDS": "3600",
            "GLOBAL_POLL_SECONDS": "3600",
            "OHLC_POLL_SECONDS": "3600",
            **(extra or {}),
        }
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "faust", "-A", "app", "worker", "-l", "info"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

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

    def assert_alive(self) -> None:
        assert self.process.poll() is None, f"worker exited:\n{self.excerpt()}"

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

    async def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.process.wait, STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, nothing is flushed or committed."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


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
        rewinder = AIOKafkaConsumer(
            *topics,
            bootstrap_servers=self.bootstrap,
            group_id=self.group_id,
            enable_auto_commit=False,
            session_timeout_ms=4000,
            heartbeat_interval_ms=1000,
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
    check: Callable[[], Awaitable[T | None]], worker: Worker, what: str, timeout: float = TIMEOUT
) -> T:
    """Poll `check` until it returns something other than None; fail if the worker dies."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (result := await check()) is None:
        worker.assert_alive()
        assert asyncio.get_running_loop().time() < deadline, f"no {what}:\n{worker.excerpt()}"
        await asyncio.sleep(0.25)
    return result


def prices(prefix: str, count: int, coins: int = 37) -> list[CryptoPriceData]:
    """Distinct snapshots with values a float would mangle (tiny, long, huge, exponent form)."""
    values = [
        lambda i: Decimal(f"{i}E-20"),
        lambda i: Decimal(1) / Decimal(7 + i),
        lambda i: Decimal(f"{i}{'9' * 25}.{'1' * 12}"),
        lambda i: Decimal(f"0.{i:038d}"[:40]),
        lambda i: Decimal(f"6.{i}E-7"),
    ]
    return [
        CryptoPriceData(
            coin_id=f"{prefix}-{i % coins}",
            symbol="sym",
            name=f"Coin {i}",
            usd_price=values[i % len(values)](i + 1),
            market_cap=Decimal(f"{i}123456789012345678"),
            change_24h=Decimal(f"-{i}.5"),
            btc_price=None if i % 3 else Decimal("0.00001234"),
            last_updated=T0 + timedelta(seconds=i),
        )
        for i in range(count)
    ]


async def stored(dsn: str, record: type[StreamRecord]) -> Rows:
    """A table's rows keyed by primary key."""
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(f"SELECT * FROM {quote_ident(record.table.name)}")  # noqa: S608
    finally:
        await connection.close()
    return {tuple(row[c] for c in record.table.primary_key): dict(row) for row in rows}


async def count_rows(dsn: str, record: type[StreamRecord]) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        count: int = await connection.fetchval(
            f"SELECT count(*) FROM {quote_ident(record.table.name)}"  # noqa: S608
        )
    finally:
        await connection.close()
    return count


def primary_key(record: StreamRecord) -> tuple[object, ...]:
    return tuple(getattr(record, column) for column in record.table.primary_key)


def expected(records: Sequence[StreamRecord]) -> Rows:
    return {primary_key(record): record.model_dump() for record in records}


def assert_exactly(rows: Rows, records: Sequence[StreamRecord]) -> None:
    """The table holds one row per record, no other row, every value equal (Decimal ==, exact)."""
    want = expected(records)
    assert len(want) == len(records), "the test's records must have distinct keys"
    assert rows.keys() == want.keys()
    for key, values in want.items():
        for column, value in values.items():
            assert rows[key][column] == value, (key, column)
