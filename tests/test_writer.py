"""RecordWriter against a real PostgreSQL: idempotent batches, exact decimals, atomic failures."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from operator import attrgetter
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from models import (
    RECORDS,
    CryptoMarketAnalytics,
    CryptoOHLCVData,
    CryptoPriceData,
    StreamRecord,
    TableSpec,
    TopicSpec,
)
from models.codec import decode_record, encode_record
from models.dsl import quote_ident
from models.types import Timestamp
from store.writer import RecordWriter, Row, WriteResult
from testkit.databases import primary_key
from testkit.records import candle, price, prices, snapshots
from testkit.strategies import valid

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
# Values a float would mangle: tiny prices, 38 fractional digits, market caps beyond 2**63.
EDGE_DECIMALS = [
    Decimal("6.31917E-7"),
    Decimal("0.00000000000000000001234567890123456"),
    Decimal("0." + "1" * 38),
    Decimal("123456789012345678901234567890.12345678"),
    Decimal("0"),
    Decimal("1E+18"),
]


def price_at(coin: str, minute: int, usd: Decimal, name: str = "Coin") -> CryptoPriceData:
    """`coin` at `minute` past T0, its market cap and change derived from `usd`."""
    at = T0 + timedelta(minutes=minute)
    return price(coin, usd, at, name=name, market_cap=usd * 1000, change_24h=-usd)


async def stored_prices(pool: asyncpg.Pool) -> dict[tuple[str, datetime], asyncpg.Record]:
    rows = await pool.fetch("SELECT * FROM crypto_prices")
    return {(row["coin_id"], row["last_updated"]): row for row in rows}


async def test_batch_stores_exact_values_once_and_replays_add_nothing(pool: asyncpg.Pool) -> None:
    writer = RecordWriter(CryptoPriceData)
    batch = [price_at(f"coin-{i}", i, value) for i, value in enumerate(EDGE_DECIMALS)]

    assert await writer.write(pool, batch) == WriteResult(len(batch), 0, 0)
    stored = await stored_prices(pool)
    assert len(stored) == len(batch)
    for record in batch:
        row = stored[(record.coin_id, record.last_updated)]
        for column in writer.columns:
            assert row[column] == getattr(record, column), column
        assert isinstance(row["usd_price"], Decimal)
        assert row["btc_price"] is None
        assert row["exchange_id"] == "aggregate"

    assert await writer.write(pool, batch) == WriteResult(0, len(batch), 0)
    assert len(await stored_prices(pool)) == len(batch)
    # Staging rows go at commit: nothing lingers in the session for the next batch.
    async with pool.acquire() as connection:
        assert await connection.fetchval(f"SELECT count(*) FROM {writer.staging}") == 0  # noqa: S608


# Decimals travel to the staging table as `str(Decimal)`: exponent forms, trailing zeros, signs,
# zeros with a scale, and the most digits and places the DSL allows (DECIMAL(76, 38)).
TEXT_FORM_DECIMALS = [
    "1E+2",
    "1.0E+2",
    "1.2E-7",
    "5E-7",
    "1.500",
    "0.12340",
    "0E-8",
    "0.000",
    "-0",
    "1E+37",
    "1E-38",
    "1.23456789E+30",
    "9" * 38 + "." + "9" * 38,
]


async def test_decimals_are_stored_as_the_binary_numeric_codec_stores_them(
    pool: asyncpg.Pool,
) -> None:
    """Every value, its scale and its text in PostgreSQL are what binding the Decimal itself
    (asyncpg's binary numeric codec, which the writer's COPY used before) gives, and NULLs stay
    NULL."""
    writer = RecordWriter(CryptoPriceData)
    values = [Decimal(text) for text in TEXT_FORM_DECIMALS]
    batch = [
        price(
            f"coin-{i}",
            value,
            T0 + timedelta(minutes=i),
            btc_price=None if i % 2 else value,
            change_24h=value.copy_negate(),  # exact: unary minus rounds to 28 digits
        )
        for i, value in enumerate(values)
    ]
    assert await writer.write(pool, batch) == WriteResult(len(batch), 0, 0)

    decimals = ("usd_price", "btc_price", "change_24h")
    as_text = ", ".join(f"{column}::text AS {column}_text" for column in decimals)
    async with pool.acquire() as connection:
        for record in batch:
            row = await connection.fetchrow(
                f"SELECT *, {as_text} FROM crypto_prices WHERE coin_id = $1",  # noqa: S608
                record.coin_id,
            )
            for column in decimals:
                sent = getattr(record, column)
                if sent is None:
                    assert row[column] is None and row[f"{column}_text"] is None
                    continue
                bound = await connection.fetchrow(
                    "SELECT $1::numeric AS value, $1::numeric::text AS text", sent
                )
                assert row[column] == sent, (column, sent)
                assert row[column].as_tuple() == bound["value"].as_tuple(), (column, sent)
                assert row[f"{column}_text"] == bound["text"], (column, sent)
    stored = await stored_prices(pool)
    assert stored[("coin-4", T0 + timedelta(minutes=4))]["usd_price"].as_tuple().exponent == -3
    biggest = stored[("coin-12", T0 + timedelta(minutes=12))]
    assert biggest["change_24h"] == Decimal("-" + "9" * 38 + "." + "9" * 38)


@pytest.mark.parametrize(
    ("usd_price", "error"),
    [
        (Decimal("1E+131072"), asyncpg.NumericValueOutOfRangeError),
        (None, asyncpg.NotNullViolationError),
    ],
)
async def test_a_decimal_the_column_cannot_hold_fails_the_batch(
    pool: asyncpg.Pool, usd_price: Decimal | None, error: type[Exception]
) -> None:
    """Validation refuses both; a record that bypassed it fails the whole batch (asyncpg's binary
    codec, used before, sent 1E+131072 as 0) and stores nothing."""
    with pytest.raises(ValueError, match="usd_price"):
        price("bitcoin", usd_price, T0)
    good = price_at("bitcoin", 0, Decimal("1"))
    unchecked = good.model_copy(update={"coin_id": "doge", "usd_price": usd_price})
    with pytest.raises(error):
        await RecordWriter(CryptoPriceData).write(pool, [good, unchecked])
    assert await stored_prices(pool) == {}


async def test_repeated_keys_in_a_batch_keep_the_first(pool: asyncpg.Pool) -> None:
    writer = RecordWriter(CryptoPriceData)
    first = price_at("bitcoin", 0, Decimal("65000.5"), name="first")
    again = price_at("bitcoin", 0, Decimal("1"), name="second")  # same key, other values
    other = price_at("bitcoin", 1, Decimal("65001"))

    assert await writer.write(pool, [first, again, other, first]) == WriteResult(2, 0, 2)
    stored = await stored_prices(pool)
    assert stored[("bitcoin", T0)]["name"] == "first"
    assert stored[("bitcoin", T0)]["usd_price"] == Decimal("65000.5")

    newer = price_at("bitcoin", 2, Decimal("64999.99"))
    result = await writer.write(pool, [again, other, newer])
    assert result == WriteResult(1, 2, 0)
    assert result.duplicates == 2
    stored = await stored_prices(pool)
    assert len(stored) == 3
    assert stored[("bitcoin", T0)]["name"] == "first"


async def test_each_record_type_uses_its_own_key(pool: asyncpg.Pool) -> None:
    writer = RecordWriter(CryptoMarketAnalytics)
    snapshot = CryptoMarketAnalytics(
        timestamp=T0, total_market_cap=Decimal("2.5E+12"), btc_dominance=Decimal("52.123456789")
    )
    other_source = snapshot.model_copy(update={"source": "elsewhere"})
    assert await writer.write(pool, [snapshot, other_source, snapshot]) == WriteResult(2, 0, 1)
    row = await pool.fetchrow("SELECT * FROM market_analytics WHERE source = 'coingecko'")
    assert row["total_market_cap"] == Decimal("2500000000000")
    assert row["btc_dominance"] == Decimal("52.123456789")


async def test_a_failed_batch_stores_nothing(pool: asyncpg.Pool) -> None:
    writer = RecordWriter(CryptoPriceData)
    await pool.execute("ALTER TABLE crypto_prices ADD CONSTRAINT no_doge CHECK (coin_id <> 'doge')")
    good, bad = price_at("bitcoin", 0, Decimal("1")), price_at("doge", 0, Decimal("0.1"))
    with pytest.raises(asyncpg.CheckViolationError):
        await writer.write(pool, [good, bad])
    assert await stored_prices(pool) == {}
    # The session (and its staging table) is still usable and clean afterwards.
    assert await writer.write(pool, [good]) == WriteResult(1, 0, 0)


@given(data=st.data())
@hypothesis_settings(
    max_examples=60,
    deadline=None,  # a database round trip on a shared machine
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # emptied for each example
)
async def test_any_valid_records_come_back_from_the_database_exactly(
    pool: asyncpg.Pool, data: st.DataObject
) -> None:
    """Every value a record can hold (tests/strategies.py: 38-digit fractions, exponents, any
    time zone, any text) is stored and read back equal; of records sharing a key, the first."""
    record_type = data.draw(st.sampled_from(RECORDS))
    records = data.draw(st.lists(valid(record_type), min_size=1, max_size=6))
    table = quote_ident(record_type.table.name)
    await pool.execute(f"TRUNCATE {table}")

    first: dict[tuple[object, ...], StreamRecord] = {}
    for record in records:
        first.setdefault(primary_key(record), record)
    result = await RecordWriter(record_type).write(pool, records)
    assert result == WriteResult(len(first), 0, len(records) - len(first))

    rows = await pool.fetch(f"SELECT * FROM {table}")  # noqa: S608
    back = {tuple(row[column] for column in record_type.table.primary_key): row for row in rows}
    assert back.keys() == first.keys()
    for key, record in first.items():
        assert {name: back[key][name] for name in record.model_fields} == record.model_dump()


class OnlyTime(StreamRecord):
    """A record of one column: its row is built by the generated function's one-value branch."""

    topic = TopicSpec(name="only-time", key_field="at", partitions=1, retention=None)
    table = TableSpec(
        name="only_time", time_column="at", primary_key=("at",), chunk_interval=timedelta(days=1)
    )

    at: Timestamp


