"""The CoinGecko poller: prices, market analytics and candles, published as DSL records.

`Poller` is the whole job and takes a `Settings`, a `CoinGeckoClient` and a `publish` callable,
so tests run its cycles directly; `agents.poller` runs the cycles on the group's leader.
This module does not import the Faust app, so /health can import `POLL_STATUS` from anywhere.

Calls per cycle stay low: prices come from /coins/markets, 250 coins per call (1,000 coins = 4
calls). `btc_price`/`eth_price` are CoinGecko's own BTC and ETH quotes from /simple/price, asked
for the coins of each markets page in one call (split only if its URL would pass
`MAX_URL_CHARS`), on every `quotes_every()`-th price poll (the other polls' rows have them null;
0: never): BTC_ETH_PRICES_EVERY, or as often as the price poll's share of the plan's calls
allows. Candles take at most `OHLC_BUDGET_SHARE` of the plan's calls, in any window of the rate
limit (their calls wait for a slot of a `RateLimiter.share` first, so a cycle's queue of candle
calls cannot crowd out the price poll) and over their interval (coins in turn, round robin); each
call returns `ohlc_days` of candles, so a coin whose turn comes round within that span misses no
candle.

CoinGecko serves cached snapshots (60 s for markets), so a record is published only if it is newer
than the last one published for its key: per coin `last_updated`, per (coin, timeframe) candle
time, `/global`'s `updated_at`. Candles whose close is still in the future are in progress and
wait until they close. A cycle never raises: failures land in `POLL_STATUS` (which /health shows)
and the log, and the next cycle tries again.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from urllib.parse import quote

from coingecko.client import (
    CallTally,
    CoinGeckoClient,
    CoinGeckoError,
    CoinGeckoRefused,
    RateLimiter,
)
from coingecko.parse import (
    CrossQuote,
    Parsed,
    parse_global,
    parse_markets,
    parse_ohlc,
    parse_simple_prices,
)
from models.dsl import StreamRecord

if TYPE_CHECKING:  # importing app.* at run time would build the whole Faust app
    from app.settings import Settings

log = logging.getLogger(__name__)

Publish = Callable[[Sequence[StreamRecord]], Awaitable[None]]
K = TypeVar("K", bound=Hashable)
MAX_PER_PAGE = 250  # CoinGecko's /coins/markets page limit
SIMPLE_PRICE = "/simple/price"
SIMPLE_PRICE_QUERY = "?ids=&vs_currencies=btc%2Ceth"  # the query without the ids, as encoded
MAX_URL_CHARS = 8000  # CoinGecko answers 414 to a URL over about 8,100 characters
OHLC_BUDGET_SHARE = 0.5  # of calls_per_minute over the OHLC interval; the rest is for prices
DEDUPE_KEYS = 20_000  # newest-timestamp memory per endpoint (top_n is at most 5,000)
REPORTED_PROBLEMS = 10_000  # distinct data problems remembered so each is logged once
ENDPOINTS = ("prices", "global", "ohlc")


@dataclass
class EndpointStatus:
    """One endpoint's polls. `last_success` is its last call whose answer was usable (a candle
    cycle spreads its calls over its interval, so it is not the cycle's end: that is
    `last_cycle_end`, whatever the cycle's errors)."""

    last_success: datetime | None = None
    last_cycle_end: datetime | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None
    polls: int = 0
    failures: int = 0
    published: int = 0
    unchanged: int = 0
    skipped: int = 0
    requests: CallTally = field(default_factory=CallTally)  # the HTTP calls of its polls


