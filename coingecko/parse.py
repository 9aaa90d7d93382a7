"""CoinGecko response bodies -> DSL records, exactly and totally.

Exact: `loads_exact` reads every JSON number with a fraction or exponent as `Decimal`
(`6.31917e-7`, `2.70016521312815e+15` and `19990746.0` keep their exact values); integers stay
`int`. Total: each `parse_*` takes any decoded JSON and returns `Parsed(records, problems)`; it
never raises. A row that cannot become a record (null price, missing id, a value the DSL rejects)
is skipped and described in `problems`; a field absent from every row (schema drift) is reported
once per body, not once per row, and stored as null.

Timestamps follow CoinGecko's units: ISO-8601 strings in /coins/markets, seconds in /global,
milliseconds (the candle's close) in /coins/{id}/ohlc.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Generic, TypeVar

from pydantic import ValidationError

from models.codec import describe_validation_error
from models.market import CryptoMarketAnalytics, CryptoOHLCVData, CryptoPriceData
from models.types import ExactDecimal

R = TypeVar("R")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A timestamp outside these years is a unit mix-up (seconds read as milliseconds or the reverse).
PLAUSIBLE_YEARS = range(2009, 2200)
PRICE_CHECK = ExactDecimal(non_negative=True)


def loads_exact(body: str | bytes) -> Any:
    """Decode JSON with exact numbers; raises ValueError for anything that is not JSON."""
    return json.loads(body, parse_float=Decimal, parse_constant=Decimal)


@dataclass
class Parsed(Generic[R]):
    records: list[R] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: int = 0  # rows (or candles) that did not become records

    def keep(self, where: str, build: Callable[[], R]) -> None:
        """Add the record `build` makes, or count the row as skipped and say why."""
        try:
            record = build()
        except _Bad as bad:
            problem = str(bad)
        except ValidationError as error:
            problem = describe_validation_error(error)
        else:
            self.records.append(record)
            return
        self.skipped += 1
        self.problems.append(f"{where}: {problem}; skipped")


class _Bad(ValueError):
    """One field (hence its row) cannot be used; the message names the field."""


def _is_number(value: object) -> bool:
    return isinstance(value, int | Decimal) and not isinstance(value, bool)


def _decimal(value: object, name: str) -> Decimal | None:
    if value is None:
        return None
    if not _is_number(value):
        raise _Bad(f"{name} is {type(value).__name__}, not a number")
    return Decimal(value)  # type: ignore[arg-type]


def _count(value: object, name: str) -> int | None:
    number = _decimal(value, name)
    if number is None:
        return None
    if not number.is_finite() or number != number.to_integral_value():
        raise _Bad(f"{name} is {number}, not a whole number")
    if number.adjusted() > 18:  # beyond bigint; int() of 1E+999999999 would never finish
        raise _Bad(f"{name} is {number}, too large")
    return int(number)


def _text(value: object, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise _Bad(f"{name} is {'missing or null' if value is None else repr(value)[:40]}")
    return value


def _plausible(moment: datetime, name: str) -> datetime:
    if moment.year not in PLAUSIBLE_YEARS:
        raise _Bad(f"{name} is {moment.isoformat()}, not a plausible time (wrong unit?)")
    return moment


def _epoch(value: object, name: str, unit: str) -> datetime:
    number = _count(value, name)
    if number is None:
        raise _Bad(f"{name} is missing or null")
    try:
        moment = EPOCH + timedelta(**{unit: number})
    except OverflowError:
        raise _Bad(f"{name} {number} is not a plausible time in {unit} (wrong unit?)") from None
    return _plausible(moment, name)


def _iso(value: object, name: str) -> datetime:
    text = _text(value, name)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _Bad(f"{name} {text[:40]!r} is not an ISO-8601 time") from None
    if moment.utcoffset() is None:
        raise _Bad(f"{name} {text[:40]!r} has no time zone")
    return _plausible(moment.astimezone(UTC), name)


class _Fields:
    """Reads a JSON object's fields, noting (not failing on) optional ones that are absent."""

    def __init__(self, row: dict[str, Any], missing: Counter[str]) -> None:
        self.row = row
        self.missing = missing

    def optional(self, name: str, read: Callable[[object, str], R]) -> R | None:
        if name not in self.row:
            self.missing[name] += 1
            return None
        return read(self.row[name], name)

    def nested(self, name: str, key: str) -> Decimal | None:
        """`row[name][key]` as a decimal, e.g. total_market_cap.usd."""
        inner = self.row.get(name)
        if not isinstance(inner, dict) or key not in inner:
            self.missing[f"{name}.{key}"] += 1
            return None
        return _decimal(inner[key], f"{name}.{key}")


