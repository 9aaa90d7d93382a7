"""The CoinGecko client with COINGECKO_SOURCE=mcp, over the real MCP protocol (the `mcp` SDK's
client and server, stdio and Streamable HTTP) against `coingecko.fake_mcp_server`, which fronts
the fake REST server: what the tests script there (faults, data) is what CoinGecko's MCP server
would pass on."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import psutil
import pytest

from app.settings import Settings
from coingecko.client import (
    CoinGeckoClient,
    CoinGeckoRefused,
    CoinGeckoUnavailable,
    CoinGeckoUnusable,
)
from coingecko.fake_mcp_server import js_number
from coingecko.fake_server import (
    FakeCoinGecko,
    body,
    rate_limited,
    serve_fake_coingecko,
    server_error,
    slow,
    truncated_json,
)
from coingecko.parse import parse_global, parse_markets, parse_ohlc, parse_simple_prices
from local.embedded import free_port
from models import RECORDS, CryptoMarketAnalytics, CryptoOHLCVData, CryptoPriceData
from testkit.databases import assert_exactly, count_rows, stored
from testkit.workers import Worker, eventually

# Every test talks to the fake MCP server as a process of its own (stdio or HTTP).
pytestmark = pytest.mark.slow

SECRET = "CG-mcp-s3cr3t-never-logged"
FAKE_MCP = f"{sys.executable} -m coingecko.fake_mcp_server"
Params = dict[str, str | int]
MARKETS: Params = {
    "vs_currency": "usd",
    "per_page": 250,
    "page": 1,
    "price_change_percentage": "24h,7d",
}
Connect = Callable[..., Awaitable[CoinGeckoClient]]


@pytest.fixture
async def fake() -> AsyncIterator[FakeCoinGecko]:
    async with serve_fake_coingecko() as server:
        yield server


@asynccontextmanager
async def http_mcp_server(upstream: str, tools: str) -> AsyncIterator[str]:
    """The fake MCP server as its own process on a loopback port; yields its /mcp URL."""
    command = f"{FAKE_MCP} --http --port 0 --upstream {upstream} --tools {tools}"
    process = await asyncio.create_subprocess_exec(*command.split(), stdout=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
        assert line.startswith("fake CoinGecko MCP serving "), line
        yield line.split()[-1]
    finally:
        process.kill()
        await process.wait()


@pytest.fixture(params=["stdio", "http"])
async def connect(request: pytest.FixtureRequest, fake: FakeCoinGecko) -> AsyncIterator[Connect]:
    """Starts a client on the MCP server in the test's transport with the given tool set."""
    async with AsyncExitStack() as stack:

        async def start(tools: str = "endpoints", **overrides: Any) -> CoinGeckoClient:
            values: dict[str, Any] = {
                "coingecko_source": "mcp",
                "coingecko_calls_per_minute": 1000,
                "coingecko_timeout": 10.0,
                "coingecko_api_key": None,
                "coingecko_plan": None,
                **overrides,
            }
            if request.param == "stdio":
                command = f"{FAKE_MCP} --upstream {fake.base_url} --tools {tools}"
                values["coingecko_mcp_command"] = command
            else:
                url = await stack.enter_async_context(http_mcp_server(fake.base_url, tools))
                values["coingecko_mcp_url"] = url
            client = CoinGeckoClient(Settings(**values), backoff_base=0.01, max_attempts=3)
            stack.push_async_callback(client.aclose)
            return client

        yield start


async def rest(fake: FakeCoinGecko, path: str, params: Params) -> Any:
    """What the fake serves over REST, read exactly, for comparison."""
    settings = Settings(coingecko_base_url=fake.base_url, coingecko_calls_per_minute=1000)
    async with CoinGeckoClient(settings) as client:
        return await client.get(path, params)


