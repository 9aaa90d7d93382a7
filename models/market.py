"""Market-data records: prices, OHLCV candles and market-wide analytics."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field

from models.dsl import StreamRecord, TableSpec, TopicSpec
from models.types import Count, Price, SignedDecimal, Text, Timestamp

COINGECKO_ATTRIBUTION = "Data provided by CoinGecko"
# CoinGecko's prices are aggregated over many venues: they carry this pseudo-exchange id, so a
# real venue's quote for the same coin and instant is a different primary key, not a collision.
AGGREGATE_EXCHANGE = "aggregate"
PARTITIONS = 6


class CryptoPriceData(StreamRecord):
    """One price snapshot of one coin on one exchange, as of `last_updated`."""

    topic = TopicSpec(
        name="crypto-prices",
        key_field="coin_id",
        partitions=PARTITIONS,
        retention=timedelta(days=7),
    )
    table = TableSpec(
        name="crypto_prices",
        time_column="last_updated",
        primary_key=("coin_id", "exchange_id", "last_updated"),
        chunk_interval=timedelta(days=1),
        segment_by=("coin_id",),
        compress_after=timedelta(days=7),
        retain_for=timedelta(days=365),
    )

    coin_id: Text = Field(description="CoinGecko coin id, e.g. 'bitcoin' (symbols are not unique)")
    symbol: Text
    name: Text
    exchange_id: Text = AGGREGATE_EXCHANGE
    usd_price: Price
    btc_price: Price | None = None
    eth_price: Price | None = None
    market_cap: Price | None = None
    volume_24h: Price | None = Field(None, description="Rolling 24 h volume in USD")
    change_24h: SignedDecimal | None = Field(None, description="Price change over 24 h, percent")
    change_7d: SignedDecimal | None = Field(None, description="Price change over 7 days, percent")
    last_updated: Timestamp
    source: Text = "coingecko"
    attribution: Text = COINGECKO_ATTRIBUTION


class CryptoOHLCVData(StreamRecord):
    """One candle; `timestamp` is the candle's close, as CoinGecko reports it."""

    topic = TopicSpec(
        name="crypto-ohlcv",
        key_field="coin_id",
        partitions=PARTITIONS,
        retention=timedelta(days=7),
    )
    table = TableSpec(
        name="crypto_ohlcv",
        time_column="timestamp",
        primary_key=("coin_id", "exchange_id", "timeframe", "timestamp"),
        chunk_interval=timedelta(days=7),
        segment_by=("coin_id",),
        compress_after=timedelta(days=30),
        retain_for=None,
    )

    coin_id: Text
    symbol: Text
    exchange_id: Text = AGGREGATE_EXCHANGE
    timestamp: Timestamp
    open: Price
    high: Price
    low: Price
    close: Price
    volume: Price | None = Field(None, description="CoinGecko's OHLC endpoint has no volume")
    timeframe: Text = Field(description="Candle width, e.g. '30m', '4h', '4d'")
    source: Text = "coingecko"
    attribution: Text = COINGECKO_ATTRIBUTION


class CryptoMarketAnalytics(StreamRecord):
    """Market-wide figures from CoinGecko's /global, as of `timestamp`."""

    topic = TopicSpec(
        name="market-analytics",
        key_field="source",
        partitions=PARTITIONS,
        retention=timedelta(days=30),
    )
    table = TableSpec(
        name="market_analytics",
        time_column="timestamp",
        primary_key=("source", "timestamp"),
        chunk_interval=timedelta(days=30),
        compress_after=timedelta(days=90),
        retain_for=None,
    )

    timestamp: Timestamp
    total_market_cap: Price | None = Field(None, description="USD")
    total_volume: Price | None = Field(None, description="Rolling 24 h, USD")
    btc_dominance: SignedDecimal | None = Field(None, description="Percent of total market cap")
    eth_dominance: SignedDecimal | None = Field(None, description="Percent of total market cap")
    active_cryptocurrencies: Count | None = None
    markets: Count | None = None
    market_cap_change_24h: SignedDecimal | None = Field(None, description="Percent")
    source: Text = "coingecko"
    attribution: Text = COINGECKO_ATTRIBUTION
