"""Live state in Faust tables, fed by their own agents on the record topics.

- `latest_prices`: the newest `CryptoPriceData` snapshot of each coin, by `last_updated` (a late,
  older snapshot never overwrites a newer one; an equal timestamp keeps the first, as the sink's
  primary key does).
- `latest_analytics`: the newest `CryptoMarketAnalytics` per source, by `timestamp`.
- `price_ranges`: high/low of each coin's USD price in hopping windows of 24 h stepping 1 h,
  placed by the snapshot's own `last_updated` (event time), expiring after 25 h. A snapshot lies
  in 24 windows and `WindowSet.apply()` widens each one separately (assigning one merged value,
  `table[k] = v`, would copy the newest window's range into the older ones). That is 24 changelog
  writes per snapshot: fine at CoinGecko's rates.

Only CoinGecko's aggregate quotes (`exchange_id == AGGREGATE_EXCHANGE`) feed these tables, the
same rows `store.queries` reads for the views, so the two sources agree.

Values are JSON (decimals as strings), so the changelog round-trips exactly. Tables are keyed like
their topics, with the same partition count, so each changelog partition matches its source
partition. A worker holds only its assigned partitions, and table recovery is unreliable on
brokers with wrong high-water marks, so the views treat these tables as a freshness layer over the
database, never as the only source (see `tables.views`).
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar, cast

import faust
from faust.tables.wrappers import WindowWrapper
from faust.types import TableT

from app.main import app, topics
from models.codec import RecordRejected, decode_record
from models.dsl import StreamRecord
from models.market import AGGREGATE_EXCHANGE, CryptoMarketAnalytics, CryptoPriceData

R = TypeVar("R", bound=StreamRecord)

RANGE_SIZE = timedelta(hours=24)
RANGE_STEP = timedelta(hours=1)
RANGE_EXPIRES = timedelta(hours=25)

# Messages these agents could not decode, per topic. The sink dead-letters them; here they are
# only skipped and counted (shown by /health).
UNDECODABLE: Counter[str] = Counter()


def _table(name: str, record: type[StreamRecord], **options: Any) -> TableT:
    """A table with JSON keys and values (Faust's default codec when no type is given)."""
    return app.Table(name, partitions=record.topic.partitions, **options)


latest_prices = _table("latest-prices", CryptoPriceData, default=None)
latest_analytics = _table("latest-analytics", CryptoMarketAnalytics, default=None)
# `hopping()` is typed as the abstract wrapper, which lacks the `relative_to()` used below.
price_ranges = cast(
    WindowWrapper,
    _table("price-ranges", CryptoPriceData, default=dict).hopping(
        RANGE_SIZE, RANGE_STEP, expires=RANGE_EXPIRES
    ),
)


def _decode(record: type[R], raw: bytes | None) -> R | None:
    try:
        return decode_record(record, raw)
    except RecordRejected:
        UNDECODABLE[record.topic.name] += 1
        return None


def _time_of(record: StreamRecord) -> datetime:
    value = getattr(record, record.table.time_column)
    assert isinstance(value, datetime)
    return value


def stored(record: type[R], value: dict[str, Any] | None) -> R | None:
    """A table value back as its record (values are stored as the record's JSON form)."""
    return None if value is None else record.model_validate(value)


def newest(*candidates: R | None) -> R | None:
    """The candidate with the latest time column; the earlier one on a tie."""
    best: R | None = None
    for candidate in candidates:
        if candidate is not None and (best is None or _time_of(candidate) > _time_of(best)):
            best = candidate
    return best


def _keep_newest(table: TableT, key: str, record: StreamRecord) -> None:
    current = stored(type(record), table.get(key))
    if newest(current, record) is record:
        table[key] = record.model_dump(mode="json")


def widen(bounds: dict[str, str], price: str) -> dict[str, str]:
    """Extend a window's {"high", "low"} (decimal strings) by one price."""
    if not bounds:
        return {"high": price, "low": price}
    value = Decimal(price)
    return {
        "high": price if value > Decimal(bounds["high"]) else bounds["high"],
        "low": price if value < Decimal(bounds["low"]) else bounds["low"],
    }


def range_window(now: datetime) -> tuple[datetime, datetime]:
    """The 24 h window that the views report at `now`: [start of the hour 23 h ago, that + 24 h).

    It is the earliest hopping window still containing `now`, i.e. the one covering the most of
    the past day.
    """
    window = price_ranges.table.window
    assert window is not None  # a hopping table always has one
    start, _ = window.earliest(now.timestamp())
    begin = datetime.fromtimestamp(start, UTC)
    return begin, begin + RANGE_SIZE


def local_range(coin_id: str, window_start: datetime) -> dict[str, str]:
    """This worker's {"high", "low"} for the window starting at `window_start` ({} if none).

    Read relative to the window's own start, `value()` selects exactly that window (Faust picks
    the latest window starting at or before the time).
    """
    value: dict[str, str] = price_ranges.relative_to(window_start)[coin_id].value()
    return value


@app.agent(topics[CryptoPriceData.topic.name])
async def track_prices(stream: faust.StreamT[bytes]) -> None:
    """Latest snapshot and 24 h high/low per coin, from the price topic."""
    async for raw in stream:
        price = _decode(CryptoPriceData, raw)
        if price is None or price.exchange_id != AGGREGATE_EXCHANGE:
            continue
        _keep_newest(latest_prices, price.coin_id, price)
        # A fixed time-relativity per event: windows follow `last_updated`, not arrival time.
        price_ranges.relative_to(price.last_updated)[price.coin_id].apply(
            widen, str(price.usd_price)
        )


@app.agent(topics[CryptoMarketAnalytics.topic.name])
async def track_analytics(stream: faust.StreamT[bytes]) -> None:
    """Latest market analytics per source, from the analytics topic."""
    async for raw in stream:
        analytics = _decode(CryptoMarketAnalytics, raw)
        if analytics is not None:
            _keep_newest(latest_analytics, analytics.source, analytics)
