"""The sink: one record topic flows into its table, in batches, stored before acknowledged.

`Sink` takes everything it works with as arguments (its batches, the database, the consumer's
positions, the dead-letter topic, its status and limits), so it runs as well in a test as in the
worker; agents/sinks.py makes one agent per record in `models.RECORDS` from it, so a new record
type gets a running sink with no new agent code. The store transaction and the offset caches are
store/ledger.py's. Why a sink works the way it does:

- The database decides where each partition continues: a batch's rows and its partitions' next
  offsets (`sink_offsets`, store/offsets.py) are written in ONE transaction (store/ledger.py).
  Faust's committed offsets are only where fetching starts; they cannot lose data even where
  Faust's own offset handling slips (faust-streaming #606; a message dropped during a
  rebalance): a batch that does not continue the stored offset is not written past the hole,
  and the partition is sought back.
  Replays below the stored offset (a consumer-group reset) are skipped, but only in the log the
  stored offsets came from: each partition's log is confirmed (cluster id, a stored message still
  at its offset) before its first batch after an assignment, before a replay of a partition
  that stored something since its last confirmation, and every
  SINK_LOG_CHECK_SECONDS; a partition found on another log (a restarted memory broker, a
  re-created topic, another cluster) is logged once and stored again from its earliest offset.
- Messages arrive in bulk (app/bulk.py): everything fetched while the previous batch was being
  written, up to SINK_BATCH_SIZE, without Faust's per-event machinery. A quiet stream's message
  is written as soon as it is fetched; a busy stream's batches grow by themselves.
- A batch is acknowledged, in offset order, only after its transaction committed, its dead
  letters were delivered and the live tables were given it; Faust commits only acknowledged
  offsets. The tables are given the stored batches at most every LIVE_TABLE_UPDATE_SECONDS
  (or SINK_BATCH_SIZE records), so that a busy stream's many small batches cost one table write
  per key per interval, not per batch.
- A failed batch is retried with capped exponential backoff and jitter, for as long as it takes:
  moving past it would leave a hole. While the agent waits, its queue (app/bulk.py) fills and
  the worker stops fetching: it stops consuming instead of dropping data.
- SIGTERM: Faust's `App.on_stop` stops fetching, waits until every message handed to a sink is
  acknowledged (`stream_wait_empty`, on by default), then commits the offsets, before it stops any
  agent. So the batch in flight is written, given to the tables with everything stored before it
  (a suspended flow does not wait for LIVE_TABLE_UPDATE_SECONDS), acknowledged and committed
  before the worker exits, and only then is the pool closed (`on_before_shutdown`); a rebalance
  waits for it the same way. The agent additionally only shields the batch's task: if it is
  cancelled anyway, the batch is still finished, and what is stored is given to the tables and
  acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from operator import attrgetter
from typing import Any, Protocol, TypeVar

from faust.types import Message, StreamT

from common.backoff import jittered_backoff
from common.metrics import SINK_DELAY_SECONDS, SINK_WRITE_SECONDS
from common.redaction import redact_password
from models import StreamRecord
from models.codec import RecordRejected, decode_record
from store.db import LazyPool
from store.ledger import Ledger, LookAtLogs
from store.offsets import Continuation, Delivered
from store.writer import Row, WriteResult

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.2  # seconds before the first retry
BACKOFF_CAP = 5.0  # a retry every few seconds costs a down database nothing and resumes quickly

T = TypeVar("T")
# Publishes a dead letter (key, value, headers) and returns once the broker has it.
DeadLetters = Callable[[bytes | None, bytes | None, list[tuple[str, bytes]]], Awaitable[None]]


class BatchSource(Protocol):
    """Where a sink's messages come from and are acknowledged to (app/bulk.py's `Batches`)."""

    async def take(self, limit: int, timeout: float | None = None) -> list[Message]: ...
    def ack(self, messages: Sequence[Message]) -> None: ...


class Observer(Protocol):
    """Follows what a sink stores (tables.live's `LiveUpdates`): each message of a batch as the
    sink decodes it (its record; None: dead-lettered), the batch once it is durable, and what was
    stored when the sink publishes. Handed each record while the sink decodes it, an observer
    reads it while it is still in the CPU's caches; a pass over the stored records at publication
    cost ~3x as much (docs/performance.md, section 7)."""

    def start_batch(self) -> Callable[[Message, StreamRecord | None], None]: ...
    def batch_stored(self) -> None: ...
    def take(self) -> Callable[[], Awaitable[None]]: ...


class Positions(Protocol):
    """The consumer as a sink sees it (app/positions.py's `ConsumerPositions`)."""

    def flowing(self) -> bool: ...
    def generation(self) -> int: ...
    def assigned(self, topic: str) -> list[int]: ...
    async def earliest(self, topic: str, partitions: Sequence[int]) -> dict[int, int]: ...
    async def seek(self, topic: str, partition: int, offset: int) -> None: ...


@dataclass(frozen=True)
class SinkLimits:
    """The settings a sink works to (SINK_BATCH_SIZE, LIVE_TABLE_UPDATE_SECONDS,
    SINK_LOG_CHECK_SECONDS)."""

    batch_size: int
    live_table_update_seconds: float
    log_check_seconds: float


@dataclass
class SinkStatus:
    """What one sink has done, for /health and for operators."""

    topic: str
    table: str
    rows_written: int = 0
    batches: int = 0  # write transactions committed
    duplicates_skipped: int = 0
    dead_letters: int = 0
    replayed_skipped: int = 0  # messages below the stored offset (stored before)
    holes_refetched: int = 0  # times a partition was sought back to its stored offset
    log_resets: int = 0  # partitions found on another log than their stored offsets, stored again
    pending_events: int = 0  # events of the batch being written (or retried) right now
    consecutive_failures: int = 0
    last_error: str | None = None
    last_write_at: datetime | None = None

    def as_json(self) -> dict[str, Any]:
        shown = asdict(self)
        shown["last_write_at"] = self.last_write_at.isoformat() if self.last_write_at else None
        return shown


class SinkStatuses:
    """Every sink's status, keyed by topic."""

    def __init__(self) -> None:
        self.sinks: dict[str, SinkStatus] = {}

    def add(self, record: type[StreamRecord]) -> SinkStatus:
        status = SinkStatus(topic=record.topic.name, table=record.table.name)
        self.sinks[status.topic] = status
        return status

    def as_json(self) -> dict[str, dict[str, Any]]:
        return {topic: status.as_json() for topic, status in self.sinks.items()}


def describe_error(error: BaseException, dsn: str) -> str:
    """`Type: message`, with the database password blanked should a driver ever echo it."""
    return redact_password(f"{type(error).__name__}: {error}", dsn)


# Seconds before retry number `failures`: sinks (and workers) hammering a database that just came
# back do not retry in step.
backoff = partial(jittered_backoff, first=BACKOFF_FIRST, cap=BACKOFF_CAP)


class Sink:
    """Moves one record topic into its table; `consume` is the Faust agent."""

    def __init__(
        self,
        record: type[StreamRecord],
        *,
        consumer_group: str,
        database: LazyPool,
        batches: BatchSource,
        positions: Positions,
        look_at_logs: LookAtLogs,
        dead_letters: DeadLetters,
        status: SinkStatus,
        limits: SinkLimits,
    ) -> None:
        self.record = record
        self.topic = record.topic.name
        self.database = database
        self.ledger = Ledger(database, record, consumer_group, limits.log_check_seconds)
        self.batches = batches
        self.positions = positions
        self.look_at_logs = look_at_logs
        self.dead_letters = dead_letters
        self.status = status
        self.limits = limits
        # Observed once per batch (common/metrics.py); the oldest record's time is one attribute
        # read per record, 0.15 µs (a histogram observation per row would be 1.2 µs).
        self.write_seconds = SINK_WRITE_SECONDS.labels(self.topic)
        self.delay_seconds = SINK_DELAY_SECONDS.labels(self.topic)
        self.event_time = attrgetter(record.table.time_column)
        self.row_of = self.ledger.writer.row
        self.next_log_check = time.monotonic() + limits.log_check_seconds
        # Given each record as it is decoded, told when its batch is durable, and given what was
        # stored at each publication, before it is acknowledged: the live tables (tables.live)
        # follow the sink instead of reading the topic again.
        self.observers: list[Observer] = []
        # Stored, not yet published to the observers nor acknowledged; since when.
        self.stored: list[Message] = []
        self.stored_since = 0.0
        self.publishing: asyncio.Future[None] | None = None  # the publication under way

    async def consume(self, stream: StreamT[bytes]) -> None:
        """The agent. Its stream subscribes the topic, with acknowledgements; the messages
        themselves arrive on `self.batches` (app/bulk.py), never through the stream."""
        try:
            while True:
                messages = await self.batches.take(self.limits.batch_size, timeout=self._wait())
                flush = asyncio.ensure_future(self.flush(messages))
                try:
                    await asyncio.shield(flush)
                except asyncio.CancelledError:
                    log.warning("sink %s: cancelled mid-batch; finishing it first", self.topic)
                    await flush
                    raise
        finally:
            await self._publish()
            if self.publishing is not None:
                await self.publishing

    async def flush(self, messages: Sequence[Message]) -> None:
        """Dead-letter a batch's bad messages, store the rest with their offsets in one
        transaction, seek back over any hole; publish what is stored when it is due; confirm the
        assigned partitions' logs when that is due."""
        if messages:
            await self._store_batch(messages)
        if self._until_publish() == 0:
            await self._publish()
        if time.monotonic() >= self.next_log_check:
            await self._check_assigned_logs()

    def _wait(self) -> float:
        """Seconds the sink may wait for messages: until stored batches or a log check are due."""
        until_check = max(0.0, self.next_log_check - time.monotonic())
        until_publish = self._until_publish()
        return until_check if until_publish is None else min(until_publish, until_check)

    async def _check_assigned_logs(self) -> None:
        """Confirm every assigned partition's log, also those that receive nothing: a topic
        re-created under the worker leaves it fetching past the new log's end, where the embedded
        broker answers with nothing at all (Kafka would answer "out of range")."""
        self.next_log_check = time.monotonic() + self.limits.log_check_seconds
        if not self.positions.flowing():  # a rebalance: the next batch is checked anyway
            return
        assigned = self.positions.assigned(self.topic)
        if not assigned:
            return
        # One attempt: nothing waits for it, and a shutdown must not wait for a broker or
        # database that is down (a batch's own check is retried, as its write is).
        try:
            restarts = await self._check_logs(assigned)
        except Exception as error:
            log.warning(
                "sink %s: log check failed, next in %gs: %s",
                self.topic,
                self.limits.log_check_seconds,
                describe_error(error, self.database.dsn),
            )
            return
        for partition, offset in restarts.items():
            await self.positions.seek(self.topic, partition, offset)

    async def _check_logs(self, partitions: Sequence[int]) -> dict[int, int]:
        """Confirm the partitions' logs; those found on another log are stored again from the
        broker's earliest offset. Returns those, with that offset (a batch's own check needs no
        seek: the batch is stored from there, or shows a hole that is sought back)."""
        restarts = await self.ledger.check_logs(
            partitions, self.look_at_logs, self.positions.generation()
        )
        for partition, restart in restarts.items():
            log.warning(
                "sink %s: partition %d is not the log its stored offsets came from "
                "(%s; stored next offset %d, broker's earliest offset %d, high-water "
                "mark %d): storing it again from offset %d",
                self.topic,
                partition,
                restart.reason,
                restart.stored_next,
                restart.broker.earliest,
                restart.broker.end,
                restart.at,
            )
            self.status.log_resets += 1
        return {partition: restart.at for partition, restart in restarts.items()}

    async def _store_batch(self, messages: Sequence[Message]) -> None:
        # Before anything is decided by the stored offsets (also which bad messages are new).
        if due := self.ledger.logs_due(messages, self.positions.generation()):
            await self._until_done("log check", partial(self._check_logs, due))
        adds = [observer.start_batch() for observer in self.observers]
        row_of, event_time = self.row_of, self.event_time
        delivered: list[Delivered[Row | None]] = []
        oldest: datetime | None = None  # the batch's oldest record time, for the delay metric
        # Everything that reads a record does it here, right after decoding it: later passes
        # over the batch's records found them evicted from the CPU's caches by the fetch and the
        # write, at ~3x the cost (docs/performance.md, section 7).
        for message in messages:
            record: StreamRecord | None = None
            row: Row | None = None
            try:
                record = decode_record(self.record, message.value)
            except RecordRejected as bad:
                # Before the offsets can move past it, the bad message must be in the DLQ.
                if self.ledger.is_new(message.partition, message.offset):
                    await self._until_done(
                        "dead-letter", partial(self._dead_letter, message, bad.reason)
                    )
            else:
                row = row_of(record)
                at = event_time(record)
                if oldest is None or at < oldest:
                    oldest = at
            for add in adds:
                try:
                    add(message, record)
                except Exception:  # a failing observer must not stop the sink
                    log.exception("sink %s: an observer failed on a record", self.topic)
                    adds = [other for other in adds if other is not add]  # for this batch
            delivered.append((message.partition, message.offset, row))
        self.status.pending_events = len(messages)
        continuation, result = await self._until_done(
            "write", partial(self._store, delivered, messages)
        )
        self.status.rows_written += result.inserted
        self.status.duplicates_skipped += result.duplicates
        self.status.replayed_skipped += continuation.replayed
        self.status.last_write_at = durable = datetime.now(UTC)
        self.status.batches += 1
        if result.inserted and oldest is not None:
            # The end-to-end delay of the batch's oldest record (its largest): from the record's
            # own time (its table's time column) until durable.
            self.delay_seconds.observe((durable - oldest).total_seconds())
        for partition, offset in continuation.holes.items():
            await self._refetch(partition, offset)
        for observer in self.observers:
            observer.batch_stored()
        if not self.stored:
            self.stored_since = time.monotonic()
        self.stored.extend(messages)
        self.status.pending_events = 0

    def _until_publish(self) -> float | None:
        """Seconds until the stored batches are due for the observers and their acknowledgement
        (None: nothing is stored). With observers, stored batches are collected for up to
        LIVE_TABLE_UPDATE_SECONDS or SINK_BATCH_SIZE records, but never while the flow is
        suspended: the tables write each key once per publication, so a busy stream of small
        batches does not write its keys' changelogs once per batch (docs/performance.md,
        section 3)."""
        if not self.stored:
            return None
        if (
            not self.observers
            or len(self.stored) >= self.limits.batch_size
            or not self.positions.flowing()  # a rebalance or shutdown waits for the acks
        ):
            return 0.0
        due = self.stored_since + self.limits.live_table_update_seconds
        return max(0.0, due - time.monotonic())

    async def _publish(self) -> None:
        """Start a publication of the stored batches: the observers get them as one, then they
        are acknowledged in offset order (acknowledged means durable everywhere the sink writes;
        Faust's committed offsets are only a starting hint now: the stored offsets decide what is
        written). It runs beside the sink, which goes on storing batches meanwhile: the observers
        yield between slices of their writes, so a publication holds the sink up for one slice at
        a time instead of all its writes at once. One publication at a time, in order: the next
        waits for the one under way.
        """
        if self.publishing is not None:
            await self.publishing
        if self.stored:
            stored, self.stored = self.stored, []
            writes = [(observer, observer.take()) for observer in self.observers]
            self.publishing = asyncio.ensure_future(self._hand_over(stored, writes))

    async def _hand_over(
        self,
        stored: Sequence[Message],
        writes: Sequence[tuple[Observer, Callable[[], Awaitable[None]]]],
    ) -> None:
        """The observers' updates are idempotent (a replay or re-fetch changes nothing), and a
        failing observer must not stop the sink."""
        try:
            for observer, write in writes:
                try:
                    await write()
                except Exception:
                    log.exception("sink %s: observer %r failed", self.topic, observer)
            self.batches.ack(stored)
        finally:
            self.publishing = None

    async def _store(
        self, delivered: Sequence[Delivered[Row | None]], messages: Sequence[Message]
    ) -> tuple[Continuation[Row | None], WriteResult]:
        started = time.perf_counter()
        stored = await self.ledger.store(delivered, messages, self._earliest)
        self.write_seconds.observe(time.perf_counter() - started)
        return stored

    async def _earliest(self, partitions: Sequence[int]) -> dict[int, int]:
        return await self.positions.earliest(self.topic, partitions)

    async def _refetch(self, partition: int, offset: int) -> None:
        """Seek back to the first offset not stored, unless retention has deleted it."""
        self.status.holes_refetched += 1
        if partition in self.ledger.started_over:  # announced already, as a log found restarted
            await self.positions.seek(self.topic, partition, offset)
            return
        earliest = (await self._earliest([partition]))[partition]
        if earliest > offset:
            log.error(
                "sink %s: partition %d offsets %d..%d expired from the topic before they were "
                "stored; continuing at %d",
                self.topic,
                partition,
                offset,
                earliest - 1,
                earliest,
            )
            self.ledger.expired(partition, earliest)
            offset = earliest
        else:
            log.warning(
                "sink %s: partition %d skipped to a later offset; fetching again from %d",
                self.topic,
                partition,
                offset,
            )
        await self.positions.seek(self.topic, partition, offset)

    async def _dead_letter(self, message: Message, reason: str) -> None:
        """Publish the original key, value and headers, plus where it came from and why; wait
        for the broker to confirm, so that acknowledging the original cannot lose it."""
        headers = message.headers or ()
        items = list(headers.items() if isinstance(headers, Mapping) else headers)
        items += [
            ("x-error", reason.encode()),
            ("x-original-topic", message.topic.encode()),
            ("x-original-partition", str(message.partition).encode()),
            ("x-original-offset", str(message.offset).encode()),
        ]
        await self.dead_letters(message.key, message.value, items)
        self.status.dead_letters += 1
        log.warning(
            "sink %s: dead-lettered partition %s offset %s: %s",
            self.topic,
            message.partition,
            message.offset,
            reason,
        )

    async def _until_done(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Retry `attempt` until it succeeds, logging each failure once."""
        while True:
            try:
                result = await attempt()
            except Exception as error:  # any failure of the database or broker: retry it
                self.status.consecutive_failures += 1
                self.status.last_error = describe_error(error, self.database.dsn)
                delay = backoff(self.status.consecutive_failures)
                log.error(
                    "sink %s: %s of %d events failed (attempt %d), retrying in %.1fs: %s",
                    self.record.topic.name,
                    what,
                    self.status.pending_events,
                    self.status.consecutive_failures,
                    delay,
                    self.status.last_error,
                )
                await asyncio.sleep(delay)
                continue
            if self.status.consecutive_failures:
                log.info(
                    "sink %s: %s succeeded after %d failed attempts",
                    self.record.topic.name,
                    what,
                    self.status.consecutive_failures,
                )
                self.status.consecutive_failures = 0
            return result