def _drift(parsed: Parsed[Any], where: str, missing: Counter[str]) -> None:
    for name, rows in sorted(missing.items()):
        parsed.problems.append(f"{where}: field {name!r} absent from {rows} row(s); stored as null")


@dataclass(frozen=True)
class CrossQuote:
    """A coin's price in BTC and in ETH as CoinGecko quotes it (/simple/price), exactly."""

    btc: Decimal | None
    eth: Decimal | None


def parse_simple_prices(body: object) -> tuple[dict[str, CrossQuote], list[str]]:
    """/simple/price?ids=...&vs_currencies=btc,eth `{id: {"btc": n, "eth": n}}` -> the quotes
    by coin id, and problems. An id CoinGecko leaves out (unknown) is simply absent; a quote
    that is not a non-negative number is dropped (stored as null) and described."""
    quotes: dict[str, CrossQuote] = {}
    if not isinstance(body, dict):
        return quotes, [f"simple/price: expected an object of coins, got {_kind(body)}"]
    problems: list[str] = []
    for coin_id, row in body.items():
        if not isinstance(row, dict):
            problems.append(f"simple/price coin {coin_id!r}: expected an object, got {_kind(row)}")
            continue
        values: dict[str, Decimal | None] = {}
        for currency in ("btc", "eth"):
            try:
                value = _decimal(row.get(currency), currency)
                if value is not None:
                    PRICE_CHECK(value)  # what the record's Price field would refuse
            except (_Bad, ValueError) as bad:
                problems.append(f"simple/price coin {coin_id!r} {currency}: {bad}; stored as null")
                value = None
            values[currency] = value
        quotes[coin_id] = CrossQuote(btc=values["btc"], eth=values["eth"])
    return quotes, problems


def parse_markets(
    body: object, quotes: Mapping[str, CrossQuote] | None = None
) -> Parsed[CryptoPriceData]:
    """/coins/markets (vs_currency=usd, price_change_percentage=24h,7d) -> price snapshots.

    btc_price/eth_price come from `quotes` (CoinGecko's own BTC and ETH quotes, /simple/price),
    null for a coin without one: /coins/markets quotes one currency, and a ratio of two USD
    prices is not CoinGecko's BTC quote, so it would be an invented number.
    """
    quotes = quotes or {}
    parsed: Parsed[CryptoPriceData] = Parsed()
    if not isinstance(body, list):
        parsed.problems.append(f"coins/markets: expected a list of coins, got {_kind(body)}")
        return parsed
    missing: Counter[str] = Counter()
    for index, row in enumerate(body):
        where = f"coins/markets row {index}"
        if not isinstance(row, dict):
            parsed.skipped += 1
            parsed.problems.append(f"{where}: expected an object, got {_kind(row)}; skipped")
            continue
        if isinstance(row.get("id"), str) and row["id"]:
            where = f"coins/markets coin {row['id']!r}"
        fields = _Fields(row, missing)

        def build(row: dict[str, Any] = row, fields: _Fields = fields) -> CryptoPriceData:
            coin_id = _text(row.get("id"), "id")
            price = _decimal(row.get("current_price"), "current_price")
            if price is None:
                raise _Bad("current_price is null or missing (no USD price)")
            quote = quotes.get(coin_id)
            return CryptoPriceData(
                coin_id=coin_id,
                symbol=_text(row.get("symbol"), "symbol"),
                name=_text(row.get("name"), "name"),
                usd_price=price,
                btc_price=quote.btc if quote else None,
                eth_price=quote.eth if quote else None,
                market_cap=fields.optional("market_cap", _decimal),
                volume_24h=fields.optional("total_volume", _decimal),
                change_24h=fields.optional("price_change_percentage_24h", _decimal),
                change_7d=fields.optional("price_change_percentage_7d_in_currency", _decimal),
                last_updated=_iso(row.get("last_updated"), "last_updated"),
            )

        parsed.keep(where, build)
    _drift(parsed, "coins/markets", missing)
    return parsed


def parse_global(body: object) -> Parsed[CryptoMarketAnalytics]:
    """/global -> one market-analytics record (its `data` object; `updated_at` is seconds)."""
    parsed: Parsed[CryptoMarketAnalytics] = Parsed()
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        parsed.problems.append(f"global: expected {{'data': {{...}}}}, got {_kind(body)}")
        return parsed
    missing: Counter[str] = Counter()
    fields = _Fields(data, missing)

    def build() -> CryptoMarketAnalytics:
        return CryptoMarketAnalytics(
            timestamp=_epoch(data.get("updated_at"), "updated_at", "seconds"),
            total_market_cap=fields.nested("total_market_cap", "usd"),
            total_volume=fields.nested("total_volume", "usd"),
            btc_dominance=fields.nested("market_cap_percentage", "btc"),
            eth_dominance=fields.nested("market_cap_percentage", "eth"),
            active_cryptocurrencies=fields.optional("active_cryptocurrencies", _count),
            markets=fields.optional("markets", _count),
            market_cap_change_24h=fields.optional("market_cap_change_percentage_24h_usd", _decimal),
        )

    parsed.keep("global", build)
    _drift(parsed, "global", missing)
    return parsed


