"""Read-side SQL over the record hypertables, shared by the web views (and any dashboard/MCP tool).

Every query is bounded: a row cap (a LIMIT) and the read pools' statement timeout
(`store.db.READ_STATEMENT_TIMEOUT_MS`).

Plain async functions: each takes an asyncpg pool or connection and a DSL record type and returns
DSL records (or a small dict). Identifiers come only from the record's declaration and are
validated against its fields and quoted; every value is a bound parameter. Each query is shaped
so the table's primary key (`key columns..., time`) serves it: equality on the leading key
columns, then a range or a backwards scan on the time column. That holds on a TimescaleDB
hypertable and on the plain-PostgreSQL partitioned fallback alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeAlias, TypedDict, TypeVar

import asyncpg

from generators.sql import CANDLE_ORIGIN, SINK_OFFSETS_TABLE, TIME_BUCKET_ORIGIN, CandleAggregate
from models.dsl import StreamRecord, quote_ident
from models.types import TYPE_MAP

R = TypeVar("R", bound=StreamRecord)
Executor: TypeAlias = asyncpg.Pool | asyncpg.Connection

HISTORY_LIMIT_DEFAULT = 100
HISTORY_LIMIT_MAX = 1000
LATEST_LIMIT_MAX = 5000  # groups (coins) in one answer: TOP_N's own maximum
CANDLES_MAX = 1000
THREAD_ROWS = 100  # rows validated in the event loop; more go to a thread
# The candle widths the read side offers (web views, MCP tools): whole multiples of the 1-minute
# aggregate's bucket.
CANDLE_INTERVALS = {
    "1m": timedelta(minutes=1),
    "5m": timedelta(minutes=5),
    "15m": timedelta(minutes=15),
    "1h": timedelta(hours=1),
    "4h": timedelta(hours=4),
    "1d": timedelta(days=1),
}


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


async def _records(record: type[R], rows: list[asyncpg.Record]) -> list[R]:
    """The rows as records. Validating one costs ~30 µs: a thousand in a row would hold the
    event loop, and every request and sink batch waiting on it, for 30 ms and more (several
    times that on a busy machine); in a thread the loop gets the GIL back every few ms."""
    if len(rows) <= THREAD_ROWS:
        return [_record(record, row) for row in rows]
    return await asyncio.to_thread(lambda: [_record(record, row) for row in rows])


async def latest_per_group(
    db: Executor,
    record: type[R],
    group_by: str,
    filters: Mapping[str, object] | None = None,
    *,
    among: Sequence[object] | None = None,
) -> list[R]:
    """The newest row (by the time column) of every distinct `group_by` value, ordered by it;
    only the values in `among` when given. At most LATEST_LIMIT_MAX rows.

    A recursive "loose index scan" walks the distinct leading key values through the primary
    key index (one probe per group) instead of reading the whole table as DISTINCT ON would
    without TimescaleDB's SkipScan; each group's newest row is then one backwards index probe.
    """
    table = quote_ident(record.table.name)
    group = _column(record, group_by)
    time = _column(record, record.table.time_column)
    conditions, args = _where(record, filters or {})
    matches = " AND ".join([f"t.{group} = groups.value", *conditions])
    if among is None:
        groups = f"""
        WITH RECURSIVE groups(value) AS (
            (SELECT {group} FROM {table} ORDER BY {group} LIMIT 1)
            UNION ALL
            SELECT (SELECT {group} FROM {table} WHERE {group} > groups.value
                    ORDER BY {group} LIMIT 1)
            FROM groups WHERE groups.value IS NOT NULL
        )"""  # noqa: S608 (identifiers from the DSL, quoted)
    else:
        if len(among) > LATEST_LIMIT_MAX:
            raise ValueError(f"at most {LATEST_LIMIT_MAX} values at once, not {len(among)}")
        args.append(list(among))
        values = f"${len(args)}::{_sql_type(record, group_by)}[]"
        groups = f"WITH groups(value) AS (SELECT DISTINCT unnest({values}))"
    args.append(LATEST_LIMIT_MAX)
    sql = f"""{groups}
        SELECT latest.* FROM groups CROSS JOIN LATERAL (
            SELECT {_columns(record)} FROM {table} AS t
            WHERE {matches} ORDER BY {time} DESC LIMIT 1
        ) AS latest
        ORDER BY latest.{group} LIMIT ${len(args)}
    """  # noqa: S608 (identifiers from the DSL, quoted; values bound)
    return await _records(record, await db.fetch(sql, *args))


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
    until: datetime | None = None,
    oldest_first: bool = False,
) -> list[R]:
    """Rows matching `filters` with time in [since, until) (either bound optional), newest first
    (or oldest first), at most `limit` (1..HISTORY_LIMIT_MAX)."""
    if not 1 <= limit <= HISTORY_LIMIT_MAX:
        raise ValueError(f"limit must be between 1 and {HISTORY_LIMIT_MAX}, not {limit}")
    _check_window(since, until)
    time = _column(record, record.table.time_column)
    conditions, args = _where(record, filters)
    if since is not None:
        args.append(since)
        conditions.append(f"{time} >= ${len(args)}")
    if until is not None:
        args.append(until)
        conditions.append(f"{time} < ${len(args)}")
    args.append(limit)
    where = " AND ".join(conditions) or "TRUE"
    sql = (
        f"SELECT {_columns(record)} FROM {quote_ident(record.table.name)} "  # noqa: S608
        f"WHERE {where} ORDER BY {time} {'ASC' if oldest_first else 'DESC'} LIMIT ${len(args)}"
    )
    return await _records(record, await db.fetch(sql, *args))


async def newer_per_key(
    db: Executor,
    record: type[R],
    filters: Mapping[str, object],
    after: Mapping[str, datetime],
    *,
    limit_per_key: int,
) -> list[R]:
    """For each topic key in `after` (e.g. coin id), its rows matching `filters` with time after
    the key's own bound, oldest first, at most `limit_per_key` of them: one probe of the primary
    key per key. Ordered by (time, key)."""
    key = _column(record, record.topic.key_field)
    time = _column(record, record.table.time_column)
    conditions, args = _where(record, filters)
    matches = " AND ".join([f"t.{key} = bounds.key", f"t.{time} > bounds.after", *conditions])
    args += [list(after), list(after.values()), limit_per_key]
    n = len(args)
    sql = f"""
        SELECT fresh.* FROM unnest(${n - 2}::{_sql_type(record, record.topic.key_field)}[],
                                   ${n - 1}::timestamptz[]) AS bounds(key, after)
        CROSS JOIN LATERAL (
            SELECT {_columns(record)} FROM {quote_ident(record.table.name)} AS t
            WHERE {matches} ORDER BY t.{time} LIMIT ${n}
        ) AS fresh
        ORDER BY fresh.{time}, fresh.{key}
    """  # noqa: S608 (identifiers from the DSL, quoted; values bound)
    return [_record(record, row) for row in await db.fetch(sql, *args)]


async def after_cursor(
    db: Executor,
    record: type[R],
    filters: Mapping[str, object],
    cursor: tuple[datetime, str],
    *,
    among: Sequence[str] | None = None,
    limit: int = HISTORY_LIMIT_MAX,
) -> list[R]:
    """Rows matching `filters` (and with a topic key in `among`, when given) that come after
    `cursor` = (time, key) in (time, key) order, in that order, at most `limit` (1..
    HISTORY_LIMIT_MAX): a stream's catch-up after its last delivered row."""
    if not 1 <= limit <= HISTORY_LIMIT_MAX:
        raise ValueError(f"limit must be between 1 and {HISTORY_LIMIT_MAX}, not {limit}")
    key = _column(record, record.topic.key_field)
    time = _column(record, record.table.time_column)
    conditions, args = _where(record, filters)
    args += list(cursor)
    # The time bound alone lets an index on the time column (and partition pruning) serve it.
    conditions += [
        f"{time} >= ${len(args) - 1}",
        f"({time}, {key}) > (${len(args) - 1}, ${len(args)})",
    ]
    if among is not None:
        if len(among) > LATEST_LIMIT_MAX:
            raise ValueError(f"at most {LATEST_LIMIT_MAX} values at once, not {len(among)}")
        args.append(list(among))
        conditions.append(
            f"{key} = ANY(${len(args)}::{_sql_type(record, record.topic.key_field)}[])"
        )
    args.append(limit)
    sql = (
        f"SELECT {_columns(record)} FROM {quote_ident(record.table.name)} "  # noqa: S608
        f"WHERE {' AND '.join(conditions)} ORDER BY {time}, {key} LIMIT ${len(args)}"
    )
    return [_record(record, row) for row in await db.fetch(sql, *args)]


