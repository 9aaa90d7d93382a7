"""The poller against the fake CoinGecko, publishing to the embedded broker (read back, decoded)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from importlib import resources
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.settings import Settings
from coingecko.client import RateLimiter
from coingecko.fake_server import FakeCoinGecko, body, html_page
from coingecko.parse import loads_exact
from coingecko.poller import MAX_URL_CHARS, OHLC_BUDGET_SHARE, quotes_every
from models.dsl import StreamRecord
from models.market import CryptoMarketAnalytics, CryptoOHLCVData, CryptoPriceData
from testkit.pollers import FIXTURE_COINS, BrokerTopics, make_poller

pytestmark = pytest.mark.fake_coingecko(extra_coins=600)  # more coins than one page lists


def fixture_rows() -> dict[str, dict[str, Any]]:
    text = (resources.files("coingecko") / "fixtures" / "coins_markets.json").read_text()
    return {row["id"]: row for row in loads_exact(text)}


async def test_prices_are_published_exactly_once_per_snapshot(
    fake_coingecko: FakeCoinGecko, topics: BrokerTopics, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    poller = make_poller(fake_coingecko, topics)
    await poller.poll_prices()
    messages = await topics.read(CryptoPriceData)
    rows = fixture_rows()
    assert sorted(key.decode() for key, _ in messages) == sorted(FIXTURE_COINS[:-1])
    for key, record in messages:
        row = rows[key.decode()]
        assert record.coin_id == row["id"] and record.symbol == row["symbol"]
        for field, source in [
            ("usd_price", "current_price"), ("market_cap", "market_cap"),
            ("volume_24h", "total_volume"), ("change_24h", "price_change_percentage_24h"),
            ("change_7d", "price_change_percentage_7d_in_currency"),
        ]:  # fmt: skip
            expected = None if row[source] is None else Decimal(row[source])
            assert getattr(record, field) == expected, (key, field)
        assert record.last_updated == datetime.fromisoformat(row["last_updated"])
    pepe = next(record for key, record in messages if key == b"pepe-cash")
    assert str(pepe.usd_price) == "0.00000714159"

    await poller.poll_prices()  # the same cached snapshot: nothing new
    assert len(await topics.read(CryptoPriceData)) == 6
    status = poller.status.endpoints["prices"]
    assert (status.published, status.unchanged, status.skipped) == (6, 6, 2)
    assert status.last_success is not None and status.last_error is None

    fake_coingecko.advance(60)
    await poller.poll_prices()
    assert len(await topics.read(CryptoPriceData)) == 12
    assert fake_coingecko.count("/coins/markets") == 3  # one call per poll for 8 ids
    # Data problems are logged once each, however many polls repeat them.
    logged = [r.getMessage() for r in caplog.records]
    assert sum("'ghost-token'" in line for line in logged) == 1
    assert sum("'no-such-coin' not returned" in line for line in logged) == 1


async def test_global_is_published_once_per_update(
    fake_coingecko: FakeCoinGecko, topics: BrokerTopics
) -> None:
    poller = make_poller(fake_coingecko, topics)
    await poller.poll_global()
    await poller.poll_global()
    ((key, record),) = await topics.read(CryptoMarketAnalytics)
    assert key == b"coingecko"
    assert str(record.total_market_cap) == "2788561234567.8125"
    assert str(record.btc_dominance) == "59.89181526671431"
    assert (record.active_cryptocurrencies, record.markets) == (16842, 1241)
    fake_coingecko.advance(600)
    await poller.poll_global()
    assert len(await topics.read(CryptoMarketAnalytics)) == 2


async def test_ohlc_candles_published_once_and_unknown_coin_disabled(
    fake_coingecko: FakeCoinGecko, topics: BrokerTopics, caplog: pytest.LogCaptureFixture
) -> None:
    poller = make_poller(fake_coingecko, topics)
    await poller.poll_ohlc()  # no coins known before the first prices poll: no calls
    assert fake_coingecko.requests == []
    await poller.poll_prices()
    fake_coingecko.fail("/coins/tether/ohlc", body('{"error":"coin not found"}', status=404))
    await poller.poll_ohlc()
    candles = [record for _, record in await topics.read(CryptoOHLCVData)]
    assert sorted({c.coin_id for c in candles}) == ["bitcoin", "ethereum", "pepe-cash"]
    assert len(candles) == 4 + 4 + 2
    last_btc = max((c for c in candles if c.coin_id == "bitcoin"), key=lambda c: c.timestamp)
    assert (str(last_btc.close), last_btc.timeframe, last_btc.volume) == ("84213.57", "30m", None)
    assert poller.status.refused == {
        "/coins/tether/ohlc": "/coins/tether/ohlc: HTTP 404, error_code None: coin not found"
    }

    await poller.poll_ohlc()  # same candles again: nothing new; tether is not asked again
    assert len(await topics.read(CryptoOHLCVData)) == 10
    assert fake_coingecko.count("/coins/tether/ohlc") == 1
    assert fake_coingecko.count("/coins/bitcoin/ohlc") == 2
    fake_coingecko.advance(1800)  # newest price 10:45:07 -> the 10:30 candle has closed
    await poller.poll_ohlc()
    before = {(c.coin_id, c.timestamp.isoformat()) for c in candles}
    after = [(r.coin_id, r.timestamp.isoformat()) for _, r in await topics.read(CryptoOHLCVData)]
    assert len(after) == len(set(after))  # no candle published twice
    new = set(after) - before
    assert {
        ("bitcoin", "2025-03-14T10:30:00+00:00"),
        ("ethereum", "2025-03-14T10:30:00+00:00"),
    } <= new
    assert all(moment > "2025-03-14T10:00:00+00:00" for coin, moment in new if coin != "pepe-cash")


async def served_quotes(
    fake_coingecko: FakeCoinGecko, ids: list[str]
) -> tuple[str, dict[str, Any]]:
    """What the fake's /simple/price serves for `ids` in BTC and ETH: its text, and decoded."""
    async with httpx.AsyncClient() as client:
        answer = await client.get(
            f"{fake_coingecko.base_url}/simple/price",
            params={"ids": ",".join(ids), "vs_currencies": "btc,eth"},
        )
    return answer.text, loads_exact(answer.text)


