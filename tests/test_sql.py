"""The generated DDL: its structure per dialect, and the plain-PostgreSQL script on a server."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from generators import sql
from generators.sql import CANDLES, amount, interval, schema_statements, sql_files
from models import RECORDS, CryptoPriceData, DSLError


def _prices_with(**changes: object) -> type[CryptoPriceData]:
    """CryptoPriceData with some table settings changed (same table name)."""

    class Prices(CryptoPriceData):
        topic = CryptoPriceData.topic
        table = replace(CryptoPriceData.table, **changes)  # type: ignore[arg-type]

    return Prices


def _create_table(statements: list[str], table: str) -> str:
    [statement] = [s for s in statements if s.startswith(f'CREATE TABLE IF NOT EXISTS "{table}" (')]
    return statement


def _primary_key(create: str) -> list[str]:
    match = re.search(r"PRIMARY KEY \(([^)]*)\)", create)
    assert match
    return [col.strip().strip('"') for col in match.group(1).split(",")]


def test_files_are_deterministic_and_one_per_dialect() -> None:
    files = sql_files()
    assert files == sql_files()
    assert sorted(files) == ["postgres.sql", "timescaledb.sql"]
    for text in files.values():
        assert text.startswith("-- Generated")
        assert "\r" not in text and text.endswith(";\n")


def test_intervals_render_in_whole_units() -> None:
    assert interval(timedelta(days=365)) == "INTERVAL '365 days'"
    assert interval(timedelta(minutes=1)) == "INTERVAL '1 minute'"
    assert amount(timedelta(hours=36)) == "36 hours"
    assert amount(timedelta(seconds=1, microseconds=5)) == "1000005 microseconds"
    with pytest.raises(DSLError):
        interval(timedelta(0))


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.__name__)
def test_timescale_table_structure(record: type[CryptoPriceData]) -> None:
    statements = schema_statements("timescaledb")
    spec = record.table
    rel = f"'\"{spec.name}\"'::regclass"
    create = _create_table(statements, spec.name)
    assert spec.time_column in _primary_key(create)
    assert "PARTITION BY" not in create
    for shape in record.shapes():
        line = next(ln for ln in create.splitlines() if ln.strip().startswith(f'"{shape.name}" '))
        assert line.rstrip(",").endswith("NOT NULL") == (not shape.nullable)
    hypertable = [s for s in statements if s.startswith(f"SELECT create_hypertable({rel},")]
    assert hypertable == [
        f"SELECT create_hypertable({rel}, by_range('{spec.time_column}', "
        f"{interval(spec.chunk_interval)}), if_not_exists => TRUE)"
    ]
    assert statements.index(create) < statements.index(hypertable[0])
    # No index on the time column alone: the hypertable makes its own.
    assert not any(
        s.startswith("CREATE INDEX") and f'ON "{spec.name}" ("{spec.time_column}"' in s
        for s in statements
    )
    compress = [i for i, s in enumerate(statements) if f'ALTER TABLE "{spec.name}" SET (' in s]
    policy = [i for i, s in enumerate(statements) if f"add_compression_policy({rel}" in s]
    assert len(compress) == len(policy) == 1 and compress[0] < policy[0]
    assert f"compress_orderby = '\"{spec.time_column}\" DESC'" in statements[compress[0]]
    if spec.segment_by:
        assert "compress_segmentby = '\"coin_id\"'" in statements[compress[0]]
    retention = [s for s in statements if f"_retention_policy({rel}" in s]
    assert len(retention) == 1
    if spec.retain_for is None:
        assert retention[0] == f"SELECT remove_retention_policy({rel}, if_exists => TRUE)"
    else:
        _assert_converges(retention[0], "retention", rel, "drop_after", spec.retain_for)
    assert spec.compress_after is not None
    _assert_converges(
        statements[policy[0]], "compression", rel, "compress_after", spec.compress_after
    )


def _assert_converges(block: str, kind: str, rel: str, option: str, value: timedelta) -> None:
    """The policy is compared with the jobs view and replaced (removed, then added) if different."""
    assert block.startswith("DO $$")
    assert "FROM timescaledb_information.jobs" in block
    assert f"proc_name = 'policy_{kind}'" in block
    assert f"(config->>'{option}')::interval = {interval(value)}" in block
    remove = block.index(f"PERFORM remove_{kind}_policy({rel}, if_exists => TRUE)")
    add = block.index(f"PERFORM add_{kind}_policy({rel}, {option} => {interval(value)})")
    assert remove < add


def test_changed_retention_window_changes_the_comparison() -> None:
    """A new window no longer matches the old job, so the old policy is removed and re-added."""

    prices = _prices_with(retain_for=timedelta(days=30))
    [block] = [s for s in schema_statements("timescaledb", (prices,)) if "policy_retention" in s]
    _assert_converges(
        block, "retention", "'\"crypto_prices\"'::regclass", "drop_after", timedelta(days=30)
    )
    assert "365 days" not in block


def test_continuous_aggregate_of_candles() -> None:
    statements = schema_statements("timescaledb")
    [candle] = CANDLES
    [view] = [s for s in statements if s.startswith("CREATE MATERIALIZED VIEW IF NOT EXISTS")]
    assert f'"{candle.name}"' in view
    assert "WITH (timescaledb.continuous, timescaledb.materialized_only = false)" in view
    assert view.endswith("WITH NO DATA")
    assert "time_bucket(INTERVAL '1 minute', \"last_updated\")" in view
    assert 'first("usd_price", "last_updated") AS "open"' in view
    assert 'last("usd_price", "last_updated") AS "close"' in view
    assert "sum(" not in view and "volume" not in view  # volume_24h is a rolling figure
    [policy] = [s for s in statements if "add_continuous_aggregate_policy" in s]
    assert statements.index(view) < statements.index(policy)
    assert (
        "remove_continuous_aggregate_policy" in policy and "timescaledb_information.jobs" in policy
    )
    assert candle.refresh_start - candle.refresh_end >= 2 * candle.bucket


def test_candles_without_their_source_table_are_left_out() -> None:
    from models import CryptoOHLCVData

    text = "\n".join(schema_statements("timescaledb", (CryptoOHLCVData,)))
    assert "candles" not in text


def test_redundant_time_index_is_refused() -> None:
    with pytest.raises(DSLError, match="redundant"):
        schema_statements("timescaledb", (_prices_with(indexes=(("last_updated",),)),))


def test_extra_index_is_generated_for_both_dialects() -> None:
    prices = _prices_with(indexes=(("symbol",),))
    for dialect in ("timescaledb", "postgres"):
        statements = schema_statements(dialect, (prices,))
        assert (
            'CREATE INDEX IF NOT EXISTS "crypto_prices_symbol_idx" ON "crypto_prices" ("symbol")'
            in statements
        )


def test_candle_declaration_is_checked() -> None:
    broken = sql.CandleAggregate(
        **{**vars(CANDLES[0]), "price": "no_such_field"}  # type: ignore[arg-type]
    )
    with pytest.raises(DSLError, match="no field 'no_such_field'"):
        sql._check_candle(broken, CryptoPriceData)
    narrow = sql.CandleAggregate(**{**vars(CANDLES[0]), "refresh_start": timedelta(minutes=2)})
    with pytest.raises(DSLError, match="two buckets"):
        sql._check_candle(narrow, CryptoPriceData)


# --- plain PostgreSQL: the fallback script on a real server ----------------------------------


async def _apply(dsn: str) -> asyncpg.Connection:
    connection = await asyncpg.connect(dsn)
    for _ in range(2):  # re-runnable
        for statement in schema_statements("postgres"):
            await connection.execute(statement)
    return connection


async def test_postgres_script_creates_partitioned_tables(database_dsn: str) -> None:
    connection = await _apply(database_dsn)
    try:
        for record in RECORDS:
            spec = record.table
            columns = await connection.fetch(
                "SELECT attname, format_type(atttypid, atttypmod) AS type, attnotnull"
                " FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0"
                " AND NOT attisdropped ORDER BY attnum",
                spec.name,
            )
            expected_types = {
                "decimal": "numeric",
                "timestamp": "timestamp with time zone",
                "text": "text",
                "integer": "bigint",
            }
            assert [(c["attname"], c["type"], c["attnotnull"]) for c in columns] == [
                (s.name, expected_types[s.kind], not s.nullable) for s in record.shapes()
            ]
            key = await connection.fetchval(
                "SELECT array_agg(a.attname ORDER BY k.n) FROM pg_index i"
                " CROSS JOIN unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)"
                " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
                " WHERE i.indrelid = $1::regclass AND i.indisprimary",
                spec.name,
            )
            assert tuple(key) == spec.primary_key
            partitioning = await connection.fetchrow(
                "SELECT p.partstrat::text, a.attname, p.partdefid::regclass::text AS default_part"
                " FROM pg_partitioned_table p JOIN pg_attribute a"
                " ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]"
                " WHERE p.partrelid = $1::regclass",
                spec.name,
            )
            assert tuple(partitioning) == ("r", spec.time_column, f"{spec.name}_default")
            ahead = await connection.fetchval(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = $1::regclass",
                spec.name,
            )
            assert ahead == sql.PARTITIONS_AHEAD + 1  # plus DEFAULT
    finally:
        await connection.close()


def _price(coin: str, at: datetime, price: str, exchange: str = "aggregate") -> tuple[object, ...]:
    return (coin, coin[:3], coin.title(), exchange, Decimal(price), at)


INSERT_PRICE = (
    "INSERT INTO crypto_prices (coin_id, symbol, name, exchange_id, usd_price, last_updated,"
    " source, attribution) VALUES ($1, $2, $3, $4, $5, $6, 'coingecko', 'test')"
)


async def test_candles_view_computes_ohlc(database_dsn: str) -> None:
    connection = await _apply(database_dsn)
    minute = datetime(2026, 1, 5, 12, 30, tzinfo=UTC)
    rows = [  # inserted out of time order: open/close follow last_updated, not insertion
        _price("bitcoin", minute + timedelta(seconds=40), "101.5"),
        _price("bitcoin", minute + timedelta(seconds=1), "100.000000000001"),
        _price("bitcoin", minute + timedelta(seconds=59, microseconds=999999), "99.25"),
        _price("bitcoin", minute + timedelta(seconds=20), "0.0000006"),
        _price("bitcoin", minute + timedelta(minutes=1), "200"),  # next bucket
        _price("bitcoin", minute + timedelta(seconds=30), "150", exchange="binance"),
        _price("ethereum", minute + timedelta(seconds=5), "3000"),
    ]
    try:
        await connection.executemany(INSERT_PRICE, rows)
        candles = await connection.fetch(
            "SELECT * FROM crypto_prices_candles_1m ORDER BY bucket, coin_id, exchange_id"
        )
        assert [list(c.keys()) for c in candles[:1]] == [
            ["bucket", "coin_id", "exchange_id", "open", "high", "low", "close", "snapshots"]
        ]
        assert [tuple(c) for c in candles] == [
            (
                minute,
                "bitcoin",
                "aggregate",
                Decimal("100.000000000001"),
                Decimal("101.5"),
                Decimal("0.0000006"),
                Decimal("99.25"),
                4,
            ),
            (
                minute,
                "bitcoin",
                "binance",
                Decimal(150),
                Decimal(150),
                Decimal(150),
                Decimal(150),
                1,
            ),
            (minute, "ethereum", "aggregate", *[Decimal(3000)] * 4, 1),
            (minute + timedelta(minutes=1), "bitcoin", "aggregate", *[Decimal(200)] * 4, 1),
        ]
    finally:
        await connection.close()


EDGE_DECIMALS = [
    "6.31917E-7",
    "1E-12",
    "0.000000000001234567890123456789",
    "1E+15",
    "999999999999999.999999999999",
    "1E+18",
    "123456789012345678.12345678",
    "9" * 38 + "." + "9" * 38,
    "0." + "0" * 37 + "1",
    "0",
]


async def test_edge_decimals_and_microseconds_round_trip(database_dsn: str) -> None:
    connection = await _apply(database_dsn)
    base = datetime(2026, 3, 1, 23, 59, 59, 999999, tzinfo=UTC)
    try:
        for i, text in enumerate(EDGE_DECIMALS):
            at = base + timedelta(microseconds=i)
            await connection.execute(
                "INSERT INTO crypto_prices (coin_id, symbol, name, exchange_id, usd_price,"
                " market_cap, last_updated, source, attribution)"
                " VALUES ($1, 's', 'n', 'x', $2, $2, $3, 's', 'a')",
                f"coin{i}",
                Decimal(text),
                at,
            )
        rows = await connection.fetch(
            "SELECT coin_id, usd_price, market_cap, last_updated FROM crypto_prices"
        )
        found = {r["coin_id"]: r for r in rows}
        for i, text in enumerate(EDGE_DECIMALS):
            row = found[f"coin{i}"]
            assert isinstance(row["usd_price"], Decimal)
            assert row["usd_price"] == Decimal(text) == row["market_cap"]  # exact comparison
            assert row["last_updated"] == base + timedelta(microseconds=i)
    finally:
        await connection.close()