def attribute_row(record_type: type[StreamRecord]) -> Callable[[StreamRecord], Row]:
    """The row as the sink built it before `RecordWriter.row`: the fields read as attributes
    (`attrgetter`), then each decimal as `str(decimal)`, None kept."""
    shapes = record_type.shapes()
    read = attrgetter(*(shape.name for shape in shapes))

    def row(record: StreamRecord) -> Row:
        values = read(record) if len(shapes) > 1 else (read(record),)
        return tuple(
            None if value is None else str(value) if shape.kind == "decimal" else value
            for value, shape in zip(values, shapes, strict=True)
        )

    return row


def assert_rows_as_attributes_give(records: list[StreamRecord]) -> None:
    record_type = type(records[0])
    writer, expected_of = RecordWriter(record_type), attribute_row(record_type)
    for record in records:
        row, expected = writer.row(record), expected_of(record)
        assert row == expected
        # Not just equal: the very objects COPY got before (an aware time in its own zone, the
        # decimal's own text), each column in its place.
        assert [type(value) for value in row] == [type(value) for value in expected]
        assert all(
            a is b
            for a, b, s in zip(row, expected, record_type.shapes(), strict=True)
            if s.kind != "decimal"
        )


def built_every_way(records: list[Any]) -> list[StreamRecord]:
    """Each record as validated, decoded from the wire, copied with an update, and constructed
    without validation (defaults filled in), as the sink, the tests and the tools make them."""
    record_type = type(records[0])
    return [
        built
        for record in records
        for built in (
            record,
            decode_record(record_type, encode_record(record)),
            record.model_copy(update={record_type.table.time_column: record.event_time()}),
            record_type.model_construct(
                **{name: value for name, value in record.__dict__.items() if value is not None}
            ),
        )
    ]


