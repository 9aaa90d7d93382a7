"""`faust -A app backfill` end to end: the command against the fake CoinGecko, a worker sinking
into PostgreSQL. Killed mid-way (SIGKILL) it continues where it stopped; the table is exactly the
fake's history, and a re-run stores nothing twice."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from coingecko.backfill import BackfillRequest
from coingecko.fake_server import FakeCoinGecko, Fault, slow
from models.codec import encode_record
from models.dsl import StreamRecord
from models.market import CryptoPriceData
from testkit.charts import CHART, backfill_of, expected_rows, hour_floor
from testkit.databases import assert_exactly, stored
from testkit.workers import Kafka, Process, Worker, eventually, faust_command

pytestmark = pytest.mark.slow

COINS = ["bitcoin", "pepe-cash"]


async def test_a_killed_backfill_continues_and_a_rerun_stores_nothing_twice(
    migrated: str,
    kafka: Kafka,
    workers: Callable[..., Worker],
    fake_coingecko: FakeCoinGecko,
    bare_env: dict[str, str],
    tmp_path: Path,
) -> None:
    worker = workers(migrated)  # its own poller asks a closed port: only backfilled rows arrive
    until = hour_floor(datetime.now(UTC)) - timedelta(days=2)
    since = until - timedelta(days=100)  # two chunks per coin
    env = {
        **worker.env,
        "WEB_ENABLED": "false",
        "COINGECKO_BASE_URL": fake_coingecko.base_url,
        "COINGECKO_CALLS_PER_MINUTE": "1000",
        "COINGECKO_TIMEOUT": "30",
        "DATA_DIR": str(tmp_path / "backfill"),
    }
    argv = faust_command(
        "backfill", "--coins", ",".join(COINS), "--since", since.isoformat(),
        "--until", until.isoformat(),
    )  # fmt: skip

    def backfill(run: int) -> Process:
        return Process(argv, env, tmp_path / f"backfill-{run}.log")

    async def finished(process: Process) -> str:
        assert await asyncio.to_thread(process.popen.wait, 60) == 0, process.excerpt()
        return process.output

    # pepe-cash's second chunk hangs: the run is killed there, three chunks published.
    fake_coingecko.fail(CHART.format("pepe-cash"), Fault(), slow(8))
    first = backfill(1)
    directory = tmp_path / "backfill"

    async def three_chunks_done() -> bool | None:
        files = list(directory.glob("backfill-*.json"))
        done = json.loads(files[0].read_text())["done"] if files else {}
        return True if done == {"bitcoin": 2, "pepe-cash": 1} else None

    async def fourth_chunk_asked() -> bool | None:
        return True if fake_coingecko.count(CHART.format("pepe-cash")) == 2 else None

    await eventually(three_chunks_done, first, "three chunks published")
    # Killed once its hanging request is in: one still in flight at the kill would be counted
    # as the rerun's.
    await eventually(fourth_chunk_asked, first, "the fourth chunk asked for")
    first.kill()
    asked = len(fake_coingecko.requests)
    assert "continued after 3 done before" in await finished(backfill(2))
    assert [r.path for r in fake_coingecko.requests[asked:]] == [CHART.format("pepe-cash")]
    assert list(directory.iterdir()) == []  # finished: the job is forgotten

    # So the same job runs again in full (in-process here, publishing as the command does, to
    # spare a third start of the command): the sink must skip every record as already stored.
    async def publish(records: Sequence[StreamRecord]) -> None:
        sent = [
            await kafka.producer.send(r.topic.name, encode_record(r), key=r.key()) for r in records
        ]
        await asyncio.gather(*sent)

    request = BackfillRequest(coins=tuple(COINS), since=since, until=until)
    assert (await backfill_of(fake_coingecko, publish, directory).run(request)).records > 0

    names = {"bitcoin": ("btc", "Bitcoin"), "pepe-cash": ("pepec", "Pepe Cash")}
    expected = [
        CryptoPriceData(
            coin_id=coin, symbol=names[coin][0], name=names[coin][1], usd_price=price,
            market_cap=cap, volume_24h=volume, last_updated=at, source="coingecko-backfill",
        )
        for (coin, at), (price, cap, volume) in expected_rows(
            fake_coingecko, COINS, since, until
        ).items()
    ]  # fmt: skip

    async def all_sunk() -> dict[str, int] | None:
        try:
            status = await worker.sink_status(CryptoPriceData.topic.name)
        except (httpx.TransportError, ValueError):  # not listening yet
            return None
        done = status["rows_written"] + status["duplicates_skipped"]
        return status if done >= 2 * len(expected) else None

    status = await eventually(all_sunk, worker, "every backfilled price sunk")
    assert (status["rows_written"], status["duplicates_skipped"]) == (len(expected), len(expected))
    assert_exactly(await stored(migrated, CryptoPriceData), expected)
