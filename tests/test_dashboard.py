"""The dashboard at `/`.

In-process (fast): the page, its assets and the chart library as Faust's aiohttp application
serves them, without a worker: `/` is the page (not Faust's own index), every URL it loads is
served here (offline), the library is cached for good and the page revalidated.

In a real browser (slow): headless Debian Chromium, driven by Selenium through Debian's
chromedriver, against a real worker polling the CoinGecko fake (real HTTP, broker and
PostgreSQL). One worker and one browser serve every check: the table fills with the fake's coins
showing the stored digits, the candlestick chart is drawn, a price the poller fetches later
appears in the table and in the chart's last candle without a reload, and a coin that does not
exist gets a clear message. A screenshot of the page is kept under the test's tmp dir (its path
is printed); with `DASHBOARD_SCREENSHOT=docs/dashboard.png` it is also copied there (the
README's picture).

Without the browser (`apt-get install chromium chromium-driver`; `.ci/run` installs it) the
browser test is skipped, but under `CI=true` it fails: CI must not pass without having looked.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver

from coingecko.fake_server import FakeCoinGecko, RawNumber
from dashboard.web import PLOTLY_JS
from testkit.web import serve_views
from testkit.workers import Kafka, Worker, eventually

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
NEW_BTC_PRICE = "91234.5678900"  # as the fake will serve it: trailing zeros and all

# Each row of the table: coin id -> the cells' text.
TABLE = """
return Object.fromEntries([...document.querySelectorAll('#prices tbody tr')].map((tr) => [
  tr.dataset.coin,
  Object.fromEntries([...tr.cells].map((td) => [td.className.split(' ')[0], td.textContent])),
]));
"""
CANDLES_DRAWN = "return document.querySelectorAll('#chart g.trace.boxes path').length"
LAST_CLOSE = "const c = document.getElementById('chart'); return c.data && c.data[0].close.at(-1)"
CHART_MESSAGE = (
    "const m = document.getElementById('chart-message'); return m.hidden ? '' : m.textContent"
)


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    """Headless Chromium. Selenium is given both binaries, so it never runs Selenium Manager
    (which would try to download a browser)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        reason = f"no {CHROMIUM} or {CHROMEDRIVER}: apt-get install chromium chromium-driver"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1000")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