def timeframe_for_days(days: int) -> str:
    """CoinGecko's OHLC granularity follows `days`: 1-2 -> 30 min, 3-30 -> 4 h, more -> 4 days."""
    if days <= 2:
        return "30m"
    return "4h" if days <= 30 else "4d"


def parse_ohlc(body: object, coin_id: str, symbol: str, days: int) -> Parsed[CryptoOHLCVData]:
    """/coins/{id}/ohlc `[[close_ms, open, high, low, close], ...]` -> candles (no volume)."""
    parsed: Parsed[CryptoOHLCVData] = Parsed()
    where = f"coins/{coin_id}/ohlc"
    if not isinstance(body, list):
        parsed.problems.append(f"{where}: expected a list of candles, got {_kind(body)}")
        return parsed
    timeframe = timeframe_for_days(days)
    for index, candle in enumerate(body):

        def build(candle: object = candle) -> CryptoOHLCVData:
            if not isinstance(candle, list) or len(candle) != 5:
                raise _Bad(f"expected [time, open, high, low, close], got {_kind(candle)}")
            moment, *prices = candle
            values = [_decimal(value, name) for value, name in zip(prices, "ohlc", strict=True)]
            if any(value is None for value in values):
                raise _Bad("a price is null")
            return CryptoOHLCVData(
                coin_id=coin_id,
                symbol=symbol,
                timestamp=_epoch(moment, "time", "milliseconds"),
                open=values[0],
                high=values[1],
                low=values[2],
                close=values[3],
                timeframe=timeframe,
            )

        parsed.keep(f"{where} candle {index}", build)
    return parsed


BACKFILL_SOURCE = "coingecko-backfill"  # `source` of backfilled prices, to tell them from polls
CHART_SERIES = ("prices", "market_caps", "total_volumes")


def parse_market_chart(
    body: object, coin_id: str, symbol: str, name: str, start: datetime, end: datetime
) -> Parsed[CryptoPriceData]:
    """/coins/{id}/market_chart/range `{prices, market_caps, total_volumes}` of `[ms, value]`
    -> one backfilled price per point of `prices` in [start, end).

    The three series are joined on their millisecond times: a market cap or volume that is
    null or absent at a price's time is stored as null; a point whose price is null is skipped.
    Points outside [start, end) belong to a neighbouring chunk (CoinGecko's `to` is inclusive).
    """
    parsed: Parsed[CryptoPriceData] = Parsed()
    where = f"coins/{coin_id}/market_chart/range"
    if not isinstance(body, dict) or not isinstance(body.get("prices"), list):
        parsed.problems.append(f"{where}: expected {{'prices': [...], ...}}, got {_kind(body)}")
        return parsed
    others: dict[str, dict[object, object]] = {}
    for series in CHART_SERIES[1:]:
        points = body.get(series)
        if not isinstance(points, list):
            parsed.problems.append(f"{where}: {series} is {_kind(points)}; stored as null")
            points = []
        others[series] = {
            point[0]: point[1] for point in points if isinstance(point, list) and len(point) == 2
        }
    first, after = _milliseconds(start), _milliseconds(end)
    for index, point in enumerate(body["prices"]):
        if isinstance(point, list) and point and _is_number(point[0]):
            if not first <= point[0] < after:
                continue

        def build(point: object = point) -> CryptoPriceData:
            if not isinstance(point, list) or len(point) != 2:
                raise _Bad(f"expected [time, price], got {_kind(point)}")
            moment, value = point
            at = _epoch(moment, "time", "milliseconds")
            price = _decimal(value, "price")
            if price is None:
                raise _Bad("price is null")
            return CryptoPriceData(
                coin_id=coin_id,
                symbol=symbol,
                name=name,
                usd_price=price,
                market_cap=_decimal(others["market_caps"].get(moment), "market_cap"),
                volume_24h=_decimal(others["total_volumes"].get(moment), "total_volume"),
                last_updated=at,
                source=BACKFILL_SOURCE,
            )

        parsed.keep(f"{where} point {index}", build)
    return parsed


def _milliseconds(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(milliseconds=1)


def _kind(value: object) -> str:
    """A short description of a JSON value for messages (never the whole, possibly huge, value)."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return names.get(type(value), "a number" if _is_number(value) else type(value).__name__)
