"""The web views of a real worker (`faust -A app worker`), over real HTTP, broker and PostgreSQL.

Records are produced to the worker's topics; other rows are written straight into the database,
standing for partitions another worker (on a host this one cannot reach) consumed and sank.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer

from app.main import app
from local.embedded import EmbeddedBroker, create_generated_topics, free_port
from models import RECORDS
from models.codec import encode_record
from models.dsl import StreamRecord, quote_ident
from models.market import PARTITIONS, CryptoMarketAnalytics, CryptoPriceData
from store.db import create_pool
from tables.live import range_window, widen
from testkit.databases import create_database, drop_database, write_records
from testkit.records import price
from testkit.web import Events
from testkit.workers import Worker, eventually

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_views")]

T = TypeVar("T")
START_TIMEOUT = 90.0  # generous: the suite shares two cores
SETTLE_TIMEOUT = 60.0
API_KEY = "views-sekrit-key"
DB_PASSWORD = "views-sekrit-pw"
NOW = datetime.now(UTC).replace(microsecond=0)


def price_ago(coin: str, usd: str, hours_ago: float, **extra: object) -> CryptoPriceData:
    """`coin`'s snapshot `hours_ago` hours before NOW, with a BTC price unless `extra` says."""
    return price(coin, usd, NOW - timedelta(hours=hours_ago), **{"btc_price": "0.000001", **extra})


def analytics(source: str, hours_ago: float, cap: str) -> CryptoMarketAnalytics:
    return CryptoMarketAnalytics.model_validate(
        {
            "source": source,
            "timestamp": NOW - timedelta(hours=hours_ago),
            "total_market_cap": cap,
            "btc_dominance": "52.123456789",
        }
    )


def as_json(record: StreamRecord) -> dict[str, Any]:
    """How a view shows a record: its JSON, decimals in plain notation."""
    shown = record.model_dump(mode="json")
    for name, value in record:
        if isinstance(value, Decimal):
            shown[name] = format(value, "f")
    return shown


# Produced, in this order: the newest bitcoin snapshot comes before an older one.
NEWEST_BTC = price_ago("bitcoin", "65000.123456789012345678", 1, btc_price="1E-8")
PRODUCED_PRICES = [
    price_ago("bitcoin", "70000", 3),
    price_ago("bitcoin", "50000.5", 2),
    NEWEST_BTC,
    price_ago("bitcoin", "40000.25", 5),  # late and older: must not become the latest
    price_ago("ripple", "0.5", 2),
]
NEWEST_ANALYTICS = analytics("coingecko", 0.1, "2.5E12")
PRODUCED_ANALYTICS = [NEWEST_ANALYTICS, analytics("coingecko", 0.3, "1")]
# Rows only in the database.
STORED = [
    price_ago("bitcoin", "90000", 10),  # inside the 24 h window: the high
    price_ago("bitcoin", "1000000", 30),  # outside it
    price_ago("bitcoin", "1", 0.5, exchange_id="binance"),  # a venue quote: never the price
    price_ago("dogecoin", "0.1234", 2),
    price_ago("ripple", "0.6", 1),  # newer than the produced ripple snapshot
    *[price_ago("ethereum", f"3000.{i:02d}", i / 10) for i in range(15)],
    analytics("other-source", 1, "42"),
]


async def produce(broker: EmbeddedBroker, messages: list[tuple[str, bytes, bytes]]) -> None:
    """Send (topic, key, value) in order, all to partition 0, so a later message on a topic is
    processed after every earlier one (the sentinels below rely on that). Sent together and
    flushed once: a topic's messages reach the broker as one request, so one fetch."""
    producer = AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{broker.port}")
    await producer.start()
    try:
        for topic, key, value in messages:
            await producer.send(topic, value, key=key, partition=0)
        await producer.flush()
    finally:
        await producer.stop()


def start_worker(bare_env: dict[str, str], broker: EmbeddedBroker, dsn: str, tmp: Path) -> Worker:
    """A worker whose environment holds secrets, so the tests can check none of them leaks."""
    # Trust authentication accepts any password: this one exists only to be hidden.
    dsn = dsn.replace("postgres:@", f"postgres:{DB_PASSWORD}@")
    app_id = f"qicore-views-{uuid.uuid4().hex[:8]}"
    return Worker(bare_env, broker, dsn, app_id, tmp, extra={"COINGECKO_API_KEY": API_KEY})


