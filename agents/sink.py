"""Sink agents: every record topic flows into its table, in batches, stored before acknowledged.

One agent per record in `models.RECORDS`, made in a loop from the DSL, so a new record type gets
a running sink with no new agent code. Why each agent works the way it does:

- The database decides where each partition continues: a batch's rows and its partitions' next
  offsets (`sink_offsets`, store/offsets.py) are written in ONE transaction. Faust's committed
  offsets are only where fetching starts; they cannot lose data even where Faust's own offset
  handling slips (faust-streaming #606; a message dropped during a rebalance): a batch that does
  not continue the stored offset is not written past the hole, and the partition is sought back.
  Replays below the stored offset (a consumer-group reset) are skipped, but only in the log the
  stored offsets came from: each partition's log is confirmed (cluster id, a stored message still
  at its offset) before its first batch after an assignment, before a replay, and every
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
from typing import Any, TypeVar

from faust.exceptions import ConsumerNotStarted
from faust.types import TP, Message, StreamT

from app.broker_logs import BrokerLogs
from app.main import app, settings, topics
from common.backoff import jittered_backoff
from common.redaction import redact_password
from models import RECORDS, StreamRecord
from models.codec import RecordRejected, decode_record
from store.db import LazyPool
from store.offsets import (
    Continuation,
    Delivered,
    Mark,
    SinkOffsets,
    continue_sequences,
    fingerprint,
    other_log,
)
from store.writer import RecordWriter, WriteResult

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.2  # seconds before the first retry
BACKOFF_CAP = 5.0  # a retry every few seconds costs a down database nothing and resumes quickly

T = TypeVar("T")
# One message of a stored batch and its decoded record (None: dead-lettered).
Stored = tuple[Message, StreamRecord | None]


@dataclass
class SinkStatus:
    """What one sink has done, for /health and for operators."""

    topic: str
    table: str
    rows_written: int = 0
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


SINK_STATUS = SinkStatuses()


# The worker's one write pool, shared by all sinks.
DATABASE = LazyPool(settings.database_dsn, settings.database_pool_size)
# The broker's side of the stored offsets, shared by all sinks.
BROKER_LOGS = BrokerLogs.of(app)


def describe_error(error: BaseException, dsn: str = settings.database_dsn) -> str:
    """`Type: message`, with the database password blanked should a driver ever echo it."""
    return redact_password(f"{type(error).__name__}: {error}", dsn)


# Seconds before retry number `failures`: sinks (and workers) hammering a database that just came
# back do not retry in step.
backoff = partial(jittered_backoff, first=BACKOFF_FIRST, cap=BACKOFF_CAP)


class Sink:
    """Moves one record topic into its table; `consume` is the Faust agent."""

    def __init__(self, record: type[StreamRecord], database: LazyPool) -> None:
        self.record = record
        self.topic = record.topic.name
        self.database = database
        self.writer = RecordWriter(record)
        self.offsets = SinkOffsets(app.conf.id, self.topic)
        self.dead_letter_topic = topics[record.topic.dead_letter_name]
        self.status = SINK_STATUS.add(record)
        self.batches = app.batches(self.topic)
        self.stored_next: dict[int, int] = {}  # last known stored offsets (a cache)
        self.floors: dict[int, int] = {}  # earliest offsets the broker still holds, after holes
        # The partitions' logs: when each was last confirmed (consumer generation, monotonic
        # time), the last message stored of it and when, the cluster id found, and the partitions
        # started over whose next hole is part of that (not worth a warning of its own).
        self.confirmed: dict[int, tuple[int, float]] = {}
        self.last_stored: dict[int, tuple[Mark, float]] = {}
        self.cluster_id: str | None = None
        self.started_over: set[int] = set()
        self.next_log_check = time.monotonic() + settings.sink_log_check_seconds
        # Called with the stored batches once they are durable, before they are acknowledged:
        # the live tables (tables.live) follow the sink instead of reading the topic again.
        self.observers: list[Callable[[Sequence[Stored]], Awaitable[None]]] = []
        # Stored, not yet published to the observers nor acknowledged; since when.
        self.stored: list[Stored] = []
        self.stored_since = 0.0
        self.publishing: asyncio.Future[None] | None = None  # the publication under way

    async def consume(self, stream: StreamT[bytes]) -> None:
        """The agent. Its stream subscribes the topic, with acknowledgements; the messages
        themselves arrive on `self.batches` (app/bulk.py), never through the stream."""
        try:
            while True:
                messages = await self.batches.take(settings.sink_batch_size, timeout=self._wait())
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
        self.next_log_check = time.monotonic() + settings.sink_log_check_seconds
        if not app.flow_control.is_active():  # a rebalance: the next batch is checked anyway
            return
        try:
            assignment = app.consumer.assignment()
        except ConsumerNotStarted:
            return
        assigned = sorted(tp.partition for tp in assignment if tp.topic == self.topic)
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
                settings.sink_log_check_seconds,
                describe_error(error),
            )
            return
        for partition, offset in restarts.items():
            await self._seek(partition, offset)

    def _logs_to_check(self, messages: Sequence[Message]) -> list[int]:
        """The batch's partitions whose log must be confirmed before it is stored: first seen in
        this consumer generation, last confirmed too long ago, or replayed (below the stored
        offset) after storing something since the last confirmation."""
        generation = app.consumer_generation_id
        stale = time.monotonic() - settings.sink_log_check_seconds
        lowest: dict[int, int] = {}
        lowest_so_far = lowest.get
        for message in messages:  # per message: kept to a few operations
            partition, offset = message.partition, message.offset
            if offset < lowest_so_far(partition, offset + 1):
                lowest[partition] = offset
        due = []
        for partition, offset in lowest.items():
            confirmed = self.confirmed.get(partition)
            if confirmed is None or confirmed[0] != generation or confirmed[1] < stale:
                due.append(partition)
            elif offset < self.stored_next.get(partition, -1):
                stored = self.last_stored.get(partition)
                if stored is not None and stored[1] > confirmed[1]:
                    due.append(partition)
        return sorted(due)

    async def _check_logs(self, partitions: Sequence[int]) -> dict[int, int]:
        """Confirm the partitions' logs (store/offsets.py); start those found on another log over
        at the broker's earliest offset. Returns those started over, with that offset."""
        pool = await self.database.get()
        restarts: dict[int, int] = {}
        async with pool.acquire() as connection:
            stored = await self.offsets.logs(connection, partitions)
            broker = await BROKER_LOGS.look(
                self.topic, {p: stored[p].checkpoint if p in stored else None for p in partitions}
            )
            cluster_id = broker[partitions[0]].cluster_id
            moves: dict[int, Mark | None] = {}
            for partition, mine in stored.items():
                theirs = broker[partition]
                reason = other_log(mine, theirs)
                last = self.last_stored.get(partition)
                if reason is None:
                    newest = last[0] if last else None
                    newer = newest is not None and (
                        mine.checkpoint is None or newest.offset > mine.checkpoint.offset
                    )
                    if newer or (cluster_id is not None and mine.cluster_id != cluster_id):
                        moves[partition] = newest if newer else None
                    continue
                restarted = await self.offsets.restart(
                    connection, partition, mine.next_offset, theirs.earliest, cluster_id
                )
                if restarted:
                    log.warning(
                        "sink %s: partition %d is not the log its stored offsets came from "
                        "(%s; stored next offset %d, broker's earliest offset %d, high-water "
                        "mark %d): storing it again from offset %d",
                        self.topic,
                        partition,
                        reason,
                        mine.next_offset,
                        theirs.earliest,
                        theirs.end,
                        theirs.earliest,
                    )
                    self.status.log_resets += 1
                    restarts[partition] = theirs.earliest
                    self.started_over.add(partition)
                # Read again at the next batch (another worker may have moved it meanwhile).
                self.stored_next.pop(partition, None)
                self.floors.pop(partition, None)
                self.last_stored.pop(partition, None)
            if moves:
                await self.offsets.confirm(connection, moves, cluster_id)
        self.cluster_id = cluster_id
        confirmed = (app.consumer_generation_id, time.monotonic())
        self.confirmed.update(dict.fromkeys(partitions, confirmed))
        return restarts

    async def _store_batch(self, messages: Sequence[Message]) -> None:
        # Before anything is decided by the stored offsets (also which bad messages are new).
        if due := self._logs_to_check(messages):
            await self._until_done("log check", partial(self._check_logs, due))
        delivered: list[Delivered[StreamRecord | None]] = []
        batch: list[Stored] = []
        for message in messages:
            payload: StreamRecord | None = None
            try:
                payload = decode_record(self.record, message.value)
            except RecordRejected as bad:
                # Before the offsets can move past it, the bad message must be in the DLQ.
                if message.offset >= self.stored_next.get(message.partition, -1):
                    await self._until_done(
                        "dead-letter", partial(self._dead_letter, message, bad.reason)
                    )
            delivered.append(Delivered(message.partition, message.offset, payload))
            batch.append((message, payload))
        self.status.pending_events = len(messages)
        continuation, result = await self._until_done(
            "write", partial(self._store, delivered, messages)
        )
        self.status.rows_written += result.inserted
        self.status.duplicates_skipped += result.duplicates
        self.status.replayed_skipped += continuation.replayed
        self.status.last_write_at = datetime.now(UTC)
        for partition, offset in continuation.holes.items():
            await self._refetch(partition, offset)
        if not self.stored:
            self.stored_since = time.monotonic()
        self.stored.extend(batch)
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
            or len(self.stored) >= settings.sink_batch_size
            or not app.flow_control.is_active()  # a rebalance or shutdown waits for the acks
        ):
            return 0.0
        due = self.stored_since + settings.live_table_update_seconds
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
            self.publishing = asyncio.ensure_future(self._hand_over(stored))

    async def _hand_over(self, stored: Sequence[Stored]) -> None:
        """The observers' updates are idempotent (a replay or re-fetch changes nothing), and a
        failing observer must not stop the sink."""
        try:
            for observer in self.observers:
                try:
                    await observer(stored)
                except Exception:
                    log.exception("sink %s: observer %s failed", self.topic, observer.__name__)
            self.batches.ack([message for message, _ in stored])
        finally:
            self.publishing = None

    async def _store(
        self, delivered: Sequence[Delivered[StreamRecord | None]], messages: Sequence[Message]
    ) -> tuple[Continuation[StreamRecord | None], WriteResult]:
        """One transaction: lock the partitions' stored offsets, write what continues them,
        advance them (with each partition's last stored message, for its log's checkpoint)."""
        partitions = sorted({item.partition for item in delivered})
        new = [p for p in partitions if p not in self.stored_next]
        starts = await self._earliest(new) if new else {}
        pool = await self.database.get()
        async with pool.acquire() as connection, connection.transaction():
            stored = await self.offsets.lock(
                connection, partitions, starts, self.floors, self.cluster_id
            )
            continuation = continue_sequences(delivered, stored)
            records = [record for record in continuation.accepted if record is not None]
            result = await self.writer.insert(connection, records)
            last = last_stored(messages, continuation.next_offsets)
            await self.offsets.advance(connection, continuation.next_offsets, last)
        self.stored_next.update({**stored, **continuation.next_offsets})
        now = time.monotonic()
        self.last_stored.update({p: (stored_mark, now) for p, stored_mark in last.items()})
        self.started_over -= set(last)
        return continuation, result

    async def _earliest(self, partitions: Sequence[int]) -> dict[int, int]:
        earliest = await app.consumer.earliest_offsets(*(TP(self.topic, p) for p in partitions))
        return {tp.partition: offset for tp, offset in earliest.items()}

    async def _refetch(self, partition: int, offset: int) -> None:
        """Seek back to the first offset not stored, unless retention has deleted it."""
        self.status.holes_refetched += 1
        if partition in self.started_over:  # announced already, as a log found restarted
            await self._seek(partition, offset)
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
            self.floors[partition] = earliest
            offset = earliest
        else:
            log.warning(
                "sink %s: partition %d skipped to a later offset; fetching again from %d",
                self.topic,
                partition,
                offset,
            )
        await self._seek(partition, offset)

    async def _seek(self, partition: int, offset: int) -> None:
        try:
            await app.consumer.seek(TP(self.topic, partition), offset)
        except Exception as error:  # no longer assigned (rebalance): the new owner resumes it
            log.info("sink %s: seek of partition %d skipped: %s", self.topic, partition, error)

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
        # force=True sends now, whatever Faust's current event is.
        delivery = await self.dead_letter_topic.send(
            key=message.key, value=message.value, headers=items, force=True
        )
        await delivery
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
                self.status.last_error = describe_error(error)
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