@pytest.mark.parametrize("tools", ["endpoints", "dynamic"])
async def test_every_endpoint_comes_back_exactly_as_served(
    fake: FakeCoinGecko, connect: Connect, tools: str
) -> None:
    client = await connect(tools)
    await client.start()
    asks: list[tuple[str, Params]] = [
        ("/coins/markets", MARKETS),
        ("/global", {}),
        ("/coins/bitcoin/ohlc", {"vs_currency": "usd", "days": 1}),  # days: int, the tool: str
        ("/simple/price", {"ids": "bitcoin,ethereum,tether", "vs_currencies": "btc,eth"}),
    ]
    for path, params in asks:
        got = await client.get(path, params)
        # repr: the same Decimals, spelled the same (7.14159E-6 stays so, 1.0 is not 1)
        assert repr(got) == repr(await rest(fake, path, params)), path
    assert "E-" in repr(await client.get("/coins/markets", MARKETS))


async def test_a_server_without_usable_tools_fails_at_start_naming_its_tools(
    connect: Connect,
) -> None:
    client = await connect("code")
    with pytest.raises(CoinGeckoUnusable) as failure:
        await client.start()
    message = str(failure.value)
    assert "\n" not in message
    assert "its tools: execute, search_docs" in message
    assert "get_coins_markets" in message  # what it would have needed


async def test_tool_errors_are_retried_or_refused_like_http_errors(
    fake: FakeCoinGecko, connect: Connect
) -> None:
    client = await connect()
    fake.fail("/global", rate_limited(retry_after=1), server_error(503))
    assert (await client.get("/global", {}))["data"]["markets"] is not None
    assert fake.count("/global") == 3  # 429, 503, then the answer

    ohlc: Params = {"vs_currency": "usd", "days": 1}
    with pytest.raises(CoinGeckoRefused) as refused:
        await client.get("/coins/no-such-coin/ohlc", ohlc)
    assert (refused.value.status, refused.value.message) == (404, "coin not found")
    with pytest.raises(CoinGeckoRefused):  # refused until restart: no second call upstream
        await client.get("/coins/no-such-coin/ohlc", ohlc)
    assert fake.count("/coins/no-such-coin/ohlc") == 1

    fake.fail("/global", server_error(), server_error(), server_error())
    with pytest.raises(CoinGeckoUnavailable, match="HTTP 500"):
        await client.get("/global", {})


async def test_malformed_results_are_retried_then_reported(
    fake: FakeCoinGecko, connect: Connect
) -> None:
    client = await connect()
    fake.fail("/global", body("<html>maintenance</html>"), truncated_json())
    assert (await client.get("/global", {}))["data"]["markets"] is not None
    fake.fail("/global", body("nope"), body(""), truncated_json())
    with pytest.raises(CoinGeckoUnavailable, match="non-JSON body"):
        await client.get("/global", {})


