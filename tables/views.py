"""JSON web views on the worker's web server.

Workers may run on hosts that cannot reach each other (Heroku dynos), so no view routes a
request to the worker that owns a key. Each answer merges two sources that are each a subset of
the truth: the database (everything the sink has written, from every partition) and this
worker's tables (its own partitions, possibly newer than the sink's last batch; none in a
process that does not sink the table's topic, whose answers are the database's). Merging keeps
the newest snapshot, and the max/min of both ranges, so the answer is right whichever worker
serves it and whether or not its tables recovered fully; a database that cannot be reached is a
503, never a silently partial answer.

Decimals are JSON strings (exact); timestamps RFC 3339. No view writes anything.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import json
import os
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import asyncpg
from faust.exceptions import ConsumerNotStarted
from faust.web import Request, Response, View
from faust.web.exceptions import NotFound, ServiceUnavailable, ValidationError

from agents.metrics import CONSUMER_LAG
from agents.sinks import SINK_STATUS
from app.bulk import Consumer, broker_client
from app.main import app, settings
from coingecko.poller import POLL_STATUS
from common.metrics import CONTENT_TYPE, exposition
from generators.sql import CANDLES
from models import RECORDS
from models.codec import plain_decimal, plain_json
from models.dsl import StreamRecord
from models.market import (
    AGGREGATE_EXCHANGE,
    CryptoMarketAnalytics,
    CryptoOHLCVData,
    CryptoPriceData,
)
from store import queries
from store.db import LazyPool
from tables import live
from tables.answers import Answer, Answers

# CoinGecko ids are lower-case words joined by hyphens; allow a little more, never quotes,
# slashes, spaces or a leading dot.
COIN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
READ_TIMEOUT = 5.0  # seconds for a view's database work, including connecting
PING_TIMEOUT = 2.0
BROKER_TIMEOUT = 2.0
AGGREGATE = {"exchange_id": AGGREGATE_EXCHANGE}
PROCESS = f"{socket.gethostname()}:{os.getpid()}"  # how /health names this process
# Without `since`, a candles view reaches this far back from `until`: a useful chart of each
# width, within queries.CANDLES_MAX candles (12 h of 1-minute candles are 720 or 721).
CANDLE_SPANS = {
    "1m": timedelta(hours=12),
    "5m": timedelta(days=1),
    "15m": timedelta(days=3),
    "1h": timedelta(days=14),
    "4h": timedelta(days=60),
    "1d": timedelta(days=365),
}
OHLCV_SPAN = timedelta(days=30)  # CoinGecko's OHLC candles are 30 min to 4 days wide
ANALYTICS_SPAN = timedelta(days=1)
ANALYTICS_SOURCE: str = CryptoMarketAnalytics.model_fields["source"].default
TIMEFRAME = re.compile(r"^[0-9]{1,4}[smhdwM]$")  # CoinGecko's candle widths: 30m, 4h, 4d
PRICE_CANDLES = next(c for c in CANDLES if c.source is CryptoPriceData)

R = TypeVar("R", bound=StreamRecord)
V = TypeVar("V", bound=View)
P = ParamSpec("P")


# One pool for every view's reads, apart from the sinks' writes.
read_pool = LazyPool(settings.database_dsn, settings.database_pool_size, reads=True)


@app.on_before_shutdown.connect
async def _close_read_pool(
    sender: object, /, *args: object, signal: object, **kwargs: object
) -> None:
    await read_pool.close()


answers = Answers(settings.view_cache_seconds)
JSON = {"Content-Type": "application/json; charset=utf-8"}
GZIP_LEVEL = 5  # ~8x smaller for /prices; level 9 takes twice the time for a few % more


def serialised(value: object) -> Answer:
    """An answer's JSON, records in their plain JSON form (`plain_json`), and its gzip: made once
    per answer, in a thread, so that the requests served from earlier answers meanwhile do not
    wait behind it (zlib releases the GIL; the rest yields it every few milliseconds)."""
    body = json.dumps(value, default=plain_json, separators=(",", ":"), ensure_ascii=False)
    encoded = body.encode()
    return Answer(encoded, gzip.compress(encoded, compresslevel=GZIP_LEVEL))


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header takes gzip (`gzip`, `gzip;q=0.5`, not `gzip;q=0`)."""
    for part in accept_encoding.split(","):
        name, _, params = part.partition(";")
        if name.strip().lower() == "gzip":
            quality = params.replace(" ", "").lower().removeprefix("q=")
            return not (params and re.fullmatch(r"0(\.0*)?", quality))
    return False


