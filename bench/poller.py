"""Poller efficiency: CoinGecko calls per price cycle, and how long a cycle takes.

    .venv/bin/python -m bench.poller [--cycles 5]

The real `coingecko.poller.Poller` and `CoinGeckoClient` against the local CoinGecko-shaped
server (`coingecko.fake_server`, `extra_coins` synthetic coins after the fixture's), tracking
the top 100, 1,000 and 5,000 coins, with their BTC/ETH quotes (/simple/price, the default
BTC_ETH_PRICES_EVERY=1). The rate limiter is set high (10,000 calls/minute) so that
the cycle time shows the poller's own cost (HTTP, exact JSON parsing, validation); the calls per
cycle are then compared with each plan's budget. Records go to an in-memory publish (this
measures the poller, not the broker). The server advances its timestamps between cycles, as
CoinGecko's cache does, so every cycle publishes every coin.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from app.settings import DEFAULT_CALLS_PER_MINUTE, Settings
from bench.common import arguments, describe_machine, mean, table
from coingecko.client import CoinGeckoClient
from coingecko.fake_server import FakeCoinGecko
from coingecko.poller import Poller, PollStatus
from models.dsl import StreamRecord

MARKETS = "/coins/markets"
QUOTES = "/simple/price"

COLUMNS = (  # of the printed table
    "coins",
    "market calls/cycle",
    "quote calls/cycle",
    "records/cycle",
    "cycle ms",
    "plans whose calls/minute fit a 60 s cycle: markets only",
    "with quotes",
)


async def measure(coins: int, cycles: int) -> tuple[int, int, float, int]:
    """(markets calls and quote calls of the last cycle, mean seconds per cycle, records per
    cycle)."""
    fake = FakeCoinGecko(extra_coins=max(0, coins))
    url = await fake.start()
    published: list[int] = []

    async def publish(records: Sequence[StreamRecord]) -> None:
        published.append(len(records))

    settings = Settings(
        coingecko_base_url=url, coingecko_calls_per_minute=10_000, top_n=coins, coins=()
    )
    client = CoinGeckoClient(settings)
    poller = Poller(settings, client, publish, status=PollStatus())
    times = []
    try:
        for _ in range(cycles):
            fake.advance(60)
            before = fake.count(MARKETS), fake.count(QUOTES)
            published.clear()
            started = time.perf_counter()
            await poller.poll_prices()
            times.append(time.perf_counter() - started)
        markets, quotes = fake.count(MARKETS) - before[0], fake.count(QUOTES) - before[1]
        return markets, quotes, mean(times), sum(published)
    finally:
        await client.aclose()
        await fake.stop()


def fitting(calls: int) -> str:
    """The plans whose default calls per minute cover `calls` a minute."""
    return ", ".join(plan for plan, limit in DEFAULT_CALLS_PER_MINUTE.items() if calls <= limit)


async def main(cycles: int) -> None:
    print(describe_machine())
    rows = []
    for coins in (100, 1000, 5000):
        markets, quotes, seconds, records = await measure(coins, cycles)
        rows.append(
            (
                f"{coins:,}",
                markets,
                quotes,
                f"{records:,}",
                f"{seconds * 1000:.0f}",
                fitting(markets),
                fitting(markets + quotes),
            )
        )
    print(table(COLUMNS, rows))


if __name__ == "__main__":
    parser = arguments(__doc__)
    parser.add_argument("--cycles", type=int, default=5)
    asyncio.run(main(parser.parse_args().cycles))