def _check_window(since: datetime | None, until: datetime | None) -> None:
    if since is not None and until is not None and since >= until:
        raise ValueError(f"since ({since.isoformat()}) must be before until ({until.isoformat()})")


def _sql_type(record: type[StreamRecord], name: str) -> str:
    """The SQL type of a field, from the DSL's one type table (for casting bound arrays)."""
    return TYPE_MAP[next(s for s in record.shapes() if s.name == name).kind].sql


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
    return (await value_ranges(db, record, column, None, filters, since, until)).get(None)


async def value_ranges(
    db: Executor,
    record: type[StreamRecord],
    column: str,
    group_by: str | None,
    filters: Mapping[str, object],
    since: datetime,
    until: datetime,
    *,
    among: Sequence[object] | None = None,
) -> dict[Any, ValueRange]:
    """Max and min of `column` per `group_by` value (only those in `among` when given; the key
    is None without `group_by`) over rows matching `filters` with time in [since, until).
    Groups without a non-null value are left out."""
    _check_window(since, until)
    time = _column(record, record.table.time_column)
    value = _column(record, column)
    if _sql_type(record, column) != "numeric":
        raise ValueError(f"{record.__name__}.{column} is not a decimal field")
    conditions, args = _where(record, filters)
    args += [since, until]
    conditions += [f"{time} >= ${len(args) - 1}", f"{time} < ${len(args)}"]
    group = "NULL" if group_by is None else _column(record, group_by)
    if among is not None:
        args.append(list(among))
        conditions.append(f"{group} = ANY(${len(args)}::{_sql_type(record, str(group_by))}[])")
    args.append(LATEST_LIMIT_MAX)
    sql = (
        f"SELECT {group} AS grp, max({value})::text AS high, "  # noqa: S608
        f"min({value})::text AS low, count({value}) AS samples "
        f"FROM {quote_ident(record.table.name)} WHERE {' AND '.join(conditions)} "
        f"GROUP BY 1 HAVING count({value}) > 0 LIMIT ${len(args)}"
    )
    return {
        row["grp"]: ValueRange(
            high=Decimal(row["high"]), low=Decimal(row["low"]), samples=row["samples"]
        )
        for row in await db.fetch(sql, *args)
    }