def shared(
    get: Callable[Concatenate[V, Request, P], Awaitable[dict[str, Any]]],
) -> Callable[Concatenate[V, Request, P], Awaitable[Response]]:
    """A view's GET that returns its answer as a value (records allowed), reused for the same
    path and query (`tables.answers`), gzipped for clients that accept it."""

    @functools.wraps(get)
    async def answer(view: V, request: Request, *args: P.args, **kwargs: P.kwargs) -> Response:
        async def compute() -> Answer:
            return await asyncio.to_thread(serialised, await get(view, request, *args, **kwargs))

        found = await answers.get(f"{type(view).__name__} {request.rel_url}", compute)
        if accepts_gzip(request.headers.get("Accept-Encoding", "")):
            headers = {**JSON, "Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
            return view.bytes(found.gzipped, headers=headers)
        return view.bytes(found.body, headers={**JSON, "Vary": "Accept-Encoding"})

    return answer


@asynccontextmanager
async def database() -> AsyncIterator[asyncpg.Pool]:
    """The read pool, with the view's database work bounded; failures become 503."""
    try:
        async with asyncio.timeout(READ_TIMEOUT):
            yield await read_pool.get()
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        app.log.warning("web view: database unavailable: %s", type(error).__name__)
        raise ServiceUnavailable("database unavailable") from None


def _coin_id(value: str) -> str:
    if not COIN_ID.match(value):
        raise ValidationError("coin_id must be a CoinGecko coin id such as 'bitcoin'")
    return value


def _limit(request: Request, default: int = queries.HISTORY_LIMIT_DEFAULT) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,7}", raw) or not 1 <= int(raw) <= queries.HISTORY_LIMIT_MAX:
        raise ValidationError(f"limit must be an integer from 1 to {queries.HISTORY_LIMIT_MAX}")
    return int(raw)


# An unencoded `+` in a query string arrives as a space: `...T12:13:00 00:00` was `+00:00`.
SPACE_FOR_PLUS = re.compile(r"(.*[0-9]) ([0-9]{2}(?::?[0-9]{2})?)")


def parse_time(raw: str, name: str) -> datetime:
    """The query parameter `name`: an ISO 8601 time with a UTC offset. A space before a trailing
    offset is read as the `+` it was before the query string was decoded: no ISO time has a
    space there."""
    plus = SPACE_FOR_PLUS.fullmatch(raw)
    for text in (raw, f"{plus[1]}+{plus[2]}" if plus else raw):
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            continue
        if moment.tzinfo is None:
            raise ValidationError(f"{name} must have a UTC offset (e.g. 2024-01-01T00:00:00Z)")
        return moment
    raise ValidationError(
        f"{name} must be an ISO 8601 timestamp with a UTC offset, e.g. 2024-01-01T00:00:00Z "
        "(encode a + in the offset as %2B)"
    )


def _window(request: Request, span: timedelta) -> tuple[datetime, datetime]:
    """[since, until) from the query: `until` defaults to now, `since` to `span` before `until`.
    Both are answered in UTC."""
    raw_since, raw_until = request.query.get("since"), request.query.get("until")
    until = datetime.now(UTC) if raw_until is None else parse_time(raw_until, "until")
    since = until - span if raw_since is None else parse_time(raw_since, "since")
    if since >= until:
        raise ValidationError("since must be before until")
    return since.astimezone(UTC), until.astimezone(UTC)


