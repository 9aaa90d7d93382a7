"""Stored sink offsets: the sequence rules, and the transaction-scoped table against PostgreSQL."""

from __future__ import annotations

import asyncpg
import pytest

from schema.migrate import migrate_database
from store.offsets import Delivered, SinkOffsets, continue_sequences


def batch(*positions: tuple[int, int]) -> list[Delivered[str]]:
    return [Delivered(p, o, f"{p}:{o}") for p, o in positions]


def test_a_batch_that_continues_the_stored_offsets_is_accepted_whole() -> None:
    result = continue_sequences(batch((0, 5), (1, 0), (0, 6), (1, 1)), {0: 5, 1: 0})
    assert sorted(result.accepted) == ["0:5", "0:6", "1:0", "1:1"]
    assert result.next_offsets == {0: 7, 1: 2}
    assert (result.replayed, result.holes, result.left_for_refetch) == (0, {}, 0)


def test_offsets_below_the_stored_one_are_replays_and_not_accepted() -> None:
    result = continue_sequences(batch((0, 3), (0, 4), (0, 5), (0, 6)), {0: 5})
    assert result.accepted == ["0:5", "0:6"]
    assert result.replayed == 2
    assert result.next_offsets == {0: 7}


def test_a_hole_stops_the_partition_and_asks_for_a_refetch() -> None:
    # Faust skipped offset 1 of partition 2 (the #606 shape): nothing from 2 on may be written.
    result = continue_sequences(batch((2, 0), (2, 2), (2, 3), (4, 0)), {2: 0, 4: 0})
    assert sorted(result.accepted) == ["2:0", "4:0"]
    assert result.holes == {2: 1}
    assert result.left_for_refetch == 2
    assert result.next_offsets == {2: 1, 4: 1}


def test_a_hole_at_the_head_writes_nothing_of_that_partition() -> None:
    result = continue_sequences(batch((1, 8), (1, 9)), {1: 7})
    assert result.accepted == []
    assert result.holes == {1: 7}
    assert result.next_offsets == {}


def test_out_of_order_delivery_within_a_batch_is_sorted_first() -> None:
    result = continue_sequences(batch((0, 2), (0, 0), (0, 1)), {0: 0})
    assert result.accepted == ["0:0", "0:1", "0:2"]


@pytest.fixture
async def connection(database_dsn: str) -> asyncpg.Connection:
    await migrate_database(database_dsn)
    connection = await asyncpg.connect(database_dsn)
    yield connection
    await connection.close()


async def test_offsets_start_at_the_given_start_and_advance_only_when_committed(
    connection: asyncpg.Connection,
) -> None:
    offsets = SinkOffsets("group-a", "crypto-prices")
    async with connection.transaction():
        assert await offsets.lock(connection, [0, 3], {0: 0, 3: 10}, {}) == {0: 0, 3: 10}
        await offsets.advance(connection, {0: 4})
    with pytest.raises(RuntimeError):
        async with connection.transaction():
            await offsets.advance(connection, {3: 99})
            raise RuntimeError("the batch's write failed")
    assert await offsets.read(connection) == {0: 4, 3: 10}
    # A start given again for a known partition does not move it back.
    async with connection.transaction():
        assert await offsets.lock(connection, [0], {0: 0}, {}) == {0: 4}
    # Another group or topic is independent.
    assert await SinkOffsets("group-b", "crypto-prices").read(connection) == {}


async def test_a_floor_lifts_an_offset_that_retention_has_deleted(
    connection: asyncpg.Connection,
) -> None:
    offsets = SinkOffsets("g", "crypto-ohlcv")
    async with connection.transaction():
        await offsets.lock(connection, [0], {0: 0}, {})
        assert await offsets.lock(connection, [0], {}, {0: 50}) == {0: 50}


async def test_an_unknown_partition_without_a_start_is_an_error(
    connection: asyncpg.Connection,
) -> None:
    with pytest.raises(LookupError, match=r"partitions \[2\]"):
        async with connection.transaction():
            await SinkOffsets("g", "t").lock(connection, [2], {}, {})