async def test_btc_and_eth_prices_are_coingeckos_quotes_exactly(
    fake_coingecko: FakeCoinGecko, topics: BrokerTopics
) -> None:
    poller = make_poller(fake_coingecko, topics, btc_eth_prices_every=2)
    await poller.poll_prices()
    (call,) = [r.query for r in fake_coingecko.requests if r.path == "/simple/price"]
    # The coins of the markets page, in one call (the unknown id is not on the page).
    assert sorted(call["ids"].split(",")) == sorted(FIXTURE_COINS)
    assert call["vs_currencies"] == "btc,eth"
    first = {record.coin_id: record for _, record in await topics.read(CryptoPriceData)}
    text, served = await served_quotes(fake_coingecko, list(first))
    assert "e-" in text  # the tiny quotes come in exponent notation
    for coin_id, record in first.items():
        for field, currency in (("btc_price", "btc"), ("eth_price", "eth")):
            value = getattr(record, field)
            assert value == served[coin_id][currency], (coin_id, field)
            assert value.as_tuple() == Decimal(served[coin_id][currency]).as_tuple()
    assert first["bitcoin"].btc_price == 1

    fake_coingecko.advance(60)
    await poller.poll_prices()  # every second poll only: this one has none
    fake_coingecko.advance(60)
    await poller.poll_prices()
    assert fake_coingecko.count("/simple/price") == 3  # two polls' calls and the test's own
    later = {
        (record.coin_id, record.last_updated - first[record.coin_id].last_updated): record
        for _, record in await topics.read(CryptoPriceData)
    }
    for coin_id in first:
        second, third = (
            later[coin_id, timedelta(seconds=60)],
            later[coin_id, timedelta(seconds=120)],
        )
        assert second.btc_price is None and second.eth_price is None
        assert third.btc_price is not None and third.eth_price is not None


async def test_btc_and_eth_quotes_of_long_ids_split_into_urls_coingecko_accepts(
    fake_coingecko: FakeCoinGecko, topics: BrokerTopics
) -> None:
    for row in fake_coingecko.coins:
        if row["id"].startswith("coin-"):
            row["id"] = f"{row['id']}-{'x' * 60}"  # 250 of them: a 16,000-character URL
    poller = make_poller(fake_coingecko, topics, coins="", top_n=600)
    await poller.poll_prices()
    calls = [r for r in fake_coingecko.requests if r.path == "/simple/price"]
    lengths = [len(str(httpx.URL(fake_coingecko.base_url + r.path, params=r.query))) for r in calls]
    assert len(calls) > 3 and max(lengths) <= MAX_URL_CHARS
    asked = [coin_id for r in calls for coin_id in r.query["ids"].split(",")]
    assert len(asked) == len(set(asked)) == 600
    records = [record for _, record in await topics.read(CryptoPriceData)]
    assert len(records) == 600 and all(r.btc_price is not None for r in records)


