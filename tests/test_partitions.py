"""Plain PostgreSQL keeps partitions ahead of time: rows that landed in DEFAULT while a partition
was missing move into it when it is created, exactly; the worker creates due partitions itself."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import asyncpg
import pytest

from generators import sql
from generators.migrate import MIGRATION_LOCK_KEY, create_partitions_ahead, migrate_database
from models import CryptoPriceData
from store.db import create_pool
from store.writer import RecordWriter
from testkit.databases import assert_exactly, stored
from testkit.records import prices
from testkit.workers import Worker, eventually

TABLE = CryptoPriceData.table.name


async def _tomorrow(connection: asyncpg.Connection) -> tuple[datetime, str]:
    """Start and name of the partition after the current one, which `migrate` created."""
    start: datetime = await connection.fetchval(
        f"SELECT date_bin({sql.interval(CryptoPriceData.table.chunk_interval)}, now(),"
        f" {sql.CHUNK_ORIGIN}) + {sql.interval(CryptoPriceData.table.chunk_interval)}"
    )
    return start, f"{TABLE}_p{start:%Y%m%dt%H%M%S}"


async def _drop_tomorrow(dsn: str) -> tuple[datetime, str]:
    """What the database looks like a day after a `migrate` that created one partition fewer."""
    connection = await asyncpg.connect(dsn)
    try:
        start, name = await _tomorrow(connection)
        await connection.execute(f'DROP TABLE "{name}"')
    finally:
        await connection.close()
    return start, name


async def _in_table(dsn: str, table: str) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        count: int = await connection.fetchval(f'SELECT count(*) FROM ONLY "{table}"')  # noqa: S608
    finally:
        await connection.close()
    return count


async def _write(dsn: str, records: list[CryptoPriceData]) -> None:
    pool = await create_pool(dsn, max_size=1)
    try:
        await RecordWriter(CryptoPriceData).write(pool, records)
    finally:
        await pool.close()


async def test_rows_in_default_move_into_the_partition_created_for_them(migrated: str) -> None:
    start, name = await _drop_tomorrow(migrated)
    due = [
        record.model_copy(update={"last_updated": start + timedelta(minutes=i)})
        for i, record in enumerate(prices("due", 5, coins=5))
    ]
    # Older than any partition: DEFAULT is its place, and it stays there.
    old = prices("old", 1)
    await _write(migrated, due + old)
    assert await _in_table(migrated, f"{TABLE}_default") == len(due) + len(old)

    created = await create_partitions_ahead(migrated)

    assert created == [f"created partition {name} ({len(due)} rows moved in from {TABLE}_default)"]
    assert await _in_table(migrated, name) == len(due)
    assert await _in_table(migrated, f"{TABLE}_default") == len(old)
    assert_exactly(await stored(migrated, CryptoPriceData), due + old)
    assert await create_partitions_ahead(migrated) == []
    assert (await migrate_database(migrated))[1:] == ["no changes: the schema is up to date"]


async def test_a_migration_holding_the_lock_makes_the_check_give_way(migrated: str) -> None:
    await _drop_tomorrow(migrated)
    migrating = await asyncpg.connect(migrated)
    try:
        async with migrating.transaction():
            await migrating.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
            assert await create_partitions_ahead(migrated) is None
    finally:
        await migrating.close()
    assert len(await create_partitions_ahead(migrated) or []) == 1


@pytest.mark.slow
async def test_the_worker_creates_a_partition_that_became_due(
    migrated: str, workers: Callable[..., Worker]
) -> None:
    _, name = await _drop_tomorrow(migrated)
    worker = workers(migrated)

    async def exists() -> bool | None:
        connection = await asyncpg.connect(migrated)
        try:
            found = await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", name)
        finally:
            await connection.close()
        return True if found else None

    await eventually(exists, worker, f"partition {name}")

    async def logged() -> bool | None:
        return True if f"partitions ahead: created partition {name}" in worker.output else None

    await eventually(logged, worker, "the worker's log line")