@dataclass
class PollStatus:
    """What the poller last did, per endpoint; `as_json()` is what /health shows."""

    endpoints: dict[str, EndpointStatus] = field(
        default_factory=lambda: {name: EndpointStatus() for name in ENDPOINTS}
    )
    refused: dict[str, str] = field(default_factory=dict)  # path -> why (until restart)

    def as_json(self, now: datetime | None = None) -> dict[str, Any]:
        now = now or datetime.now(UTC)
        shown: dict[str, Any] = {}
        for name, status in self.endpoints.items():
            entry = asdict(status)
            for key in ("last_success", "last_cycle_end", "last_error_at"):
                entry[key] = entry[key].isoformat() if entry[key] else None
            last = status.last_success
            entry["age_seconds"] = round((now - last).total_seconds(), 3) if last else None
            shown[name] = entry
        return {"endpoints": shown, "refused": dict(self.refused)}


POLL_STATUS = PollStatus()


class LatestSeen(Generic[K]):
    """Per key, the newest timestamp published; least recently updated keys are forgotten."""

    def __init__(self, maxsize: int = DEDUPE_KEYS) -> None:
        self.maxsize = maxsize
        self._latest: OrderedDict[K, datetime] = OrderedDict()

    def is_new(self, key: K, moment: datetime) -> bool:
        last = self._latest.get(key)
        return last is None or moment > last

    def remember(self, key: K, moment: datetime) -> None:
        if self.is_new(key, moment):
            self._latest[key] = moment
            self._latest.move_to_end(key)
            while len(self._latest) > self.maxsize:
                self._latest.popitem(last=False)


class _Cycle:
    """One poll of one endpoint: counts, and the errors that did not stop it."""

    def __init__(self, status: EndpointStatus) -> None:
        self.status = status
        self.errors: list[str] = []

    def fail(self, error: str) -> None:
        self.errors.append(error)


def quotes_every(settings: Settings) -> int:
    """Every how many price polls to ask /simple/price (0: never). BTC_ETH_PRICES_EVERY if set;
    else as often as fits the calls left to prices (the plan's calls over the price interval,
    less OHLC's share and the /global polls) after the /coins/markets pages, one quote call per
    page."""
    if settings.btc_eth_prices_every is not None:
        return settings.btc_eth_prices_every
    interval = settings.price_poll_seconds
    budget = settings.calls_per_minute * interval / 60 * (1 - OHLC_BUDGET_SHARE)
    budget -= interval / settings.global_poll_seconds
    coins = len(settings.coins) or settings.top_n
    pages = math.ceil(coins / MAX_PER_PAGE)
    spare = budget - pages  # quote calls a poll can afford, on average
    return math.ceil(pages / spare - 1e-9) if spare > 0 else 0  # 1e-9: float noise, not a call


def _how_often(every: int) -> str:
    if every == 0:
        return "never (BTC_ETH_PRICES_EVERY=0, or the plan's calls leave no room for them)"
    return "on every price poll" if every == 1 else f"once every {every} price polls"


