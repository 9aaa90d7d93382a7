"""The sinks' stored offsets: which part of each topic partition is durable in the database.

A sink writes its rows and advances `sink_offsets` in ONE transaction, so the stored offset is
exactly what is durable. That makes the database, not the broker's committed offsets, the
authority on where a partition continues, and closes the holes Faust's own offset handling can
open (faust-streaming #606: a single unacknowledged head offset can be committed past; a
rebalance can drop a fetched message and move on). Each batch must continue the stored sequence:

- offsets below the stored one were stored before (a replay, a consumer-group reset): skipped;
- an offset above the next expected one is a hole: nothing from there on is written, and the sink
  seeks the partition back to the expected offset so the missing records are fetched again.

Record topics are written by plain (non-transactional) producers with delete retention, so their
offsets are consecutive; the only legitimate hole is retention deleting records that were never
stored, which the sink detects from the partition's earliest offset (`floors`).

An offset means something only in the log it came from. A broker with memory storage (the
embedded one) starts empty, a topic can be deleted and created again, `BROKER_URL` can point at
another cluster: the new log's offsets start at 0 again, below the stored ones, and the rules
above would skip every record of it as a replay. So each stored offset is bound to its log:

- the cluster id the broker reported (Kafka and Redpanda report a fixed one; each start of the
  embedded broker gets a fresh one), and
- a checkpoint: the offset and fingerprint (broker timestamp, key, value) of a message stored
  from that log. It is set by the first batch stored after a (re)start of the sequence and moved
  up to the latest stored message each time the log is confirmed.

The sink confirms a partition's log (`other_log`) before it stores the partition's first batch
after an assignment, when a batch replays a partition that stored something since it was last
confirmed, and every SINK_LOG_CHECK_SECONDS: the cluster id must be the stored one, and the
message at the checkpoint must still be there and the same. A topic re-created under a running
worker is caught by the checkpoint, even if the new log grew past the stored offset meanwhile.
Rows without a checkpoint (written before it existed) fall back to the high-water mark: a log
that ends below the stored offset is another one. A partition on another log starts over at the
broker's earliest offset (`restart`): everything is stored again, which the primary key makes
idempotent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Generic, TypeAlias, TypeVar

import asyncpg

from generators.sql import SINK_OFFSETS_TABLE

T = TypeVar("T")

_TABLE = '"' + SINK_OFFSETS_TABLE + '"'
# New partitions start at their earliest offset; existing rows are left alone.
_INITIALISE = (
    f"INSERT INTO {_TABLE} (consumer_group, topic, topic_partition, next_offset, cluster_id) "  # noqa: S608
    "SELECT $1, $2, p, o, $5 FROM unnest($3::int[], $4::bigint[]) AS t(p, o) "
    "ON CONFLICT DO NOTHING"
)
# FOR UPDATE: a worker that still believes it owns a partition after a rebalance waits here and
# then sees the new owner's progress, instead of both writing from the same position.
_LOCK = (
    f"SELECT topic_partition, next_offset FROM {_TABLE} "  # noqa: S608
    "WHERE consumer_group = $1 AND topic = $2 AND topic_partition = ANY($3::int[]) "
    "ORDER BY topic_partition FOR UPDATE"
)
# A sequence (re)started without a checkpoint takes the batch's last stored message as its first.
_ADVANCE = (
    f"UPDATE {_TABLE} AS s SET next_offset = t.o, updated_at = now(), "  # noqa: S608
    "checkpoint_offset = coalesce(s.checkpoint_offset, t.co), "
    "checkpoint_digest = coalesce(s.checkpoint_digest, t.cd) "
    "FROM unnest($3::int[], $4::bigint[], $5::bigint[], $6::bytea[]) AS t(p, o, co, cd) "
    "WHERE s.consumer_group = $1 AND s.topic = $2 AND s.topic_partition = t.p"
)
_LOGS = (
    f"SELECT topic_partition, next_offset, cluster_id, checkpoint_offset, checkpoint_digest "  # noqa: S608
    f"FROM {_TABLE} WHERE consumer_group = $1 AND topic = $2 AND topic_partition = ANY($3::int[])"
)
# Confirmed: the cluster id is filled in (rows from before it was kept), the checkpoint moves up.
_CONFIRM = (
    f"UPDATE {_TABLE} AS s SET cluster_id = coalesce($3, s.cluster_id), "  # noqa: S608
    "checkpoint_offset = coalesce(t.co, s.checkpoint_offset), "
    "checkpoint_digest = coalesce(t.cd, s.checkpoint_digest) "
    "FROM unnest($4::int[], $5::bigint[], $6::bytea[]) AS t(p, co, cd) "
    "WHERE s.consumer_group = $1 AND s.topic = $2 AND s.topic_partition = t.p "
    "AND (t.co IS NULL OR t.co < s.next_offset)"
)
# Only from the offset it was judged on: a worker that took the partition over meanwhile and
# moved on is not set back.
_RESTART = (
    f"UPDATE {_TABLE} SET next_offset = $5, cluster_id = $6, checkpoint_offset = NULL, "  # noqa: S608
    "checkpoint_digest = NULL, updated_at = now() "
    "WHERE consumer_group = $1 AND topic = $2 AND topic_partition = $3 AND next_offset = $4"
)


def fingerprint(timestamp_ms: int | None, key: bytes | None, value: bytes | None) -> bytes:
    """Enough of a message to recognise it at its offset: another log holding a message with the
    same broker timestamp, key and value at the same offset is as good as the same log. A message
    without a timestamp counts as timestamp -1 (how Kafka's wire format spells it)."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (str(-1 if timestamp_ms is None else timestamp_ms).encode(), key, value):
        digest.update(b"-" if part is None else b"+%d:" % len(part))
        digest.update(part or b"")
    return digest.digest()


@dataclass(frozen=True)
class Mark:
    """A message recognised by its offset and fingerprint."""

    offset: int
    digest: bytes


@dataclass(frozen=True)
class StoredLog:
    """What `sink_offsets` says about a partition's log."""

    next_offset: int
    cluster_id: str | None
    checkpoint: Mark | None


@dataclass(frozen=True)
class BrokerLog:
    """What the broker says about a partition's log now."""

    cluster_id: str | None
    earliest: int
    end: int  # high-water mark: exact on Kafka and Redpanda, below the end on the embedded broker
    at_checkpoint: Mark | None  # the message at the stored checkpoint's offset; None: none there


def other_log(stored: StoredLog, broker: BrokerLog) -> str | None:
    """Why the broker's partition is not the log `stored` came from; None when it is (or cannot
    be told apart: a checkpoint that retention has deleted proves nothing)."""
    if stored.cluster_id and broker.cluster_id and stored.cluster_id != broker.cluster_id:
        return f"the broker's cluster id is {broker.cluster_id!r}, not {stored.cluster_id!r}"
    checkpoint = stored.checkpoint
    if checkpoint is None:
        if broker.end < stored.next_offset:
            return f"its high-water mark {broker.end} is below the stored offset"
        return None
    if checkpoint.offset < broker.earliest:
        return None
    found = broker.at_checkpoint
    if found is None:
        return f"no message at offset {checkpoint.offset}, where one was stored from"
    if found != checkpoint:
        return f"another message at offset {checkpoint.offset} than the one stored from"
    return None


# One message as the sink received it: (partition, offset, its decoded payload). A plain tuple:
# one is made per message, and a named tuple's constructor is a Python call (~0.3 µs, against
# ~0.05 for the tuple; docs/performance.md, section 7).
Delivered: TypeAlias = tuple[int, int, T]


@dataclass
class Continuation(Generic[T]):
    """What of a batch continues the stored sequences, and where each partition goes next."""

    accepted: list[T] = field(default_factory=list)
    next_offsets: dict[int, int] = field(default_factory=dict)
    replayed: int = 0  # messages below the stored offset: stored before
    holes: dict[int, int] = field(default_factory=dict)  # partition -> offset to fetch again
    left_for_refetch: int = 0  # messages after a hole, not written this time


_offset = itemgetter(1)  # a Delivered's offset, without a Python call per item


def continue_sequences(batch: Sequence[Delivered[T]], stored: Mapping[int, int]) -> Continuation[T]:
    """Split a batch by the stored next offset of each partition (see the module docstring)."""
    result: Continuation[T] = Continuation()
    by_partition: dict[int, list[Delivered[T]]] = {}
    for item in batch:
        by_partition.setdefault(item[0], []).append(item)
    for partition, items in by_partition.items():
        expected = stored[partition]
        for _, offset, payload in sorted(items, key=_offset):
            if partition in result.holes:
                result.left_for_refetch += 1
            elif offset < expected:
                result.replayed += 1
            elif offset == expected:
                result.accepted.append(payload)
                expected += 1
            else:
                result.holes[partition] = expected
                result.left_for_refetch += 1
        if expected != stored[partition]:
            result.next_offsets[partition] = expected
    return result


class SinkOffsets:
    """Stored offsets of one consumer group on one topic, used inside the sink's transaction."""

    def __init__(self, consumer_group: str, topic: str) -> None:
        self.key = (consumer_group, topic)

    async def lock(
        self,
        connection: asyncpg.Connection,
        partitions: Sequence[int],
        starts: Mapping[int, int],
        floors: Mapping[int, int],
        cluster_id: str | None = None,
    ) -> dict[int, int]:
        """Lock and read the partitions' next offsets. A partition seen for the first time starts
        at `starts[p]`, bound to `cluster_id`; `floors[p]` moves a stored offset up to what the
        broker still holds."""
        if starts:
            await connection.execute(
                _INITIALISE, *self.key, list(starts), list(starts.values()), cluster_id
            )
        rows = await connection.fetch(_LOCK, *self.key, list(partitions))
        stored = {row["topic_partition"]: row["next_offset"] for row in rows}
        missing = set(partitions) - set(stored)
        if missing:
            raise LookupError(f"no stored offset for partitions {sorted(missing)}")
        return {p: max(offset, floors.get(p, offset)) for p, offset in stored.items()}

    async def advance(
        self,
        connection: asyncpg.Connection,
        next_offsets: Mapping[int, int],
        last: Mapping[int, Mark],
    ) -> None:
        """Move the partitions to their next offsets; `last[p]` is the batch's last stored message
        of `p`, the checkpoint of a sequence that has none yet."""
        if next_offsets:
            partitions = list(next_offsets)
            await connection.execute(
                _ADVANCE,
                *self.key,
                partitions,
                [next_offsets[p] for p in partitions],
                [last[p].offset for p in partitions],
                [last[p].digest for p in partitions],
            )

    async def logs(
        self, connection: asyncpg.Connection, partitions: Sequence[int]
    ) -> dict[int, StoredLog]:
        """The stored logs of those partitions that have a stored offset."""
        rows = await connection.fetch(_LOGS, *self.key, list(partitions))
        return {
            row["topic_partition"]: StoredLog(
                row["next_offset"],
                row["cluster_id"],
                None
                if row["checkpoint_offset"] is None
                else Mark(row["checkpoint_offset"], row["checkpoint_digest"]),
            )
            for row in rows
        }

    async def confirm(
        self,
        connection: asyncpg.Connection,
        checkpoints: Mapping[int, Mark | None],
        cluster_id: str | None,
    ) -> None:
        """The partitions' logs were confirmed: record the cluster id, and move each checkpoint
        to the given message (None: keep it)."""
        partitions = list(checkpoints)
        marks = [checkpoints[p] for p in partitions]
        await connection.execute(
            _CONFIRM,
            *self.key,
            cluster_id,
            partitions,
            [None if mark is None else mark.offset for mark in marks],
            [None if mark is None else mark.digest for mark in marks],
        )

    async def restart(
        self,
        connection: asyncpg.Connection,
        partition: int,
        judged: int,
        earliest: int,
        cluster_id: str | None,
    ) -> bool:
        """Start the partition's sequence over at `earliest` of a new log, if it is still at the
        `judged` offset; whether it was."""
        status = await connection.execute(
            _RESTART, *self.key, partition, judged, earliest, cluster_id
        )
        return bool(status == "UPDATE 1")

    async def read(self, connection: asyncpg.Connection) -> dict[int, int]:
        """Every stored partition of this group and topic (for tests and operators)."""
        rows = await connection.fetch(
            f"SELECT topic_partition, next_offset FROM {_TABLE} "  # noqa: S608
            "WHERE consumer_group = $1 AND topic = $2",
            *self.key,
        )
        return {row["topic_partition"]: row["next_offset"] for row in rows}
