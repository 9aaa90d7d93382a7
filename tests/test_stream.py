"""The push feed in-process, over a real PostgreSQL and its real NOTIFY: the one LISTEN relay
(store/notices.py) feeding both the price feed (store/feed.py) and the MCP resource feeds, the
fan-out with its bounded queues, dropping a slow client, the cap on clients, resuming after a
cursor, and `/stream/prices` as Server-Sent Events on Faust's own web application."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from mcp.server.subscriptions import InMemorySubscriptionBus, ResourceUpdated, ServerEvent

from mcpserver.feeds import follow_stored_prices
from models.codec import plain_json
from models.market import CryptoPriceData
from store.feed import Cursor, Dropped, Feed, FeedFull, Subscription
from store.notices import StoredNotice, StoredRelay, parse_notice
from tables import stream
from testkit.databases import write_records
from testkit.records import price
from testkit.web import Events, serve_views

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
AGGREGATE = {"exchange_id": "aggregate"}
TIMEOUT = 10.0


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


@pytest.fixture
async def relay(migrated: str) -> AsyncIterator[StoredRelay]:
    """The test database's relay, listening."""
    relay = StoredRelay(migrated)
    listening = asyncio.Event()
    task = asyncio.create_task(relay.run(listening.set))
    try:
        async with asyncio.timeout(TIMEOUT):
            await listening.wait()
        yield relay
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def price_feed(relay: StoredRelay, pool: asyncpg.Pool, **limits: int) -> Feed[CryptoPriceData]:
    async def get_pool() -> asyncpg.Pool:
        return pool

    sizes = {"max_subscribers": 10, "queue_size": 100, **limits}
    return Feed(relay, get_pool, CryptoPriceData, AGGREGATE, stream.price_event, **sizes)


def shown(event: bytes) -> dict[str, Any]:
    """The price an SSE event carries."""
    data: dict[str, Any] = json.loads(event.decode().split("\ndata: ", 1)[1])
    return data


async def take(subscription: Subscription, count: int) -> list[Any]:
    """The next `count` items: (coin, usd as shown) for a price, the Dropped itself."""
    taken: list[Any] = []
    async with asyncio.timeout(TIMEOUT):
        for _ in range(count):
            item = await subscription.queue.get()
            if isinstance(item, Dropped):
                taken.append(item)
            else:
                taken.append((shown(item[1])["coin_id"], shown(item[1])["usd_price"]))
    return taken


async def test_notices_parse_and_one_relay_feeds_the_mcp_resources(
    relay: StoredRelay, pool: asyncpg.Pool
) -> None:
    assert parse_notice('{"table":"t","keys":["a","b"]}') == StoredNotice("t", ("a", "b"))
    for bad in ("", "[]", '{"table":"t"}', '{"table":1,"keys":[]}', '{"table":"t","keys":[1]}'):
        with pytest.raises(ValueError, match="not a stored-rows notice"):
            parse_notice(bad)

    bus = InMemorySubscriptionBus()
    updated: asyncio.Queue[str] = asyncio.Queue()

    def listen(event: ServerEvent) -> None:
        assert isinstance(event, ResourceUpdated)
        updated.put_nowait(event.uri)

    bus.subscribe(listen)
    unsubscribe = follow_stored_prices(relay, bus)
    await write_records(pool, [price("bitcoin", "1", T0)])
    async with asyncio.timeout(TIMEOUT):
        assert [await updated.get(), await updated.get()] == ["prices://latest", "prices://bitcoin"]
    unsubscribe()


async def test_every_stored_price_reaches_each_matching_subscriber_once(
    relay: StoredRelay, pool: asyncpg.Pool
) -> None:
    await write_records(pool, [price("bitcoin", "1", at(0))])  # before anyone subscribed
    feed = price_feed(relay, pool)
    async with feed.subscribe() as everything, feed.subscribe(frozenset({"bitcoin"})) as btc:
        await write_records(
            pool,
            [
                price("ethereum", "3000.000000000000000001", at(2)),
                price("bitcoin", "61000.5", at(1)),
                price("bitcoin", "99", at(3), exchange_id="binance"),  # a venue's quote
            ],
        )
        await write_records(pool, [price("bitcoin", "62000", at(4))])
        assert await take(everything, 3) == [
            ("bitcoin", "61000.5"),
            ("ethereum", "3000.000000000000000001"),
            ("bitcoin", "62000"),
        ]
        assert await take(btc, 2) == [("bitcoin", "61000.5"), ("bitcoin", "62000")]
        # Not newer than the coin's stored price: a late snapshot is not pushed (documented).
        await write_records(pool, [price("bitcoin", "1", at(0.5)), price("ripple", "0.5", at(5))])
        assert await take(everything, 1) == [("ripple", "0.5")]
        assert btc.queue.empty() and everything.queue.empty()
    assert feed.subscribers == 0


