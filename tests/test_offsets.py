"""Stored sink offsets: the sequence rules, how a stored offset is bound to its log, and the
transaction-scoped table against PostgreSQL."""

from __future__ import annotations

import asyncpg
import pytest

from generators.migrate import migrate_database
from store.offsets import (
    BrokerLog,
    Delivered,
    Mark,
    SinkOffsets,
    StoredLog,
    continue_sequences,
    fingerprint,
    other_log,
)


def batch(*positions: tuple[int, int]) -> list[Delivered[str]]:
    return [(p, o, f"{p}:{o}") for p, o in positions]


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
        await offsets.advance(connection, {0: 4}, {0: MARK_3})
    with pytest.raises(RuntimeError):
        async with connection.transaction():
            await offsets.advance(connection, {3: 99}, {3: Mark(98, MARK_3.digest)})
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


MARK_3 = Mark(3, fingerprint(1_700_000_000_123, b"bitcoin", b'{"usd_price": "1"}'))


def test_a_fingerprint_tells_timestamp_key_and_value_apart() -> None:
    base = (1_700_000_000_123, b"k", b"v")
    variants = [
        base,
        (1_700_000_000_124, b"k", b"v"),
        (1_700_000_000_123, b"K", b"v"),
        (1_700_000_000_123, b"k", b"V"),
        (1_700_000_000_123, None, b"v"),
        (1_700_000_000_123, b"", b"v"),
        (1_700_000_000_123, b"kv", b""),  # the same bytes, split differently
        (1_700_000_000_123, b"k", None),
        (None, b"k", b"v"),
    ]
    assert len({fingerprint(*variant) for variant in variants}) == len(variants)
    assert fingerprint(*base) == fingerprint(*base)
    assert fingerprint(None, b"k", b"v") == fingerprint(-1, b"k", b"v")


def stored_log(cluster: str | None = "c1", checkpoint: Mark | None = MARK_3) -> StoredLog:
    return StoredLog(next_offset=10, cluster_id=cluster, checkpoint=checkpoint)


def broker_log(
    cluster: str | None = "c1", earliest: int = 0, end: int = 10, found: Mark | None = MARK_3
) -> BrokerLog:
    return BrokerLog(cluster_id=cluster, earliest=earliest, end=end, at_checkpoint=found)


def test_the_same_log_is_confirmed() -> None:
    assert other_log(stored_log(), broker_log()) is None
    # A high-water mark below the stored offset (the embedded broker's count batches) proves
    # nothing where the checkpoint is still there.
    assert other_log(stored_log(), broker_log(end=4)) is None
    # A cluster id not known on one side is not a mismatch.
    assert other_log(stored_log(cluster=None), broker_log()) is None
    assert other_log(stored_log(), broker_log(cluster=None)) is None


def test_another_cluster_is_another_log() -> None:
    reason = other_log(stored_log(), broker_log(cluster="c2"))
    assert reason is not None and "'c2'" in reason and "'c1'" in reason


def test_a_log_without_the_checkpoint_message_is_another_log() -> None:
    reason = other_log(stored_log(), broker_log(end=2, found=None))
    assert reason is not None and "no message at offset 3," in reason


def test_a_log_with_another_message_at_the_checkpoint_is_another_log() -> None:
    other = Mark(3, fingerprint(1_700_000_000_999, b"bitcoin", b'{"usd_price": "1"}'))
    reason = other_log(stored_log(), broker_log(end=50, found=other))
    assert reason is not None and "another message at offset 3 " in reason
    # The message found first past a gap is not the one at the checkpoint either.
    assert other_log(stored_log(), broker_log(found=Mark(4, MARK_3.digest))) is not None


def test_a_checkpoint_that_retention_deleted_proves_nothing() -> None:
    assert other_log(stored_log(), broker_log(earliest=4, found=None)) is None


def test_without_a_checkpoint_a_log_that_ends_below_the_stored_offset_is_another_log() -> None:
    reason = other_log(stored_log(checkpoint=None), broker_log(end=9, found=None))
    assert reason is not None and "high-water mark 9 " in reason
    assert other_log(stored_log(checkpoint=None), broker_log(end=10, found=None)) is None


async def test_the_first_batch_sets_the_checkpoint_and_only_a_confirmation_moves_it(
    connection: asyncpg.Connection,
) -> None:
    offsets = SinkOffsets("g", "crypto-prices")
    async with connection.transaction():
        await offsets.lock(connection, [0, 1], {0: 0, 1: 0}, {}, "c1")
        await offsets.advance(connection, {0: 4}, {0: MARK_3})
    later = Mark(7, fingerprint(1_700_000_000_200, b"k", b"v"))
    async with connection.transaction():
        await offsets.lock(connection, [0], {}, {})
        await offsets.advance(connection, {0: 8}, {0: later})
    assert await offsets.logs(connection, [0, 1, 2]) == {
        0: StoredLog(8, "c1", MARK_3),
        1: StoredLog(0, "c1", None),
    }
    await offsets.confirm(connection, {0: later, 1: None}, "c1")
    assert (await offsets.logs(connection, [0]))[0].checkpoint == later
    # Never past what is stored (a stale worker's last message of a partition moved back).
    await offsets.confirm(connection, {1: later}, "c1")
    assert (await offsets.logs(connection, [1]))[1].checkpoint is None


async def test_a_confirmation_fills_in_the_cluster_id_of_rows_from_before_it(
    connection: asyncpg.Connection,
) -> None:
    offsets = SinkOffsets("g", "crypto-prices")
    async with connection.transaction():
        await offsets.lock(connection, [0], {0: 5}, {})
    assert (await offsets.logs(connection, [0]))[0] == StoredLog(5, None, None)
    await offsets.confirm(connection, {0: None}, "c9")
    assert (await offsets.logs(connection, [0]))[0] == StoredLog(5, "c9", None)


async def test_a_restart_starts_the_sequence_over_unless_it_moved_meanwhile(
    connection: asyncpg.Connection,
) -> None:
    offsets = SinkOffsets("g", "crypto-prices")
    async with connection.transaction():
        await offsets.lock(connection, [0], {0: 0}, {}, "c1")
        await offsets.advance(connection, {0: 40}, {0: Mark(39, MARK_3.digest)})
    # Judged at 30, but another worker stored up to 40 since: it is not set back.
    assert not await offsets.restart(connection, 0, 30, 0, "c2")
    assert (await offsets.logs(connection, [0]))[0].next_offset == 40
    assert await offsets.restart(connection, 0, 40, 0, "c2")
    assert (await offsets.logs(connection, [0]))[0] == StoredLog(0, "c2", None)
    # The new log's first batch gives it a checkpoint of its own.
    async with connection.transaction():
        await offsets.lock(connection, [0], {}, {})
        await offsets.advance(connection, {0: 4}, {0: MARK_3})
    assert (await offsets.logs(connection, [0]))[0] == StoredLog(4, "c2", MARK_3)
