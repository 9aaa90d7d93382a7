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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import asyncpg

from schema.sql import SINK_OFFSETS_TABLE

T = TypeVar("T")

_TABLE = '"' + SINK_OFFSETS_TABLE + '"'
# New partitions start at their earliest offset; existing rows are left alone.
_INITIALISE = (
    f"INSERT INTO {_TABLE} (consumer_group, topic, topic_partition, next_offset) "  # noqa: S608
    "SELECT $1, $2, p, o FROM unnest($3::int[], $4::bigint[]) AS t(p, o) "
    "ON CONFLICT DO NOTHING"
)
# FOR UPDATE: a worker that still believes it owns a partition after a rebalance waits here and
# then sees the new owner's progress, instead of both writing from the same position.
_LOCK = (
    f"SELECT topic_partition, next_offset FROM {_TABLE} "  # noqa: S608
    "WHERE consumer_group = $1 AND topic = $2 AND topic_partition = ANY($3::int[]) "
    "ORDER BY topic_partition FOR UPDATE"
)
_ADVANCE = (
    f"UPDATE {_TABLE} AS s SET next_offset = t.o, updated_at = now() "  # noqa: S608
    "FROM unnest($3::int[], $4::bigint[]) AS t(p, o) "
    "WHERE s.consumer_group = $1 AND s.topic = $2 AND s.topic_partition = t.p"
)


@dataclass(frozen=True)
class Delivered(Generic[T]):
    """One message as the sink received it: where it sits, and its decoded payload."""

    partition: int
    offset: int
    payload: T


@dataclass
class Continuation(Generic[T]):
    """What of a batch continues the stored sequences, and where each partition goes next."""

    accepted: list[T] = field(default_factory=list)
    next_offsets: dict[int, int] = field(default_factory=dict)
    replayed: int = 0  # messages below the stored offset: stored before
    holes: dict[int, int] = field(default_factory=dict)  # partition -> offset to fetch again
    left_for_refetch: int = 0  # messages after a hole, not written this time


def continue_sequences(batch: Sequence[Delivered[T]], stored: Mapping[int, int]) -> Continuation[T]:
    """Split a batch by the stored next offset of each partition (see the module docstring)."""
    result: Continuation[T] = Continuation()
    by_partition: dict[int, list[Delivered[T]]] = {}
    for item in batch:
        by_partition.setdefault(item.partition, []).append(item)
    for partition, items in by_partition.items():
        expected = stored[partition]
        for item in sorted(items, key=lambda delivered: delivered.offset):
            if partition in result.holes:
                result.left_for_refetch += 1
            elif item.offset < expected:
                result.replayed += 1
            elif item.offset == expected:
                result.accepted.append(item.payload)
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
    ) -> dict[int, int]:
        """Lock and read the partitions' next offsets. A partition seen for the first time starts
        at `starts[p]`; `floors[p]` moves a stored offset up to what the broker still holds."""
        if starts:
            await connection.execute(_INITIALISE, *self.key, list(starts), list(starts.values()))
        rows = await connection.fetch(_LOCK, *self.key, list(partitions))
        stored = {row["topic_partition"]: row["next_offset"] for row in rows}
        missing = set(partitions) - set(stored)
        if missing:
            raise LookupError(f"no stored offset for partitions {sorted(missing)}")
        return {p: max(offset, floors.get(p, offset)) for p, offset in stored.items()}

    async def advance(
        self, connection: asyncpg.Connection, next_offsets: Mapping[int, int]
    ) -> None:
        if next_offsets:
            await connection.execute(
                _ADVANCE, *self.key, list(next_offsets), list(next_offsets.values())
            )

    async def read(self, connection: asyncpg.Connection) -> dict[int, int]:
        """Every stored partition of this group and topic (for tests and operators)."""
        rows = await connection.fetch(
            f"SELECT topic_partition, next_offset FROM {_TABLE} "  # noqa: S608
            "WHERE consumer_group = $1 AND topic = $2",
            *self.key,
        )
        return {row["topic_partition"]: row["next_offset"] for row in rows}