async def test_exact_values_travel_as_the_price_view_shows_them(
    relay: StoredRelay, pool: asyncpg.Pool
) -> None:
    feed = price_feed(relay, pool)
    stored = price("shiba-inu", "6.31917E-7", at(1), btc_price="1E-8")
    async with feed.subscribe() as subscription:
        await write_records(pool, [stored])
        async with asyncio.timeout(TIMEOUT):
            item = await subscription.queue.get()
    assert not isinstance(item, Dropped)
    cursor, rendered = item
    assert cursor == Cursor(at(1), "shiba-inu")
    head, data = rendered.decode().removesuffix("\n\n").rsplit("\n", 1)
    assert head == f"id: {cursor}\nevent: price"
    assert json.loads(data.removeprefix("data: ")) == plain_json(stored)
    assert json.loads(data.removeprefix("data: "))["usd_price"] == "0.000000631917"


async def test_a_slow_subscriber_is_dropped_without_holding_up_the_others(
    relay: StoredRelay, pool: asyncpg.Pool
) -> None:
    feed = price_feed(relay, pool, queue_size=3)
    async with feed.subscribe() as slow, feed.subscribe() as fast:
        for i in range(5):  # five commits: the writer never waits for a subscriber
            await write_records(pool, [price(f"coin-{i}", str(i), at(10 - i))])
            await take(fast, 1)
        async with asyncio.timeout(TIMEOUT):
            dropped = await slow.queue.get()
        # Its queue was emptied: the final item says to resume at the first undelivered price.
        # (coin-3, at 7, overflowed the queue of coin-0..2, at 10, 9, 8.)
        assert dropped == Dropped("fell behind: more than 3 prices waiting", Cursor(at(7), ""))
        assert slow.queue.empty() and feed.subscribers == 1
        await write_records(pool, [price("coin-5", "5", at(11))])
        assert await take(fast, 1) == [("coin-5", "5")]
        assert slow.queue.empty()


async def test_the_number_of_subscribers_is_capped(relay: StoredRelay, pool: asyncpg.Pool) -> None:
    feed = price_feed(relay, pool, max_subscribers=2)
    async with feed.subscribe(), feed.subscribe():
        with pytest.raises(FeedFull, match="at most 2 clients"):
            async with feed.subscribe():
                pass
    async with feed.subscribe(), feed.subscribe():
        assert feed.subscribers == 2


async def test_prices_stored_while_nobody_listened_are_not_pushed_later(
    relay: StoredRelay, pool: asyncpg.Pool
) -> None:
    feed = price_feed(relay, pool)
    async with feed.subscribe() as first:
        await write_records(pool, [price("bitcoin", "1", at(1))])
        assert await take(first, 1) == [("bitcoin", "1")]
    await write_records(pool, [price("bitcoin", "2", at(2))])  # nobody subscribed
    async with feed.subscribe() as second:
        await write_records(pool, [price("bitcoin", "3", at(3))])
        assert await take(second, 1) == [("bitcoin", "3")]


async def test_catch_up_after_a_cursor_in_cursor_order(
    relay: StoredRelay, pool: asyncpg.Pool
) -> None:
    rows = [
        price("bitcoin", "1", at(1)),
        price("ethereum", "2", at(1)),
        price("aave", "3", at(2)),
        price("bitcoin", "4", at(3)),
        price("bitcoin", "5", at(0)),
        price("bitcoin", "6", at(2), exchange_id="binance"),
    ]
    await write_records(pool, rows)
    feed = price_feed(relay, pool)
    after = await feed.catch_up(Cursor(at(1), "bitcoin"), None, 1000)
    assert [(c, shown(event)["usd_price"]) for c, event in after] == [
        (Cursor(at(1), "ethereum"), "2"),
        (Cursor(at(2), "aave"), "3"),
        (Cursor(at(3), "bitcoin"), "4"),
    ]
    only = await feed.catch_up(Cursor(at(1), ""), frozenset({"bitcoin"}), 1000)
    assert [shown(event)["usd_price"] for _, event in only] == ["1", "4"]
    assert len(await feed.catch_up(Cursor(at(0), ""), None, 2)) == 2


def test_cursors_round_trip_and_refuse_anything_else() -> None:
    cursor = Cursor(datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC), "usd-coin")
    assert str(cursor) == "1714564800123456:usd-coin"
    assert Cursor.parse(str(cursor)) == cursor
    assert Cursor.parse("1714564800123456:") < cursor
    for bad in ("", "abc", "12", "-1:bitcoin", "1.5:bitcoin", "9" * 30 + ":x"):
        with pytest.raises(ValueError, match="not a cursor"):
            Cursor.parse(bad)