async def test_a_refused_simple_price_leaves_the_prices_flowing(
    fake_coingecko: FakeCoinGecko, topics: BrokerTopics
) -> None:
    plan_error = '{"status":{"error_code":10005,"error_message":"not on your plan"}}'
    fake_coingecko.fail("/simple/price", body(plan_error, status=401))
    poller = make_poller(fake_coingecko, topics)
    await poller.poll_prices()
    assert "/simple/price" in poller.status.refused
    first = [record for _, record in await topics.read(CryptoPriceData)]
    assert len(first) == 6 and all(r.btc_price is None for r in first)
    fake_coingecko.advance(60)
    await poller.poll_prices()  # no second call: prices alone, and a successful poll
    assert fake_coingecko.count("/simple/price") == 1
    assert len(await topics.read(CryptoPriceData)) == 12
    assert poller.status.endpoints["prices"].last_success is not None


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 5000),
    st.sampled_from([5, 30, 250, 1000]),
    st.sampled_from([10.0, 60.0, 300.0]),
)
def test_quotes_by_default_as_often_as_the_price_share_of_the_plan_allows(
    top_n: int, calls_per_minute: int, interval: float
) -> None:
    config = Settings(
        coins=(),
        top_n=top_n,
        coingecko_calls_per_minute=calls_per_minute,
        price_poll_seconds=interval,
    )
    every = quotes_every(config)
    price_share = calls_per_minute * interval / 60 * (1 - OHLC_BUDGET_SHARE)
    budget = price_share - interval / config.global_poll_seconds
    pages = -(-top_n // 250)

    def calls(every: int) -> float:  # per price poll, on average
        return pages + (pages / every if every else 0)

    if every == 0:  # the markets pages alone use up the price share: no quotes at all
        assert pages >= budget
    else:
        assert calls(every) <= budget + 1e-9
        assert every == 1 or calls(every - 1) > budget  # not less often than it could
    assert quotes_every(config.model_copy(update={"btc_eth_prices_every": 3})) == 3


@pytest.mark.parametrize(
    ("overrides", "pages"),
    [
        ({"coins": "", "top_n": 600}, ["1", "2", "3"]),  # 600 of 607 coins: 3 pages of 250
        ({"coins": "", "top_n": 1000}, ["1", "2", "3"]),  # only 607 exist: page 3 is the last
    ],
)
async def test_top_n_pages(
    fake_coingecko: FakeCoinGecko, topics: BrokerTopics, overrides: dict[str, Any], pages: list[str]
) -> None:
    poller = make_poller(fake_coingecko, topics, **overrides)
    await poller.poll_prices()
    calls = [r.query for r in fake_coingecko.requests if r.path == "/coins/markets"]
    assert [q["page"] for q in calls] == pages
    assert {q["per_page"] for q in calls} == {"250"} and "ids" not in calls[0]
    expected = min(overrides["top_n"], 606)  # ghost-token has no price
    assert topics.published == expected == len(poller.symbols)
    assert list(poller.symbols)[:3] == ["bitcoin", "ethereum", "tether"]  # by market cap


async def test_coin_list_goes_250_ids_per_call(
    fake_coingecko: FakeCoinGecko, topics: BrokerTopics
) -> None:
    ids = [f"coin-{n:04d}" for n in range(1, 601)]
    poller = make_poller(fake_coingecko, topics, coins=",".join(ids))
    await poller.poll_prices()
    calls = [r.query for r in fake_coingecko.requests if r.path == "/coins/markets"]
    assert [len(q["ids"].split(",")) for q in calls] == [250, 250, 100]
    assert topics.published == 600


async def test_failures_never_escape_a_cycle(
    fake_coingecko: FakeCoinGecko, topics: BrokerTopics
) -> None:
    poller = make_poller(fake_coingecko, topics)
    fake_coingecko.fail(
        "/coins/markets", html_page(), html_page()
    )  # both attempts of the first poll
    fake_coingecko.fail("/global", body("{}"))
    await poller.poll_prices()
    await poller.poll_global()
    prices, global_ = poller.status.endpoints["prices"], poller.status.endpoints["global"]
    assert prices.failures == 1
    assert "HTTP 502" in (prices.last_error or "")
    assert prices.last_success is None and topics.published == 0
    assert global_.failures == 1 and "no usable data" in (global_.last_error or "")
    await poller.poll_prices()  # the next cycle recovers
    assert prices.last_success is not None and topics.published == 6
    assert poller.status.as_json()["endpoints"]["prices"]["failures"] == 1


async def test_wrong_key_is_reported_once_and_stops_calls(
    fake_coingecko: FakeCoinGecko, topics: BrokerTopics, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    invalid = '{"status":{"error_code":10002,"error_message":"Invalid API key"}}'
    fake_coingecko.fail("/coins/markets", body(invalid, status=401))
    poller = make_poller(fake_coingecko, topics, coingecko_plan="demo", coingecko_api_key="CG-bad")
    for _ in range(3):
        await poller.poll_prices()
    assert fake_coingecko.count("/coins/markets") == 1
    assert "/coins/markets" in poller.status.refused
    assert poller.status.endpoints["prices"].failures == 3
    errors = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(errors) == 1 and "HTTP 401, error_code 10002: Invalid API key" in errors[0]


async def test_candles_take_at_most_their_share_of_the_calls_and_never_starve_prices(
    fake_coingecko: FakeCoinGecko, topics: BrokerTopics
) -> None:
    """A candle cycle's calls queued on the one rate limit took every slot the price poll was not
    asking for, so each price poll waited for a full window (keyless: 7 price vs 35 candle calls
    in 8 minutes). Candles get at most OHLC_BUDGET_SHARE of any window; prices the rest."""
    window = 0.4
    plan = RateLimiter(calls=4, period=window)  # "4 calls a minute", a minute being 0.4 s
    poller = make_poller(fake_coingecko, topics, limiter=plan)
    await poller.poll_prices()  # tells the candle poll the coins
    await asyncio.sleep(window)  # an empty window to start from
    start = len(fake_coingecko.requests)

    async def forever(poll: Callable[[], Awaitable[None]], pause: float) -> None:
        while True:
            await poll()
            await asyncio.sleep(pause)

    polls = ((poller.poll_prices, window / 2), (poller.poll_ohlc, 0.0))
    tasks = [asyncio.create_task(forever(poll, pause)) for poll, pause in polls]
    while len(fake_coingecko.requests) < start + 24:
        await asyncio.sleep(0.05)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    requests = fake_coingecko.requests[start:]
    candles = [r.at for r in requests if r.path.endswith("/ohlc")]
    prices = [r for r in requests if not r.path.endswith("/ohlc")]
    share = int(plan.calls * OHLC_BUDGET_SHARE)
    # Any `share` + 1 candle calls span more than a window: at most `share` in any window.
    spans = zip(candles, candles[share:], strict=False)
    assert all(later - first >= window for first, later in spans)
    assert len(prices) >= len(candles) > 0


async def test_candles_succeed_call_by_call_before_their_cycle_ends(
    fake_coingecko: FakeCoinGecko, topics: BrokerTopics
) -> None:
    """A candle cycle spreads its calls over its 900 s interval: success counted only at its end
    showed "poll ohlc: never" for up to 15 minutes while candles were being stored."""
    poller = make_poller(fake_coingecko, topics)
    ohlc = poller.status.endpoints["ohlc"]
    await poller.poll_prices()
    fake_coingecko.fail("/coins/tether/ohlc", body('{"error":"coin not found"}', status=404))
    during: list[tuple[datetime | None, datetime | None]] = []

    async def publish(records: Sequence[StreamRecord]) -> None:
        await topics.publish(records)
        during.append((ohlc.last_success, ohlc.last_cycle_end))

    poller.publish = publish
    await poller.poll_ohlc()
    assert len(during) == 3  # bitcoin, ethereum, pepe-cash (tether refused)
    assert all(success is not None and end is None for success, end in during[1:])
    assert ohlc.last_cycle_end is not None and ohlc.last_success is not None
    assert "coin not found" in (ohlc.last_error or "")  # a cycle's error does not hide the rest
    shown = poller.status.as_json()["endpoints"]["ohlc"]
    assert shown["last_cycle_end"] == ohlc.last_cycle_end.isoformat()
