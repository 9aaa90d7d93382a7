"""The CoinGecko client over real HTTP against the local fake server: headers, limits, retries."""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal
from typing import Any

import pytest

from app.settings import Settings
from coingecko.client import (
    CoinGeckoClient,
    CoinGeckoRefused,
    CoinGeckoUnavailable,
    RateLimiter,
)
from coingecko.fake_server import (
    FakeCoinGecko,
    body,
    html_page,
    rate_limited,
    server_error,
    slow,
    truncated_json,
)
from local.embedded import free_port

SECRET = "CG-s3cr3t-key-never-logged"


def make_settings(base_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "coingecko_base_url": base_url,
        "coingecko_calls_per_minute": 1000,
        "coingecko_timeout": 2.0,
        "coingecko_api_key": None,
        "coingecko_plan": None,
        **overrides,
    }
    return Settings(**values)


def make_client(base_url: str, **overrides: Any) -> CoinGeckoClient:
    return CoinGeckoClient(make_settings(base_url, **overrides), backoff_base=0.01)


@pytest.mark.parametrize(
    ("plan", "key", "header"),
    [
        ("keyless", None, None),
        ("demo", SECRET, "x-cg-demo-api-key"),
        ("pro", SECRET, "x-cg-pro-api-key"),
    ],
)
async def test_key_travels_in_the_plan_header_only(
    fake_coingecko: FakeCoinGecko, plan: str, key: str | None, header: str | None
) -> None:
    async with make_client(
        fake_coingecko.base_url, coingecko_plan=plan, coingecko_api_key=key
    ) as client:
        assert await client.get("/ping") == {"gecko_says": "(V3) To the Moon!"}
    (request,) = fake_coingecko.requests
    sent = {name.lower(): value for name, value in request.headers.items()}
    key_headers = {name for name in sent if name.startswith("x-cg-")}
    assert key_headers == ({header} if header else set())
    if header:
        assert sent[header] == SECRET
    assert SECRET not in str(request.query)


