"""One sink's side of the database: its batches and their stored offsets, and what it knows of
them between batches.

The rules are store/offsets.py's; this is their sequence, kept in one place so that a sink (or a
test) cannot get the order wrong: a batch is written in ONE transaction that locks its
partitions' stored offsets, keeps what continues them (`continue_sequences`), inserts those rows
and advances the offsets. Between batches it remembers the stored offsets it last saw (so that a
replayed bad message is not dead-lettered twice), the floors retention left after a hole, and
when each partition's log was last confirmed against the broker's (`check_logs`).

It knows nothing of Faust: messages are anything with a partition, offset, timestamp, key and
value; the broker is reached through the callables a caller passes.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import asyncpg

from models.dsl import StreamRecord
from store.db import LazyPool
from store.offsets import (
    BrokerLog,
    Continuation,
    Delivered,
    Mark,
    SinkOffsets,
    continue_sequences,
    fingerprint,
    other_log,
)
from store.writer import RecordWriter, Row, WriteResult

T = TypeVar("T")

# The broker's earliest offsets of some partitions of the sink's topic.
Earliest = Callable[[Sequence[int]], Awaitable[dict[int, int]]]
# What the broker says of the partitions' logs, given the stored checkpoints (app/broker_logs.py).
LookAtLogs = Callable[[Mapping[int, Mark | None]], Awaitable[dict[int, BrokerLog]]]


class Fetched(Protocol):
    """A fetched message, as far as the stored offsets need it (Faust's `Message` is one)."""

    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> float | None: ...  # seconds, as Faust keeps the broker's
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


@dataclass(frozen=True)
class Restart:
    """A partition found on another log than its stored offsets, started over at `at`."""

    reason: str
    stored_next: int
    broker: BrokerLog

    @property
    def at(self) -> int:
        return self.broker.earliest


class Ledger:
    """The lock -> check -> insert -> advance transaction of one record topic, and its caches."""

    def __init__(
        self,
        database: LazyPool,
        record: type[StreamRecord],
        consumer_group: str,
        log_check_seconds: float,
    ) -> None:
        self.database = database
        self.writer = RecordWriter(record)
        self.offsets = SinkOffsets(consumer_group, record.topic.name)
        self.log_check_seconds = log_check_seconds
        self.stored_next: dict[int, int] = {}  # last known stored offsets (a cache)
        self.floors: dict[int, int] = {}  # earliest offsets the broker still holds, after holes
        # The partitions' logs: when each was last confirmed (consumer generation, monotonic
        # time), the last message stored of it and when, the cluster id found, and the partitions
        # started over whose next hole is part of that (not worth a warning of its own).
        self.confirmed: dict[int, tuple[int, float]] = {}
        self.last_stored: dict[int, tuple[Mark, float]] = {}
        self.cluster_id: str | None = None
        self.started_over: set[int] = set()

    def is_new(self, partition: int, offset: int) -> bool:
        """Whether the message is not below its partition's stored offset (as last seen)."""
        return offset >= self.stored_next.get(partition, -1)

    def expired(self, partition: int, earliest: int) -> None:
        """Retention deleted the partition's messages below `earliest` before they were stored:
        its stored offset moves up to it at the next batch."""
        self.floors[partition] = earliest

    def logs_due(self, messages: Sequence[Fetched], generation: int) -> list[int]:
        """The batch's partitions whose log must be confirmed before it is stored: first seen in
        this consumer generation, last confirmed too long ago, or replayed (below the stored
        offset) after storing something since the last confirmation."""
        stale = time.monotonic() - self.log_check_seconds
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

    async def check_logs(
        self, partitions: Sequence[int], look: LookAtLogs, generation: int
    ) -> dict[int, Restart]:
        """Confirm the partitions' logs (store/offsets.py); start those found on another log over
        at the broker's earliest offset, and return them."""
        pool = await self.database.get()
        restarts: dict[int, Restart] = {}
        async with pool.acquire() as connection:
            stored = await self.offsets.logs(connection, partitions)
            broker = await look(
                {p: stored[p].checkpoint if p in stored else None for p in partitions}
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
                    restarts[partition] = Restart(reason, mine.next_offset, theirs)
                    self.started_over.add(partition)
                # Read again at the next batch (another worker may have moved it meanwhile).
                self.stored_next.pop(partition, None)
                self.floors.pop(partition, None)
                self.last_stored.pop(partition, None)
            if moves:
                await self.offsets.confirm(connection, moves, cluster_id)
        self.cluster_id = cluster_id
        self.confirmed.update(dict.fromkeys(partitions, (generation, time.monotonic())))
        return restarts

    async def store(
        self,
        delivered: Sequence[Delivered[Row | None]],
        messages: Sequence[Fetched],
        earliest: Earliest,
    ) -> tuple[Continuation[Row | None], WriteResult]:
        """Store what of the batch continues the stored offsets, and advance them, in one
        transaction (`delivered[i]` is `messages[i]` decoded, as its row (`RecordWriter.row`);
        None: dead-lettered). Partitions
        seen for the first time start at the broker's `earliest` offset."""
        partitions = sorted({message.partition for message in messages})
        new = [p for p in partitions if p not in self.stored_next]
        starts = await earliest(new) if new else {}
        pool = await self.database.get()
        async with pool.acquire() as connection, connection.transaction():
            stored, continuation, result, last = await self._write(
                connection, partitions, starts, delivered, messages
            )
        self.stored_next.update({**stored, **continuation.next_offsets})
        now = time.monotonic()
        self.last_stored.update({p: (stored_mark, now) for p, stored_mark in last.items()})
        self.started_over -= set(last)
        return continuation, result

    async def _write(
        self,
        connection: asyncpg.Connection,
        partitions: Sequence[int],
        starts: Mapping[int, int],
        delivered: Sequence[Delivered[Row | None]],
        messages: Sequence[Fetched],
    ) -> tuple[dict[int, int], Continuation[Row | None], WriteResult, dict[int, Mark]]:
        """The body of a batch's transaction: lock the partitions' stored offsets, write what
        continues them, advance them (with each partition's last stored message, for its log's
        checkpoint). Whatever must commit or roll back with the batch belongs here."""
        stored = await self.offsets.lock(
            connection, partitions, starts, self.floors, self.cluster_id
        )
        continuation = continue_sequences(delivered, stored)
        rows = [row for row in continuation.accepted if row is not None]
        result = await self.writer.insert_rows(connection, rows)
        last = last_stored(messages, continuation.next_offsets)
        await self.offsets.advance(connection, continuation.next_offsets, last)
        return stored, continuation, result, last


def last_stored(messages: Sequence[Fetched], next_offsets: Mapping[int, int]) -> dict[int, Mark]:
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


def mark(message: Fetched) -> Mark:
    """The message as a log checkpoint (Faust keeps the broker's timestamp in seconds)."""
    timestamp = message.timestamp
    timestamp_ms = None if timestamp is None else round(timestamp * 1000)
    return Mark(message.offset, fingerprint(timestamp_ms, message.key, message.value))
