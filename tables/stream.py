"""GET /stream/prices: Server-Sent Events of every aggregate price as soon as it is durable.

This process's one LISTEN connection (`relay`, store/notices.py; the worker's `/mcp` follows it
too) hears every commit of every sink on any worker process; the feed (store/feed.py) reads the
new rows once and offers them to each client's bounded queue, dropping a client that falls
behind. Each price is

    id: <cursor>
    event: price
    data: <the price as GET /prices/{coin_id} shows it>

the stream sends `: keepalive` when quiet, and ends with `event: dropped` (data
`{"reason": ..., "resume_after": <cursor or null>}`, with an `id:` when it names one). A client
that reconnects with `Last-Event-ID` gets the stored prices after that cursor first.
"""

from __future__ import annotations

import asyncio
from typing import cast

import asyncpg
from aiohttp import web
from faust.web import Request, View
from faust.web.exceptions import ServiceUnavailable, ValidationError

from app.main import app, settings
from app.web import COMPACT
from models.codec import plain_json
from models.market import CryptoPriceData
from store import queries
from store.feed import Cursor, Dropped, Feed, FeedFull, Item, Subscription
from store.notices import StoredRelay
from tables import views

KEEPALIVE_SECONDS = 15.0  # a quiet stream sends a comment this often (proxies close idle ones)
CATCH_UP_PAGES = 10  # a resumed stream sends at most this many pages of stored prices, then ends
KEEPALIVE = b": keepalive\n\n"
DATABASE_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

relay = StoredRelay(settings.database_dsn)


async def _read_pool() -> asyncpg.Pool:
    return await views.read_pool.get()


def price_event(cursor: Cursor, price: CryptoPriceData) -> bytes:
    """A price as an SSE event: rendered once per price, whatever the number of clients."""
    return f"id: {cursor}\nevent: price\ndata: {COMPACT(plain_json(price))}\n\n".encode()


price_feed = Feed(
    relay,
    _read_pool,
    CryptoPriceData,
    views.AGGREGATE,
    price_event,
    max_subscribers=settings.stream_max_clients,
    queue_size=settings.stream_queue_size,
)

if settings.web_enabled:

    @app.task
    async def run_stored_relay() -> None:
        """This process's LISTEN connection, for as long as the worker runs."""
        await relay.run()


@app.on_before_shutdown.connect
async def _end_streams(sender: object, /, *args: object, signal: object, **kwargs: object) -> None:
    price_feed.close("the server is stopping")


def dropped_event(dropped: Dropped) -> bytes:
    after = None if dropped.resume_after is None else str(dropped.resume_after)
    data = COMPACT({"reason": dropped.reason, "resume_after": after})
    event = f"event: dropped\ndata: {data}\n\n"
    return (event if after is None else f"id: {after}\n{event}").encode()


def _coins(request: Request) -> frozenset[str] | None:
    raw = request.query.get("coins")
    if raw is None:
        return None
    coins = frozenset(coin.strip() for coin in raw.split(",") if coin.strip())
    if not coins or len(coins) > queries.LATEST_LIMIT_MAX:
        raise ValidationError(f"coins must name 1 to {queries.LATEST_LIMIT_MAX} coin ids")
    if not all(views.COIN_ID.match(coin) for coin in coins):
        raise ValidationError("coins must be CoinGecko coin ids such as 'bitcoin,ethereum'")
    return coins


def _last_event_id(request: Request) -> Cursor | None:
    raw = request.headers.get("Last-Event-ID")
    if raw is None or not raw.strip():
        return None
    try:
        return Cursor.parse(raw.strip())
    except ValueError:
        raise ValidationError("Last-Event-ID must be an id this stream sent") from None


@app.page("/stream/prices")
class PriceStream(View):
    """GET /stream/prices?coins=bitcoin,ethereum: stored prices as Server-Sent Events."""

    async def get(self, request: Request) -> web.StreamResponse:
        coins, after = _coins(request), _last_event_id(request)
        try:
            async with price_feed.subscribe(coins) as subscription:
                response = web.StreamResponse(
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
                )
                response.content_type = "text/event-stream"
                await response.prepare(request)  # type: ignore[arg-type]  # aiohttp's request
                try:
                    await response.write(KEEPALIVE)  # sends the headers: the client is subscribed
                    await _stream(response, subscription, coins, after)
                except ConnectionError:  # the client left
                    pass
                return response
        except FeedFull as full:
            raise ServiceUnavailable(f"too many stream clients: {full}") from None
        except DATABASE_ERRORS as error:
            app.log.warning("price stream: database unavailable: %s", type(error).__name__)
            raise ServiceUnavailable("database unavailable") from None


async def _stream(
    response: web.StreamResponse,
    subscription: Subscription,
    coins: frozenset[str] | None,
    after: Cursor | None,
) -> None:
    """The stored prices after `after` (if any), then the live ones, until dropped."""
    caught_up: set[Cursor] = set()  # the live queue may hold some of them again
    if after is not None:
        try:
            ended = await _catch_up(response, coins, after, caught_up)
        except DATABASE_ERRORS:
            ended = Dropped("database unavailable", None)
        if ended is not None:
            await response.write(dropped_event(ended))
            return
    queue = subscription.queue
    while True:
        try:
            first = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
        except TimeoutError:
            await response.write(KEEPALIVE)
            continue
        items = [first, *(queue.get_nowait() for _ in range(queue.qsize()))]
        last = items[-1]
        dropped = last if isinstance(last, Dropped) else None  # a Dropped is always the last
        prices = cast(list[Item], items[:-1] if dropped else items)
        events = [event for cursor, event in prices if cursor not in caught_up]
        if dropped is not None:
            events.append(dropped_event(dropped))
        await response.write(b"".join(events))  # what waits goes out in one write
        if dropped is not None:
            return


async def _catch_up(
    response: web.StreamResponse,
    coins: frozenset[str] | None,
    after: Cursor,
    sent: set[Cursor],
) -> Dropped | None:
    """Send the stored prices after `after`, page by page; a Dropped if there were too many."""
    for _ in range(CATCH_UP_PAGES):
        page = await price_feed.catch_up(after, coins, queries.HISTORY_LIMIT_MAX)
        await response.write(b"".join(event for _, event in page))
        sent.update(cursor for cursor, _ in page)
        if len(page) < queries.HISTORY_LIMIT_MAX:
            return None
        after = page[-1][0]
    limit = CATCH_UP_PAGES * queries.HISTORY_LIMIT_MAX
    return Dropped(f"more than {limit} stored prices to catch up; reconnect to continue", after)