def _merge_newest(
    record: type[R], stored: list[R], key: str, table: live.LiveTable | None
) -> dict[str, R]:
    """The stored records by `key`, each replaced by this worker's table value where newer (a
    tie keeps the stored one). Only the table values that win are validated: usually none."""
    merged = {getattr(row, key): row for row in stored}
    time_column = record.table.time_column
    for name, value in live.items_of(table):
        held = merged.get(name)
        if value is None or (
            held is not None
            and datetime.fromisoformat(value[time_column]) <= getattr(held, time_column)
        ):
            continue
        merged[name] = record.model_validate(value)
    return merged


def _bounds(*ranges: dict[str, Any]) -> dict[str, str | None]:
    """Merge {"high", "low"} ranges (decimals or decimal strings); nulls if all are empty."""
    present = [r for r in ranges if r]
    if not present:
        return {"high": None, "low": None}
    return {
        "high": plain_decimal(max(Decimal(str(r["high"])) for r in present)),
        "low": plain_decimal(min(Decimal(str(r["low"])) for r in present)),
    }


@app.page("/prices")
class Prices(View):
    """GET /prices: the latest aggregate price of every coin, keyed by coin id."""

    @shared
    async def get(self, request: Request) -> dict[str, Any]:
        async with database() as db:
            stored = await queries.latest_per_group(db, CryptoPriceData, "coin_id", AGGREGATE)
        merged = _merge_newest(CryptoPriceData, stored, "coin_id", live.latest_prices)
        return {
            "count": len(merged),
            "prices": {coin_id: merged[coin_id] for coin_id in sorted(merged)},
        }


@app.page("/prices/{coin_id}")
class Price(View):
    """GET /prices/{coin_id}: one coin's latest price and its 24 h high/low."""

    @shared
    async def get(self, request: Request, coin_id: str) -> dict[str, Any]:
        coin_id = _coin_id(coin_id)
        since, until = live.range_window(datetime.now(UTC))
        filters = {"coin_id": coin_id, **AGGREGATE}
        async with database() as db:
            stored = await queries.latest(db, CryptoPriceData, filters)
            stored_range = await queries.value_range(
                db, CryptoPriceData, "usd_price", filters, since, until
            )
        price = live.newest(
            stored, live.stored(CryptoPriceData, live.value_of(live.latest_prices, coin_id))
        )
        if price is None:
            raise NotFound(f"unknown coin {coin_id!r}")
        bounds = _bounds(dict(stored_range or {}), live.local_range(coin_id, since))
        window = {"since": since.isoformat(), "until": until.isoformat()}
        return {"price": price, "range_24h": {**window, **bounds}}


@app.page("/prices/{coin_id}/history")
class PriceHistory(View):
    """GET /prices/{coin_id}/history?limit=N&since=ISO: stored snapshots, newest first."""

    @shared
    async def get(self, request: Request, coin_id: str) -> dict[str, Any]:
        coin_id = _coin_id(coin_id)
        raw_since = request.query.get("since")
        limit, since = (
            _limit(request),
            None if raw_since is None else parse_time(raw_since, "since"),
        )
        filters = {"coin_id": coin_id, **AGGREGATE}
        async with database() as db:
            rows = await queries.history(db, CryptoPriceData, filters, limit=limit, since=since)
            known = rows or live.value_of(live.latest_prices, coin_id) is not None
            if not known and await queries.latest(db, CryptoPriceData, filters) is None:
                raise NotFound(f"unknown coin {coin_id!r}")
        return {"coin_id": coin_id, "limit": limit, "count": len(rows), "prices": rows}


@app.page("/prices/{coin_id}/candles")
class PriceCandles(View):
    """GET /prices/{coin_id}/candles?interval=1m&since=ISO&until=ISO: OHLC candles of the
    coin's aggregate price, rolled up in the database, oldest first (see CANDLE_SPANS)."""

    @shared
    async def get(self, request: Request, coin_id: str) -> dict[str, Any]:
        coin_id = _coin_id(coin_id)
        interval = request.query.get("interval", "1m")
        if interval not in queries.CANDLE_INTERVALS:
            raise ValidationError(f"interval must be one of {', '.join(queries.CANDLE_INTERVALS)}")
        since, until = _window(request, CANDLE_SPANS[interval])
        filters = {"coin_id": coin_id, **AGGREGATE}
        width = queries.CANDLE_INTERVALS[interval]
        async with database() as db:
            try:
                found = await queries.candles(db, PRICE_CANDLES, filters, width, since, until)
            except ValueError as error:  # too many candles
                raise ValidationError(str(error)) from None
            if not found:
                await _known_coin(db, coin_id)
        candles = [
            {
                "time": candle["bucket"].isoformat(),
                **{part: plain_decimal(candle[part]) for part in ("open", "high", "low", "close")},
                "snapshots": candle["snapshots"],
            }
            for candle in found
        ]
        window = {"since": since.isoformat(), "until": until.isoformat()}
        return {"coin_id": coin_id, "interval": interval, **window, "candles": candles}