def last_stored(messages: Sequence[Message], next_offsets: Mapping[int, int]) -> dict[int, Mark]:
    """Each advanced partition's last stored message, as a mark. Searched from the end: it is
    usually among the batch's last few messages."""
    wanted = {partition: offset - 1 for partition, offset in next_offsets.items()}
    last: dict[int, Mark] = {}
    for message in reversed(messages):
        if wanted.get(message.partition) == message.offset:
            last[message.partition] = mark(message)
            if len(last) == len(wanted):
                break
    return last


def mark(message: Message) -> Mark:
    """The message as a log checkpoint (Faust keeps the broker's timestamp in seconds)."""
    timestamp = message.timestamp
    timestamp_ms = None if timestamp is None else round(timestamp * 1000)
    return Mark(message.offset, fingerprint(timestamp_ms, message.key, message.value))


def _register(record: type[StreamRecord]) -> Sink:
    sink = Sink(record, DATABASE)
    agent = app.agent(topics[record.topic.name], name=f"sink_{record.table.name}")(sink.consume)
    # What `faust -A app agents` shows (Faust's default is the docstring of `consume`).
    agent.help = (
        f"Stores {record.__name__} records in the {record.table.name} table, batched and "
        f"idempotent; bad messages go to {record.topic.dead_letter_name}."
    )
    return sink


SINKS: dict[str, Sink] = {record.topic.name: _register(record) for record in RECORDS}


@app.on_before_shutdown.connect
async def _close_pool(sender: object, /, *args: object, signal: object, **kwargs: object) -> None:
    """Runs after Faust waited for every stream to acknowledge its events: nothing is in flight."""
    await DATABASE.close()
    await BROKER_LOGS.close()
