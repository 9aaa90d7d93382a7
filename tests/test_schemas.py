"""JSON Schema and Avro: the schemas accept exactly the wire form, and values round-trip exactly."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import avro.errors
import avro.io
import avro.schema
import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from generators.avro import avro_schema, decode_avro, encode_avro
from generators.jsonschema import json_schema
from models import RECORDS, CryptoMarketAnalytics, CryptoOHLCVData, CryptoPriceData
from models.codec import decode_record, encode_record
from models.dsl import StreamRecord
from testkit.records import price
from testkit.strategies import valid

NOW = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
MAX_DECIMAL = "9" * 38 + "." + "9" * 38  # DECIMAL(76, 38) at full precision
EDGE_DECIMALS = [
    "0",
    "1E-12",
    "1.2345678901234567E-12",  # 17 significant digits
    "6.31917E-7",  # the sub-satoshi price NUMERIC(20,8) rounds to 0.00000063
    "0.00000001",
    "1E+15",
    "999999999999999.99999999",
    "2.70016521312815E+15",
    "1E+18",
    "1000000000000000000.000000000000000001",
    "1E-38",
    MAX_DECIMAL,
]
SIGNED_EDGES = ["-" + MAX_DECIMAL, "-1E-38", "-12.345", "-0"]


def validator(record_type: type[StreamRecord]) -> jsonschema.Draft202012Validator:
    schema = json_schema(record_type)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def as_json(record: StreamRecord) -> dict[str, Any]:
    return json.loads(encode_record(record))


def edge_price(value: str, **extra: Any) -> CryptoPriceData:
    """A snapshot with `value` in every price, cap and volume field."""
    amounts = dict.fromkeys(("btc_price", "eth_price", "market_cap", "volume_24h"), value)
    return price("pepe", value, NOW, **amounts, **extra)


def decimals_of(record: StreamRecord) -> dict[str, Decimal]:
    return {name: value for name, value in record if isinstance(value, Decimal)}


# --- JSON Schema ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", EDGE_DECIMALS)
def test_edge_values_validate_and_round_trip_through_json_unchanged(value: str) -> None:
    record = edge_price(value, change_24h=value, change_7d=f"-{value}")
    document = as_json(record)
    validator(CryptoPriceData).validate(document)
    # Same sign, digits and exponent as given: nothing rounded, no trailing zeros added.
    assert Decimal(document["usd_price"]).as_tuple() == Decimal(value).as_tuple()
    decoded = decode_record(CryptoPriceData, encode_record(record))
    assert decoded == record
    for name, original in decimals_of(record).items():
        assert getattr(decoded, name) == original
        assert str(getattr(decoded, name)) == str(original)  # same digits and exponent


def test_every_record_type_has_a_valid_schema_with_its_metadata() -> None:
    for record_type in RECORDS:
        schema = json_schema(record_type)
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["x-qicore"] == {
            "record": record_type.__name__,
            "topic": record_type.topic.name,
            "key_field": record_type.topic.key_field,
            "table": record_type.table.name,
            "time_column": record_type.table.time_column,
            "primary_key": list(record_type.table.primary_key),
        }
        assert schema["required"] == list(record_type.model_fields)


def _price_document(**changes: Any) -> dict[str, Any]:
    document = as_json(edge_price("6.31917E-7", change_24h="-3.5"))
    document.update(changes)
    return {k: v for k, v in document.items() if v is not ...}


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"usd_price": "-1.5"}, "negative price"),
        ({"usd_price": "-0.000001"}, "negative price"),
        ({"volume_24h": "-.5"}, "negative volume"),
        ({"market_cap": "-1E+18"}, "negative market cap"),
        ({"usd_price": 1.5}, "number instead of a decimal string"),
        ({"usd_price": 2}, "integer instead of a decimal string"),
        ({"usd_price": "NaN"}, "NaN"),
        ({"usd_price": "Infinity"}, "infinity"),
        ({"usd_price": "1,5"}, "not a decimal"),
        ({"usd_price": None}, "null in a required value"),
        ({"usd_price": ...}, "missing field"),
        ({"exchange": "binance"}, "extra field"),
        ({"coin_id": ""}, "empty id"),
        ({"symbol": "x" * 257}, "text too long"),
        ({"last_updated": 1714566600}, "epoch number instead of a timestamp string"),
    ],
)
def test_invalid_documents_fail_the_json_schema(changes: dict[str, Any], reason: str) -> None:
    schema_validator = validator(CryptoPriceData)
    schema_validator.validate(_price_document())  # the unchanged document is valid
    assert not schema_validator.is_valid(_price_document(**changes)), reason


@pytest.mark.parametrize("value", ["-3.5", "-0", "-0.000", "-0E+5", "0", "12"])
def test_signed_and_zero_values_fit_the_json_schema(value: str) -> None:
    """Signed fields take any sign; non-negative ones take a negative zero, as the record does."""
    schema_validator = validator(CryptoPriceData)
    schema_validator.validate(_price_document(change_7d=value))
    unsigned = _price_document(usd_price=value)
    accepted_by_record = Decimal(value) >= 0
    assert schema_validator.is_valid(unsigned) is accepted_by_record
    if accepted_by_record:
        CryptoPriceData.model_validate(unsigned)


def test_counts_are_non_negative_integers_in_the_schema() -> None:
    schema_validator = validator(CryptoMarketAnalytics)
    document = as_json(CryptoMarketAnalytics(timestamp=NOW, markets=1200))
    schema_validator.validate(document)
    assert not schema_validator.is_valid({**document, "markets": -1})
    assert not schema_validator.is_valid({**document, "markets": "1200"})
    assert not schema_validator.is_valid({**document, "markets": 1.5})


# --- Avro -----------------------------------------------------------------------------------


def test_generated_avro_schemas_parse_with_logical_types() -> None:
    for record_type in RECORDS:
        parsed = avro.schema.parse(json.dumps(avro_schema(record_type)))
        assert isinstance(parsed, avro.schema.RecordSchema)
        assert parsed.fullname == f"qicore.models.{record_type.__name__}"
        fields = {field.name: field for field in parsed.fields}
        assert list(fields) == list(record_type.model_fields)
        time_field = fields[record_type.table.time_column]
        assert isinstance(time_field.type, avro.schema.TimestampMicrosSchema)


@pytest.mark.parametrize("value", EDGE_DECIMALS)
def test_edge_values_round_trip_through_avro_unchanged(value: str) -> None:
    record = edge_price(value, change_24h=value, change_7d=f"-{value}")
    decoded = decode_avro(CryptoPriceData, encode_avro(record))
    assert decoded == record
    for name, original in decimals_of(record).items():
        assert getattr(decoded, name) == original, name
    # Avro's fixed scale leaves no trailing zeros behind for JSON or the database.
    written = as_json(decoded)["usd_price"]
    assert Decimal(written) == Decimal(value)
    assert "." not in written or not written.split("E")[0].endswith("0")


@pytest.mark.parametrize("value", SIGNED_EDGES)
def test_negative_signed_values_round_trip_through_avro(value: str) -> None:
    record = edge_price("1", change_24h=value)
    decoded = decode_avro(CryptoPriceData, encode_avro(record))
    assert decoded.change_24h == Decimal(value)


def test_avro_reads_back_the_digits_not_just_an_equal_value() -> None:
    record = edge_price("6.31917E-7")
    decoded = decode_avro(CryptoPriceData, encode_avro(record))
    assert str(decoded.usd_price) == "6.31917E-7"
    assert str(edge_price("1E+15").usd_price) == "1E+15"
    assert str(decode_avro(CryptoPriceData, encode_avro(edge_price("1E+15"))).usd_price) == (
        "1000000000000000"
    )


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2024, 2, 29, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 1, tzinfo=UTC),  # before the epoch: negative micros
        datetime(2024, 5, 1, 21, 30, 0, 123_456, tzinfo=timezone(timedelta(hours=9))),
        datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
    ],
)
def test_timestamps_round_trip_through_avro_to_the_microsecond(moment: datetime) -> None:
    record = CryptoOHLCVData(
        coin_id="bitcoin",
        symbol="btc",
        timestamp=moment,
        open="1",
        high="2",
        low="0.5",
        close="1.5",
        timeframe="4h",
    )
    decoded = decode_avro(CryptoOHLCVData, encode_avro(record))
    assert decoded.timestamp == moment
    assert decoded.timestamp.utcoffset() == timedelta(0)
    assert decoded == record


def test_avro_datum_has_the_layout_a_schema_registry_consumer_expects() -> None:
    """A plain avro reader with the generated schema reads what encode_avro wrote."""
    record = CryptoMarketAnalytics(
        timestamp=NOW, total_market_cap="2.70016521312815E+15", markets=7
    )
    reader = avro.io.DatumReader(avro.schema.parse(json.dumps(avro_schema(CryptoMarketAnalytics))))
    datum = reader.read(avro.io.BinaryDecoder(io.BytesIO(encode_avro(record))))
    assert isinstance(datum, dict)
    assert datum["total_market_cap"] == Decimal("2.70016521312815E+15")
    assert datum["timestamp"] == NOW
    assert datum["markets"] == 7
    assert datum["btc_dominance"] is None


def test_avro_decode_refuses_trailing_bytes_and_wrong_types() -> None:
    data = encode_avro(edge_price("1"))
    with pytest.raises(ValueError, match="bytes left over"):
        decode_avro(CryptoPriceData, data + b"\x00")
    with pytest.raises((ValueError, avro.errors.AvroException, EOFError)):
        decode_avro(CryptoOHLCVData, data)


# --- properties -----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.one_of([valid(record_type) for record_type in RECORDS]))
def test_any_valid_record_round_trips_exactly_and_fits_its_schemas(record: StreamRecord) -> None:
    record_type = type(record)
    document = as_json(record)
    validator(record_type).validate(document)

    from_json = decode_record(record_type, encode_record(record))
    assert from_json == record
    assert as_json(from_json) == document  # identical text, digit for digit

    from_avro = decode_avro(record_type, encode_avro(record))
    assert from_avro == record
    for name, value in decimals_of(record).items():
        assert getattr(from_avro, name) == value
