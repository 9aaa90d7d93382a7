"""Databases for the tests and the benchmarks: a fresh database on a running server, rows written
the way the sink writes them, and exact comparisons of what a table holds with what was sent."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from itertools import groupby
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from generators.migrate import migrate_database
from models import StreamRecord
from models.dsl import quote_ident
from store.writer import RecordWriter

Rows = dict[tuple[object, ...], dict[str, object]]


def dsn_for(server_dsn: str, database: str) -> str:
    """The DSN of `database` on the server of `server_dsn`."""
    return urlunsplit(urlsplit(server_dsn)._replace(path=f"/{database}"))


async def create_database(server_dsn: str, prefix: str = "t", migrated: bool = False) -> str:
    """A new, uniquely named database on the server (with the app's schema if `migrated`)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {quote_ident(name)}")
    finally:
        await admin.close()
    dsn = dsn_for(server_dsn, name)
    if migrated:
        await migrate_database(dsn)
    return dsn


async def drop_database(server_dsn: str, dsn: str) -> None:
    """Drop `dsn`'s database, whoever is still connected to it."""
    name = urlsplit(dsn).path.lstrip("/")
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
    finally:
        await admin.close()


@asynccontextmanager
async def fresh_database(
    server_dsn: str, prefix: str = "t", migrated: bool = False
) -> AsyncIterator[str]:
    """`create_database`, dropped afterwards."""
    dsn = await create_database(server_dsn, prefix, migrated)
    try:
        yield dsn
    finally:
        await drop_database(server_dsn, dsn)


async def write_records(pool: asyncpg.Pool, records: Iterable[StreamRecord]) -> None:
    """Store `records` the way the sink does (`RecordWriter`: a key already stored is skipped),
    a batch per run of one record type."""
    for record_type, batch in groupby(records, type):
        await RecordWriter(record_type).write(pool, list(batch))


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
