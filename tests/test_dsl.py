"""The DSL refuses bad declarations when the class is defined, and bad values when one is built."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from pydantic import Field, ValidationError

from models import RECORDS, CryptoMarketAnalytics, CryptoOHLCVData, CryptoPriceData
from models.codec import MAX_MESSAGE_BYTES, RecordRejected, decode_record, encode_record
from models.dsl import StreamRecord, TableSpec, TopicSpec, check_registry
from models.types import DSLError, Price, Text, Timestamp
from testkit.records import price_fields

BASE_FIELDS: dict[str, Any] = {"coin_id": Text, "at": Timestamp, "price": Price}


def declare(
    fields: dict[str, Any] | None = None,
    *,
    record: str = "Probe",
    defaults: dict[str, Any] | None = None,
    **table: Any,
) -> type[StreamRecord]:
    """Define a record class the way a module would; `table` overrides TableSpec arguments."""
    topic = table.pop(
        "topic", TopicSpec(name="probe", key_field="coin_id", partitions=1, retention=None)
    )
    spec = {
        "name": "probe",
        "time_column": "at",
        "primary_key": ("coin_id", "at"),
        "chunk_interval": timedelta(days=1),
        **table,
    }
    namespace = {
        "__annotations__": dict(BASE_FIELDS if fields is None else fields),
        "__module__": __name__,
        "topic": topic,
        "table": TableSpec(**spec),
        **(defaults or {}),
    }
    return type(record, (StreamRecord,), namespace)


def test_a_well_formed_declaration_is_accepted() -> None:
    probe = declare({**BASE_FIELDS, "x" * 63: Price})  # 63 bytes is PostgreSQL's limit
    assert [shape.name for shape in probe.shapes()] == ["coin_id", "at", "price", "x" * 63]


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("select", "'select' is a reserved SQL key word"),
        ("user", "'user' is a reserved SQL key word"),
        ("Price", "'Price' must be snake_case"),
        ("my price", "'my price' must be snake_case"),
        ('a"b', "'a\"b' must be snake_case"),
        ("préis", "'préis' must be snake_case"),
        ("xmin", "'xmin' clashes with a PostgreSQL system column"),
        ("ctid", "'ctid' clashes with a PostgreSQL system column"),
        ("x" * 64, "is 64 bytes; PostgreSQL truncates identifiers longer than 63 bytes"),
    ],
)
def test_invalid_field_names_fail_at_class_definition(field: str, message: str) -> None:
    with pytest.raises(DSLError, match="Probe: field ") as error:
        declare({**BASE_FIELDS, field: Price})
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("table_name", "message"),
    [
        ("order", "reserved SQL key word"),
        ("Crypto_Prices", "must be snake_case"),
        ("t" * 64, "is 64 bytes"),
        # The primary key's constraint gets "<table>_pkey": that name must fit as well.
        ("t" * 60, "generated index name 'tttt"),
    ],
)
def test_invalid_table_names_fail(table_name: str, message: str) -> None:
    with pytest.raises(DSLError) as error:
        declare(name=table_name)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"primary_key": ("coin_id",)}, "must contain the time column 'at'"),
        (
            {"primary_key": ("coin_id", "venue", "at")},
            "primary_key names 'venue', which is not a field",
        ),
        ({"segment_by": ("venue",)}, "segment_by names 'venue', which is not a field"),
        ({"time_column": "when"}, "time_column names 'when', which is not a field"),
        ({"indexes": (("price", "venue"),)}, "an index names 'venue'"),
        ({"primary_key": ("coin_id", "at", "coin_id")}, "primary key repeats a column"),
        ({"time_column": "price", "primary_key": ("coin_id", "price")}, "must be a timestamp"),
        (
            {"topic": TopicSpec(name="probe", key_field="venue", partitions=1, retention=None)},
            "topic key_field names 'venue'",
        ),
        (
            {
                "topic": TopicSpec(
                    name="crypto prices", key_field="coin_id", partitions=1, retention=None
                )
            },
            "not a valid Kafka topic name",
        ),
        (
            {"topic": TopicSpec(name="probe", key_field="coin_id", partitions=0, retention=None)},
            "partitions and replication_factor must be at least 1",
        ),
    ],
)
def test_inconsistent_specs_fail(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(DSLError) as error:
        declare(**overrides)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        (float, "type <class 'float'> has no mapping"),
        (bool, "type <class 'bool'> has no mapping"),
        (Decimal, "plain Decimal is unchecked; use Price or SignedDecimal"),
        (datetime, "plain datetime allows naive values; use Timestamp"),
        (list[str], "has no mapping"),
    ],
)
def test_unmappable_types_fail(annotation: Any, message: str) -> None:
    with pytest.raises(DSLError, match=r"Probe\.extra: ") as error:
        declare({**BASE_FIELDS, "extra": annotation})
    assert message in str(error.value)


def test_optional_fields_cannot_join_the_primary_key() -> None:
    with pytest.raises(DSLError, match="primary-key field 'venue' cannot be optional"):
        declare(
            {**BASE_FIELDS, "venue": Text | None},
            defaults={"venue": None},
            primary_key=("coin_id", "venue", "at"),
        )


def test_optional_fields_must_default_to_none() -> None:
    with pytest.raises(DSLError, match="an optional field must default to None"):
        declare({**BASE_FIELDS, "venue": Text | None}, defaults={"venue": "x"})


def test_aliases_are_refused() -> None:
    with pytest.raises(DSLError, match="aliases are not allowed"):
        declare(
            {**BASE_FIELDS, "venue": Text},
            defaults={"venue": Field("x", alias="Venue")},
        )


def test_a_record_must_declare_both_specs() -> None:
    with pytest.raises(DSLError, match="must declare both `topic` and `table`"):
        type(
            "Half",
            (StreamRecord,),
            {
                "__annotations__": dict(BASE_FIELDS),
                "__module__": __name__,
                "topic": TopicSpec(name="half", key_field="coin_id", partitions=1, retention=None),
            },
        )


def test_registry_refuses_shared_tables_and_topics() -> None:
    check_registry(RECORDS)  # the real registry is clash-free
    first = declare(name="probe_one", topic=TopicSpec("one", "coin_id", 1, None))
    same_table = declare(name="probe_one", topic=TopicSpec("two", "coin_id", 1, None))
    same_topic = declare(name="probe_two", topic=TopicSpec("one", "coin_id", 1, None))
    with pytest.raises(DSLError, match="both use table 'probe_one'"):
        check_registry((first, same_table))
    with pytest.raises(DSLError, match="both use topic 'one'"):
        check_registry((first, same_topic))
    with pytest.raises(DSLError, match="both use table 'crypto_prices'"):
        check_registry((*RECORDS, declare(name="crypto_prices")))


# --- values ---------------------------------------------------------------------------------

NOW = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)


def wire(record_type: type[StreamRecord], **overrides: Any) -> bytes:
    """A valid message of `record_type` with some JSON fields replaced (or removed, via ...)."""
    valid = {
        CryptoPriceData: price_fields(),
        CryptoOHLCVData: {
            "coin_id": "bitcoin",
            "symbol": "btc",
            "timestamp": NOW,
            "open": "1",
            "high": "2",
            "low": "0.5",
            "close": "1.5",
            "timeframe": "30m",
        },
        CryptoMarketAnalytics: {"timestamp": NOW},
    }[record_type]
    document = json.loads(encode_record(record_type(**valid)))
    document.update(overrides)
    return json.dumps({k: v for k, v in document.items() if v is not ...}).encode()


REJECTED = [
    ("usd_price", "NaN", "finite number"),
    ("usd_price", "sNaN", "finite number"),
    ("usd_price", "Infinity", "finite number"),
    ("usd_price", "-Infinity", "finite number"),
    ("usd_price", "-0.01", "must not be negative"),
    ("market_cap", "-1E+18", "must not be negative"),
    ("volume_24h", "-5", "must not be negative"),
    ("change_24h", "NaN", "finite number"),
    ("usd_price", 1.5, "not a float"),
    ("usd_price", True, "not a float"),
    ("usd_price", "1E-39", "does not fit DECIMAL(76, 38)"),
    ("usd_price", "1E+38", "does not fit DECIMAL(76, 38)"),
    # 80 significant digits: more than the context's 28 must still be counted exactly.
    ("usd_price", "1" * 30 + "." + "1" * 50, "30 integer and 50 fractional digits"),
    ("coin_id", "", "at least 1 character"),
    ("symbol", "x" * 257, "at most 256 characters"),
    # PostgreSQL text cannot hold NUL: one such value would fail a whole sink batch.
    ("name", "Bit\x00coin", "should match pattern"),
    ("last_updated", "2024-05-01T12:30:00", "must be timezone-aware"),
    ("last_updated", 1714564800, "not a number"),
]


@pytest.mark.parametrize(("field", "value", "message"), REJECTED)
def test_invalid_values_are_refused_by_the_record(field: str, value: Any, message: str) -> None:
    with pytest.raises(ValidationError) as error:
        CryptoPriceData(**price_fields(**{field: value}))
    assert error.value.errors()[0]["loc"] == (field,)
    assert message in str(error.value)


@pytest.mark.parametrize(("field", "value", "message"), REJECTED)
def test_invalid_values_are_rejected_on_the_wire(field: str, value: Any, message: str) -> None:
    with pytest.raises(RecordRejected) as error:
        decode_record(CryptoPriceData, wire(CryptoPriceData, **{field: value}))
    assert error.value.reason.startswith(f"{field}: ")
    assert message in error.value.reason


@pytest.mark.parametrize(
    ("record_type", "field", "value", "message"),
    [
        (CryptoOHLCVData, "volume", "-1", "volume: Value error, must not be negative"),
        (CryptoOHLCVData, "low", "Infinity", "low: Input should be a finite number"),
        (CryptoOHLCVData, "timeframe", ..., "timeframe: Field required"),
        (
            CryptoMarketAnalytics,
            "markets",
            -1,
            "markets: Input should be greater than or equal to 0",
        ),
        (
            CryptoMarketAnalytics,
            "markets",
            2**63,
            "markets: Input should be less than or equal to 9223372036854775807",
        ),
        (CryptoMarketAnalytics, "timestamp", "yesterday", "timestamp: Input should be a valid"),
        (CryptoPriceData, "coin_id", ..., "coin_id: Field required"),
        (CryptoPriceData, "exchange", "binance", "exchange: Extra inputs are not permitted"),
    ],
)
def test_each_record_type_rejects_bad_messages(
    record_type: type[StreamRecord], field: str, value: Any, message: str
) -> None:
    with pytest.raises(RecordRejected) as error:
        decode_record(record_type, wire(record_type, **{field: value}))
    assert message in error.value.reason


def test_undecodable_messages_are_rejected_with_a_reason() -> None:
    with pytest.raises(RecordRejected, match="null value"):
        decode_record(CryptoPriceData, None)
    with pytest.raises(RecordRejected, match="exceeds"):
        decode_record(CryptoPriceData, b" " * (MAX_MESSAGE_BYTES + 1))
    with pytest.raises(RecordRejected, match="Invalid JSON"):
        decode_record(CryptoPriceData, b'{"coin_id": ')
    with pytest.raises(RecordRejected, match="message: Input should be an object"):
        decode_record(CryptoPriceData, b"[]")


def test_signed_decimals_accept_negative_values_and_zero_is_not_negative() -> None:
    record = CryptoPriceData(**price_fields(change_24h="-12.5", usd_price="-0", volume_24h="0"))
    assert record.change_24h == Decimal("-12.5")
    assert record.usd_price == 0


def test_aware_datetimes_are_normalised_to_utc() -> None:
    tokyo = timezone(timedelta(hours=9))
    record = CryptoPriceData(
        **price_fields(last_updated=datetime(2024, 5, 1, 21, 30, tzinfo=tokyo))
    )
    assert record.last_updated == NOW
    assert record.last_updated.tzinfo is UTC
    decoded = decode_record(
        CryptoPriceData, wire(CryptoPriceData, last_updated="2024-05-01T07:30:00-05:00")
    )
    assert decoded.last_updated == NOW and decoded.last_updated.tzinfo is UTC
    assert b'"last_updated":"2024-05-01T12:30:00Z"' in encode_record(decoded)


def test_decimals_keep_their_exact_digits() -> None:
    record = CryptoMarketAnalytics(
        timestamp=NOW, active_cryptocurrencies=17_000, total_market_cap="2.70016521312815E+15"
    )
    assert record.total_market_cap == Decimal("2700165213128150")
    assert str(record.total_market_cap) == "2.70016521312815E+15"
    with pytest.raises(ValidationError, match="not a float"):
        CryptoMarketAnalytics(timestamp=NOW, btc_dominance=52.1)
    # A JSON integer is exact, so it is accepted where a JSON fraction is not.
    raw = wire(CryptoMarketAnalytics, total_volume=10**20)
    assert decode_record(CryptoMarketAnalytics, raw).total_volume == Decimal(10**20)
