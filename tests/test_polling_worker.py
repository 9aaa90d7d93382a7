"""The poller inside real workers (`faust -A app worker`): first polls at start, exact BTC/ETH
quotes in the stored rows, and /health on a process that does not poll. CoinGecko is the
project's fake server (real HTTP); broker and database are the embedded ones."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx
import pytest

from coingecko.fake_server import serve_fake_coingecko
from coingecko.parse import loads_exact
from models import RECORDS, CryptoPriceData
from testkit.databases import count_rows, stored
from testkit.workers import Kafka, Worker, eventually

pytestmark = pytest.mark.slow


async def health(worker: Worker) -> dict[str, Any] | None:
    try:
        return (await worker.health()).body
    except (httpx.TransportError, ValueError):  # not listening yet
        return None


async def test_the_leader_polls_at_start_and_every_process_tells_how_fresh_the_polls_are(
    migrated: str, kafka: Kafka, workers: Callable[..., Worker]
) -> None:
    async with serve_fake_coingecko() as fake:
        # The workers' poll intervals are an hour (testkit/workers.py): every row here comes from
        # the first poll of each endpoint, at start.
        extra = {"COINGECKO_BASE_URL": fake.base_url, "COINGECKO_CALLS_PER_MINUTE": "1000"}
        first = workers(migrated, extra)

        async def every_table_filled() -> list[int] | None:
            counts = [await count_rows(migrated, record) for record in RECORDS]
            return counts if all(counts) else None

        await eventually(every_table_filled, first, "rows from every endpoint")
        assert fake.count("/coins/markets") >= 1 and fake.count("/global") >= 1
        assert fake.count("/coins/bitcoin/ohlc") >= 1

        # btc_price/eth_price are exactly what the fake's /simple/price served.
        prices = (await stored(migrated, CryptoPriceData)).values()
        ids = sorted({str(row["coin_id"]) for row in prices})
        async with httpx.AsyncClient() as client:
            answer = await client.get(
                f"{fake.base_url}/simple/price",
                params={"ids": ",".join(ids), "vs_currencies": "btc,eth"},
            )
        assert "e-" in answer.text  # tiny quotes in exponent notation, as CoinGecko writes them
        served = loads_exact(answer.text)
        for row in prices:
            quote = served[row["coin_id"]]
            assert (row["btc_price"], row["eth_price"]) == (quote["btc"], quote["eth"]), row
        assert all(row["btc_price"] is not None for row in prices)

        second = workers(migrated, extra)

        async def one_leader() -> list[dict[str, Any]] | None:
            bodies = [await health(first), await health(second)]
            if None in bodies:
                return None
            leaders = [body["poller"]["polls_here"] for body in bodies if body]
            return [body for body in bodies if body] if leaders.count(True) == 1 else None

        bodies = await eventually(one_leader, second, "one polling process of two")
        leader, idle = sorted(bodies, key=lambda body: not body["poller"]["polls_here"])
        assert leader["poller"]["process"] != idle["poller"]["process"]
        # The process that does not poll still tells when the polls last arrived, from the
        # database: the newest stored price is the newest the fake served.
        fresh = idle["poller"]["stored"]
        newest = max(
            row["last_updated"] for row in prices if isinstance(row["last_updated"], datetime)
        )
        assert datetime.fromisoformat(fresh["crypto_prices"]["newest"]) == newest
        for record in RECORDS:
            assert fresh[record.table.name]["newest"] is not None
            assert fresh[record.table.name]["stored_at"] is not None
            assert fresh[record.table.name]["stored_age_seconds"] >= 0
