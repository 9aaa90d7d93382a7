"""A local HTTP server that answers like CoinGecko's API v3, for tests and offline runs.

It serves `/api/v3/ping`, `/coins/markets` (honouring `vs_currency`, `ids`, `order`, `per_page`,
`page`, `price_change_percentage`), `/global`, `/coins/{id}/ohlc` and `/simple/price` from the
bundled fixture files in `coingecko/fixtures/`, and `/coins/{id}/market_chart/range` from a
formula (`FakeCoinGecko.chart_point`; granularity and history limit as CoinGecko's, see
`chart_times`), writing numbers exactly as the fixtures spell them
(`7.14159e-6`, `2.1e+10`, `1.0`), with CoinGecko's nulls, ISO/second/millisecond timestamps and
error bodies (`404 {"error":"coin not found"}`, `429` with a `retry-after` header).

In tests (in-process, on the test's event loop):

    async with serve_fake_coingecko() as fake:          # port 0 = any free port
        settings = Settings(coingecko_base_url=fake.base_url)   # http://127.0.0.1:PORT/api/v3
        fake.fail("/coins/markets", rate_limited(retry_after=1), server_error(), html_page())
        ...
        fake.count("/coins/markets"); fake.requests  # what the client sent, and when
        fake.advance(60)                             # a new snapshot: later timestamps

From synchronous code (a background thread with its own loop; what `faust -A app up` can use):

    with fake_coingecko_in_thread() as base_url: ...

Standalone, for offline runs: `python -m coingecko.fake_server --port 8765` (timestamps are moved
to the present and advance every `--tick` seconds, like CoinGecko's refreshing cache).

`extra_coins=N` adds N synthetic coins after the fixture's, for pagination at scale.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal
from importlib import resources
from typing import Any

from aiohttp import web

API_PREFIX = "/api/v3"
MAX_PER_PAGE = 250
OFFLINE_EXTRA_COINS = 40  # offline runs: enough coins to watch data flow across partitions
CANDLE_MS = 30 * 60 * 1000  # the fixtures' candles are 30 minutes wide
ORDERS = {
    "market_cap_desc": ("market_cap", True),
    "market_cap_asc": ("market_cap", False),
    "volume_desc": ("total_volume", True),
    "volume_asc": ("total_volume", False),
    "id_asc": ("id", False),
    "id_desc": ("id", True),
}
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
OHLC_DAYS = {"1", "2", "7", "14", "30", "90", "180", "365"}
HISTORY_DAYS = 365  # how far back keyless and Demo keys may ask for market charts
HISTORY_LIMIT_BODY = (
    '{"error":{"status":{"error_code":10012,"error_message":"Your request exceeds the allowed time'
    ' range. Public API users are limited to querying historical data within the past 365 days."}}}'
)
PRICE_CHANGE_WINDOWS = {"1h", "24h", "7d", "14d", "30d", "200d", "1y"}
RATE_LIMIT_BODY = (
    '{"status":{"error_code":429,"error_message":"You\'ve exceeded the Rate Limit. Please visit'
    " https://www.coingecko.com/en/api/pricing to subscribe to our API plans for higher rate"
    ' limits."}}'
)
HTML_PAGE = (
    "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
    "<body><h1>Bad Gateway</h1><p>The origin is temporarily unreachable.</p></body></html>"
)


class RawNumber(str):
    """A JSON number kept as the text the fixture wrote, so it is served unchanged."""


def _load(text: str) -> Any:
    return json.loads(text, parse_float=RawNumber)


def dump_raw(value: Any) -> str:
    """JSON text in which `RawNumber`s appear verbatim (json.dumps would quote them)."""
    if isinstance(value, RawNumber):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{dump_raw(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump_raw(item) for item in value) + "]"
    return json.dumps(value)


def _number(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value))


def chart_times(start_ms: int, end_ms: int, now_ms: int) -> range:
    """The times a market chart of [start_ms, end_ms] holds, by CoinGecko's automatic granularity:
    5-minutely for one day up to now, hourly up to 90 days, daily (00:00 UTC) beyond."""
    span = end_ms - start_ms
    if span <= DAY_MS and end_ms >= now_ms - HOUR_MS:
        step = 5 * 60 * 1000
    else:
        step = HOUR_MS if span <= 90 * DAY_MS else DAY_MS
    return range(-(-start_ms // step) * step, end_ms + 1, step)


def _exponent(value: Decimal) -> str:
    """`value` in exponent notation with a two-digit exponent, as in `7.1487e-06`, `3.2e+10`."""
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa}e{exponent[0]}{abs(int(exponent)):02d}"


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class Fault:
    """One scripted answer. `body=None` serves the real body (cut short if `truncate`)."""

    status: int = 200
    body: str | None = None
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    truncate: bool = False


def rate_limited(retry_after: int = 1) -> Fault:
    return Fault(429, RATE_LIMIT_BODY, headers={"retry-after": str(retry_after)})


def server_error(status: int = 500) -> Fault:
    return Fault(status, '{"error":"Internal Server Error"}')


def html_page(status: int = 502) -> Fault:
    return Fault(status, HTML_PAGE, content_type="text/html")


def truncated_json() -> Fault:
    return Fault(truncate=True)


def body(text: str, status: int = 200) -> Fault:
    """Any body, e.g. `body("{}")` for schema drift or a 401 error object."""
    return Fault(status, text)


def slow(seconds: float) -> Fault:
    return Fault(delay=seconds)


@dataclass(frozen=True)
class RecordedRequest:
    path: str  # below /api/v3, e.g. "/coins/markets"
    query: dict[str, str]
    headers: dict[str, str]
    at: float  # time.monotonic()


class FakeCoinGecko:
    """The server's data, fault queues and request log; `start()`/`stop()` run it."""

    def __init__(self, *, extra_coins: int = 0, host: str = "127.0.0.1", port: int = 0) -> None:
        fixtures = resources.files("coingecko") / "fixtures"
        self.coins: list[dict[str, Any]] = _load((fixtures / "coins_markets.json").read_text())
        self.global_data: dict[str, Any] = _load((fixtures / "global.json").read_text())
        self.ohlc: dict[str, list[list[Any]]] = _load((fixtures / "coins_ohlc.json").read_text())
        self.coins.extend(_synthetic_coin(n, self.coins[0]) for n in range(1, extra_coins + 1))
        self.requests: list[RecordedRequest] = []
        self.clock_offset = 0.0  # seconds this CoinGecko's clock runs ahead of ours
        # The market charts' history stays put while offline runs make the prices wander.
        self._history = {
            row["id"]: (row["current_price"], row["market_cap"], row["total_volume"])
            for row in self.coins
        }
        self._faults: dict[str, deque[Fault]] = {}
        self._host, self._port = host, port
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    # -- test controls -----------------------------------------------------------------------

    def fail(self, path: str, *faults: Fault) -> None:
        """Answer the next requests to `path` (below /api/v3) with `faults`, in order."""
        self._faults.setdefault(path, deque()).extend(faults)

    def count(self, path: str) -> int:
        return sum(1 for request in self.requests if request.path == path)

    def advance(self, seconds: int = 60) -> None:
        """A new snapshot: every coin's last_updated and /global's updated_at move by `seconds`;
        each OHLC series gains the candles (copies of its last) that have closed by then."""
        self._shift_times(timedelta(seconds=seconds))

    def chart_point(self, coin_id: str, ms: int) -> tuple[str | None, str | None, str | None]:
        """The price, market cap and volume (JSON number texts, or None for null) of a coin's
        market chart at `ms`: the fixture's values moved by at most ±2% with the hour, so a test
        can compute every stored row. Some are null (every 29th hour's price, every 11th hour's
        market cap, every 13th hour's volume); tiny prices and every 5th hour's volume are in
        exponent notation."""
        base_price, base_cap, base_volume = self._history[coin_id]
        hour = ms // HOUR_MS
        factor = 1 + Decimal((hour + len(coin_id)) % 41 - 20).scaleb(-3)
        exact = Context(prec=60)

        def moved(value: Any, by: Decimal, null: bool) -> Decimal | None:
            number = _number(value)
            return None if null or number is None else exact.multiply(number, by)

        price = moved(base_price, factor, hour % 29 == 7)
        cap = moved(base_cap, factor, hour % 11 == 0)
        volume = moved(base_volume, 1 + Decimal(hour * 7 % 19).scaleb(-2), hour % 13 == 5)
        return (
            None if price is None else _exponent(price) if price < Decimal("0.001") else str(price),
            None if cap is None else str(cap),
            None if volume is None else _exponent(volume) if hour % 5 == 0 else str(volume),
        )

    def ohlc_candles(self, coin_id: str, days: int, now_ms: int) -> list[list[Any]]:
        """/coins/{id}/ohlc of more than 2 days: candles 4 hours wide (up to 30 days) or 4 days
        (beyond), `[close_ms, open, high, low, close]` closing on multiples of their width within
        the last `days` (the last one may still be open, as CoinGecko's is), from the market
        chart's hourly prices at the candle's open and close; none where either is null."""
        width = (4 * HOUR_MS) if days <= 30 else (4 * DAY_MS)
        first = now_ms - days * DAY_MS
        candles: list[list[Any]] = []
        for close in range(-(-first // width) * width, now_ms + width, width):
            opened, closed = (self.chart_point(coin_id, ms)[0] for ms in (close - width, close))
            if opened is None or closed is None:
                continue
            low, high = sorted((opened, closed), key=Decimal)
            candles.append([close, *(RawNumber(v) for v in (opened, high, low, closed))])
        return candles

    def wander(self, rng: random.Random) -> None:
        """Offline runs: every known price takes a random step of up to ±0.5%, rounded to 12
        significant digits (Decimal's text: exponent form for the tiniest, as CoinGecko)."""
        context = Context(prec=12)
        for coin in self.coins:
            price = coin.get("current_price")
            if price is None:
                continue
            step = Decimal(rng.randint(-50, 50)).scaleb(-4)
            moved = context.multiply(Decimal(str(price)), 1 + step)
            coin["current_price"] = RawNumber(str(moved))

    def rebase(self, now: datetime) -> None:
        """Move every timestamp by the same amount so that the newest price is `now`."""
        newest = max(datetime.fromisoformat(coin["last_updated"]) for coin in self.coins)
        shift = timedelta(seconds=int((now - newest).total_seconds()))
        self._shift_times(shift, move_candles=True)

    def _shift_times(self, shift: timedelta, move_candles: bool = False) -> None:
        for coin in self.coins:
            coin["last_updated"] = _iso(datetime.fromisoformat(coin["last_updated"]) + shift)
        self.global_data["data"]["updated_at"] += int(shift.total_seconds())
        newest = max(datetime.fromisoformat(coin["last_updated"]) for coin in self.coins)
        newest_ms = int(newest.timestamp() * 1000)
        candle_shift = int(shift.total_seconds() * 1000) // CANDLE_MS * CANDLE_MS
        for candles in self.ohlc.values():
            if move_candles:
                for candle in candles:
                    candle[0] += candle_shift
            while candles and candles[-1][0] + CANDLE_MS <= newest_ms:
                candles.append([candles[-1][0] + CANDLE_MS, *candles[-1][1:]])

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application(middlewares=[self._record_and_fault])
        app.router.add_get(API_PREFIX + "/ping", self._ping)
        app.router.add_get(API_PREFIX + "/coins/markets", self._markets)
        app.router.add_get(API_PREFIX + "/global", self._global)
        app.router.add_get(API_PREFIX + "/coins/{coin_id}/ohlc", self._ohlc)
        app.router.add_get(API_PREFIX + "/simple/price", self._simple_price)
        app.router.add_get(API_PREFIX + "/coins/{coin_id}/market_chart/range", self._chart_range)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://{self._host}:{port}{API_PREFIX}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- HTTP --------------------------------------------------------------------------------

    @web.middleware
    async def _record_and_fault(self, request: web.Request, handler: Any) -> web.StreamResponse:
        path = request.path.removeprefix(API_PREFIX)
        self.requests.append(
            RecordedRequest(path, dict(request.query), dict(request.headers), time.monotonic())
        )
        queue = self._faults.get(path)
        fault = queue.popleft() if queue else None
        if fault is None:
            return await handler(request)
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.body is not None:
            return web.Response(
                status=fault.status,
                text=fault.body,
                content_type=fault.content_type,
                headers=fault.headers,
            )
        real = await handler(request)
        assert isinstance(real, web.Response) and real.text is not None
        text = real.text[: len(real.text) // 2] if fault.truncate else real.text
        return web.Response(status=real.status, text=text, content_type="application/json")

    @staticmethod
    def _json(value: Any, status: int = 200) -> web.Response:
        return web.Response(status=status, text=dump_raw(value), content_type="application/json")

    async def _ping(self, request: web.Request) -> web.Response:
        return self._json({"gecko_says": "(V3) To the Moon!"})

    async def _markets(self, request: web.Request) -> web.Response:
        query = request.query
        if "vs_currency" not in query:
            return self._json({"error": "Missing parameter vs_currency"}, 400)
        if query["vs_currency"].lower() != "usd":
            return self._json({"error": "invalid vs_currency"}, 400)
        order = query.get("order", "market_cap_desc")
        if order not in ORDERS:
            return self._json({"error": "invalid order"}, 400)
        try:
            per_page = min(max(int(query.get("per_page", "100")), 1), MAX_PER_PAGE)
            page = max(int(query.get("page", "1")), 1)
        except ValueError:
            return self._json({"error": "invalid per_page or page"}, 400)
        rows = self.coins
        if "ids" in query:
            wanted = {coin_id.strip() for coin_id in query["ids"].split(",")}
            rows = [row for row in rows if row["id"] in wanted]
        key, descending = ORDERS[order]
        present = [row for row in rows if row[key] is not None]
        present.sort(key=lambda row: row[key] if key == "id" else Decimal(row[key]))
        if descending:
            present.reverse()
        rows = present + [row for row in rows if row[key] is None]  # nulls last, either way
        windows = [w for w in query.get("price_change_percentage", "").split(",") if w]
        if any(window not in PRICE_CHANGE_WINDOWS for window in windows):
            return self._json({"error": "invalid price_change_percentage"}, 400)
        served = []
        for row in rows[(page - 1) * per_page : page * per_page]:
            out = {k: v for k, v in row.items() if not k.endswith("_in_currency")}
            for window in windows:
                name = f"price_change_percentage_{window}_in_currency"
                out[name] = row.get(name)
            served.append(out)
        return self._json(served)

    async def _global(self, request: web.Request) -> web.Response:
        return self._json(self.global_data)

    async def _ohlc(self, request: web.Request) -> web.Response:
        coin_id = request.match_info["coin_id"]
        if not any(row["id"] == coin_id for row in self.coins):
            return self._json({"error": "coin not found"}, 404)
        if request.query.get("vs_currency", "").lower() != "usd" or "days" not in request.query:
            return self._json({"error": "Missing parameter vs_currency or days"}, 400)
        days = request.query["days"]
        if days in ("1", "2"):  # the fixture's 30-minute candles
            return self._json(self.ohlc.get(coin_id, []))
        if days not in OHLC_DAYS:
            return self._json({"error": "invalid days"}, 400)
        now_ms = int((time.time() + self.clock_offset) * 1000)
        return self._json(self.ohlc_candles(coin_id, int(days), now_ms))

    async def _chart_range(self, request: web.Request) -> web.Response:
        """`from`/`to` in UNIX seconds or ISO dates; without a Pro key (x-cg-pro-api-key) only the
        last HISTORY_DAYS may be asked for (401, error_code 10012, as CoinGecko answers)."""
        coin_id = request.match_info["coin_id"]
        if not any(row["id"] == coin_id for row in self.coins):
            return self._json({"error": "coin not found"}, 404)
        query = request.query
        if query.get("vs_currency", "").lower() != "usd":
            return self._json({"error": "Missing parameter vs_currency"}, 400)
        try:
            start, end = (_unix_ms(query[name]) for name in ("from", "to"))
        except (KeyError, ValueError):
            return self._json({"error": "invalid from or to"}, 400)
        now_ms = int((time.time() + self.clock_offset) * 1000)
        if "x-cg-pro-api-key" not in request.headers and start < now_ms - HISTORY_DAYS * DAY_MS:
            return web.Response(
                status=401, text=HISTORY_LIMIT_BODY, content_type="application/json"
            )
        times = chart_times(start, min(end, now_ms), now_ms)
        points = [(ms, self.chart_point(coin_id, ms)) for ms in times]
        chart = {
            series: [
                [ms, RawNumber(v) if (v := values[i]) is not None else None]
                for ms, values in points
            ]
            for i, series in enumerate(("prices", "market_caps", "total_volumes"))
        }
        return self._json(chart)

    async def _simple_price(self, request: web.Request) -> web.Response:
        """usd is the coin's current_price; btc and eth are divided by theirs (8 digits)."""
        ids = [i.strip() for i in request.query.get("ids", "").split(",") if i.strip()]
        currencies = [c.strip().lower() for c in request.query.get("vs_currencies", "").split(",")]
        if not ids or not any(currencies):
            return self._json({"error": "Missing parameter ids or vs_currencies"}, 400)
        by_id = {row["id"]: row for row in self.coins}
        divisors = {"usd": Decimal(1)}
        for currency, coin_id in (("btc", "bitcoin"), ("eth", "ethereum")):
            divisors[currency] = _number(by_id[coin_id]["current_price"]) or Decimal(0)
        answer: dict[str, Any] = {}
        for coin_id in ids:
            row = by_id.get(coin_id)
            if row is None:
                continue  # CoinGecko leaves unknown ids out (and answers `{}` for none)
            price = _number(row["current_price"])
            quotes: dict[str, Any] = {}
            for currency in currencies:
                if currency in divisors and price is not None and divisors[currency]:
                    quote = price / divisors[currency]
                    quotes[currency] = RawNumber(
                        row["current_price"] if currency == "usd" else f"{quote:.8g}"
                    )
            if request.query.get("include_last_updated_at") == "true":
                moment = datetime.fromisoformat(row["last_updated"])
                quotes["last_updated_at"] = int(moment.timestamp())
            answer[coin_id] = quotes
        return self._json(answer)


def _unix_ms(text: str) -> int:
    """CoinGecko's `from`/`to`: UNIX seconds, or an ISO date (`2026-01-31`, `2026-01-31T12:00`)."""
    try:
        return int(Decimal(text) * 1000)
    except ArithmeticError:
        moment = datetime.fromisoformat(text)
        return int(moment.replace(tzinfo=moment.tzinfo or UTC).timestamp() * 1000)


def _synthetic_coin(n: int, template: dict[str, Any]) -> dict[str, Any]:
    """Coin number `n` of the padding: distinct id, exact price, market cap below the fixture's."""
    row: dict[str, Any] = dict.fromkeys(template)
    row.update(
        id=f"coin-{n:04d}",
        symbol=f"c{n}",
        name=f"Coin {n}",
        image="missing_large.png",
        current_price=RawNumber(f"{n}.{n:04d}"),
        market_cap=10_000_000 - n,
        market_cap_rank=None,
        total_volume=1000 + n,
        price_change_percentage_24h=RawNumber(f"-0.{n:05d}"),
        last_updated=template["last_updated"],
        roi=None,
    )
    return row


@asynccontextmanager
async def serve_fake_coingecko(
    *, port: int = 0, extra_coins: int = 0
) -> AsyncIterator[FakeCoinGecko]:
    """Run a `FakeCoinGecko` on this event loop; `fake.base_url` ends in /api/v3."""
    fake = FakeCoinGecko(port=port, extra_coins=extra_coins)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@contextmanager
def fake_coingecko_in_thread(
    *, port: int = 0, tick: int = 60, extra_coins: int = OFFLINE_EXTRA_COINS
) -> Iterator[str]:
    """Run the fake on its own event loop in a daemon thread, moved to the present and advancing
    every `tick` seconds with wandering prices; yield its base URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-coingecko", daemon=True)
    thread.start()
    fake = FakeCoinGecko(port=port, extra_coins=extra_coins)
    fake.rebase(datetime.now(UTC))
    try:
        base_url = asyncio.run_coroutine_threadsafe(fake.start(), loop).result(15)
        ticking = asyncio.run_coroutine_threadsafe(_advance_forever(fake, tick), loop)
        try:
            yield base_url
        finally:
            ticking.cancel()
            asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(15)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@asynccontextmanager
async def serve_offline_coingecko(
    *,
    tick: int = 60,
    host: str = "127.0.0.1",
    port: int = 0,
    extra_coins: int = OFFLINE_EXTRA_COINS,
) -> AsyncIterator[FakeCoinGecko]:
    """Offline runs on this event loop: the fake moved to the present, a new snapshot with
    wandering prices every `tick` seconds."""
    fake = FakeCoinGecko(host=host, port=port, extra_coins=extra_coins)
    fake.rebase(datetime.now(UTC))
    await fake.start()
    ticking = asyncio.create_task(_advance_forever(fake, tick))
    try:
        yield fake
    finally:
        ticking.cancel()
        await fake.stop()


async def _advance_forever(fake: FakeCoinGecko, tick: int) -> None:
    rng = random.Random(1)  # the same walk every run
    while True:
        await asyncio.sleep(tick)
        fake.wander(rng)
        fake.advance(tick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--tick", type=int, default=60, help="seconds between snapshots")
    parser.add_argument("--extra-coins", type=int, default=OFFLINE_EXTRA_COINS)
    args = parser.parse_args()

    async def serve() -> None:
        async with serve_offline_coingecko(
            tick=args.tick, host=args.host, port=args.port, extra_coins=args.extra_coins
        ) as fake:
            print(f"fake CoinGecko serving {fake.base_url}", flush=True)
            await asyncio.Event().wait()  # until interrupted

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