@pytest.fixture
async def sse(
    migrated: str, pool: asyncpg.Pool, relay: StoredRelay, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[httpx.AsyncClient]:
    """/stream/prices in-process: the view's feed on the test database, at most two clients,
    four waiting prices each, a keepalive every 0.2 s."""
    monkeypatch.setattr(
        stream, "price_feed", price_feed(relay, pool, max_subscribers=2, queue_size=4)
    )
    monkeypatch.setattr(stream, "KEEPALIVE_SECONDS", 0.2)
    async with serve_views(migrated, monkeypatch) as client:
        yield client


async def test_the_stream_view_speaks_server_sent_events(
    sse: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await write_records(pool, [price("bitcoin", "1", at(1)), price("ethereum", "2", at(1))])
    async with sse.stream("GET", "/stream/prices", params={"coins": "bitcoin,aave"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        events = Events(response)
        assert await events.next(comments=True) == {"comment": "keepalive"}  # subscribed
        assert await events.next(comments=True) == {"comment": "keepalive"}  # while quiet
        stored = price("bitcoin", "65000.123456789012345678", at(2))
        await write_records(pool, [price("ethereum", "3", at(2)), stored])
        event = await events.next()
        assert event == {
            "id": str(Cursor(at(2), "bitcoin")),
            "event": "price",
            "data": json.dumps(plain_json(stored), separators=(",", ":")),
        }
        last_seen = event["id"]
    # Missed while away: stored after the last id, in cursor order; ethereum is not asked for.
    await write_records(
        pool,
        [
            price("aave", "90.5", at(3)),
            price("bitcoin", "66000", at(4)),
            price("ethereum", "4", at(5)),
        ],
    )
    headers = {"Last-Event-ID": last_seen}
    async with sse.stream("GET", "/stream/prices?coins=bitcoin,aave", headers=headers) as response:
        events = Events(response)
        caught_up = [await events.next(), await events.next()]
        assert [(e["id"], json.loads(e["data"])["usd_price"]) for e in caught_up] == [
            (str(Cursor(at(3), "aave")), "90.5"),
            (str(Cursor(at(4), "bitcoin")), "66000"),
        ]
        await write_records(pool, [price("aave", "91", at(6))])
        assert json.loads((await events.next())["data"])["usd_price"] == "91"


async def test_a_dropped_client_gets_a_final_event_and_the_stream_ends(
    sse: httpx.AsyncClient,
) -> None:
    """What a dropped client is sent (the feed's tests show when it is dropped), here when the
    server stops; one that fell behind is told where to resume in the event's id."""
    async with sse.stream("GET", "/stream/prices") as response:
        events = Events(response)
        assert await events.next(comments=True) == {"comment": "keepalive"}  # subscribed
        stream.price_feed.close("the server is stopping")
        assert await events.next() == {
            "event": "dropped",
            "data": '{"reason":"the server is stopping","resume_after":null}',
        }
        with pytest.raises(AssertionError, match="the stream ended"):
            await events.next()
    behind = stream.dropped_event(Dropped("fell behind", Cursor(at(1), "")))
    assert behind == (
        b"id: 1714564860000000:\nevent: dropped\n"
        b'data: {"reason":"fell behind","resume_after":"1714564860000000:"}\n\n'
    )


@pytest.mark.parametrize(
    ("params", "headers", "error"),
    [
        ({"coins": "bit'coin"}, {}, "coins must be CoinGecko coin ids such as 'bitcoin,ethereum'"),
        ({"coins": ","}, {}, "coins must name 1 to 5000 coin ids"),
        ({}, {"Last-Event-ID": "yesterday"}, "Last-Event-ID must be an id this stream sent"),
    ],
)
async def test_bad_stream_requests_are_json_errors(
    sse: httpx.AsyncClient, params: dict[str, str], headers: dict[str, str], error: str
) -> None:
    response = await sse.get("/stream/prices", params=params, headers=headers)
    assert response.status_code == 400
    assert response.json() == {"error": error}


async def test_clients_beyond_the_cap_get_503(sse: httpx.AsyncClient) -> None:
    async with (
        sse.stream("GET", "/stream/prices") as one,
        sse.stream("GET", "/stream/prices") as two,
    ):
        first, second = Events(one), Events(two)  # kept: a dropped reader closes its response
        assert await first.next(comments=True) == await second.next(comments=True)
        third = await sse.get("/stream/prices", timeout=TIMEOUT)
        assert third.status_code == 503
        assert third.json() == {"error": "too many stream clients: at most 2 clients"}
