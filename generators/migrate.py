"""Apply the generated DDL to a database: idempotent, additive, and refusing to lose data.

`migrate_database` compares each record with its table as the catalog describes it. Added
fields become added columns (rows are kept); a dropped field, a changed column type or a changed
primary key would lose or rewrite data, so they are refused unless forced. Then the dialect's
script (TimescaleDB when the server can run it and TIMESCALEDB allows it, plain PostgreSQL
otherwise) runs, which creates what is missing and converges policies. All of it happens in one
transaction, under an advisory lock so two releases cannot migrate at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
from pydantic_core import PydanticUndefined

from generators import sql
from models import RECORDS, StreamRecord
from models.dsl import check_sql_identifier
from models.types import TYPE_MAP, DSLError, FieldShape
from store.db import connect

# Arbitrary, fixed: every migrating process takes this transaction-level advisory lock, and so
# does the worker that creates partitions ahead (`create_partitions_ahead`).
MIGRATION_LOCK_KEY = 0x71_69_63_6F_72_65  # "qicore"


class MigrationRefused(Exception):
    """The records ask for a change that would lose data, or that existing rows cannot meet."""


class TimescaleUnavailable(Exception):
    """TimescaleDB is asked for (or half there) but the server cannot run it; says what to do."""


NOT_PRELOADED = (
    "TimescaleDB is installed on the database server but not preloaded: add timescaledb to "
    "shared_preload_libraries in postgresql.conf and restart PostgreSQL, or set TIMESCALEDB=off "
    "to use plain PostgreSQL"
)
# Whether the server loaded TimescaleDB's loader at start (shared_preload_libraries): the loader
# defines these two settings; pg_settings shows shared_preload_libraries to privileged roles only.
_PRELOADED = (
    "SELECT current_setting('timescaledb.disable_load', true) IS NOT NULL"
    " OR current_setting('timescaledb.max_background_workers', true) IS NOT NULL"
    " OR EXISTS (SELECT FROM pg_settings WHERE name = 'shared_preload_libraries'"
    " AND 'timescaledb' = ANY (string_to_array(replace(setting, ' ', ''), ',')))"
)


@dataclass(frozen=True)
class _Table:
    """A table as the catalog describes it."""

    kind: str  # pg_class.relkind: 'r' plain (or hypertable), 'p' partitioned
    columns: dict[str, tuple[str, bool]]  # name -> (formatted type, NOT NULL)
    primary_key: tuple[str, ...]


@dataclass(frozen=True)
class _Step:
    statement: str
    report: str | None
    args: tuple[Any, ...] = ()


async def migrate_database(
    dsn: str,
    *,
    force: bool = False,
    records: sql.Records = RECORDS,
    timescaledb: sql.TimescaleMode = "auto",
) -> list[str]:
    """Bring the database at `dsn` up to the records; return what was done, one line each: what
    the server is, then each change, or that there was none."""
    connection = await connect(dsn, command_timeout=None)
    notices = _collect_notices(connection)
    changes: list[str] = []
    try:
        async with _transaction(connection):
            await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
            dialect, header = await _dialect(connection, timescaledb, changes)
            steps = await _plan(connection, dialect, records, force)
            names = [record.table.name for record in records]
            names += [candle.name for candle, _ in sql.candles_for(records)]
            before = {name: await _relkind(connection, name) for name in names}
            offsets = await _describe(connection, sql.SINK_OFFSETS_TABLE)
            for step in steps:
                await connection.execute(step.statement, *step.args)
                if step.report:
                    changes.append(step.report)
            for statement in sql.schema_statements(dialect, records):
                await connection.execute(statement)
            changes += [f"created {name}" for name in names if before[name] is None]
            if offsets is not None and (
                missing := [c for c in sql.SINK_OFFSETS_LOG_COLUMNS if c not in offsets.columns]
            ):
                changes.append(
                    f"added {', '.join(missing)} to {sql.SINK_OFFSETS_TABLE}: stored offsets are "
                    "bound to their log from the next batch on"
                )
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        # A server asked to load a TimescaleDB it did not preload ends the session with this
        # error (FATAL): asyncpg raises it as such, or as "connection was closed" quoting it.
        if 'extension "timescaledb" must be preloaded' in str(error):
            raise TimescaleUnavailable(NOT_PRELOADED) from None
        raise
    finally:
        await connection.close()
    changes += notices
    return header + (changes or ["no changes: the schema is up to date"])


def _collect_notices(connection: asyncpg.Connection) -> list[str]:
    """The list the connection's notices of our own scripts (`sql.NOTICE_PREFIX`) go to."""
    notices: list[str] = []

    def collect(_connection: object, message: asyncpg.PostgresLogMessage) -> None:
        text = str(message.message)
        if text.startswith(sql.NOTICE_PREFIX):
            notices.append(text.removeprefix(sql.NOTICE_PREFIX))

    connection.add_log_listener(collect)
    return notices