async def until(
    worker: Worker,
    client: httpx.AsyncClient,
    check: Callable[[httpx.AsyncClient], Awaitable[T | None]],
    what: str,
) -> T:
    """Poll `check(client)` until it returns something truthy (the server may not listen yet)."""

    async def attempt() -> T | None:
        try:
            return await check(client) or None
        except httpx.TransportError:
            return None

    return await eventually(attempt, worker, what, timeout=START_TIMEOUT)


@pytest.fixture(scope="module")
async def views_broker(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[EmbeddedBroker]:
    """A broker of this module's own: nothing another test's worker publishes reaches these
    views. Its topics are created up front, as an operator does from the generated file (Tansu
    would otherwise auto-create a topic with 4 partitions on a consumer's first metadata request,
    before the worker's own declaration)."""
    log_path = tmp_path_factory.mktemp("views-broker") / "broker.log"
    with EmbeddedBroker(log_path=log_path) as running:
        await create_generated_topics(f"127.0.0.1:{running.port}")
        yield running


@pytest.fixture(scope="module")
async def views(
    views_broker: EmbeddedBroker,
    postgres_server: str,
    tmp_path_factory: pytest.TempPathFactory,
    bare_env: dict[str, str],
) -> AsyncIterator[tuple[httpx.AsyncClient, str, Worker]]:
    """A worker that has processed the produced records, over a database holding `STORED`."""
    dsn = await create_database(postgres_server, "v", migrated=True)
    pool = await create_pool(dsn)
    try:
        await write_records(pool, STORED)
    finally:
        await pool.close()

    tmp = tmp_path_factory.mktemp("views")
    worker = start_worker(bare_env, views_broker, dsn, tmp)
    try:
        async with httpx.AsyncClient(base_url=worker.url, timeout=10) as client:

            async def ready(client: httpx.AsyncClient) -> bool:
                return (await client.get("/health")).status_code == 200

            await until(worker, client, ready, "a healthy worker")
            sentinel = price_ago("zz-sentinel", "1", 0)
            await produce(
                views_broker,
                [
                    *[(p.topic.name, p.key(), encode_record(p)) for p in PRODUCED_PRICES],
                    ("crypto-prices", b"bitcoin", b"{not json"),
                    (sentinel.topic.name, sentinel.key(), encode_record(sentinel)),
                    *[(a.topic.name, a.key(), encode_record(a)) for a in PRODUCED_ANALYTICS],
                    ("market-analytics", b"zz", encode_record(analytics("zz-sentinel", 0, "1"))),
                ],
            )

            async def processed(client: httpx.AsyncClient) -> bool:
                # Faust's own table view reads this worker's tables (it owns every partition).
                prices = await client.get("/table/latest-prices/zz-sentinel/")
                stats = await client.get("/table/latest-analytics/zz-sentinel/")
                return prices.status_code == 200 and stats.status_code == 200

            await until(worker, client, processed, "the produced records in the tables")
            yield client, dsn, worker
    finally:
        worker.kill()
        await drop_database(postgres_server, dsn)


async def test_tables_keep_the_newest_snapshot(views: tuple[httpx.AsyncClient, str, Worker]):
    client, _, _ = views
    # Tables hold the record's own JSON form (decimals as the wire carried them).
    local = await client.get("/table/latest-prices/bitcoin/")
    assert local.json() == NEWEST_BTC.model_dump(mode="json")
    local = await client.get("/table/latest-analytics/coingecko/")
    assert local.json() == NEWEST_ANALYTICS.model_dump(mode="json")


async def test_prices_merge_tables_and_database_exactly(views):
    client, _, _ = views
    response = await client.get("/prices")
    assert response.status_code == 200
    body = response.json()
    assert sorted(body["prices"]) == ["bitcoin", "dogecoin", "ethereum", "ripple", "zz-sentinel"]
    assert body["count"] == 5
    assert body["prices"]["bitcoin"] == as_json(NEWEST_BTC)
    assert body["prices"]["bitcoin"]["usd_price"] == "65000.123456789012345678"
    assert body["prices"]["bitcoin"]["btc_price"] == "0.00000001"
    assert body["prices"]["dogecoin"]["usd_price"] == "0.1234"  # database only
    assert body["prices"]["ripple"]["usd_price"] == "0.6"  # the database's is newer
    assert body["prices"]["ethereum"] == as_json(STORED[5])


async def test_one_price_with_its_24h_range(views):
    client, _, _ = views
    response = await client.get("/prices/bitcoin")
    assert response.status_code == 200
    body = response.json()
    assert body["price"] == as_json(NEWEST_BTC)
    window = body["range_24h"]
    # The stored 90000 (10 h ago) is the high; the late 40000.25 snapshot is the low; the
    # 1000000 of 30 h ago and the venue's quote of 1 are outside the range.
    assert (window["high"], window["low"]) == ("90000", "40000.25")
    since, until = (datetime.fromisoformat(window[k]) for k in ("since", "until"))
    assert until - since == timedelta(hours=24)
    assert since <= NOW - timedelta(hours=22) and until > datetime.now(UTC)

    dogecoin = (await client.get("/prices/dogecoin")).json()
    assert dogecoin["price"]["usd_price"] == "0.1234"
    assert (dogecoin["range_24h"]["high"], dogecoin["range_24h"]["low"]) == ("0.1234", "0.1234")


async def test_history_is_ordered_bounded_and_filtered(views):
    client, _, _ = views
    ethereum = [
        as_json(r) for r in STORED if getattr(r, "coin_id", "") == "ethereum"
    ]  # newest first
    body = (await client.get("/prices/ethereum/history", params={"limit": 5})).json()
    assert body["prices"] == ethereum[:5] and body["count"] == 5 and body["limit"] == 5
    body = (await client.get("/prices/ethereum/history")).json()
    assert body["prices"] == ethereum and body["limit"] == 100
    since = ethereum[3]["last_updated"]
    body = (await client.get("/prices/ethereum/history", params={"since": since})).json()
    assert body["prices"] == ethereum[:4]
    future = (NOW + timedelta(days=1)).isoformat()
    body = (await client.get("/prices/ethereum/history", params={"since": future})).json()
    assert body["prices"] == []


async def test_analytics(views):
    client, _, _ = views
    body = (await client.get("/analytics")).json()
    assert body["analytics"]["coingecko"] == as_json(NEWEST_ANALYTICS)
    assert body["analytics"]["coingecko"]["total_market_cap"] == "2500000000000"
    assert body["analytics"]["other-source"]["total_market_cap"] == "42"


@pytest.mark.parametrize(
    ("path", "params", "status"),
    [
        ("/prices/unknown-coin", {}, 404),
        ("/prices/unknown-coin/history", {}, 404),
        ("/prices/bitcoin'; drop table crypto_prices;--", {}, 400),
        ("/prices/bitcoin'; drop table crypto_prices;--/history", {}, 400),
        ("/prices/..%2F..%2Fetc%2Fpasswd", {}, 400),
        ("/prices/.hidden", {}, 400),
        ("/prices/" + "a" * 200, {}, 400),
        ("/prices/ethereum/history", {"limit": "0"}, 400),
        ("/prices/ethereum/history", {"limit": "-1"}, 400),
        ("/prices/ethereum/history", {"limit": "1001"}, 400),
        ("/prices/ethereum/history", {"limit": "1" + "0" * 40}, 400),
        ("/prices/ethereum/history", {"limit": "ten"}, 400),
        ("/prices/ethereum/history", {"limit": "5; drop table crypto_prices"}, 400),
        ("/prices/ethereum/history", {"since": "yesterday"}, 400),
        ("/prices/ethereum/history", {"since": "2024-01-01T00:00:00"}, 400),  # no offset
        ("/prices/ethereum/history", {"since": "1'; drop table crypto_prices;--"}, 400),
    ],
)
async def test_bad_requests_get_json_errors_and_change_nothing(views, path, params, status):
    client, dsn, _ = views
    before = await price_rows(dsn)
    response = await client.get(path, params=params)
    assert response.status_code == status, response.text
    assert isinstance(response.json()["error"], str)
    assert await price_rows(dsn) == before  # the table is still there, every row of it


async def price_rows(dsn: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(dsn)
    try:
        return await connection.fetch("SELECT * FROM crypto_prices ORDER BY coin_id, last_updated")
    finally:
        await connection.close()


async def test_since_with_an_unencoded_plus_reads_it_as_the_offset(views):
    client, _, _ = views
    moment = (NOW - timedelta(minutes=30)).isoformat()
    assert moment.endswith("+00:00")
    encoded = await client.get("/prices/ethereum/history", params={"since": moment})
    unencoded = await client.get(f"/prices/ethereum/history?since={moment}")  # + becomes a space
    assert unencoded.status_code == encoded.status_code == 200
    assert unencoded.json() == encoded.json()
    assert 0 < encoded.json()["count"] < 15  # the filter applied
    wrong = await client.get("/prices/ethereum/history?since=2026-12-03T12:13:00 99:99")
    assert wrong.status_code == 400
    assert "%2B" in wrong.json()["error"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/no-such-view", 404),
        ("GET", "/prices/", 404),
        ("GET", "/prices/bitcoin/history/extra", 404),
        ("POST", "/prices", 405),
        ("DELETE", "/health", 405),
    ],
)
async def test_every_http_error_is_json(views, method, path, status):
    client, _, _ = views
    response = await client.request(method, path)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert isinstance(response.json()["error"], str)
    if status == 405:
        assert "GET" in response.headers["allow"].split(",")


async def raw_status(port: int, request: str) -> int:
    """Send `request` as it is and return the answer's status code."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request.encode())
        await writer.drain()
        status_line = await reader.readline()
    finally:
        writer.close()
    return int(status_line.split()[1])


async def test_oversized_requests_are_refused_as_json_without_a_traceback(views):
    client, _, worker = views
    logged_before = len(worker.output)
    long_url = await client.get("/prices/bitcoin/history", params={"since": "9" * 20_000})
    assert long_url.status_code == 414
    assert long_url.json() == {"error": "request URL longer than 8192 bytes"}
    long_header = await client.get("/health", headers={"x-filler": "a" * 20_000})
    assert long_header.status_code == 431
    assert long_header.json() == {"error": "a request header is longer than 8192 bytes"}
    # Beyond the parser's own limit aiohttp answers 400 itself; it logs one warning, no traceback.
    # (httpx refuses to send a URL this long: the request is written by hand.)
    port = int(worker.env["WEB_PORT"])
    huge = "a" * 100_000
    assert await raw_status(port, f"GET /health?x={huge} HTTP/1.1\r\nHost: x\r\n\r\n") == 400
    assert await raw_status(port, f"GET /health HTTP/1.1\r\nX-Filler: {huge}\r\n\r\n") == 400

    async def both_refusals_logged() -> str | None:
        logged = worker.output[logged_before:]
        return logged if logged.count("HTTP 400") == 2 else None

    logged = await eventually(both_refusals_logged, worker, "the refusals in the log")
    assert "Traceback" not in logged and "[ERROR]" not in logged, logged[:3000]


async def test_path_traversal_never_reaches_a_file(views):
    client, _, _ = views
    response = await client.get("/prices/../../etc/passwd")
    assert 400 <= response.status_code < 500
    assert "root:" not in response.text


async def test_health_reports_broker_database_poller_sink_and_no_secret(views):
    client, _, worker = views
    response = await client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["broker"]["connected"] is True
    assert body["broker"]["assigned_partitions"] > 0
    # Recovered tables' changelogs are not fetched (Faust only stops reading them); records are.
    changelogs = {f"{worker.env['APP_ID']}-{table}-changelog" for table in app.tables}
    assert body["broker"]["paused_partitions"] == {
        topic: list(range(PARTITIONS)) for topic in sorted(changelogs)
    }
    assert body["database"] == {"reachable": True}
    assert isinstance(body["poller"], dict)
    # The only worker of its group holds every partition of every record topic.
    assert {topic: status["partitions"] for topic, status in body["sink"].items()} == {
        record.topic.name: list(range(record.topic.partitions)) for record in RECORDS
    }
    assert body["tables"]["undecodable"]["crypto-prices"] >= 1
    for path in ("/health", "/prices", "/prices/bitcoin", "/analytics"):
        text = (await client.get(path)).text
        assert API_KEY not in text and DB_PASSWORD not in text
    assert API_KEY not in worker.output and DB_PASSWORD not in worker.output


async def test_unreachable_database_is_503_and_unhealthy(
    views_broker: EmbeddedBroker, bare_env: dict[str, str], tmp_path: Path
) -> None:
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    worker = start_worker(bare_env, views_broker, closed, tmp_path)
    try:
        async with httpx.AsyncClient(base_url=worker.url, timeout=15) as client:

            async def health(client: httpx.AsyncClient) -> httpx.Response | None:
                response = await client.get("/health")
                return response if response.status_code != 404 else None

            response = await until(worker, client, health, "the health view")
            assert response.status_code == 503
            body = response.json()
            assert body["status"] == "degraded" and body["database"] == {"reachable": False}
            prices = await client.get("/prices")
            assert prices.status_code == 503
            assert prices.json() == {"error": "database unavailable"}
    finally:
        worker.kill()


def test_widen_keeps_exact_extremes_as_given() -> None:
    bounds = widen({}, "1E-8")
    assert bounds == {"high": "1E-8", "low": "1E-8"}
    bounds = widen(bounds, "0.00000002")
    assert bounds == {"high": "0.00000002", "low": "1E-8"}
    assert widen(bounds, "0.000000010") == bounds  # equal to the low: the first spelling stays
    assert widen(bounds, "0.000000009") == {"high": "0.00000002", "low": "0.000000009"}


@pytest.mark.parametrize("minute", [0, 1, 59])
def test_range_window_is_the_earliest_hopping_window_containing_now(minute: int) -> None:
    now = datetime(2024, 5, 1, 12, minute, 30, tzinfo=UTC)
    since, until = range_window(now)
    assert since == datetime(2024, 4, 30, 13, tzinfo=UTC)
    assert until == datetime(2024, 5, 1, 13, tzinfo=UTC)


async def test_a_late_older_snapshot_in_a_later_batch_does_not_replace_the_table_value(
    views: tuple[httpx.AsyncClient, str, Worker], views_broker: EmbeddedBroker
) -> None:
    """The tables compare with what they already hold, not only within one batch. (Last in the
    module: it adds a snapshot and a coin that the tests above do not expect.)"""
    client, _, worker = views
    late = price_ago("bitcoin", "50000", 2.5)  # older than NEWEST_BTC, inside the 24 h range
    sentinel = price_ago("zz-sentinel-late", "1", 0)
    await produce(
        views_broker,
        [
            (late.topic.name, late.key(), encode_record(late)),
            (sentinel.topic.name, sentinel.key(), encode_record(sentinel)),
        ],
    )

    async def processed(client: httpx.AsyncClient) -> bool:
        return (await client.get("/table/latest-prices/zz-sentinel-late/")).status_code == 200

    await until(worker, client, processed, "the late batch in the tables")
    held = (await client.get("/table/latest-prices/bitcoin/")).json()
    assert CryptoPriceData.model_validate(held) == NEWEST_BTC


async def test_the_range_of_the_live_tables_alone_has_the_batch_high_and_low(
    views: tuple[httpx.AsyncClient, str, Worker], views_broker: EmbeddedBroker
) -> None:
    """With the coin's rows deleted from the database, /prices/{coin} answers from the tables
    only: their hourly windows must hold each hour's high and low, also when one batch holds a
    new low after a higher first price (`produce` sends them as one request: one batch)."""
    client, dsn, worker = views
    coin = "zz-range"
    # One hour's window gets 5, 2, 9, 3 (a minute apart, from 20 past), a later hour's gets 4.
    hour = (NOW - timedelta(hours=3)).replace(minute=20, second=0)
    first = (NOW - hour).total_seconds() / 3600
    snapshots = [price_ago(coin, usd, first - i / 60) for i, usd in enumerate(("5", "2", "9", "3"))]
    snapshots.append(newest := price_ago(coin, "4", 2))
    await produce(views_broker, [(p.topic.name, p.key(), encode_record(p)) for p in snapshots])

    async def processed(client: httpx.AsyncClient) -> bool:
        held = await client.get(f"/table/latest-prices/{coin}/")
        return held.status_code == 200 and held.json()["usd_price"] == "4"

    await until(worker, client, processed, "the coin's batch in the tables")
    assert await delete_rows(dsn, coin) == len(snapshots)  # the sink had stored every one

    body = (await client.get(f"/prices/{coin}")).json()
    assert body["price"] == as_json(newest)
    assert (body["range_24h"]["high"], body["range_24h"]["low"]) == ("9", "2")

    # A later update widens the hour it already holds: a new low, and a price inside the range.
    later = [price_ago(coin, "1", first - 4 / 60), price_ago(coin, "6", first - 5 / 60)]
    sentinel = price_ago("zz-sentinel-range", "1", 0)
    await produce(
        views_broker, [(p.topic.name, p.key(), encode_record(p)) for p in [*later, sentinel]]
    )

    async def sentinel_processed(client: httpx.AsyncClient) -> bool:
        return (await client.get("/table/latest-prices/zz-sentinel-range/")).status_code == 200

    await until(worker, client, sentinel_processed, "the later batch in the tables")
    assert await delete_rows(dsn, coin) == len(later)
    body = (await client.get(f"/prices/{coin}")).json()
    assert (body["range_24h"]["high"], body["range_24h"]["low"]) == ("9", "1")


async def delete_rows(dsn: str, coin: str) -> int:
    """Delete a coin's price rows, so that a view can only answer from the live tables."""
    connection = await asyncpg.connect(dsn)
    try:
        table = quote_ident(CryptoPriceData.table.name)
        deleted = await connection.execute(f"DELETE FROM {table} WHERE coin_id = $1", coin)  # noqa: S608
    finally:
        await connection.close()
    return int(deleted.split()[1])


async def test_stored_prices_are_pushed_as_server_sent_events_and_resumed(
    views: tuple[httpx.AsyncClient, str, Worker], views_broker: EmbeddedBroker
) -> None:
    """GET /stream/prices on the worker: each price the sink stores, as GET /prices/{coin}
    shows it; after a disconnect, Last-Event-ID brings the prices stored meanwhile. (Adds coins
    the tests above do not expect.)"""
    client, _, worker = views
    coins = {"coins": "zz-stream-a,zz-stream-b"}
    first = [
        price_ago("zz-stream-a", "1.000000000000000001", 0.5),
        price_ago("zz-stream-b", "2E-9", 0.4),
    ]
    async with client.stream("GET", "/stream/prices", params=coins, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        await produce(
            views_broker,
            [
                (p.topic.name, p.key(), encode_record(p))
                for p in [*first, price_ago("zz-other", "1", 0)]
            ],
        )
        events = Events(response, timeout=SETTLE_TIMEOUT)
        pushed = [await events.next() for _ in first]
    assert [e["event"] for e in pushed] == ["price", "price"]
    assert [json.loads(e["data"]) for e in pushed] == [as_json(p) for p in first]
    assert json.loads(pushed[0]["data"])["usd_price"] == "1.000000000000000001"

    missed = [price_ago("zz-stream-b", "4", 0.2), price_ago("zz-stream-a", "3", 0.3)]
    await produce(views_broker, [(p.topic.name, p.key(), encode_record(p)) for p in missed])

    async def stored(client: httpx.AsyncClient) -> bool:
        answer = await client.get("/prices/zz-stream-b/history")
        return answer.status_code == 200 and answer.json()["count"] == 2

    await until(worker, client, stored, "the missed prices stored")
    headers = {"Last-Event-ID": pushed[-1]["id"]}
    async with client.stream("GET", "/stream/prices", params=coins, headers=headers) as response:
        events = Events(response, timeout=SETTLE_TIMEOUT)
        resumed = [await events.next() for _ in missed]
    # In cursor order (last_updated, then coin id): zz-stream-a's 0.3 h ago comes first.
    assert [json.loads(e["data"]) for e in resumed] == [as_json(missed[1]), as_json(missed[0])]