async def test_the_key_reaches_coingecko_as_the_official_server_takes_it_and_is_never_logged(
    fake: FakeCoinGecko, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await connect(coingecko_plan="demo", coingecko_api_key=SECRET)
    fake.fail("/global", body(f'{{"error":"bad key {SECRET}"}}', status=401))
    with pytest.raises(CoinGeckoRefused) as refused:
        await client.get("/global", {})
    assert SECRET not in str(refused.value)
    await client.get("/coins/markets", MARKETS)
    for request in fake.requests:
        assert request.headers.get("x-cg-demo-api-key") == SECRET, request.path
    assert SECRET not in caplog.text


def mcp_worker_env(fake: FakeCoinGecko, tools: str = "endpoints") -> dict[str, str]:
    return {
        "COINGECKO_SOURCE": "mcp",
        "COINGECKO_MCP_COMMAND": f"{FAKE_MCP} --upstream {fake.base_url} --tools {tools}",
        "COINGECKO_CALLS_PER_MINUTE": "1000",
        "BTC_ETH_PRICES_EVERY": "1",
    }


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_a_worker_reading_coingecko_through_mcp_stores_exactly_what_was_served(
    fake: FakeCoinGecko, migrated: str, workers: Callable[..., Worker], transport: str
) -> None:
    # What the first polls get (the workers' intervals are an hour): the top 100 by market cap
    # with CoinGecko's own BTC/ETH quotes, /global, and every coin's candles, read here over REST
    # from the same fake and parsed the same way.
    top: Params = {**MARKETS, "order": "market_cap_desc", "per_page": 100}
    markets = await rest(fake, "/coins/markets", top)
    ids = ",".join(sorted(row["id"] for row in markets))
    quotes, _ = parse_simple_prices(
        await rest(fake, "/simple/price", {"ids": ids, "vs_currencies": "btc,eth"})
    )
    prices = parse_markets(markets, quotes).records
    analytics = parse_global(await rest(fake, "/global", {})).records
    candles = [
        candle
        for price in prices
        for candle in parse_ohlc(
            await rest(fake, f"/coins/{price.coin_id}/ohlc", {"vs_currency": "usd", "days": 1}),
            price.coin_id,
            price.symbol,
            1,
        ).records
    ]
    fake.requests.clear()

    async with AsyncExitStack() as stack:
        env = mcp_worker_env(fake)
        if transport == "http":
            del env["COINGECKO_MCP_COMMAND"]
            server = http_mcp_server(fake.base_url, "endpoints")
            env["COINGECKO_MCP_URL"] = await stack.enter_async_context(server)
        worker = workers(migrated, env)

        async def all_stored() -> bool | None:
            want = [len(prices), len(candles), len(analytics)]
            have = [await count_rows(migrated, record) for record in RECORDS]
            return True if have == want else None

        await eventually(all_stored, worker, "every served row stored, through MCP")
    assert fake.count("/coins/markets") >= 1  # the worker's own calls, through the MCP server
    assert_exactly(await stored(migrated, CryptoPriceData), prices)
    assert_exactly(await stored(migrated, CryptoOHLCVData), candles)
    assert_exactly(await stored(migrated, CryptoMarketAnalytics), analytics)


async def test_a_worker_on_an_mcp_server_without_coingecko_tools_stops_with_the_reason(
    fake: FakeCoinGecko, migrated: str, workers: Callable[..., Worker]
) -> None:
    worker = workers(migrated, mcp_worker_env(fake, tools="code"))
    status = await asyncio.to_thread(worker.popen.wait, 120)
    assert status != 0
    assert "its tools: execute, search_docs" in worker.output
    assert not fake.requests  # it never called CoinGecko


async def test_a_slow_tool_call_times_out_and_is_retried(
    fake: FakeCoinGecko, connect: Connect
) -> None:
    client = await connect(coingecko_timeout=1.0)
    await client.start()
    fake.fail("/global", slow(3))
    assert (await client.get("/global", {}))["data"]["markets"] is not None
    assert fake.count("/global") == 2


@pytest.mark.parametrize(
    "where",
    [
        {"coingecko_mcp_url": f"http://127.0.0.1:{free_port()}/mcp"},  # nothing listens
        {"coingecko_mcp_command": "/no/such/mcp-server --stdio"},
        {"coingecko_mcp_command": f"{sys.executable} -c 'import sys; sys.exit(3)'"},
    ],
)
async def test_an_unreachable_server_is_unavailable_not_a_crash(where: dict[str, Any]) -> None:
    settings = Settings(coingecko_source="mcp", coingecko_calls_per_minute=1000, **where)
    async with CoinGeckoClient(settings, backoff_base=0.01, max_attempts=2) as client:
        with pytest.raises(CoinGeckoUnavailable, match="could not connect"):
            await client.start()
        with pytest.raises(CoinGeckoUnavailable, match="gave up after 2 tries"):
            await client.get("/global", {})


async def test_an_endpoint_the_server_has_no_tool_for_is_refused_without_a_call(
    fake: FakeCoinGecko, connect: Connect
) -> None:
    client = await connect("endpoints --tool get_coins_markets --tool get_global")
    await client.start()
    assert await client.get("/global", {}) == await rest(fake, "/global", {})
    with pytest.raises(CoinGeckoRefused, match="no tool for /coins/bitcoin/ohlc") as refused:
        await client.get("/coins/bitcoin/ohlc", {"vs_currency": "usd", "days": 1})
    assert "its tools: get_coins_markets, get_global" in str(refused.value)
    assert "/coins/bitcoin/ohlc" in client.refused
    assert fake.count("/coins/bitcoin/ohlc") == 0


@pytest.mark.parametrize(
    ("number", "javascript"),  # String(number) in node 20
    [
        (6.31917e-7, "6.31917e-7"),
        (1.5e-6, "0.0000015"),
        (1e21, "1e+21"),
        (1e20, "100000000000000000000"),
        (2.70016521312815e15, "2700165213128150"),
        (float(12345678901234567891), "12345678901234567000"),
        (19990746.0, "19990746"),
        (-2.5e22, "-2.5e+22"),
        (-0.0, "0"),
    ],
)
def test_the_fake_prints_numbers_as_javascript_does(number: float, javascript: str) -> None:
    assert js_number(number) == javascript


async def test_through_a_javascript_server_big_integers_arrive_rounded_as_it_sent_them(
    fake: FakeCoinGecko, connect: Connect
) -> None:
    """What the README warns of: REST is exact, the official (JavaScript) server is not."""
    served = '[{"id":"big","market_cap":12345678901234567891,"current_price":6.31917e-07}]'
    fake.fail("/coins/markets", body(served), body(served))
    client = await connect("endpoints --js-numbers")
    (row,) = await client.get("/coins/markets", MARKETS)
    (exact,) = await rest(fake, "/coins/markets", MARKETS)
    assert exact["market_cap"] == Decimal("12345678901234567891")
    assert row["market_cap"] == Decimal("12345678901234567000")  # the double JavaScript held
    assert row["current_price"] == exact["current_price"] == Decimal("6.31917e-7")


async def test_up_reads_the_offline_fake_through_mcp_and_stops_it(
    bare_env: dict[str, str], tmp_path: Path
) -> None:
    """`faust -A app up` with COINGECKO_SOURCE=mcp COINGECKO_MCP_URL=offline: the worker starts
    the fake MCP server over stdio, prices are stored, and Ctrl-C stops the fake too."""
    env = {
        **bare_env,
        "APP_ID": f"qicore-mcp-{uuid.uuid4().hex[:8]}",
        "COINGECKO_SOURCE": "mcp",
        "COINGECKO_MCP_URL": "offline",
        "WEB_PORT": str(free_port()),
        "DATA_DIR": str(tmp_path / "data"),
    }
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "faust", "-A", "app", "up"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        dsn = None
        while dsn is None or not await count_rows(dsn, CryptoPriceData):
            output = log_path.read_text(errors="replace")
            assert up.poll() is None and time.monotonic() < deadline, output[-5000:]
            banner = [line.split()[2] for line in output.splitlines() if "qicore: database" in line]
            dsn = banner[0] if banner and "qicore: worker" in output else None
            await asyncio.sleep(0.5)
        output = log_path.read_text(errors="replace")
        assert "qicore: coingecko MCP offline" in output
        assert "tools get_coins_markets, get_global, get_coins_ohlc, get_simple_price" in output
        fakes = [
            child
            for child in psutil.Process(up.pid).children(recursive=True)
            if "coingecko.fake_mcp_server" in " ".join(child.cmdline())
        ]
        assert len(fakes) == 1
        up.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(up.wait, 90) == 0
        assert not any(
            fake.is_running() and fake.status() != psutil.STATUS_ZOMBIE for fake in fakes
        )
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