@asynccontextmanager
async def _transaction(connection: asyncpg.Connection) -> AsyncIterator[None]:
    """A transaction that rolls back only while the session lives. `connection.transaction()`
    raises "the underlying connection is closed" on its way out instead, hiding why the server
    ended the session (a FATAL error, such as TimescaleDB's "must be preloaded")."""
    transaction = connection.transaction()
    await transaction.start()
    try:
        yield
    except BaseException:
        if not connection.is_closed():
            await transaction.rollback()
        raise
    await transaction.commit()


async def _dialect(
    connection: asyncpg.Connection, mode: sql.TimescaleMode, changes: list[str]
) -> tuple[sql.Dialect, list[str]]:
    """The dialect TIMESCALEDB (`mode`) and the server allow, and the lines that say so; enabling
    the extension is added to `changes`. Raises `TimescaleUnavailable` where "on" cannot be met
    or the extension is in the database but cannot run."""
    server = await connection.fetchval("SHOW server_version")
    plain = (
        f"PostgreSQL {server} without TimescaleDB: tables range-partitioned on time, "
        "candles as plain views"
    )
    if mode == "off":
        return "postgres", [f"{plain} (TIMESCALEDB=off)"]
    find = "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
    version = await connection.fetchval(find)
    available = await connection.fetchval(
        "SELECT EXISTS (SELECT FROM pg_available_extensions WHERE name = 'timescaledb')"
    )
    preloaded = await connection.fetchval(_PRELOADED)
    if version is None and available and preloaded:
        await connection.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        version = await connection.fetchval(find)
        changes.append(f"enabled extension timescaledb {version}")
    if version is not None and preloaded:
        return "timescaledb", [f"PostgreSQL {server} with TimescaleDB {version}"]
    if version is not None or (available and mode == "on"):
        # Created in this database (its tables need it) or required, but not loadable.
        raise TimescaleUnavailable(NOT_PRELOADED)
    if mode == "on":
        raise TimescaleUnavailable(
            "TIMESCALEDB=on but the database server has no timescaledb extension: install "
            "TimescaleDB there, or set TIMESCALEDB=auto to fall back to plain PostgreSQL"
        )
    if available:
        return "postgres", [
            plain,
            "TimescaleDB is installed on the server but not preloaded (shared_preload_libraries):"
            " using plain PostgreSQL; set TIMESCALEDB=on to require TimescaleDB instead",
        ]
    return "postgres", [plain]


async def create_partitions_ahead(dsn: str, records: sql.Records = RECORDS) -> list[str] | None:
    """Plain PostgreSQL: create the partitions `migrate` keeps ahead of time that are missing now
    (time moved on since), moving any rows that landed in DEFAULT meanwhile into them. Returns
    what was created, one line each, or None when a migration (or another worker) holds the lock.
    Tables that are not partitioned (TimescaleDB creates its chunks itself) are left alone."""
    connection = await connect(dsn)
    notices = _collect_notices(connection)
    try:
        async with _transaction(connection):
            if not await connection.fetchval(
                "SELECT pg_try_advisory_xact_lock($1)", MIGRATION_LOCK_KEY
            ):
                return None
            # Creating a partition locks its table: rather give up now and retry later than
            # hold the sinks' inserts behind a long wait.
            await connection.execute("SET LOCAL lock_timeout = '10s'")
            for record in records:
                if await _relkind(connection, record.table.name) == "p":
                    await connection.execute(sql.partitions_ahead(record))
    finally:
        await connection.close()
    return notices


async def _relkind(connection: asyncpg.Connection, name: str) -> str | None:
    kind = await connection.fetchval(
        "SELECT relkind::text FROM pg_class WHERE relname = $1"
        " AND relnamespace = current_schema()::regnamespace",
        name,
    )
    return None if kind is None else str(kind)


