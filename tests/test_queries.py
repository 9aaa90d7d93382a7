"""store.queries against a real, migrated PostgreSQL: exact values, ordering, bounds, ranges."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from models.market import CryptoMarketAnalytics, CryptoPriceData
from store import queries
from store.db import create_pool
from testkit.databases import write_records
from testkit.records import price

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
AGGREGATE = {"exchange_id": "aggregate"}


async def test_latest_per_group_takes_each_coins_newest_aggregate_row(pool: asyncpg.Pool) -> None:
    await write_records(
        pool,
        [
            price("bitcoin", "60000.10", T0),
            price("bitcoin", "61000.123456789012345678901234567890", T0 + timedelta(minutes=2)),
            price("bitcoin", "59000", T0 + timedelta(minutes=1)),
            # A venue quote newer than every aggregate one must not be served as the price.
            price("bitcoin", "1", T0 + timedelta(hours=1), exchange_id="binance"),
            price("shiba-inu", "6.31917E-7", T0 - timedelta(days=3)),
            price("only-venue", "5", T0, exchange_id="binance"),
        ],
    )
    latest = await queries.latest_per_group(pool, CryptoPriceData, "coin_id", AGGREGATE)
    assert [(p.coin_id, p.usd_price, p.last_updated) for p in latest] == [
        ("bitcoin", Decimal("61000.123456789012345678901234567890"), T0 + timedelta(minutes=2)),
        ("shiba-inu", Decimal("6.31917E-7"), T0 - timedelta(days=3)),
    ]
    assert str(latest[0].usd_price) == "61000.123456789012345678901234567890"
    # Plain text, as written: not asyncpg's binary decoding (which would give '6E+4').
    await write_records(
        pool, [price("round", "60000", T0), price("round", "60000.10", T0 - timedelta(1))]
    )
    history = await queries.history(pool, CryptoPriceData, {"coin_id": "round", **AGGREGATE})
    assert [str(row.usd_price) for row in history] == ["60000", "60000.10"]


async def test_latest_per_group_on_an_empty_table_and_for_analytics(pool: asyncpg.Pool) -> None:
    assert await queries.latest_per_group(pool, CryptoPriceData, "coin_id", AGGREGATE) == []
    old = CryptoMarketAnalytics(timestamp=T0, total_market_cap=Decimal("2.5E12"), markets=900)
    new = CryptoMarketAnalytics(timestamp=T0 + timedelta(minutes=10), btc_dominance=Decimal("-1"))
    await write_records(pool, [new, old])
    assert await queries.latest_per_group(pool, CryptoMarketAnalytics, "source") == [new]


async def test_latest_and_history_order_limit_and_since(pool: asyncpg.Pool) -> None:
    rows = [price("ethereum", str(3000 + i), T0 + timedelta(minutes=i)) for i in range(12)]
    await write_records(pool, [*rows, price("bitcoin", "1", T0 + timedelta(hours=5))])
    coin = {"coin_id": "ethereum", **AGGREGATE}

    assert await queries.latest(pool, CryptoPriceData, coin) == rows[-1]
    assert await queries.latest(pool, CryptoPriceData, {"coin_id": "nope", **AGGREGATE}) is None

    history = await queries.history(pool, CryptoPriceData, coin, limit=5)
    assert history == rows[::-1][:5]
    everything = await queries.history(pool, CryptoPriceData, coin)
    assert everything == rows[::-1]
    since = await queries.history(pool, CryptoPriceData, coin, since=rows[9].last_updated)
    assert since == [rows[11], rows[10], rows[9]]  # `since` is inclusive

    for limit in (0, -1, queries.HISTORY_LIMIT_MAX + 1):
        with pytest.raises(ValueError, match="limit"):
            await queries.history(pool, CryptoPriceData, coin, limit=limit)
    assert len(await queries.history(pool, CryptoPriceData, coin, limit=1000)) == 12


async def test_values_are_bound_and_identifiers_must_be_fields(pool: asyncpg.Pool) -> None:
    await write_records(pool, [price("bitcoin", "1", T0)])
    hostile = {"coin_id": "bitcoin'; drop table crypto_prices;--", **AGGREGATE}
    assert await queries.history(pool, CryptoPriceData, hostile) == []
    with pytest.raises(ValueError, match="no field"):
        await queries.history(pool, CryptoPriceData, {'coin_id" = 1; --': "x"})
    with pytest.raises(ValueError, match="no field"):
        await queries.latest_per_group(pool, CryptoPriceData, "1; drop table crypto_prices")
    assert len(await queries.history(pool, CryptoPriceData, {"coin_id": "bitcoin"})) == 1


async def test_value_range_is_max_and_min_over_a_half_open_window(pool: asyncpg.Pool) -> None:
    since, until = T0, T0 + timedelta(hours=24)
    await write_records(
        pool,
        [
            price("bitcoin", "99999", since - timedelta(microseconds=1)),  # before the window
            price("bitcoin", "100.5", since),  # on the lower bound: inside
            price("bitcoin", "250.25", since + timedelta(hours=3)),
            price("bitcoin", "0.000000000000000000001", since + timedelta(hours=20)),
            price("bitcoin", "1000000", until),  # on the upper bound: outside
            price("bitcoin", "5000000", since + timedelta(hours=1), exchange_id="binance"),
        ],
    )
    coin = {"coin_id": "bitcoin", **AGGREGATE}
    found = await queries.value_range(pool, CryptoPriceData, "usd_price", coin, since, until)
    assert found is not None and str(found["high"]) == "250.25"
    assert found == {
        "high": Decimal("250.25"),
        "low": Decimal("0.000000000000000000001"),
        "samples": 3,
    }
    empty = await queries.value_range(
        pool, CryptoPriceData, "usd_price", coin, until + timedelta(hours=1), until + timedelta(2)
    )
    assert empty is None
    with pytest.raises(ValueError, match="not a decimal"):
        await queries.value_range(pool, CryptoPriceData, "symbol", coin, since, until)


async def test_ping(pool: asyncpg.Pool, database_dsn: str) -> None:
    assert await queries.ping(pool, timeout=2) is True
    connection = await asyncpg.connect(database_dsn)
    await connection.close()
    assert await queries.ping(connection, timeout=2) is False


async def test_history_window_is_half_open_and_pages_both_ways(pool: asyncpg.Pool) -> None:
    rows = [price("ethereum", f"30{i}.5", T0 + timedelta(minutes=i)) for i in range(10)]
    await write_records(pool, rows)
    coin = {"coin_id": "ethereum", **AGGREGATE}
    since, until = rows[2].last_updated, rows[8].last_updated
    newest = await queries.history(pool, CryptoPriceData, coin, since=since, until=until, limit=4)
    assert newest == [rows[7], rows[6], rows[5], rows[4]]
    # The next page, newest first: `until` is the last row's time (exclusive).
    rest = await queries.history(
        pool, CryptoPriceData, coin, since=since, until=rows[4].last_updated
    )
    assert rest == [rows[3], rows[2]]
    oldest = await queries.history(
        pool, CryptoPriceData, coin, since=since, until=until, limit=3, oldest_first=True
    )
    assert oldest == rows[2:5]
    with pytest.raises(ValueError, match="must be before"):
        await queries.history(pool, CryptoPriceData, coin, since=until, until=since)


async def test_latest_per_group_among_given_values_and_ranges_per_group(pool: asyncpg.Pool) -> None:
    await write_records(
        pool,
        [
            price("bitcoin", "60000.5", T0),
            price("bitcoin", "59000.25", T0 + timedelta(hours=1)),
            price("ethereum", "3000.125", T0),
            price("dogecoin", "0.00000001", T0),
        ],
    )
    found = await queries.latest_per_group(
        pool,
        CryptoPriceData,
        "coin_id",
        AGGREGATE,
        among=["ethereum", "bitcoin", "nope", "bitcoin"],
    )
    assert [(p.coin_id, str(p.usd_price)) for p in found] == [
        ("bitcoin", "59000.25"),
        ("ethereum", "3000.125"),
    ]
    ranges = await queries.value_ranges(
        pool,
        CryptoPriceData,
        "usd_price",
        "coin_id",
        AGGREGATE,
        T0,
        T0 + timedelta(days=1),
        among=["bitcoin", "dogecoin"],
    )
    assert ranges == {
        "bitcoin": {"high": Decimal("60000.5"), "low": Decimal("59000.25"), "samples": 2},
        "dogecoin": {"high": Decimal("0.00000001"), "low": Decimal("0.00000001"), "samples": 1},
    }
    too_many = [f"c{i}" for i in range(queries.LATEST_LIMIT_MAX + 1)]
    with pytest.raises(ValueError, match="at most"):
        await queries.latest_per_group(pool, CryptoPriceData, "coin_id", among=too_many)


async def test_candles_roll_up_in_the_database(pool: asyncpg.Pool) -> None:
    from generators.sql import CANDLES

    start = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    prices = ["10.5", "12.25", "9.125", "11", "13.5", "8.0625", "10"]
    await write_records(
        pool,
        [price("bitcoin", usd, start + timedelta(minutes=7 * i)) for i, usd in enumerate(prices)]
        + [price("bitcoin", "99", start, exchange_id="binance")],
    )
    coin = {"coin_id": "bitcoin", **AGGREGATE}
    # 12:00, 12:07, ..., 12:42 in 15-minute candles from 12:05: the first starts at 12:00.
    found = await queries.candles(
        pool,
        CANDLES[0],
        coin,
        timedelta(minutes=15),
        start + timedelta(minutes=5),
        start + timedelta(minutes=40),
    )
    assert found == [
        {
            "bucket": start,
            "open": Decimal("10.5"),
            "high": Decimal("12.25"),
            "low": Decimal("9.125"),
            "close": Decimal("9.125"),
            "snapshots": 3,
        },
        {
            "bucket": start + timedelta(minutes=15),
            "open": Decimal("11"),
            "high": Decimal("13.5"),
            "low": Decimal("11"),
            "close": Decimal("13.5"),
            "snapshots": 2,
        },
        {
            "bucket": start + timedelta(minutes=30),
            "open": Decimal("8.0625"),
            "high": Decimal("10"),
            "low": Decimal("8.0625"),
            "close": Decimal("10"),
            "snapshots": 2,
        },
    ]
    day = await queries.candles(
        pool, CANDLES[0], coin, timedelta(days=1), start, start + timedelta(1)
    )
    assert [(c["open"], c["high"], c["low"], c["close"]) for c in day] == [
        (Decimal("10.5"), Decimal("13.5"), Decimal("8.0625"), Decimal("10"))
    ]
    with pytest.raises(ValueError, match="at most"):
        await queries.candles(
            pool, CANDLES[0], coin, timedelta(minutes=1), start, start + timedelta(1)
        )
    with pytest.raises(ValueError, match="whole multiple"):
        await queries.candles(
            pool, CANDLES[0], coin, timedelta(seconds=90), start, start + timedelta(1)
        )
    with pytest.raises(ValueError, match="not grouped by"):
        await queries.candles(
            pool, CANDLES[0], {"symbol": "btc"}, timedelta(days=1), start, start + timedelta(1)
        )


async def test_read_pools_have_a_statement_timeout(database_dsn: str) -> None:
    pool = await create_pool(database_dsn, reads=True)
    try:
        with pytest.raises(asyncpg.QueryCanceledError, match="statement timeout"):
            await pool.fetchval("SELECT pg_sleep(30)")
    finally:
        await pool.close()
