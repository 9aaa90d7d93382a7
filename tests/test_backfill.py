"""The backfill in-process: chunking, the market-chart parser, and `Backfill` against the fake
CoinGecko (real HTTP) publishing to the embedded broker, read back and compared exactly."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from coingecko.backfill import (
    CHUNK,
    Backfill,
    BackfillError,
    BackfillRequest,
    LogProgress,
    plan_chunks,
)
from coingecko.fake_server import HOUR_MS, FakeCoinGecko, Fault, server_error
from coingecko.parse import BACKFILL_SOURCE, loads_exact, parse_market_chart
from models.market import CryptoOHLCVData, CryptoPriceData
from testkit.charts import CHART, backfill_of, expected_rows, hour_floor
from testkit.pollers import BrokerTopics


def published(
    messages: list[tuple[bytes, Any]],
) -> list[tuple[tuple[str, datetime], tuple[Decimal, Decimal | None, Decimal | None]]]:
    return [
        ((r.coin_id, r.last_updated), (r.usd_price, r.market_cap, r.volume_24h))
        for _, r in messages
    ]


def make_backfill(
    fake: FakeCoinGecko, topics: BrokerTopics, directory: Path, **overrides: Any
) -> Backfill:
    return backfill_of(fake, topics.publish, directory, **overrides)


def test_a_long_range_is_cut_into_contiguous_chunks_of_at_most_90_days() -> None:
    since = datetime(2026, 1, 1, tzinfo=UTC)
    chunks = plan_chunks(since, since + timedelta(days=200))
    assert [end - start for start, end in chunks] == [CHUNK, CHUNK, timedelta(days=20)]
    assert chunks[0][0] == since and chunks[-1][1] == since + timedelta(days=200)
    assert all(a[1] == b[0] for a, b in pairwise(chunks))
    assert plan_chunks(since, since + timedelta(hours=5)) == [(since, since + timedelta(hours=5))]


def test_market_chart_points_become_exact_backfilled_prices() -> None:
    start = datetime(2026, 3, 1, tzinfo=UTC)
    ms = int(start.timestamp()) * 1000
    body = loads_exact(
        f"""{{"prices": [[{ms - HOUR_MS}, 1.0], [{ms}, 1.2e-05], [{ms + HOUR_MS}, null],
              [{ms + 2 * HOUR_MS}, 19990746.0], [{ms + 3 * HOUR_MS}, 5]],
             "market_caps": [[{ms}, 2.70016521312815e+15], [{ms + 2 * HOUR_MS}, null]],
             "total_volumes": [[{ms}, 3], [{ms + 2 * HOUR_MS}, 4.5]]}}"""
    )
    end = start + timedelta(hours=3)  # the point at `end` belongs to the next chunk
    parsed = parse_market_chart(body, "pepe-cash", "pepec", "Pepe Cash", start, end)
    rows = [(r.last_updated, r.usd_price, r.market_cap, r.volume_24h) for r in parsed.records]
    assert rows == [
        (start, Decimal("0.000012"), Decimal("2700165213128150"), Decimal(3)),
        (start + timedelta(hours=2), Decimal("19990746.0"), None, Decimal("4.5")),
    ]
    assert str(parsed.records[0].usd_price) == "0.000012"
    assert {r.source for r in parsed.records} == {BACKFILL_SOURCE}
    assert parsed.skipped == 1 and "price is null" in parsed.problems[0]
    assert parse_market_chart({"error": "x"}, "a", "a", "A", start, end).problems


async def test_the_backfill_publishes_the_exact_history_and_forgets_a_finished_run(
    fake_coingecko: FakeCoinGecko, topics: BrokerTopics, tmp_path: Path
) -> None:
    until = hour_floor(datetime.now(UTC)) - timedelta(days=10)
    since = until - timedelta(days=100)  # two chunks per coin: 90 days and 10 days
    coins = ["bitcoin", "pepe-cash", "no-such-coin"]
    backfill = make_backfill(fake_coingecko, topics, tmp_path)
    summary = await backfill.run(BackfillRequest(coins=tuple(coins), since=since, until=until))

    expected = expected_rows(fake_coingecko, coins[:2], since, until)
    got = published(await topics.read(CryptoPriceData))
    assert dict(got) == expected and len(got) == len(expected)  # each point once
    assert any(price < Decimal("0.001") for price, _, _ in expected.values())
    assert any(cap is None for _, cap, _ in expected.values())
    assert (summary.chunks, summary.records, summary.failed) == (4, len(expected), {})
    assert summary.skipped > 0  # the fake's null prices
    spans = [
        int(r.query["to"]) - int(r.query["from"])
        for r in fake_coingecko.requests
        if r.path.endswith("/market_chart/range")
    ]
    assert len(spans) == 4 and max(spans) <= 90 * 86400
    assert list(tmp_path.iterdir()) == []  # finished: no progress left to resume


async def test_an_interrupted_backfill_continues_with_the_chunks_it_had_not_published(
    fake_coingecko: FakeCoinGecko, topics: BrokerTopics, tmp_path: Path
) -> None:
    until = hour_floor(datetime.now(UTC)) - timedelta(days=1)
    since = until - timedelta(days=200)  # three chunks per coin
    request = BackfillRequest(coins=("ethereum", "tether"), since=since, until=until)
    # tether's second chunk fails (retries exhausted): ethereum's three and tether's first are in.
    fake_coingecko.fail(CHART.format("tether"), Fault(), server_error(), server_error())
    with pytest.raises(BackfillError, match="run the same command again to continue"):
        await make_backfill(fake_coingecko, topics, tmp_path).run(request)
    first = published(await topics.read(CryptoPriceData))
    assert [path.name for path in tmp_path.iterdir()] == [f"backfill-{request.key()}.json"]

    asked_before = len(fake_coingecko.requests)
    summary = await make_backfill(fake_coingecko, topics, tmp_path).run(request)
    again = fake_coingecko.requests[asked_before:]
    assert [r.path for r in again] == [CHART.format("tether")] * 2  # no markets call either
    assert int(again[0].query["from"]) == int((since + CHUNK).timestamp())
    assert (summary.resumed_from, summary.chunks) == (4, 2)
    told = str(summary)
    assert told.startswith("published ") and "in 2 chunks (continued after 4 done before)" in told

    everything = published(await topics.read(CryptoPriceData))
    expected = expected_rows(fake_coingecko, ["ethereum", "tether"], since, until)
    assert dict(everything) == expected and len(everything) == len(expected)
    assert len(first) < len(expected)
    assert list(tmp_path.iterdir()) == []


async def test_the_top_coins_by_market_cap_are_backfilled_hourly(
    fake_coingecko: FakeCoinGecko, topics: BrokerTopics, tmp_path: Path
) -> None:
    request = BackfillRequest(top=2, days=90)
    await make_backfill(fake_coingecko, topics, tmp_path).run(request)
    times: dict[str, list[datetime]] = {}
    for (coin, at), _ in published(await topics.read(CryptoPriceData)):
        times.setdefault(coin, []).append(at)
    assert set(times) == {"bitcoin", "ethereum"}
    # 90 days up to now is one chunk, and CoinGecko answers it hourly (a second more: daily).
    for moments in times.values():
        assert min(b - a for a, b in pairwise(sorted(moments))) == timedelta(hours=1)
        assert len(moments) > 85 * 24  # every 29th hour has no price


async def test_history_beyond_the_plan_is_refused_with_one_clear_line(
    fake_coingecko: FakeCoinGecko, topics: BrokerTopics, tmp_path: Path
) -> None:
    backfill = make_backfill(fake_coingecko, topics, tmp_path)
    with pytest.raises(BackfillError) as refused:
        await backfill.run(BackfillRequest(coins=("bitcoin",), days=400))
    message = str(refused.value)
    assert "keyless plan" in message and "365 days" in message and "10012" in message
    assert "\n" not in message and fake_coingecko.requests == []  # refused before any call

    # CoinGecko's clock ahead of ours: the range passes our check, CoinGecko answers 401/10012.
    fake_coingecko.clock_offset = 3 * 86400
    demo = make_backfill(fake_coingecko, topics, tmp_path, coingecko_api_key="demo-key-123")
    with pytest.raises(BackfillError) as answered:
        await demo.run(BackfillRequest(coins=("bitcoin",), days=363))
    assert "demo plan" in str(answered.value) and "365 days" in str(answered.value)
    assert fake_coingecko.count(CHART.format("bitcoin")) == 1


def test_progress_lines_tell_the_rate_and_what_is_left() -> None:
    out = io.StringIO()
    progress = LogProgress(out, every=0)
    progress.start(total=4, done=1)
    progress.advance(records=2160)
    progress.close()  # nothing new since the last line: no line
    lines = out.getvalue().splitlines()
    assert "backfill: 2/4 chunks, 2160 records," in lines[0] and "ETA" in lines[0]
    assert len(lines) == 1

    quiet = LogProgress(out, every=3600)
    quiet.start(total=2, done=0)
    quiet.advance(records=5)
    quiet.advance(records=5)
    quiet.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "backfill: 2/2 chunks, 10 records," in lines[1]


async def test_a_chunk_the_broker_did_not_take_is_not_recorded_as_done(
    fake_coingecko: FakeCoinGecko, topics: BrokerTopics, tmp_path: Path
) -> None:
    until = hour_floor(datetime.now(UTC)) - timedelta(days=1)
    since = until - timedelta(days=100)
    request = BackfillRequest(coins=("bitcoin",), since=since, until=until)
    backfill = make_backfill(fake_coingecko, topics, tmp_path)
    calls = 0

    async def broker_gone_after_one_chunk(records: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ConnectionError("broker unreachable")
        await topics.publish(records)

    backfill.publish = broker_gone_after_one_chunk
    with pytest.raises(ConnectionError):
        await backfill.run(request)
    asked_before = fake_coingecko.count(CHART.format("bitcoin"))
    summary = await make_backfill(fake_coingecko, topics, tmp_path).run(request)
    assert (asked_before, summary.resumed_from, summary.chunks) == (2, 1, 1)
    expected = expected_rows(fake_coingecko, ["bitcoin"], since, until)
    assert dict(published(await topics.read(CryptoPriceData))) == expected


async def test_candles_of_the_range_come_with_ohlc(
    fake_coingecko: FakeCoinGecko, topics: BrokerTopics, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    until = hour_floor(now) - timedelta(days=1)
    since = until - timedelta(days=20)  # /ohlc?days=30: 4-hour candles
    request = BackfillRequest(coins=("ethereum",), since=since, until=until, ohlc=True)
    summary = await make_backfill(fake_coingecko, topics, tmp_path).run(request)
    assert summary.chunks == 2  # the chart, then the candles
    asked = [r.query for r in fake_coingecko.requests if r.path == "/coins/ethereum/ohlc"]
    assert asked == [{"vs_currency": "usd", "days": "30"}]

    candles = [record for _, record in await topics.read(CryptoOHLCVData)]
    served = fake_coingecko.ohlc_candles("ethereum", 30, int(now.timestamp() * 1000))
    expected = {
        datetime.fromtimestamp(close / 1000, UTC): tuple(Decimal(v) for v in values)
        for close, *values in served
        if since <= datetime.fromtimestamp(close / 1000, UTC) < until
    }
    got = {c.timestamp: (c.open, c.high, c.low, c.close) for c in candles}
    assert got == expected and len(candles) == len(expected) > 100
    assert {(c.timeframe, c.source, c.volume) for c in candles} == {("4h", BACKFILL_SOURCE, None)}