async def _describe(connection: asyncpg.Connection, name: str) -> _Table | None:
    row = await connection.fetchrow(
        "SELECT oid, relkind::text AS relkind FROM pg_class WHERE relname = $1"
        " AND relnamespace = current_schema()::regnamespace AND relkind IN ('r', 'p')",
        name,
    )
    if row is None:
        return None
    columns = await connection.fetch(
        "SELECT attname, format_type(atttypid, atttypmod) AS type, attnotnull FROM pg_attribute"
        " WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        row["oid"],
    )
    key = await connection.fetchval(
        "SELECT array_agg(a.attname ORDER BY k.position) FROM pg_index i"
        " CROSS JOIN unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, position)"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
        " WHERE i.indrelid = $1 AND i.indisprimary",
        row["oid"],
    )
    return _Table(
        kind=str(row["relkind"]),
        columns={c["attname"]: (c["type"], c["attnotnull"]) for c in columns},
        primary_key=tuple(key or ()),
    )


def _default(record: type[StreamRecord], shape: FieldShape) -> Any:
    """The field's static default, or None when it has none to fill existing rows with."""
    info = record.model_fields[shape.name]
    return None if info.default is PydanticUndefined else info.default


async def _plan(
    connection: asyncpg.Connection, dialect: sql.Dialect, records: sql.Records, force: bool
) -> list[_Step]:
    """The ALTERs existing tables need; raise `MigrationRefused` before anything is applied."""
    types = dict(
        await connection.fetch(
            "SELECT t, format_type(t::regtype, NULL) FROM unnest($1::text[]) AS t",
            sorted({mapping.sql for mapping in TYPE_MAP.values()}),
        )
    )
    destructive: list[str] = []
    impossible: list[str] = []
    steps: list[_Step] = []
    for record in records:
        table = record.table.name
        existing = await _describe(connection, table)
        if existing is None:
            continue
        if (existing.kind == "p") != (dialect == "postgres"):
            impossible.append(
                f"table {table} was created for the other dialect (relkind {existing.kind!r}); "
                "move its rows to a table created by this migration by hand"
            )
            continue
        forced: list[_Step] = []
        added: list[_Step] = []
        for shape in record.shapes():
            column = f"{table}.{shape.name}"
            wanted = TYPE_MAP[shape.kind].sql
            current = existing.columns.get(shape.name)
            if current is not None and current[0] != types[wanted]:
                destructive.append(
                    f"column {column} is {current[0]} but the record says {types[wanted]} (retype)"
                )
                forced.append(
                    _Step(sql.retype_column(table, shape), f"retyped column {column} to {wanted}")
                )
            if current is None:
                added.append(_Step(sql.add_column(table, shape), f"added column {column} {wanted}"))
            elif current[1] and shape.nullable:
                added.append(
                    _Step(
                        sql.set_not_null(table, shape.name, False),
                        f"column {column} is now optional (dropped NOT NULL)",
                    )
                )
            if shape.nullable or (current is not None and current[1]):
                continue
            default = _default(record, shape)
            if default is not None:
                added.append(
                    _Step(
                        sql.backfill(table, shape.name),
                        f"filled {column} with its default",
                        (default,),
                    )
                )
            elif await connection.fetchval(
                sql.has_rows(table, None if current is None else shape.name)
            ):
                impossible.append(
                    f"column {column} is required and has no default, but {table} has rows "
                    "without a value: make the field optional (`| None = None`) or give it a "
                    "default"
                )
                continue
            added.append(
                _Step(sql.set_not_null(table, shape.name, True), f"column {column} is NOT NULL")
            )
        fields = set(record.model_fields)
        for name in existing.columns:
            if name in fields:
                continue
            destructive.append(
                f"column {table}.{name} is not a field of {record.__name__} (drop: its data is "
                "lost)"
            )
            try:
                check_sql_identifier(name, f"column {table}.{name}")
            except DSLError as error:
                impossible.append(f"{error}; drop it by hand")
                continue
            forced.insert(0, _Step(sql.drop_column(table, name), f"dropped column {table}.{name}"))
        if existing.primary_key != record.table.primary_key:
            destructive.append(
                f"table {table} has primary key {existing.primary_key} but {record.__name__} "
                f"declares {record.table.primary_key} (rebuilds the key; fails on duplicates)"
            )
            forced.append(
                _Step(sql.replace_primary_key(record), f"replaced primary key of {table}")
            )
        if forced:
            # Views over the table would block a retype; the schema script recreates them.
            views = [
                _Step(sql.drop_candles(candle, dialect), f"dropped {candle.name} (recreated)")
                for candle, source in sql.candles_for(records)
                if source is record
            ]
            forced = views + forced
        steps += forced + added
    if impossible:
        raise MigrationRefused("; ".join(impossible))
    if destructive and not force:
        raise MigrationRefused(
            "destructive changes: "
            + "; ".join(destructive)
            + ". Nothing was applied. Run `faust -A app migrate --force` to apply them."
        )
    return steps
