"""Record factories for the tests and the benchmarks: one valid price to vary, many distinct ones
with values a float would mangle, realistic polling cycles, and candles."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from models import CryptoOHLCVData, CryptoPriceData

T0 = datetime(2024, 5, 1, tzinfo=UTC)


def price_fields(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments of a valid CryptoPriceData (Python values), with `overrides` applied:
    what a test that feeds invalid values to validation starts from."""
    return {
        "coin_id": "bitcoin",
        "symbol": "btc",
        "name": "Bitcoin",
        "usd_price": Decimal("64000.12"),
        "last_updated": T0,
        **overrides,
    }


def price(coin: str, usd: object, at: datetime, **extra: object) -> CryptoPriceData:
    """`coin`'s snapshot at `at` (`usd` as JSON would carry it, or a Decimal); `extra` sets other
    fields."""
    fields = price_fields(coin_id=coin, symbol=coin[:3], name=coin.title(), usd_price=usd)
    return CryptoPriceData.model_validate({**fields, "last_updated": at, **extra})


def prices(prefix: str, count: int, coins: int = 37) -> list[CryptoPriceData]:
    """Distinct snapshots with values a float would mangle (tiny, long, huge, exponent form)."""
    values = [
        lambda i: Decimal(f"{i}E-20"),
        lambda i: Decimal(1) / Decimal(7 + i),
        lambda i: Decimal(f"{i}{'9' * 25}.{'1' * 12}"),
        lambda i: Decimal(f"0.{i:038d}"[:40]),
        lambda i: Decimal(f"6.{i}E-7"),
    ]
    return [
        CryptoPriceData(
            coin_id=f"{prefix}-{i % coins}",
            symbol="sym",
            name=f"Coin {i}",
            usd_price=values[i % len(values)](i + 1),
            market_cap=Decimal(f"{i}123456789012345678"),
            change_24h=Decimal(f"-{i}.5"),
            btc_price=None if i % 3 else Decimal("0.00001234"),
            last_updated=T0 + timedelta(seconds=i),
        )
        for i in range(count)
    ]


def coin_price(coin: int, cycle: int, when: datetime) -> CryptoPriceData:
    """A CoinGecko-like snapshot: prices from 1E-10 to 1E+5 (tiny ones in exponent form), long
    market caps, signed percentages, optional fields sometimes null."""
    base = Decimal(f"{(coin * 7919) % 9973 + 1}E{coin % 16 - 10}")
    wiggle = Decimal(1000 + (cycle * 37 + coin) % 61 - 30) / 1000
    return CryptoPriceData(
        coin_id=f"coin-{coin:04d}",
        symbol=f"c{coin}",
        name=f"Coin {coin}",
        usd_price=base * wiggle,
        btc_price=(base * wiggle / 65000).quantize(Decimal("1E-18")) if coin % 4 else None,
        eth_price=(base * wiggle / 3200).quantize(Decimal("1E-18")) if coin % 4 else None,
        market_cap=Decimal(f"{(coin + 1) * 1234567890123 + cycle}"),
        volume_24h=Decimal(f"{(coin + 7) * 9876543 + cycle}.{cycle % 100:02d}"),
        change_24h=Decimal(f"{(cycle % 200) - 100}.{coin:04d}"),
        change_7d=None if coin % 3 else Decimal(f"-{cycle % 50}.125"),
        last_updated=when,
    )


def snapshots(count: int, coins: int = 100, start: datetime = T0) -> list[CryptoPriceData]:
    """`count` snapshots of `coins` coins, one polling cycle (a minute) after another."""
    return [
        coin_price(i % coins, i // coins, start + timedelta(minutes=i // coins))
        for i in range(count)
    ]


def candle(i: int, prefix: str = "coin", coins: int = 5) -> CryptoOHLCVData:
    """The i-th of `coins` coins' 30-minute candles, with values a float would mangle."""
    return CryptoOHLCVData(
        coin_id=f"{prefix}-{i % coins}",
        symbol="sym",
        timestamp=T0 + timedelta(minutes=30 * i),
        open=Decimal("1.1"),
        high=Decimal(f"2.{i}"),
        low=Decimal("0.000000001"),
        close=Decimal(f"1.{i}"),
        timeframe="30m",
    )