class Poller:
    def __init__(
        self,
        settings: Settings,
        client: CoinGeckoClient,
        publish: Publish,
        status: PollStatus = POLL_STATUS,
    ) -> None:
        self.settings = settings
        self.client = client
        self.publish = publish
        self.status = status
        self.symbols: dict[str, str] = {}  # coin id -> symbol, from the latest markets poll
        self._prices: LatestSeen[str] = LatestSeen()
        self._candles: LatestSeen[tuple[str, str]] = LatestSeen()
        self._global: LatestSeen[str] = LatestSeen()
        self._ohlc_turn = 0
        self._ohlc_share = client.limiter.share(OHLC_BUDGET_SHARE)
        self._price_polls = 0
        self.quotes_every = quotes_every(settings)
        log.info("coingecko: btc_price/eth_price %s", _how_often(self.quotes_every))
        self._reported: set[str] = set()

    # -- the three polls ---------------------------------------------------------------------

    async def poll_prices(self) -> None:
        with self._cycle("prices") as cycle:
            every = self.quotes_every
            refused = SIMPLE_PRICE in self.client.refused  # logged once, in the status since
            with_quotes = every > 0 and self._price_polls % every == 0 and not refused
            self._price_polls += 1
            symbols: dict[str, str] = {}
            for params, wanted in self._market_requests():
                body = await self._get(cycle, "/coins/markets", params)
                if body is None:
                    continue
                per_page, page = int(params["per_page"]), int(params["page"])
                last_page = isinstance(body, list) and len(body) < per_page
                if wanted:
                    self._report_missing(wanted, body)
                elif isinstance(body, list):  # the last page may reach past top_n
                    body = body[: self.settings.top_n - (page - 1) * per_page]
                quotes = await self._cross_quotes(cycle, body) if with_quotes else {}
                parsed = parse_markets(body, quotes)
                symbols.update((r.coin_id, r.symbol) for r in parsed.records)
                await self._publish_new(cycle, parsed, self._prices, lambda r: r.coin_id)
                if last_page and not wanted:
                    break  # fewer coins exist than asked for: no further pages
            self.symbols = symbols if not cycle.errors else {**self.symbols, **symbols}

    async def poll_global(self) -> None:
        with self._cycle("global") as cycle:
            body = await self._get(cycle, "/global", {})
            if body is not None:
                await self._publish_new(cycle, parse_global(body), self._global, lambda r: r.source)

    async def poll_ohlc(self) -> None:
        with self._cycle("ohlc") as cycle:
            days = self.settings.ohlc_days
            for coin_id in self._ohlc_turns():
                path = f"/coins/{quote(coin_id, safe='')}/ohlc"
                params: dict[str, str | int] = {"vs_currency": "usd", "days": days}
                body = await self._get(cycle, path, params, self._ohlc_share)
                if body is None:
                    continue
                parsed = parse_ohlc(body, coin_id, self.symbols[coin_id], days)
                now = datetime.now(UTC)
                parsed.records = [r for r in parsed.records if r.timestamp <= now]
                await self._publish_new(
                    cycle, parsed, self._candles, lambda r: (r.coin_id, r.timeframe)
                )

    # -- helpers -----------------------------------------------------------------------------

    def _market_requests(self) -> Iterator[tuple[dict[str, str | int], set[str]]]:
        """(query, ids asked for) per /coins/markets call: batches of COINS, or top-N pages."""
        common: dict[str, str | int] = {"vs_currency": "usd", "price_change_percentage": "24h,7d"}
        coins = self.settings.coins
        for start in range(0, len(coins), MAX_PER_PAGE):
            batch = coins[start : start + MAX_PER_PAGE]
            yield (
                {**common, "ids": ",".join(batch), "per_page": MAX_PER_PAGE, "page": 1},
                set(batch),
            )
        if not coins:
            per_page = min(MAX_PER_PAGE, self.settings.top_n)
            for page in range(1, math.ceil(self.settings.top_n / per_page) + 1):
                order: dict[str, str | int] = {
                    "order": "market_cap_desc",
                    "per_page": per_page,
                    "page": page,
                }
                yield {**common, **order}, set()

    async def _cross_quotes(self, cycle: _Cycle, markets: object) -> dict[str, CrossQuote]:
        """CoinGecko's BTC and ETH quotes of the coins of one /coins/markets body."""
        rows = markets if isinstance(markets, list) else []
        ids = sorted(
            {row["id"] for row in rows if isinstance(row, dict) and isinstance(row.get("id"), str)}
        )
        quotes: dict[str, CrossQuote] = {}
        for batch in self._url_sized(ids):
            params: dict[str, str | int] = {"ids": ",".join(batch), "vs_currencies": "btc,eth"}
            body = await self._get(cycle, SIMPLE_PRICE, params)
            if body is not None:
                found, problems = parse_simple_prices(body)
                self._report(problems)
                quotes.update(found)
        return quotes

    def _url_sized(self, ids: Sequence[str]) -> Iterator[list[str]]:
        """`ids` in batches whose /simple/price URL (ids percent-encoded, commas as %2C) stays
        within MAX_URL_CHARS."""
        fixed = len(self.client.base_url + SIMPLE_PRICE + SIMPLE_PRICE_QUERY)
        batch: list[str] = []
        length = fixed
        for coin_id in ids:
            size = len(quote(coin_id, safe="")) + (3 if batch else 0)
            if batch and length + size > MAX_URL_CHARS:
                yield batch
                batch, length, size = [], fixed, size - 3
            batch.append(coin_id)
            length += size
        if batch:
            yield batch

    def _ohlc_turns(self) -> list[str]:
        """This cycle's coins: the next ones in turn, within OHLC's share of the plan's calls."""
        refused = self.client.refused
        coins = [c for c in self.symbols if f"/coins/{quote(c, safe='')}/ohlc" not in refused]
        if not coins:
            return []
        budget = self.settings.calls_per_minute * self.settings.ohlc_poll_seconds / 60
        count = min(len(coins), max(1, int(budget * OHLC_BUDGET_SHARE)))
        start = self._ohlc_turn % len(coins)
        self._ohlc_turn = start + count
        return [coins[(start + i) % len(coins)] for i in range(count)]

    async def _get(
        self,
        cycle: _Cycle,
        path: str,
        params: dict[str, str | int],
        share: RateLimiter | None = None,
    ) -> Any:
        """The decoded body, or None after recording why there is none."""
        try:
            return await self.client.get(path, params, cycle.status.requests, share)
        except CoinGeckoRefused as refused:  # the client logged it, once
            self.status.refused[refused.path] = str(refused)
            cycle.fail(str(refused))
        except CoinGeckoError as error:
            log.warning("coingecko poll failed: %s", error)
            cycle.fail(str(error))
        return None

    async def _publish_new(
        self,
        cycle: _Cycle,
        parsed: Parsed[Any],
        seen: LatestSeen[Any],
        key: Callable[[Any], Any],
    ) -> None:
        """Publish the records newer than the last published for their key, then remember them;
        a usable answer is the endpoint's `last_success`, even with nothing new in it."""
        self._report(parsed.problems)
        cycle.status.skipped += parsed.skipped
        if parsed.problems and not parsed.records:
            cycle.fail(f"no usable data: {parsed.problems[0]}")
            return
        new = [r for r in parsed.records if seen.is_new(key(r), r.event_time())]
        cycle.status.unchanged += len(parsed.records) - len(new)
        if new:
            await self.publish(new)
            for record in new:
                seen.remember(key(record), record.event_time())
            cycle.status.published += len(new)
        cycle.status.last_success = datetime.now(UTC)

    def _report_missing(self, wanted: set[str], body: object) -> None:
        rows = body if isinstance(body, list) else []
        returned = {row.get("id") for row in rows if isinstance(row, dict)}
        self._report(
            [
                f"coins/markets: coin {coin!r} not returned (unknown id or delisted)"
                for coin in sorted(wanted - returned)
            ]
        )

    def _report(self, problems: list[str]) -> None:
        """Log each distinct data problem once (they repeat every cycle until CoinGecko fixes
        them); the skipped-row counts in the status keep counting."""
        for problem in problems:
            if problem not in self._reported and len(self._reported) < REPORTED_PROBLEMS:
                self._reported.add(problem)
                log.warning("coingecko data: %s", problem)

    @contextmanager
    def _cycle(self, endpoint: str) -> Iterator[_Cycle]:
        status = self.status.endpoints[endpoint]
        cycle = _Cycle(status)
        status.polls += 1
        try:
            yield cycle
        except Exception as error:  # a cycle never crashes the worker: record, retry next time
            log.exception("coingecko %s poll crashed", endpoint)
            cycle.fail(f"{type(error).__name__}: {error}")
        status.last_cycle_end = datetime.now(UTC)
        if cycle.errors:
            status.failures += 1
            status.last_error = "; ".join(cycle.errors)[:1000]
            status.last_error_at = status.last_cycle_end