async def _known_coin(db: asyncpg.Pool, coin_id: str) -> None:
    """404 unless the coin has a price, stored or in this worker's table."""
    if live.value_of(live.latest_prices, coin_id) is not None:
        return
    if await queries.latest(db, CryptoPriceData, {"coin_id": coin_id, **AGGREGATE}) is None:
        raise NotFound(f"unknown coin {coin_id!r}")


async def _series(
    db: asyncpg.Pool,
    record: type[R],
    filters: dict[str, object],
    window: tuple[datetime, datetime],
    limit: int,
) -> dict[str, Any]:
    """The newest `limit` rows in [since, until), listed oldest first, as a view shows them;
    `next_page` is the window of the rows before them, null when there are none left."""
    since, until = window
    rows = await queries.history(db, record, filters, limit=limit, since=since, until=until)
    rows.reverse()
    next_page = None
    if len(rows) == limit:
        first = getattr(rows[0], record.table.time_column)
        next_page = {"since": since.isoformat(), "until": first.isoformat()}
    return {
        "since": since.isoformat(),
        "until": until.isoformat(),
        "count": len(rows),
        "rows": list(map(plain_json, rows)),
        "next_page": next_page,
    }


@app.page("/ohlcv/{coin_id}")
class OHLCV(View):
    """GET /ohlcv/{coin_id}?timeframe=4h&since=ISO&until=ISO&limit=N: CoinGecko's own OHLC
    candles as stored (by `timestamp`, the candle's close), oldest first; every timeframe
    unless one is given."""

    @shared
    async def get(self, request: Request, coin_id: str) -> dict[str, Any]:
        coin_id = _coin_id(coin_id)
        timeframe = request.query.get("timeframe")
        if timeframe is not None and not TIMEFRAME.match(timeframe):
            raise ValidationError("timeframe must be a candle width such as 30m, 4h or 4d")
        window = _window(request, OHLCV_SPAN)
        limit = _limit(request, queries.HISTORY_LIMIT_MAX)
        filters: dict[str, object] = {"coin_id": coin_id, **AGGREGATE}
        if timeframe is not None:
            filters["timeframe"] = timeframe
        async with database() as db:
            series = await _series(db, CryptoOHLCVData, filters, window, limit)
            coin = {"coin_id": coin_id, **AGGREGATE}
            if not series["rows"] and await queries.latest(db, CryptoOHLCVData, coin) is None:
                raise NotFound(f"unknown coin {coin_id!r}: no OHLCV candles stored for it")
        return {"coin_id": coin_id, "timeframe": timeframe, **series}


@app.page("/analytics/history")
class AnalyticsHistory(View):
    """GET /analytics/history?source=coingecko&since=ISO&until=ISO&limit=N: one source's stored
    market analytics, oldest first."""

    @shared
    async def get(self, request: Request) -> dict[str, Any]:
        source = request.query.get("source", ANALYTICS_SOURCE)
        if not COIN_ID.match(source):
            raise ValidationError("source must be a source name such as 'coingecko'")
        window = _window(request, ANALYTICS_SPAN)
        limit = _limit(request, queries.HISTORY_LIMIT_MAX)
        async with database() as db:
            series = await _series(db, CryptoMarketAnalytics, {"source": source}, window, limit)
        return {"source": source, **series}


