"""Read-side SQL over the record hypertables, shared by the web views (and any dashboard/MCP tool).

Plain async functions: each takes an asyncpg pool or connection and a DSL record type and returns
DSL records (or a small dict). Identifiers come only from the record's declaration and are
validated against its fields and quoted; every value is a bound parameter. Each query is shaped
so the table's primary key (`key columns..., time`) serves it: equality on the leading key
columns, then a range or a backwards scan on the time column. That holds on a TimescaleDB
hypertable and on the plain-PostgreSQL partitioned fallback alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeAlias, TypedDict, TypeVar

import asyncpg

from models.dsl import StreamRecord, quote_ident
from schema.sql import SINK_OFFSETS_TABLE

R = TypeVar("R", bound=StreamRecord)
Executor: TypeAlias = asyncpg.Pool | asyncpg.Connection

HISTORY_LIMIT_DEFAULT = 100
HISTORY_LIMIT_MAX = 1000


class ValueRange(TypedDict):
    """Highest and lowest value of one column over a time range, and how many rows it spans."""

    high: Decimal
    low: Decimal
    samples: int


def _column(record: type[StreamRecord], name: str) -> str:
    """The quoted column for a field name; refuses anything that is not a field of `record`."""
    if name not in record.model_fields:
        raise ValueError(f"{record.__name__} has no field {name!r}")
    return quote_ident(name)


def _columns(record: type[StreamRecord]) -> str:
    """The select list. Decimals travel as text: asyncpg's binary `numeric` decoding turns 90000
    into Decimal('9E+4') (equal, but not how anyone writes a price); PostgreSQL's text form is
    exact and plain."""
    return ", ".join(
        f"{quote_ident(shape.name)}::text AS {quote_ident(shape.name)}"
        if shape.kind == "decimal"
        else quote_ident(shape.name)
        for shape in record.shapes()
    )


def _where(
    record: type[StreamRecord], filters: Mapping[str, object]
) -> tuple[list[str], list[object]]:
    """Equality conditions `"col" = $n` for each filter (parameters $1..$n) and their values."""
    conditions = [f"{_column(record, name)} = ${n}" for n, name in enumerate(filters, start=1)]
    return conditions, list(filters.values())


def _record(record: type[R], row: asyncpg.Record) -> R:
    return record.model_validate(dict(row))


async def latest_per_group(
    db: Executor, record: type[R], group_by: str, filters: Mapping[str, object] | None = None
) -> list[R]:
    """The newest row (by the time column) of every distinct `group_by` value, ordered by it.

    A recursive "loose index scan" walks the distinct leading key values through the primary
    key index (one probe per group) instead of reading the whole table as DISTINCT ON would
    without TimescaleDB's SkipScan; each group's newest row is then one backwards index probe.
    """
    table = quote_ident(record.table.name)
    group = _column(record, group_by)
    time = _column(record, record.table.time_column)
    conditions, args = _where(record, filters or {})
    matches = " AND ".join([f"t.{group} = groups.value", *conditions])
    sql = f"""
        WITH RECURSIVE groups(value) AS (
            (SELECT {group} FROM {table} ORDER BY {group} LIMIT 1)
            UNION ALL
            SELECT (SELECT {group} FROM {table} WHERE {group} > groups.value
                    ORDER BY {group} LIMIT 1)
            FROM groups WHERE groups.value IS NOT NULL
        )
        SELECT latest.* FROM groups CROSS JOIN LATERAL (
            SELECT {_columns(record)} FROM {table} AS t
            WHERE {matches} ORDER BY {time} DESC LIMIT 1
        ) AS latest
        ORDER BY latest.{group}
    """  # noqa: S608 (identifiers from the DSL, quoted; values bound)
    return [_record(record, row) for row in await db.fetch(sql, *args)]


async def latest(db: Executor, record: type[R], filters: Mapping[str, object]) -> R | None:
    """The newest row matching `filters` (equality on key columns), or None."""
    rows = await history(db, record, filters, limit=1)
    return rows[0] if rows else None


async def history(
    db: Executor,
    record: type[R],
    filters: Mapping[str, object],
    *,
    limit: int = HISTORY_LIMIT_DEFAULT,
    since: datetime | None = None,
) -> list[R]:
    """Rows matching `filters`, newest first, at most `limit` (1..HISTORY_LIMIT_MAX), since
    `since` (inclusive) when given."""
    if not 1 <= limit <= HISTORY_LIMIT_MAX:
        raise ValueError(f"limit must be between 1 and {HISTORY_LIMIT_MAX}, not {limit}")
    time = _column(record, record.table.time_column)
    conditions, args = _where(record, filters)
    if since is not None:
        args.append(since)
        conditions.append(f"{time} >= ${len(args)}")
    args.append(limit)
    where = " AND ".join(conditions) or "TRUE"
    sql = (
        f"SELECT {_columns(record)} FROM {quote_ident(record.table.name)} "  # noqa: S608
        f"WHERE {where} ORDER BY {time} DESC LIMIT ${len(args)}"
    )
    return [_record(record, row) for row in await db.fetch(sql, *args)]


async def value_range(
    db: Executor,
    record: type[StreamRecord],
    column: str,
    filters: Mapping[str, object],
    since: datetime,
    until: datetime,
) -> ValueRange | None:
    """Max and min of `column` over rows matching `filters` with time in [since, until), or None
    when there are no such rows (or all their values are null)."""
    time = _column(record, record.table.time_column)
    value = _column(record, column)
    if next(s for s in record.shapes() if s.name == column).kind != "decimal":
        raise ValueError(f"{record.__name__}.{column} is not a decimal field")
    conditions, args = _where(record, filters)
    conditions += [f"{time} >= ${len(args) + 1}", f"{time} < ${len(args) + 2}"]
    sql = (
        f"SELECT max({value})::text AS high, min({value})::text AS low, "  # noqa: S608
        f"count({value}) AS samples "
        f"FROM {quote_ident(record.table.name)} WHERE {' AND '.join(conditions)}"
    )
    row: Any = await db.fetchrow(sql, *args, since, until)
    if row["samples"] == 0:
        return None
    return ValueRange(high=Decimal(row["high"]), low=Decimal(row["low"]), samples=row["samples"])


class Freshness(TypedDict):
    """How current a record table is: its newest row's own time (the table's time column) and
    when the consumer group's sink last stored a batch of the record's topic."""

    newest: datetime | None
    stored_at: datetime | None


async def freshness(
    db: Executor, records: Iterable[type[StreamRecord]], consumer_group: str
) -> dict[str, Freshness]:
    """Freshness of each record's table, keyed by table name: what any worker can tell about
    the polls, whichever worker made them (max of the time column is one probe of its index)."""
    stored_at = dict(
        await db.fetch(
            f"SELECT topic, max(updated_at) FROM {quote_ident(SINK_OFFSETS_TABLE)} "  # noqa: S608
            "WHERE consumer_group = $1 GROUP BY topic",
            consumer_group,
        )
    )
    shown: dict[str, Freshness] = {}
    for record in records:
        time = _column(record, record.table.time_column)
        newest = await db.fetchval(
            f"SELECT max({time}) FROM {quote_ident(record.table.name)}"  # noqa: S608
        )
        shown[record.table.name] = Freshness(
            newest=newest, stored_at=stored_at.get(record.topic.name)
        )
    return shown


async def ping(db: Executor, timeout: float) -> bool:
    """Whether the database answers `SELECT 1` within `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):  # bounds acquiring a pool connection too
            return await db.fetchval("SELECT 1") == 1
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