async def test_the_page_and_everything_it_loads_are_served_here(
    migrated: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve_views(migrated, monkeypatch) as client:
        page = await client.get("/")
        assert page.status_code == 200, page.text
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["cache-control"] == "no-cache"
        assert (await client.get("/index.html")).text == page.text
        loaded = re.findall(r'(?:src|href)="([^"]*)"', page.text)
        assert loaded and all(url.startswith(("/", "data:")) for url in loaded), loaded
        for url in loaded:
            if url.startswith("/"):
                answer = await client.get(url)
                assert answer.status_code == 200, url
        plotly_url = next(url for url in loaded if "plotly" in url)
        plotly = await client.get(plotly_url)
        assert plotly.content == PLOTLY_JS.read_bytes()
        assert plotly.headers["cache-control"] == "public, max-age=31536000, immutable"
        again = await client.get(plotly_url, headers={"If-None-Match": plotly.headers["etag"]})
        assert again.status_code == 304
        script = await client.get("/dashboard/dashboard.js")
        assert script.headers["cache-control"] == "no-cache"
        for missing in ("/dashboard/nothing.js", "/dashboard/plotly-0.0.1.min.js", "/dashboard/"):
            answer = await client.get(missing)
            assert answer.status_code == 404 and "error" in answer.json(), missing
        traversal = await client.get("/dashboard/..%2Fweb.py")
        assert traversal.status_code == 404


async def in_page(
    driver: WebDriver, script: str, ready: Callable[[Any], bool], worker: Worker, what: str
) -> Any:
    """The script's value once `ready` accepts it (the page updates itself meanwhile)."""

    async def check() -> Any:
        value = await asyncio.to_thread(driver.execute_script, script)
        return value if ready(value) else None

    return await eventually(check, worker, what)


async def get_json(url: str) -> Any:
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.get(url)
    return answer.json() if answer.status_code == 200 else None


@pytest.mark.slow
async def test_the_dashboard_shows_the_data_live_in_a_browser(
    browser: WebDriver,  # first: without a browser, nothing else is started
    migrated: str,
    kafka: Kafka,
    workers: Callable[..., Worker],
    fake_coingecko: FakeCoinGecko,
    tmp_path: Path,
) -> None:
    # Its prices a few minutes old: in the candles' window, and still in the past after the
    # minute it moves on below.
    fake_coingecko.rebase(datetime.now(UTC) - timedelta(minutes=5))
    worker = workers(
        migrated,
        {
            "COINGECKO_BASE_URL": fake_coingecko.base_url,
            "COINGECKO_CALLS_PER_MINUTE": "1000",
            "PRICE_POLL_SECONDS": "1",  # unchanged prices are not published again
        },
    )

    async def stored_prices() -> dict[str, Any] | None:
        try:
            body = await get_json(f"{worker.url}/prices")
        except httpx.TransportError:  # not listening yet
            return None
        return body["prices"] if body and "bitcoin" in body["prices"] else None

    await eventually(stored_prices, worker, "the first poll's prices")

    await asyncio.to_thread(browser.get, f"{worker.url}/?coin=bitcoin&interval=1m")
    prices = await stored_prices()
    assert prices is not None

    # Every stored coin is a row, its price exactly the stored decimal string.
    def filled(table: dict[str, dict[str, str]]) -> bool:
        return set(table) >= set(prices) and all(
            table[coin]["price"] == price["usd_price"] for coin, price in prices.items()
        )

    table = await in_page(browser, TABLE, filled, worker, "a row with the stored price per coin")
    assert prices["pepe-cash"]["usd_price"] == "0.00000714159"  # the fake's 7.14159e-6
    assert table["pepe-cash"]["price"] == "0.00000714159"
    # The 24 h range comes per coin from /prices/{coin_id}.
    btc = await get_json(f"{worker.url}/prices/bitcoin")
    await in_page(
        browser,
        TABLE,
        lambda t: (
            (t["bitcoin"]["high"], t["bitcoin"]["low"])
            == (btc["range_24h"]["high"], btc["range_24h"]["low"])
        ),
        worker,
        "bitcoin's 24 h range",
    )
    assert await in_page(browser, CANDLES_DRAWN, bool, worker, "a drawn candle") >= 1

    # A new price, fetched by the poller: it reaches the open page through the push feed.
    await asyncio.to_thread(browser.execute_script, "window.notReloaded = true")
    bitcoin = next(coin for coin in fake_coingecko.coins if coin["id"] == "bitcoin")
    bitcoin["current_price"] = RawNumber(NEW_BTC_PRICE)
    fake_coingecko.advance(60)

    async def new_btc_price() -> str | None:
        body = await get_json(f"{worker.url}/prices/bitcoin")
        shown: str = body["price"]["usd_price"]
        return shown if Decimal(shown) == Decimal(NEW_BTC_PRICE) else None

    stored = await eventually(new_btc_price, worker, "the new bitcoin price stored")
    # The new price is the 24 h high now, in the same digits.
    await in_page(
        browser,
        TABLE,
        lambda t: t["bitcoin"]["price"] == t["bitcoin"]["high"] == stored,
        worker,
        "the pushed price",
    )
    await in_page(browser, LAST_CLOSE, lambda c: c == stored, worker, "the chart extended")
    assert await asyncio.to_thread(browser.execute_script, "return window.notReloaded") is True

    await in_page(browser, "return !document.querySelector('tr.flash')", bool, worker, "calm")
    screenshot = tmp_path / "dashboard.png"
    assert await asyncio.to_thread(browser.save_screenshot, str(screenshot))
    print(f"dashboard screenshot: {screenshot}")
    if target := os.environ.get("DASHBOARD_SCREENSHOT"):
        shutil.copyfile(screenshot, target)

    # A coin nobody tracks: the chart says so instead of staying empty.
    await asyncio.to_thread(browser.get, f"{worker.url}/?coin=nope")
    message = await in_page(browser, CHART_MESSAGE, bool, worker, "the unknown coin's message")
    assert message.startswith('No prices for coin "nope"'), message
