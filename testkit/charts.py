"""The fake CoinGecko's market charts as a test expects them: the exact rows a backfill of a
range must publish and store."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from coingecko.fake_server import HOUR_MS, FakeCoinGecko

CHART = "/coins/{}/market_chart/range"


def hour_floor(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def expected_rows(
    fake: FakeCoinGecko, coins: list[str], since: datetime, until: datetime
) -> dict[tuple[str, datetime], tuple[Decimal, Decimal | None, Decimal | None]]:
    """What the fake's hourly charts hold in [since, until), null prices left out."""
    rows = {}
    first = int(since.timestamp()) * 1000
    for coin in coins:
        for ms in range(first, int(until.timestamp()) * 1000, HOUR_MS):
            price, cap, volume = fake.chart_point(coin, ms)
            if price is not None:
                at = datetime.fromtimestamp(ms / 1000, UTC)
                rows[coin, at] = (
                    Decimal(price),
                    None if cap is None else Decimal(cap),
                    None if volume is None else Decimal(volume),
                )
    return rows