class Candle(TypedDict):
    """One OHLC candle: `bucket` is its start; `snapshots` how many price rows it summarises."""

    bucket: datetime
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    snapshots: int


def align(moment: datetime, interval: timedelta) -> datetime:
    """The start of the `interval` bucket holding `moment`: the origin TimescaleDB's
    `time_bucket` uses by default, and the generated `date_bin` views use too."""
    return CANDLE_ORIGIN + ((moment - CANDLE_ORIGIN) // interval) * interval


async def has_timescaledb(db: Executor) -> bool:
    found: bool = await db.fetchval(
        "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'timescaledb')"
    )
    return found


async def candles(
    db: Executor,
    candle: CandleAggregate,
    filters: Mapping[str, object],
    interval: timedelta,
    since: datetime,
    until: datetime,
) -> list[Candle]:
    """Candles of `interval` (a whole multiple of the aggregate's bucket) covering [since,
    until), oldest first, rolled up in the database from the 1-bucket aggregate (TimescaleDB's
    continuous aggregate with `time_bucket`, or the plain view with `date_bin`). Each candle is
    whole: the first starts at or before `since`. At most CANDLES_MAX of them."""
    _check_window(since, until)
    if interval <= timedelta(0) or interval % candle.bucket:
        raise ValueError(f"interval must be a whole multiple of {candle.bucket}")
    start, end = align(since, interval), align(until - timedelta.resolution, interval) + interval
    if (end - start) // interval > CANDLES_MAX:
        raise ValueError(
            f"{(end - start) // interval} candles of {interval} asked for; at most {CANDLES_MAX}"
        )
    conditions, args = [], []
    for name, value in filters.items():
        if name not in candle.group_by:
            raise ValueError(f"candles {candle.name!r} are not grouped by {name!r}")
        args.append(value)
        conditions.append(f"{quote_ident(name)} = ${len(args)}")
    args += [interval, start, end, CANDLES_MAX]
    n = len(args)
    bucket = quote_ident("bucket")
    if await has_timescaledb(db):
        binned = f"time_bucket(${n - 3}::interval, {bucket})"
    else:
        binned = f"date_bin(${n - 3}::interval, {bucket}, {TIME_BUCKET_ORIGIN})"
    conditions += [f"{bucket} >= ${n - 2}", f"{bucket} < ${n - 1}"]
    sql = f"""
        SELECT {binned} AS bucket,
            (array_agg("open" ORDER BY {bucket}))[1]::text AS open,
            max("high")::text AS high, min("low")::text AS low,
            (array_agg("close" ORDER BY {bucket} DESC))[1]::text AS close,
            sum("snapshots")::bigint AS snapshots
        FROM {quote_ident(candle.name)} WHERE {" AND ".join(conditions)}
        GROUP BY 1 ORDER BY 1 LIMIT ${n}
    """  # noqa: S608 (identifiers from the DSL, quoted; values bound)
    return [
        Candle(
            bucket=row["bucket"],
            open=Decimal(row["open"]),
            high=Decimal(row["high"]),
            low=Decimal(row["low"]),
            close=Decimal(row["close"]),
            snapshots=row["snapshots"],
        )
        for row in await db.fetch(sql, *args)
    ]


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