async def test_key_is_never_logged_even_when_the_server_echoes_it(
    fake_coingecko: FakeCoinGecko, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    echo = '{"status":{"error_code":10002,"error_message":"API key ' + SECRET + ' is invalid"}}'
    fake_coingecko.fail("/global", server_error(), body(echo, status=401))
    async with make_client(
        fake_coingecko.base_url, coingecko_plan="demo", coingecko_api_key=SECRET
    ) as c:
        await c.get("/ping")
        with pytest.raises(CoinGeckoRefused) as refused:
            await c.get("/global")
    assert refused.value.status == 401 and refused.value.error_code == 10002
    assert refused.value.message == "API key *** is invalid"
    assert SECRET not in str(refused.value)
    assert caplog.records, "expected log lines to inspect"
    for record in caplog.records:
        assert SECRET not in record.getMessage()


async def test_numbers_come_back_exact(fake_coingecko: FakeCoinGecko) -> None:
    async with make_client(fake_coingecko.base_url) as client:
        data = (await client.get("/global"))["data"]
        rows = await client.get("/coins/markets", {"vs_currency": "usd", "ids": "pepe-cash"})
    assert data["total_market_cap"]["ars"].as_tuple() == Decimal("2.9914327788912e+15").as_tuple()
    assert str(data["total_volume"]["usd"]) == "101234567890.0"
    assert rows[0]["current_price"].as_tuple() == Decimal("7.14159e-6").as_tuple()
    assert rows[0]["market_cap"] == 3004112345 and isinstance(rows[0]["market_cap"], int)


async def test_429_waits_for_retry_after(fake_coingecko: FakeCoinGecko) -> None:
    fake_coingecko.fail("/global", rate_limited(retry_after=1))
    async with make_client(fake_coingecko.base_url) as client:
        pauses: list[float] = []
        pause = client.limiter.pause

        def recorded(seconds: float) -> None:
            pauses.append(seconds)
            pause(seconds)

        client.limiter.pause = recorded  # type: ignore[method-assign]
        assert "data" in await client.get("/global")
        await client.get("/ping")  # the pause holds every request, not only the retried one
    assert pauses == [1.0]  # the server's Retry-After, not the client's own backoff
    first, retry, ping = fake_coingecko.requests
    assert (first.path, retry.path, ping.path) == ("/global", "/global", "/ping")


async def test_transient_failures_are_retried_until_success(fake_coingecko: FakeCoinGecko) -> None:
    fake_coingecko.fail(
        "/global", server_error(), html_page(), truncated_json(), html_page(status=200)
    )
    async with make_client(fake_coingecko.base_url, coingecko_calls_per_minute=1000) as client:
        client.max_attempts = 5
        data = await client.get("/global")
    assert data["data"]["markets"] == 1241
    assert fake_coingecko.count("/global") == 5


async def test_a_slow_answer_times_out_and_is_retried(fake_coingecko: FakeCoinGecko) -> None:
    fake_coingecko.fail("/ping", slow(1.0))
    async with make_client(fake_coingecko.base_url, coingecko_timeout=0.2) as client:
        assert await client.get("/ping") == {"gecko_says": "(V3) To the Moon!"}
    assert fake_coingecko.count("/ping") == 2


async def test_gives_up_after_max_attempts(fake_coingecko: FakeCoinGecko) -> None:
    fake_coingecko.fail("/global", *[server_error(503)] * 5)
    async with make_client(fake_coingecko.base_url) as client:
        client.max_attempts = 3
        with pytest.raises(CoinGeckoUnavailable, match="HTTP 503"):
            await client.get("/global")
        assert fake_coingecko.count("/global") == 3
        assert "data" in await client.get("/global")  # not disabled: it may heal


async def test_connection_refused_is_unavailable_not_a_crash() -> None:
    async with make_client(f"http://127.0.0.1:{free_port()}/api/v3") as client:
        client.max_attempts = 2
        with pytest.raises(CoinGeckoUnavailable, match="connection failed"):
            await client.get("/ping")


async def test_unknown_coin_is_reported_once_and_not_retried(
    fake_coingecko: FakeCoinGecko, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with make_client(fake_coingecko.base_url) as client:
        for _ in range(3):
            with pytest.raises(CoinGeckoRefused) as refused:
                await client.get("/coins/no-such-coin/ohlc", {"vs_currency": "usd", "days": 1})
        assert (refused.value.status, refused.value.message) == (404, "coin not found")
        assert set(client.refused) == {"/coins/no-such-coin/ohlc"}
        assert await client.get("/coins/bitcoin/ohlc", {"vs_currency": "usd", "days": 1})
    assert fake_coingecko.count("/coins/no-such-coin/ohlc") == 1
    reports = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(reports) == 1 and reports[0].levelno == logging.ERROR
    assert "HTTP 404" in reports[0].getMessage() and "coin not found" in reports[0].getMessage()


async def test_wrong_host_error_code_is_reported(fake_coingecko: FakeCoinGecko) -> None:
    wrong_host = (
        '{"status":{"error_code":10010,"error_message":"If you are using Pro API key, please '
        'change your root URL from api.coingecko.com to pro-api.coingecko.com"}}'
    )
    fake_coingecko.fail("/coins/markets", body(wrong_host, status=400))
    async with make_client(fake_coingecko.base_url) as client:
        with pytest.raises(CoinGeckoRefused) as refused:
            await client.get("/coins/markets", {"vs_currency": "usd"})
    assert (refused.value.status, refused.value.error_code) == (400, 10010)
    assert "pro-api.coingecko.com" in refused.value.message


async def test_rate_limiter_keeps_calls_within_the_window(fake_coingecko: FakeCoinGecko) -> None:
    async with make_client(fake_coingecko.base_url) as client:
        client.limiter = RateLimiter(calls=2, period=1.0)
        for _ in range(3):
            await client.get("/ping")
    first, _, third = fake_coingecko.requests
    assert third.at - first.at >= 1.0  # the third call waited for the first to leave the window


async def test_a_request_in_line_behind_a_waiting_one_has_waited_too() -> None:
    """The prices poll queued behind an OHLC call that waits for the window waits as long: its
    wait is counted (it was not, so /health and /metrics showed prices never rate-limited)."""
    limiter = RateLimiter(calls=2, period=0.3)
    for _ in range(2):
        async with limiter.slot():
            pass

    async def request() -> float:
        async with limiter.slot() as waited:
            return waited

    first, second = await asyncio.gather(request(), request())
    assert first > 0  # the window was full
    assert second > 0  # in line behind the first, then a free slot


async def test_empty_object_body_is_returned_for_the_parser(fake_coingecko: FakeCoinGecko) -> None:
    fake_coingecko.fail("/coins/markets", body("{}"))
    async with make_client(fake_coingecko.base_url) as client:
        assert await client.get("/coins/markets", {"vs_currency": "usd"}) == {}
