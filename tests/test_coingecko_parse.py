"""CoinGecko bodies -> DSL records: exact numbers, nulls, units, and no exception for any input."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from importlib import resources
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from coingecko.parse import (
    CrossQuote,
    loads_exact,
    parse_global,
    parse_markets,
    parse_ohlc,
    parse_simple_prices,
    timeframe_for_days,
)
from testkit.pollers import FIXTURE_COINS
from testkit.strategies import exact_decimals

FIXTURES = resources.files("coingecko") / "fixtures"


def fixture(name: str) -> Any:
    return loads_exact((FIXTURES / name).read_text())


def same(value: Decimal | None, text: str) -> bool:
    """Equal value AND the same digits and exponent: nothing went through a float."""
    return value is not None and value.as_tuple() == Decimal(text).as_tuple()


def test_loads_exact_keeps_every_number_exactly() -> None:
    values = loads_exact("[6.31917e-7, 2.70016521312815e+15, 19990746.0, 0.1, 5, -0.0]")
    assert [str(v) for v in values] == [
        "6.31917E-7",
        "2.70016521312815E+15",
        "19990746.0",
        "0.1",
        "5",
        "-0.0",
    ]
    assert isinstance(values[4], int)


def test_markets_fixture_values_are_exact() -> None:
    parsed = parse_markets(fixture("coins_markets.json"))
    by_id = {record.coin_id: record for record in parsed.records}
    assert list(by_id) == FIXTURE_COINS[:-1]  # the last, ghost-token, has no current price
    btc = by_id["bitcoin"]
    assert (btc.symbol, btc.name, btc.exchange_id) == ("btc", "Bitcoin", "aggregate")
    assert same(btc.usd_price, "84213.57")
    assert same(btc.market_cap, "1670123456789")
    assert same(btc.volume_24h, "31234567890")
    assert same(btc.change_24h, "1.22768")
    assert same(btc.change_7d, "-4.11829373641201")
    assert btc.last_updated == datetime(2025, 3, 14, 10, 15, 7, 311000, tzinfo=UTC)
    assert btc.btc_price is None and btc.eth_price is None  # not quoted by /coins/markets
    assert btc.attribution == "Data provided by CoinGecko"
    assert same(by_id["tether"].usd_price, "1.0")
    assert same(by_id["pepe-cash"].usd_price, "7.14159e-6")
    assert same(by_id["pepe-cash"].change_7d, "9.87e-3")
    wrapped = by_id["wrapped-bitcoin-x"]
    assert wrapped.symbol == "btc"  # symbols are not unique: records are keyed by id
    assert same(wrapped.market_cap, "2.1e+10")
    assert wrapped.change_7d is None
    quiet = by_id["quiet-ledger"]
    assert same(quiet.usd_price, "0.00031207")
    assert (quiet.market_cap, quiet.volume_24h, quiet.change_24h, quiet.change_7d) == (
        None,
        None,
        None,
        None,
    )
    assert parsed.skipped == 1
    assert parsed.problems == [
        "coins/markets coin 'ghost-token': current_price is null or missing (no USD price); skipped"
    ]


def test_markets_schema_drift_skips_bad_rows_and_keeps_the_rest() -> None:
    good = {
        "id": "a",
        "symbol": "a",
        "name": "A",
        "current_price": Decimal("1.5"),
        "last_updated": "2025-01-01T00:00:00.000Z",
    }
    rows = [
        good,
        {**good, "id": "b", "current_price": "1.5"},  # a quoted number
        {**good, "id": "c", "last_updated": 1735689600},  # seconds where ISO is expected
        {**good, "id": "d", "current_price": Decimal("-1")},  # the DSL refuses negative prices
        {**good, "id": "e", "last_updated": "2025-01-01T00:00:00"},  # no zone
        {key: value for key, value in good.items() if key != "id"},
        "not a row",
        {**good, "id": "f", "current_price": Decimal("NaN")},
    ]
    parsed = parse_markets(rows)
    assert [record.coin_id for record in parsed.records] == ["a"]
    assert parsed.skipped == 7
    problems = "\n".join(parsed.problems)
    assert "coin 'b': current_price is str, not a number" in problems
    assert "coin 'c': last_updated is 1735689600" in problems
    assert "coin 'd': usd_price: Value error, must not be negative" in problems
    assert "coin 'e': last_updated '2025-01-01T00:00:00' has no time zone" in problems
    assert "row 5: id is missing or null" in problems
    assert "row 6: expected an object, got a string" in problems
    assert "coin 'f': usd_price: Input should be a finite number" in problems
    # Optional fields absent from every row are reported once per body, not once per row.
    assert "field 'market_cap' absent from 5 row(s); stored as null" in problems
    assert parsed.records[0].market_cap is None


def test_markets_empty_and_wrong_shapes() -> None:
    assert parse_markets([]).records == [] and parse_markets([]).problems == []
    bodies: tuple[object, ...] = ({}, None, "html", Decimal(3))
    for body in bodies:
        parsed = parse_markets(body)
        assert parsed.records == []
        assert parsed.problems and parsed.problems[0].startswith("coins/markets: expected a list")


def test_global_fixture_values_are_exact() -> None:
    parsed = parse_global(fixture("global.json"))
    assert parsed.problems == []
    (record,) = parsed.records
    assert record.timestamp == datetime(2025, 3, 14, 10, 10, tzinfo=UTC)  # seconds
    assert same(record.total_market_cap, "2788561234567.8125")
    assert same(record.total_volume, "101234567890.0")
    assert same(record.btc_dominance, "59.89181526671431")
    assert same(record.eth_dominance, "8.270028837813045")
    assert record.active_cryptocurrencies == 16842
    assert record.markets == 1241
    assert same(record.market_cap_change_24h, "-1.7340298123456789")
    assert record.source == "coingecko"


def test_global_drift() -> None:
    data = fixture("global.json")["data"]
    # CoinGecko's documentation example nests under "date" (a typo): no record, a clear message.
    assert parse_global({"date": data}).problems == [
        "global: expected {'data': {...}}, got an object"
    ]
    in_ms = parse_global({"data": {**data, "updated_at": data["updated_at"] * 1000}})
    assert in_ms.records == [] and "not a plausible time" in in_ms.problems[0]
    no_usd = parse_global({"data": {**data, "total_market_cap": {"eur": Decimal(1)}}})
    assert no_usd.records[0].total_market_cap is None
    assert "field 'total_market_cap.usd' absent" in no_usd.problems[0]


def test_ohlc_fixture_values_are_exact() -> None:
    parsed = parse_ohlc(fixture("coins_ohlc.json")["bitcoin"], "bitcoin", "btc", 1)
    assert parsed.problems == []
    assert len(parsed.records) == 4
    last = parsed.records[-1]
    assert last.timestamp == datetime(2025, 3, 14, 10, 0, tzinfo=UTC)  # ms, the candle's close
    assert [str(v) for v in (last.open, last.high, last.low, last.close)] == [
        "84102.2",
        "84230.0",
        "84050.45",
        "84213.57",
    ]
    assert (last.timeframe, last.volume, last.symbol) == ("30m", None, "btc")
    pepe = parse_ohlc(fixture("coins_ohlc.json")["pepe-cash"], "pepe-cash", "pepec", 1)
    assert same(pepe.records[0].open, "7.0312e-6")


def test_ohlc_bad_candles_are_skipped() -> None:
    good = [1741946400000, 1, 2, Decimal("0.5"), Decimal("1.5")]
    parsed = parse_ohlc(
        [good, [1741946400000, 1, 2, 3], [1741948200000, None, 1, 1, 1]], "x", "x", 90
    )
    assert len(parsed.records) == 1 and parsed.records[0].timeframe == "4d"
    assert parsed.skipped == 2
    assert parsed.problems[0].startswith("coins/x/ohlc candle 1: expected [time, open")
    assert parsed.problems[1] == "coins/x/ohlc candle 2: a price is null; skipped"
    assert parse_ohlc({"error": "coin not found"}, "x", "x", 1).problems == [
        "coins/x/ohlc: expected a list of candles, got an object"
    ]


def test_timeframe_follows_days() -> None:
    assert [timeframe_for_days(d) for d in (1, 2, 3, 30, 31, 365)] == [
        "30m",
        "30m",
        "4h",
        "4h",
        "4d",
        "4d",
    ]


# /simple/price?ids=...&vs_currencies=btc,eth as CoinGecko writes it: exponent notation for the
# tiny quotes, `1.0` for bitcoin in BTC, unknown ids left out.
SIMPLE_PRICE = """{
  "bitcoin": {"btc": 1.0, "eth": 44.04419385},
  "pepe-cash": {"btc": 8.480386e-11, "eth": 3.7350231e-09},
  "tether": {"btc": 1.187e-05, "eth": 0.00052301},
  "quiet-ledger": {"btc": null, "eth": 1.6e-7},
  "broken": {"btc": -1, "eth": "0.1"},
  "not-an-object": 5
}"""


def test_simple_price_quotes_are_exact_and_bad_ones_null() -> None:
    quotes, problems = parse_simple_prices(loads_exact(SIMPLE_PRICE))
    assert same(quotes["bitcoin"].btc, "1.0") and same(quotes["bitcoin"].eth, "44.04419385")
    assert same(quotes["pepe-cash"].btc, "8.480386e-11")
    assert same(quotes["pepe-cash"].eth, "3.7350231e-09")
    assert str(quotes["pepe-cash"].btc) == "8.480386E-11"
    assert same(quotes["tether"].btc, "1.187e-05")
    assert quotes["quiet-ledger"] == CrossQuote(btc=None, eth=Decimal("1.6e-7"))
    assert quotes["broken"] == CrossQuote(btc=None, eth=None)
    assert "not-an-object" not in quotes
    assert problems == [
        "simple/price coin 'broken' btc: must not be negative; stored as null",
        "simple/price coin 'broken' eth: eth is str, not a number; stored as null",
        "simple/price coin 'not-an-object': expected an object, got a number",
    ]


def test_markets_take_their_btc_and_eth_prices_from_the_quotes() -> None:
    quotes, _ = parse_simple_prices(loads_exact(SIMPLE_PRICE))
    parsed = parse_markets(fixture("coins_markets.json"), quotes)
    by_id = {record.coin_id: record for record in parsed.records}
    assert same(by_id["pepe-cash"].btc_price, "8.480386e-11")
    assert same(by_id["pepe-cash"].eth_price, "3.7350231e-09")
    assert by_id["quiet-ledger"].btc_price is None
    assert same(by_id["quiet-ledger"].eth_price, "1.6e-7")
    assert by_id["ethereum"].btc_price is None  # no quote for it: null, never a USD ratio
    # Apart from the quotes, the records are the ones parsed without them.
    plain = {
        record.coin_id: record for record in parse_markets(fixture("coins_markets.json")).records
    }
    for coin_id, record in by_id.items():
        assert record.model_copy(update={"btc_price": None, "eth_price": None}) == plain[coin_id]


@settings(max_examples=200, deadline=None)
@given(exact_decimals(signed=False), exact_decimals(signed=False), st.booleans())
def test_simple_price_quotes_keep_any_price_exactly(
    btc: Decimal, eth: Decimal, exponent: bool
) -> None:
    """Whatever digits CoinGecko writes, plainly or in exponent notation, arrive unchanged."""
    write = (lambda d: f"{d:e}") if exponent else str
    body = f'{{"x": {{"btc": {write(btc)}, "eth": {write(eth)}, "usd": 1}}}}'
    quotes, problems = parse_simple_prices(loads_exact(body))
    assert problems == []
    assert quotes["x"].btc == btc and quotes["x"].eth == eth
    if not exponent:
        assert quotes["x"].btc.as_tuple() == Decimal(str(btc)).as_tuple()  # type: ignore[union-attr]


FIELD_NAMES = st.sampled_from(
    [
        "id",
        "symbol",
        "name",
        "current_price",
        "market_cap",
        "total_volume",
        "last_updated",
        "price_change_percentage_24h",
        "data",
        "updated_at",
        "total_market_cap",
        "usd",
        "btc",
        "eth",
        "market_cap_percentage",
        "active_cryptocurrencies",
        "markets",
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.decimals(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(["2025-03-14T10:15:07.311Z", "2025-03-14", "x"])
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(FIELD_NAMES, inner, max_size=8),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_parsers_are_total(body: Any) -> None:
    """Any JSON value: records and problems, never an exception."""
    for parsed in (
        parse_markets(body),
        parse_markets([body]),
        parse_global(body),
        parse_global({"data": body}),
        parse_ohlc(body, "x", "x", 1),
        parse_ohlc([body], "x", "x", 1),
    ):
        assert isinstance(parsed.records, list) and isinstance(parsed.problems, list)
    quotes, problems = parse_simple_prices(body)
    assert isinstance(quotes, dict) and isinstance(problems, list)
