"""`migrate` on a real PostgreSQL: idempotent, additive, refusing data loss unless forced."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from generators import sql
from generators.migrate import MigrationRefused, migrate_database
from models import RECORDS, StreamRecord, TableSpec, TopicSpec
from models.types import Price, Text, Timestamp

PROJECT = Path(__file__).resolve().parent.parent
NO_CHANGES = "no changes: the schema is up to date"
WIDGET_TABLE = TableSpec(
    name="widgets",
    time_column="at",
    primary_key=("widget_id", "at"),
    chunk_interval=timedelta(days=1),
)


class Widget(StreamRecord):
    topic = TopicSpec(name="widgets", key_field="widget_id", partitions=1, retention=None)
    table = WIDGET_TABLE

    widget_id: Text
    at: Timestamp
    price: Price


class WidgetGrown(Widget):
    """Gains an optional field and a required one with a default."""

    note: Text | None = None
    venue: Text = "aggregate"


class WidgetNeedsColor(Widget):
    """Gains a required field that existing rows have no value for."""

    color: Text


class WidgetShrunk(StreamRecord):
    topic = Widget.topic
    table = WIDGET_TABLE

    widget_id: Text
    at: Timestamp


class WidgetRekeyed(Widget):
    topic = Widget.topic
    table = replace(WIDGET_TABLE, primary_key=("at",))


async def _columns(connection: asyncpg.Connection, table: str) -> dict[str, tuple[str, bool]]:
    rows = await connection.fetch(
        "SELECT attname, format_type(atttypid, atttypmod) AS type, attnotnull FROM pg_attribute"
        " WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped",
        table,
    )
    return {r["attname"]: (r["type"], r["attnotnull"]) for r in rows}


async def _with_widgets(dsn: str, count: int = 2) -> asyncpg.Connection:
    """Migrate `Widget` and insert `count` rows."""
    await migrate_database(dsn, records=(Widget,))
    connection = await asyncpg.connect(dsn)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    await connection.executemany(
        "INSERT INTO widgets (widget_id, at, price) VALUES ($1, $2, $3)",
        [(f"w{i}", at + timedelta(microseconds=i), Decimal("6.31917E-7")) for i in range(count)],
    )
    return connection


async def test_first_run_creates_everything_and_second_is_a_no_op(database_dsn: str) -> None:
    first = await migrate_database(database_dsn)
    assert "without TimescaleDB" in first[0]
    for record in RECORDS:
        assert f"created {record.table.name}" in first
    assert "created crypto_prices_candles_1m" in first
    assert any(line.startswith("created partition crypto_prices_p") for line in first)
    second = await migrate_database(database_dsn)
    assert second == [first[0], NO_CHANGES]


async def test_concurrent_migrations_do_not_race(database_dsn: str) -> None:
    reports = await asyncio.gather(*(migrate_database(database_dsn) for _ in range(3)))
    assert sorted(report[-1] == NO_CHANGES for report in reports) == [False, True, True]


async def test_added_fields_become_columns_and_rows_are_kept(database_dsn: str) -> None:
    connection = await _with_widgets(database_dsn)
    try:
        report = await migrate_database(database_dsn, records=(WidgetGrown,))
        assert "added column widgets.note text" in report
        assert "added column widgets.venue text" in report
        assert "filled widgets.venue with its default" in report
        columns = await _columns(connection, "widgets")
        assert columns["note"] == ("text", False)
        assert columns["venue"] == ("text", True)
        rows = await connection.fetch("SELECT * FROM widgets ORDER BY widget_id")
        assert [(r["widget_id"], r["price"], r["note"], r["venue"]) for r in rows] == [
            (f"w{i}", Decimal("6.31917E-7"), None, "aggregate") for i in range(2)
        ]
        again = await migrate_database(database_dsn, records=(WidgetGrown,))
        assert again[1:] == [NO_CHANGES]
    finally:
        await connection.close()


async def test_stored_offsets_of_an_older_release_are_kept_and_bound_to_their_log_later(
    database_dsn: str,
) -> None:
    """`sink_offsets` as releases before the log columns created it, with a stored offset."""
    connection = await asyncpg.connect(database_dsn)
    try:
        await connection.execute(
            'CREATE TABLE "sink_offsets" ("consumer_group" text NOT NULL, "topic" text NOT NULL,'
            ' "topic_partition" integer NOT NULL, "next_offset" bigint NOT NULL,'
            ' "updated_at" timestamptz NOT NULL DEFAULT now(),'
            ' CONSTRAINT "sink_offsets_pkey"'
            ' PRIMARY KEY ("consumer_group", "topic", "topic_partition"))'
        )
        await connection.execute(
            "INSERT INTO sink_offsets (consumer_group, topic, topic_partition, next_offset)"
            " VALUES ('qicore-streams', 'crypto-prices', 3, 1234)"
        )
        report = await migrate_database(database_dsn)
        assert (
            "added cluster_id, checkpoint_offset, checkpoint_digest to sink_offsets: stored "
            "offsets are bound to their log from the next batch on"
        ) in report
        rows = await connection.fetch("SELECT * FROM sink_offsets")
        assert [dict(row) | {"updated_at": None} for row in rows] == [
            {
                "consumer_group": "qicore-streams",
                "topic": "crypto-prices",
                "topic_partition": 3,
                "next_offset": 1234,
                "cluster_id": None,
                "checkpoint_offset": None,
                "checkpoint_digest": None,
                "updated_at": None,
            }
        ]
        columns = await _columns(connection, "sink_offsets")
        assert columns["checkpoint_digest"] == ("bytea", False)
        assert (await migrate_database(database_dsn))[1:] == [NO_CHANGES]
    finally:
        await connection.close()


async def test_new_required_field_without_default_needs_an_empty_table(database_dsn: str) -> None:
    connection = await _with_widgets(database_dsn)
    try:
        for force in (False, True):  # forcing cannot invent values either
            with pytest.raises(MigrationRefused, match=r"column widgets\.color is required"):
                await migrate_database(database_dsn, force=force, records=(WidgetNeedsColor,))
        assert "color" not in await _columns(connection, "widgets")
        await connection.execute("DELETE FROM widgets")
        report = await migrate_database(database_dsn, records=(WidgetNeedsColor,))
        assert "column widgets.color is NOT NULL" in report
        assert (await _columns(connection, "widgets"))["color"] == ("text", True)
    finally:
        await connection.close()


async def test_dropped_field_is_refused_unless_forced(database_dsn: str) -> None:
    connection = await _with_widgets(database_dsn)
    try:
        with pytest.raises(MigrationRefused) as refused:
            await migrate_database(database_dsn, records=(WidgetShrunk,))
        message = str(refused.value)
        assert "column widgets.price is not a field of WidgetShrunk (drop" in message
        assert "--force" in message
        assert "price" in await _columns(connection, "widgets")
        report = await migrate_database(database_dsn, force=True, records=(WidgetShrunk,))
        assert "dropped column widgets.price" in report
        assert "price" not in await _columns(connection, "widgets")
        assert await connection.fetchval("SELECT count(*) FROM widgets") == 2
    finally:
        await connection.close()


async def test_changed_primary_key_is_refused_unless_forced(database_dsn: str) -> None:
    connection = await _with_widgets(database_dsn)
    key = (
        "SELECT array_agg(a.attname ORDER BY a.attname) FROM pg_index i JOIN pg_attribute a"
        " ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
        " WHERE i.indrelid = 'widgets'::regclass AND i.indisprimary"
    )
    try:
        with pytest.raises(MigrationRefused, match=r"table widgets has primary key"):
            await migrate_database(database_dsn, records=(WidgetRekeyed,))
        assert await connection.fetchval(key) == ["at", "widget_id"]
        report = await migrate_database(database_dsn, force=True, records=(WidgetRekeyed,))
        assert "replaced primary key of widgets" in report
        assert await connection.fetchval(key) == ["at"]
    finally:
        await connection.close()


async def test_rounding_numeric_column_is_retyped_only_when_forced(database_dsn: str) -> None:
    """The original design's NUMERIC(20,8) rounds sub-satoshi prices: migrate must not keep it."""
    await migrate_database(database_dsn)
    view = next(
        s for s in sql.schema_statements("postgres") if s.startswith("CREATE OR REPLACE VIEW")
    )
    connection = await asyncpg.connect(database_dsn)
    try:
        await connection.execute("DROP VIEW crypto_prices_candles_1m")
        await connection.execute("ALTER TABLE crypto_prices ALTER usd_price TYPE numeric(20,8)")
        await connection.execute(view)  # the candles now depend on the rounding column
        with pytest.raises(MigrationRefused, match=r"crypto_prices\.usd_price is numeric\(20,8\)"):
            await migrate_database(database_dsn)
        report = await migrate_database(database_dsn, force=True)
        assert "dropped crypto_prices_candles_1m (recreated)" in report
        assert "retyped column crypto_prices.usd_price to numeric" in report
        assert (await _columns(connection, "crypto_prices"))["usd_price"] == ("numeric", True)
        await connection.execute(
            "INSERT INTO crypto_prices (coin_id, symbol, name, exchange_id, usd_price,"
            " last_updated, source, attribution) VALUES ('c', 's', 'n', 'x', $1, now(), 's', 'a')",
            Decimal("6.31917E-7"),
        )
        assert await connection.fetchval("SELECT open FROM crypto_prices_candles_1m") == Decimal(
            "6.31917E-7"
        )
        assert (await migrate_database(database_dsn))[1:] == [NO_CHANGES]
    finally:
        await connection.close()


def _faust_migrate(
    env: dict[str, str], dsn: str, data_dir: Path
) -> subprocess.CompletedProcess[str]:
    env = {**env, "DATABASE_URL": dsn, "DATA_DIR": str(data_dir)}
    return subprocess.run(
        [str(Path(sys.executable).parent / "faust"), "-A", "app", "migrate"],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
async def test_faust_migrate_command(
    database_dsn: str, tmp_path: Path, bare_env: dict[str, str]
) -> None:
    first = await asyncio.to_thread(_faust_migrate, bare_env, database_dsn, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "created crypto_prices" in first.stdout
    connection = await asyncpg.connect(database_dsn)
    try:
        tables = await connection.fetchval(
            "SELECT array_agg(relname::text ORDER BY relname) FROM pg_class"
            " WHERE relkind = 'p' AND relnamespace = 'public'::regnamespace"
        )
        assert tables == sorted(record.table.name for record in RECORDS)
    finally:
        await connection.close()
    second = await asyncio.to_thread(_faust_migrate, bare_env, database_dsn, tmp_path)
    assert second.returncode == 0, second.stderr
    assert NO_CHANGES in second.stdout
