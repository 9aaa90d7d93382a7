"""The fake CoinGecko's market charts as a test expects them: the exact rows a backfill of a
range must publish and store."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from app.settings import Settings
from coingecko.backfill import Backfill, ProgressFile
from coingecko.client import CoinGeckoClient
from coingecko.fake_server import HOUR_MS, FakeCoinGecko
from coingecko.poller import Publish

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


def backfill_of(
    fake: FakeCoinGecko, publish: Publish, directory: Path, **settings: Any
) -> Backfill:
    """A `Backfill` on the fake (no rate limit to speak of, quick retries), keeping its progress
    in `directory`."""
    values: dict[str, Any] = {
        "coingecko_base_url": fake.base_url,
        "coingecko_calls_per_minute": 1000,
        "coingecko_api_key": None,
        "coingecko_plan": None,
        **settings,
    }
    configured = Settings(**values)
    client = CoinGeckoClient(configured, backoff_base=0.01, max_attempts=2)
    return Backfill(client, configured.plan, publish, ProgressFile(directory))