@app.page("/analytics")
class Analytics(View):
    """GET /analytics: the latest market-wide analytics, keyed by source."""

    @shared
    async def get(self, request: Request) -> dict[str, Any]:
        async with database() as db:
            stored = await queries.latest_per_group(db, CryptoMarketAnalytics, "source")
        merged = _merge_newest(CryptoMarketAnalytics, stored, "source", live.latest_analytics)
        return {"analytics": {source: merged[source] for source in sorted(merged)}}


async def _broker_status() -> dict[str, Any]:
    """Whether the broker answers a metadata request on the app's own producer connection."""
    try:
        client = broker_client(app)
        async with asyncio.timeout(BROKER_TIMEOUT):
            await client.fetch_all_metadata()
        connected = True
    except Exception as error:  # any failure means "not connected"; the kind is logged
        app.log.warning("health: broker metadata request failed: %s", type(error).__name__)
        connected = False
    return {
        "connected": connected,
        "rebalancing": app.rebalancing,
        "assigned_partitions": len(app.consumer.assignment()),
        "paused_partitions": await _paused_partitions(),
    }


async def _paused_partitions() -> dict[str, list[int]] | None:
    """Partitions not fetched, by topic: every table's changelog once it is recovered, all of
    them during a rebalance. None while the consumer is not started or does not answer."""
    try:
        async with asyncio.timeout(BROKER_TIMEOUT):
            tps = await cast(Consumer, app.consumer).paused_partitions()
    except (ConsumerNotStarted, TimeoutError):
        return None
    paused: dict[str, list[int]] = {}
    for tp in sorted(tps):
        paused.setdefault(tp.topic, []).append(tp.partition)
    return paused


def _sink_status() -> dict[str, dict[str, Any]]:
    """Every sink's counters, with the partitions of its topic this worker holds right now."""
    assignment = app.consumer.assignment()
    statuses = SINK_STATUS.as_json()
    for topic, status in statuses.items():
        status["partitions"] = sorted(tp.partition for tp in assignment if tp.topic == topic)
    return statuses


async def _stored_freshness() -> dict[str, dict[str, Any]] | None:
    """Per record table, its newest row and when this deployment's sinks last stored one: the same
    on every process, whichever one polls. None when the database does not answer."""
    try:
        async with asyncio.timeout(PING_TIMEOUT):
            pool = await read_pool.get()
            tables = await queries.freshness(pool, RECORDS, settings.app_id)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return None
    now = datetime.now(UTC)
    return {
        table: {
            "newest": _iso(fresh["newest"]),
            "stored_at": _iso(fresh["stored_at"]),
            "stored_age_seconds": (
                round((now - fresh["stored_at"]).total_seconds(), 3) if fresh["stored_at"] else None
            ),
        }
        for table, fresh in tables.items()
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


async def _poller_status() -> dict[str, Any]:
    """Who polls and how recently the polls arrived. Only the group's leader polls, so the
    counters of a process that does not (`polls_here` false) stay at zero; `stored` tells any
    process how fresh the polled data is."""
    return {
        "polls_here": settings.poller_enabled and app.is_leader(),
        "process": PROCESS,
        **POLL_STATUS.as_json(),
        "stored": await _stored_freshness(),
    }


@app.page("/health")
class Health(View):
    """GET /health: broker, database, poller and sink state; 503 when broker or database is down."""

    async def get(self, request: Request) -> Response:
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                pool = await read_pool.get()
            reachable = await queries.ping(pool, PING_TIMEOUT)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            reachable = False
        broker = await _broker_status()
        healthy = reachable and broker["connected"]
        body = {
            "status": "ok" if healthy else "degraded",
            "broker": broker,
            "database": {"reachable": reachable},
            "poller": await _poller_status(),
            "sink": _sink_status(),
            "tables": {"undecodable": dict(live.UNDECODABLE)},
        }
        return self.json(body, status=200 if healthy else 503)


@app.page("/metrics")
class Metrics(View):
    """GET /metrics: this process's metrics in Prometheus' text format (agents/metrics.py)."""

    async def get(self, request: Request) -> Response:
        await CONSUMER_LAG.refresh()
        return self.bytes(exposition(), headers={"Content-Type": CONTENT_TYPE})
