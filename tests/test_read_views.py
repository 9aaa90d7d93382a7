"""The candles, OHLCV and analytics-history views in-process (Faust's aiohttp application on a
test server) over a real, migrated PostgreSQL: the JSON contract the dashboard relies on, exact
decimals, windows, caps and JSON errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import httpx
import pytest

from models.market import CryptoMarketAnalytics, CryptoOHLCVData
from testkit.databases import write_records
from testkit.records import price

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def ohlcv(coin: str, timeframe: str, at: datetime, close: str) -> CryptoOHLCVData:
    return CryptoOHLCVData.model_validate(
        {
            "coin_id": coin,
            "symbol": coin[:3],
            "timestamp": at,
            "open": "1.5",
            "high": "2E+1",
            "low": "0.000000001",
            "close": close,
            "timeframe": timeframe,
        }
    )


def analytics(at: datetime, cap: str, source: str = "coingecko") -> CryptoMarketAnalytics:
    return CryptoMarketAnalytics.model_validate(
        {"source": source, "timestamp": at, "total_market_cap": cap}
    )


async def test_candles_contract(web: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    usd = ["10.5", "12.25", "9.125", "11", "13.5", "8.0625", "1E+5"]
    await write_records(
        pool,
        [price("bitcoin", v, T0 + timedelta(minutes=7 * i)) for i, v in enumerate(usd)]
        + [price("bitcoin", "99", T0, exchange_id="binance")],  # a venue quote: not the price
    )
    since, until = T0 + timedelta(minutes=5), T0 + timedelta(minutes=40)
    params = {"interval": "15m", "since": since.isoformat(), "until": until.isoformat()}
    response = await web.get("/prices/bitcoin/candles", params=params)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "coin_id": "bitcoin",
        "interval": "15m",
        "since": "2024-05-01T12:05:00+00:00",
        "until": "2024-05-01T12:40:00+00:00",
        "candles": [
            {
                "time": "2024-05-01T12:00:00+00:00",
                "open": "10.5",
                "high": "12.25",
                "low": "9.125",
                "close": "9.125",
                "snapshots": 3,
            },
            {
                "time": "2024-05-01T12:15:00+00:00",
                "open": "11",
                "high": "13.5",
                "low": "11",
                "close": "13.5",
                "snapshots": 2,
            },
            {
                "time": "2024-05-01T12:30:00+00:00",
                "open": "8.0625",
                "high": "100000",
                "low": "8.0625",
                "close": "100000",
                "snapshots": 2,
            },
        ],
    }
    # Another offset in, UTC out; a known coin with nothing in the window is an empty list.
    later = {
        "interval": "1h",
        "since": "2024-05-02T14:00:00+02:00",
        "until": "2024-05-02T16:00:00+02:00",
    }
    body = (await web.get("/prices/bitcoin/candles", params=later)).json()
    assert body["since"] == "2024-05-02T12:00:00+00:00" and body["candles"] == []


async def test_candles_default_window_ends_now(web: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    now = datetime.now(UTC)
    await write_records(pool, [price("ethereum", "3000.1", now - timedelta(minutes=1))])
    before = datetime.now(UTC)
    body = (await web.get("/prices/ethereum/candles")).json()
    since, until = (datetime.fromisoformat(body[k]) for k in ("since", "until"))
    assert body["interval"] == "1m" and until - since == timedelta(hours=12)
    assert before <= until <= datetime.now(UTC)
    assert [(c["close"], c["snapshots"]) for c in body["candles"]] == [("3000.1", 1)]
    week = (await web.get("/prices/ethereum/candles", params={"interval": "1d"})).json()
    assert len(week["candles"]) == 1 and week["candles"][0]["open"] == "3000.1"


@pytest.mark.parametrize(
    ("path", "params", "status", "error"),
    [
        ("/prices/nope/candles", {}, 404, "unknown coin 'nope'"),
        ("/prices/bitcoin/candles", {"interval": "7m"}, 400, "interval must be one of"),
        ("/prices/bitcoin/candles", {"since": "yesterday"}, 400, "since must be"),
        ("/prices/bitcoin/candles", {"until": "2024-01-01T00:00:00"}, 400, "until must have"),
        (
            "/prices/bitcoin/candles",
            {"since": "2024-05-02T00:00:00Z", "until": "2024-05-01T00:00:00Z"},
            400,
            "since must be before until",
        ),
        (
            "/prices/bitcoin/candles",
            {"since": "2024-05-01T00:00:00Z", "until": "2024-05-02T00:00:00Z"},
            400,
            "1440 candles of 0:01:00 asked for; at most 1000",
        ),
        ("/prices/bit'coin/candles", {}, 400, "coin_id must be"),
        ("/ohlcv/nope", {}, 404, "unknown coin 'nope'"),
        ("/ohlcv/bitcoin", {"timeframe": "4 hours"}, 400, "timeframe must be"),
        ("/ohlcv/bitcoin", {"limit": "1001"}, 400, "limit must be"),
        ("/analytics/history", {"until": "soon"}, 400, "until must be"),
        ("/analytics/history", {"source": "a;b"}, 400, "source must be"),
        ("/analytics/history", {"limit": "0"}, 400, "limit must be"),
    ],
)
async def test_bad_requests_are_json_errors(
    web: httpx.AsyncClient, pool: asyncpg.Pool, path: str, params: dict, status: int, error: str
) -> None:
    await write_records(pool, [price("bitcoin", "1", T0), ohlcv("bitcoin", "4h", T0, "1")])
    response = await web.get(path, params=params)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert error in response.json()["error"]


async def test_ohlcv_by_timeframe_oldest_first_paged(
    web: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    rows = [ohlcv("bitcoin", "4h", T0 + timedelta(hours=4 * i), f"6{i}000.5") for i in range(5)]
    others = [ohlcv("bitcoin", "30m", T0, "1"), ohlcv("ethereum", "4h", T0, "2")]
    await write_records(pool, [*rows, *others])
    window = {"since": T0.isoformat(), "until": (T0 + timedelta(days=1)).isoformat()}
    body = (await web.get("/ohlcv/bitcoin", params={**window, "timeframe": "4h"})).json()
    assert body["coin_id"] == "bitcoin" and body["timeframe"] == "4h"
    assert [r["close"] for r in body["rows"]] == [
        "60000.5",
        "61000.5",
        "62000.5",
        "63000.5",
        "64000.5",
    ]
    assert body["rows"][0]["high"] == "20" and body["rows"][0]["low"] == "0.000000001"
    assert body["count"] == 5 and body["next_page"] is None

    # The newest `limit` rows of the window; next_page reaches the ones before them.
    page = (
        await web.get("/ohlcv/bitcoin", params={**window, "timeframe": "4h", "limit": 2})
    ).json()
    assert [r["close"] for r in page["rows"]] == ["63000.5", "64000.5"]
    assert page["next_page"] == {"since": window["since"], "until": rows[3].timestamp.isoformat()}
    before = (
        await web.get("/ohlcv/bitcoin", params={**page["next_page"], "timeframe": "4h"})
    ).json()
    assert [r["close"] for r in before["rows"]] == ["60000.5", "61000.5", "62000.5"]

    every = (await web.get("/ohlcv/bitcoin", params=window)).json()
    assert every["timeframe"] is None
    assert [(r["timeframe"], r["close"]) for r in every["rows"][:2]] == [
        ("30m", "1"),
        ("4h", "60000.5"),
    ]


async def test_analytics_history(web: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    await write_records(
        pool,
        [
            analytics(now - timedelta(hours=30), "1"),  # before the default 24 h
            analytics(now - timedelta(hours=2), "2.5E12"),
            analytics(now - timedelta(hours=1), "2600000000000.123456789"),
            analytics(now - timedelta(hours=1), "42", source="other"),
        ],
    )
    body = (await web.get("/analytics/history")).json()
    assert body["source"] == "coingecko" and body["count"] == 2
    assert [r["total_market_cap"] for r in body["rows"]] == [
        "2500000000000",
        "2600000000000.123456789",
    ]
    since = (now - timedelta(days=2)).isoformat()
    body = (await web.get("/analytics/history", params={"since": since, "source": "other"})).json()
    assert [r["total_market_cap"] for r in body["rows"]] == ["42"]
    assert Decimal(body["rows"][0]["total_market_cap"]) == 42