def test_a_row_holds_what_the_records_attributes_hold_for_every_record_type() -> None:
    """`RecordWriter.row` reads the fields from the record's `__dict__`: the values, in the
    columns' order, that reading them as attributes gives, for every record type and however a
    record was made."""
    analytics = [
        CryptoMarketAnalytics(timestamp=T0, btc_dominance=Decimal("-0.5E-3"), markets=7),
        CryptoMarketAnalytics(
            timestamp=T0 + timedelta(hours=1),
            total_market_cap=Decimal("2.5E+12"),
            total_volume=Decimal("1E-38"),
            eth_dominance=Decimal("17.25"),
            active_cryptocurrencies=0,
            market_cap_change_24h=Decimal("0"),
            source="other",
        ),
    ]
    built: dict[type[StreamRecord], list[Any]] = {
        CryptoPriceData: [*prices("row", 10), *snapshots(8, coins=4)],
        CryptoOHLCVData: [candle(i) for i in range(6)],
        CryptoMarketAnalytics: analytics,
        OnlyTime: [OnlyTime(at=T0)],
    }
    assert set(RECORDS) <= set(built), "a record type this test does not build"
    for records in built.values():
        assert_rows_as_attributes_give(built_every_way(records))


@given(data=st.data())
@hypothesis_settings(max_examples=100, deadline=None)
def test_any_valid_records_row_is_what_its_attributes_hold(data: st.DataObject) -> None:
    record_type = data.draw(st.sampled_from(RECORDS))
    assert_rows_as_attributes_give(data.draw(st.lists(valid(record_type), min_size=1, max_size=4)))
