"""The MCP server through the SDK's own client, against `faust -A app mcp` on stdio and a real,
migrated PostgreSQL: every tool's answer equals the database's rows exactly, every schema is
valid JSON Schema and every answer validates against its tool's output schema, and bad
arguments are tool errors that leave the server up."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import anyio
import asyncpg
import httpx
import httpx2
import jsonschema
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import ResourceUpdated, Subscription
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, TextResourceContents, Tool

from app.settings import load_settings
from models import RECORDS, StreamRecord
from models.codec import plain_json
from models.market import CryptoMarketAnalytics, CryptoOHLCVData, CryptoPriceData
from store.db import create_pool
from store.writer import NOTIFY_PAYLOAD_BYTES, STORED_CHANNEL, RecordWriter
from testkit.workers import TIMEOUT, Kafka, Worker, eventually

NOW = datetime.now(UTC).replace(second=0, microsecond=0)
T1 = NOW - timedelta(hours=3)


def price(coin: str, symbol: str, usd: str, at: datetime, **extra: Any) -> CryptoPriceData:
    return CryptoPriceData.model_validate(
        {
            "coin_id": coin,
            "symbol": symbol,
            "name": coin.title(),
            "usd_price": usd,
            "last_updated": at,
            **extra,
        }
    )


PRICES = [
    price("bitcoin", "btc", "61000.123456789012345678901234567890", T1),
    price("bitcoin", "btc", "0.00000001", T1 + timedelta(minutes=7)),
    price("bitcoin", "btc", "2500000000000", T1 + timedelta(minutes=75), market_cap="1E+3"),
    price("bitcoin", "btc", "1", T1 + timedelta(hours=2), exchange_id="binance"),
    price("ethereum", "eth", "3000.5", T1 + timedelta(minutes=1), change_24h="-1.25"),
    price("tether", "usdt", "1.0001", T1),
    price("bridged-tether", "usdt", "0.9998", T1),
]
OHLCV = [
    CryptoOHLCVData(
        coin_id="bitcoin",
        symbol="btc",
        timestamp=T1 + timedelta(minutes=30 * i),
        open=Decimal("1.5") + i,
        high=Decimal("2E+1"),
        low=Decimal("0.1"),
        close=Decimal(i),
        timeframe="30m",
    )
    for i in range(3)
]
ANALYTICS = [
    CryptoMarketAnalytics(timestamp=T1, total_market_cap=Decimal("2.5E12"), markets=900),
    CryptoMarketAnalytics(timestamp=T1 + timedelta(minutes=10), btc_dominance=Decimal("-0.5")),
]


@pytest.fixture
async def stocked(migrated: str) -> str:
    """The migrated database with the rows above, written as the sink writes them."""
    pool = await create_pool(migrated)
    try:
        for records in (PRICES, OHLCV, ANALYTICS):
            await RecordWriter(type(records[0])).write(pool, records)
    finally:
        await pool.close()
    return migrated


def stdio_server(dsn: str, env: Mapping[str, str]) -> StdioServerParameters:
    """`faust -A app mcp`, as a desktop assistant starts it. (Entered in the test itself: the
    SDK's client must be left in the task that entered it, which a fixture's teardown is not.)"""
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "faust", "-A", "app", "mcp"],
        env={**env, "DATABASE_URL": dsn, "APP_ID": "mcp-test"},
    )


async def fetch(dsn: str, sql: str, *args: object) -> list[dict[str, Any]]:
    connection = await asyncpg.connect(dsn)
    try:
        return [dict(row) for row in await connection.fetch(sql, *args)]
    finally:
        await connection.close()


def parsed(record: type[StreamRecord], row: Mapping[str, Any]) -> dict[str, Any]:
    """An answer's row with its decimal strings and RFC 3339 times read back, to compare with
    the database's values exactly (Decimal and datetime equality)."""
    shown = dict(row)
    for shape in record.shapes():
        value = shown[shape.name]
        if value is not None and shape.kind == "decimal":
            assert "E" not in value.upper(), f"{shape.name}: {value} is not plain notation"
            shown[shape.name] = Decimal(value)
        elif value is not None and shape.kind == "timestamp":
            shown[shape.name] = datetime.fromisoformat(value)
    return shown


async def call(client: Client, tools: dict[str, Tool], name: str, /, **arguments: Any) -> Any:
    """A successful call's structured content, validated against the tool's output schema."""
    result = await client.call_tool(name, arguments)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    jsonschema.validate(
        result.structured_content,
        tools[name].output_schema or {},
        cls=jsonschema.Draft202012Validator,
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )
    return result.structured_content


@pytest.mark.slow  # starts `faust -A app mcp`
async def test_stdio_tools_answer_exactly_and_refuse_bad_arguments(
    stocked: str, bare_env: dict[str, str]
) -> None:
    async with Client(stdio_server(stocked, bare_env)) as client:
        await check_answers(client, stocked)
        await check_refusals(client, stocked)


async def check_answers(client: Client, stocked: str) -> None:
    tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    per_record = {f"{kind}_{r.table.name}" for r in RECORDS for kind in ("latest", "history")}
    assert per_record | {"candles_crypto_prices", "search_coins", "pipeline_status"} == set(tools)
    for tool in tools.values():
        jsonschema.Draft202012Validator.check_schema(tool.input_schema)
        jsonschema.Draft202012Validator.check_schema(tool.output_schema or {})
        assert tool.annotations is not None and tool.annotations.read_only_hint

    # Latest of every coin (the aggregate quotes), with the 24 h range of each.
    latest = await fetch(
        stocked,
        "SELECT DISTINCT ON (coin_id) * FROM crypto_prices WHERE exchange_id = 'aggregate' "
        "ORDER BY coin_id, last_updated DESC",
    )
    answer = await call(client, tools, "latest_crypto_prices")
    assert [parsed(CryptoPriceData, row) for row in answer["rows"]] == latest
    assert answer["rows"][0]["usd_price"] == "2500000000000"  # bitcoin first, by id; plain
    ranges = await fetch(
        stocked,
        "SELECT coin_id, max(usd_price) AS high, min(usd_price) AS low, count(*) AS samples "
        "FROM crypto_prices WHERE exchange_id = 'aggregate' GROUP BY coin_id",
    )
    assert {
        coin: {"high": Decimal(r["high"]), "low": Decimal(r["low"]), "samples": r["samples"]}
        for coin, r in answer["range_24h"]["ranges"].items()
    } == {r.pop("coin_id"): r for r in ranges}
    some = await call(client, tools, "latest_crypto_prices", coin_id=["ethereum", "bitcoin"])
    assert [row["coin_id"] for row in some["rows"]] == ["bitcoin", "ethereum"]
    assert some["rows"][0]["usd_price"] == "2500000000000"
    assert set(some["range_24h"]["ranges"]) == {"bitcoin", "ethereum"}
    binance = await call(client, tools, "latest_crypto_prices", exchange_id="binance")
    assert [(row["coin_id"], row["usd_price"]) for row in binance["rows"]] == [("bitcoin", "1")]

    # History: paged newest first, then oldest first.
    stored = await fetch(
        stocked,
        "SELECT * FROM crypto_prices WHERE coin_id = 'bitcoin' AND exchange_id = 'aggregate' "
        "ORDER BY last_updated DESC",
    )
    since = (T1 - timedelta(days=1)).isoformat()
    page = await call(
        client, tools, "history_crypto_prices", coin_id="bitcoin", since=since, limit=2
    )
    assert [parsed(CryptoPriceData, row) for row in page["rows"]] == stored[:2]
    rest = await call(
        client, tools, "history_crypto_prices", coin_id="bitcoin", limit=2, **page["next_page"]
    )
    assert [parsed(CryptoPriceData, row) for row in rest["rows"]] == stored[2:]
    assert rest["next_page"] is None
    oldest = await call(
        client, tools, "history_crypto_prices", coin_id="bitcoin", since=since, order="oldest_first"
    )
    assert [parsed(CryptoPriceData, row) for row in oldest["rows"]] == stored[::-1]

    # Candles built in the database: 1 h candles over the bitcoin snapshots.
    hourly = await call(
        client,
        tools,
        "candles_crypto_prices",
        coin_id="bitcoin",
        interval="1h",
        since=T1.isoformat(),
        until=(T1 + timedelta(hours=3)).isoformat(),
    )
    by_hour: dict[datetime, list[dict[str, Any]]] = {}
    for row in sorted(stored, key=lambda row: row["last_updated"]):
        hour = row["last_updated"].replace(minute=0, second=0, microsecond=0)
        by_hour.setdefault(hour, []).append(row)
    assert [
        (
            datetime.fromisoformat(c["start"]),
            Decimal(c["open"]),
            Decimal(c["high"]),
            Decimal(c["low"]),
            Decimal(c["close"]),
            c["snapshots"],
        )
        for c in hourly["candles"]
    ] == [
        (
            hour,
            rows[0]["usd_price"],
            max(r["usd_price"] for r in rows),
            min(r["usd_price"] for r in rows),
            rows[-1]["usd_price"],
            len(rows),
        )
        for hour, rows in sorted(by_hour.items())
    ]

    # CoinGecko's OHLC candles and the market analytics, latest and over a range.
    ohlc = await fetch(
        stocked, "SELECT * FROM crypto_ohlcv WHERE timeframe = '30m' ORDER BY timestamp"
    )
    stored_ohlc = await call(
        client,
        tools,
        "history_crypto_ohlcv",
        coin_id="bitcoin",
        timeframe="30m",
        since=since,
        order="oldest_first",
    )
    assert [parsed(CryptoOHLCVData, row) for row in stored_ohlc["rows"]] == ohlc
    analytics = await fetch(stocked, "SELECT * FROM market_analytics ORDER BY timestamp DESC")
    newest = await call(client, tools, "latest_market_analytics")
    assert [parsed(CryptoMarketAnalytics, row) for row in newest["rows"]] == analytics[:1]
    window = await call(client, tools, "history_market_analytics", source="coingecko", since=since)
    assert [parsed(CryptoMarketAnalytics, row) for row in window["rows"]] == analytics

    # Search: by symbol finds both coins that share it; by name, case-insensitively.
    usdt = await call(client, tools, "search_coins", query="USDT")
    assert [coin["coin_id"] for coin in usdt["coins"]] == ["bridged-tether", "tether"]
    assert "not unique" in usdt["note"]
    assert [
        c["coin_id"] for c in (await call(client, tools, "search_coins", query="ereum"))["coins"]
    ] == ["ethereum"]

    status = await call(client, tools, "pipeline_status")
    assert status["database"] == {"reachable": True}
    newest_price = max(
        row["last_updated"] for row in await fetch(stocked, "SELECT * FROM crypto_prices")
    )
    assert datetime.fromisoformat(status["tables"]["crypto_prices"]["newest"]) == newest_price


BAD_CALLS: list[tuple[str, dict[str, Any], str]] = [
    (
        "history_crypto_prices",
        {"coin_id": "dogecoin", "since": "2024-01-01T00:00:00Z"},
        "unknown coin_id",
    ),
    ("latest_crypto_prices", {"coin_id": ["bitcoin", "nope"]}, "unknown coin_id: 'nope'"),
    (
        "history_crypto_prices",
        {"coin_id": "bitcoin' OR '1'='1", "since": "2024-01-01T00:00:00Z"},
        "unknown coin_id",
    ),
    (
        "latest_crypto_prices",
        {"coin_id": ['bitcoin"; DROP TABLE crypto_prices; --']},
        "unknown coin_id",
    ),
    (
        "candles_crypto_prices",
        {"coin_id": "bitcoin", "interval": "2m", "since": "2024-01-01T00:00:00Z"},
        "interval",
    ),
    (
        "candles_crypto_prices",
        {"coin_id": "bitcoin", "interval": "1m", "since": "2020-01-01T00:00:00Z"},
        "at most 1000",
    ),
    (
        "history_crypto_prices",
        {"coin_id": "bitcoin", "since": "2024-02-01T00:00:00Z", "until": "2024-01-01T00:00:00Z"},
        "must be before until",
    ),
    (
        "history_crypto_prices",
        {"coin_id": "bitcoin", "since": "2024-01-01T00:00:00Z", "limit": 10**9},
        "limit",
    ),
    (
        "history_crypto_prices",
        {"coin_id": "bitcoin", "since": "2024-01-01T00:00:00Z", "limit": 0},
        "limit",
    ),
    ("history_crypto_prices", {"coin_id": "bitcoin", "since": "2024-01-01T00:00:00"}, "timezone"),
    ("history_crypto_prices", {"coin_id": "bitcoin", "since": "yesterday"}, "since"),
    ("history_crypto_ohlcv", {"coin_id": "bitcoin", "since": "2024-01-01T00:00:00Z"}, "timeframe"),
    ("search_coins", {"query": ""}, "query"),
    ("latest_crypto_prices", {"coin_id": []}, "coin_id"),
    ("latest_crypto_prices", {"coin_id": ["bit\x00coin"]}, "coin_id"),
    ("no_such_tool", {}, "no_such_tool"),
]


async def check_refusals(client: Client, stocked: str) -> None:
    """Each bad argument is a tool error naming the problem; nothing changes, the server stays."""
    before = await fetch(stocked, "SELECT count(*) AS n FROM crypto_prices")
    for name, arguments, reason in BAD_CALLS:
        result: CallToolResult = await client.call_tool(name, arguments)
        assert result.is_error, (name, arguments, result.structured_content)
        text = " ".join(getattr(block, "text", "") for block in result.content)
        assert reason in text, (name, arguments, text)
        assert "\n" not in text or "validation error" in text  # the SDK's own multi-line report
    status = await client.call_tool("pipeline_status", {})
    assert not status.is_error
    assert await fetch(stocked, "SELECT count(*) AS n FROM crypto_prices") == before


TOKEN = "test-token-" + "x" * 20
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "0"},
    },
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream"}


async def started(worker: Worker) -> Worker:
    async def healthy() -> bool | None:
        try:
            return (await worker.health()).code == 200 or None
        except httpx.TransportError:
            return None

    await eventually(healthy, worker, "a healthy worker")
    return worker


@pytest.mark.slow
async def test_http_on_the_workers_port_with_a_token(
    stocked: str, workers: Callable[..., Worker]
) -> None:
    worker = await started(workers(stocked, {"MCP_TOKEN": TOKEN}))
    url = f"{worker.url}/mcp"
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=TIMEOUT) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        await check_answers(client, stocked)
        await check_refusals(client, stocked)

    async with httpx.AsyncClient(timeout=10) as plain:
        for headers in ({}, {"Authorization": "Bearer wrong-token-of-some-length"}):
            refused = await plain.post(url, json=INITIALIZE, headers={**MCP_HEADERS, **headers})
            assert refused.status_code == 401, refused.text
            assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        authorized = {**MCP_HEADERS, "Authorization": f"Bearer {TOKEN}"}
        # DNS rebinding: a page on another name that resolves to this host is refused.
        rebound = await plain.post(
            url, json=INITIALIZE, headers={**authorized, "Host": "evil.test"}
        )
        assert rebound.status_code == 421, rebound.text
        foreign = {**authorized, "Origin": "http://evil.test"}
        assert (await plain.post(url, json=INITIALIZE, headers=foreign)).status_code == 403
        accepted = await plain.post(url, json=INITIALIZE, headers=authorized)
        assert accepted.status_code == 200, accepted.text
    worker.assert_alive()


def test_a_token_is_required_beyond_loopback(
    environ: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        environ.setenv("WEB_HOST", host)
        assert load_settings().mcp_token is None
    environ.setenv("WEB_HOST", "0.0.0.0")
    with pytest.raises(SystemExit) as exited:
        load_settings()
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "qicore: invalid setting MCP_TOKEN: is required: the web server listens on 0.0.0.0, "
        "beyond loopback, and serves MCP at /mcp (set MCP_TOKEN, or MCP_HTTP_ENABLED=false)\n"
    )
    environ.setenv("WEB_HOST", "127.0.0.1")
    environ.setenv("PORT", "5000")  # Heroku: 0.0.0.0 whatever WEB_HOST says
    with pytest.raises(SystemExit):
        load_settings()
    environ.setenv("MCP_TOKEN", "too-short")
    with pytest.raises(SystemExit):
        load_settings()
    assert "at least 16 characters" in capsys.readouterr().err
    environ.setenv("MCP_TOKEN", TOKEN)
    assert load_settings().public_view()["mcp_token"] == "***"
    environ.delenv("MCP_TOKEN")
    environ.setenv("MCP_HTTP_ENABLED", "false")
    assert load_settings().mcp_token is None
    environ.setenv("MCP_WRITE_ENABLED", "true")  # stdio alone: no token needed
    assert load_settings().mcp_write_enabled
    environ.delenv("PORT")
    environ.delenv("MCP_HTTP_ENABLED")  # the write tool on /mcp: never without a token
    with pytest.raises(SystemExit):
        load_settings()
    assert "MCP_WRITE_ENABLED: needs MCP_TOKEN" in capsys.readouterr().err


async def test_stored_rows_are_notified_at_commit_once_per_new_batch(migrated: str) -> None:
    """pg_notify inside the write transaction: a notice per batch that stored rows, naming its
    coins, delivered at commit; nothing for a replayed batch or a rolled-back one."""
    listener = await asyncpg.connect(migrated)
    notices: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await listener.add_listener(
        STORED_CHANNEL, lambda *args: notices.put_nowait(json.loads(args[-1]))
    )
    pool = await create_pool(migrated)
    writer = RecordWriter(CryptoPriceData)
    try:
        first = [price("bitcoin", "btc", "1.5", T1), price("aave", "aave", "2", T1)]
        await writer.write(pool, first)
        async with asyncio.timeout(TIMEOUT):
            notice = await notices.get()
        assert notice == {"table": "crypto_prices", "keys": ["aave", "bitcoin"]}
        await writer.write(pool, first)  # a replay stores nothing
        async with pool.acquire() as connection:
            transaction = connection.transaction()
            await transaction.start()
            await writer.insert(connection, [price("rolled-back", "rb", "3", T1)])
            await transaction.rollback()
        await writer.write(pool, [price("ethereum", "eth", "3", T1)])
        async with asyncio.timeout(TIMEOUT):  # the next notice: none came in between
            notice = await notices.get()
        assert notice == {"table": "crypto_prices", "keys": ["ethereum"]}
        many = [price(f"coin-{'x' * 200}-{i}", "c", "1", T1) for i in range(100)]
        chunks = writer.notices([writer.row(record) for record in many])
        assert len(chunks) > 1
        assert all(len(chunk.encode()) <= NOTIFY_PAYLOAD_BYTES for chunk in chunks)
        sent = [key for chunk in chunks for key in json.loads(chunk)["keys"]]
        assert sent == sorted(p.coin_id for p in many)
    finally:
        await pool.close()
        await listener.close()


async def wait_for_updates(subscription: Subscription, uris: set[str]) -> None:
    """Until every one of `uris` has been reported updated."""
    waiting = set(uris)
    with anyio.fail_after(TIMEOUT):
        async for event in subscription:
            if isinstance(event, ResourceUpdated):
                waiting.discard(event.uri)
            if not waiting:
                return
    raise AssertionError(f"the subscription ended before {waiting} were updated")


@pytest.mark.slow
async def test_subscribed_clients_are_told_when_a_price_is_stored(
    stocked: str, workers: Callable[..., Worker], kafka: Kafka, bare_env: dict[str, str]
) -> None:
    worker = await started(workers(stocked, {"MCP_TOKEN": TOKEN}))
    uri = "prices://solana"
    new = price("solana", "sol", "142.000000000000000000000000000001", NOW)
    async with (
        Client(stdio_server(stocked, bare_env)) as local,
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=TIMEOUT) as http,
        Client(streamable_http_client(f"{worker.url}/mcp", http_client=http)) as remote,
        local.listen(resource_subscriptions=[uri, "prices://latest"]) as over_stdio,
        remote.listen(resource_subscriptions=[uri]) as over_http,
    ):
        with pytest.raises(MCPError, match="unknown coin_id 'solana'"):
            await local.read_resource(uri)  # not stored yet
        await kafka.send_records([new])
        await wait_for_updates(over_stdio, {uri, "prices://latest"})
        await wait_for_updates(over_http, {uri})
        # Notified at commit: the row is there by the time the client hears of it.
        stored = await fetch(stocked, "SELECT * FROM crypto_prices WHERE coin_id = 'solana'")
        assert [row["usd_price"] for row in stored] == [new.usd_price]
        for client in (local, remote):
            read = await client.read_resource(uri)
            content = read.contents[0]
            assert isinstance(content, TextResourceContents)
            assert json.loads(content.text) == plain_json(new)
        latest = (await local.read_resource("prices://latest")).contents[0]
        assert isinstance(latest, TextResourceContents)
        assert json.loads(latest.text)["prices"]["solana"]["usd_price"] == str(new.usd_price)


@pytest.mark.slow
async def test_the_write_tool_publishes_a_price_that_the_sink_stores_once(
    stocked: str, workers: Callable[..., Worker], kafka: Kafka, bare_env: dict[str, str]
) -> None:
    worker = await started(workers(stocked, {"MCP_TOKEN": TOKEN, "MCP_WRITE_ENABLED": "true"}))
    fields = {
        "coin_id": "written-coin",
        "symbol": "wc",
        "name": "Written Coin",
        "usd_price": "0.000000000000000000000000000000000001",
        "market_cap": "123456789012345678901234567890",
        "last_updated": "2024-06-01T12:00:00.123456+02:00",
    }
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=TIMEOUT) as http,
        Client(streamable_http_client(f"{worker.url}/mcp", http_client=http)) as client,
    ):
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert tools["store_price"].annotations is not None
        assert tools["store_price"].annotations.read_only_hint is False
        for bad, reason in (
            ({**fields, "usd_price": 1.5}, "not a float"),
            ({**fields, "usd_price": "-1"}, "must not be negative"),
            ({**fields, "last_updated": "2024-06-01T12:00:00"}, "timezone"),
            ({**fields, "coin_id": ""}, "coin_id"),
        ):
            refused = await client.call_tool("store_price", bad)
            assert refused.is_error
            assert reason in " ".join(getattr(block, "text", "") for block in refused.content)
        answer = await call(client, tools, "store_price", **fields)
    expected = CryptoPriceData.model_validate(fields)
    assert answer["record"] == plain_json(expected)

    async def landed() -> list[dict[str, Any]] | None:
        rows = await fetch(stocked, "SELECT * FROM crypto_prices WHERE coin_id = 'written-coin'")
        return rows or None

    rows = await eventually(landed, worker, "the written price in crypto_prices")
    assert rows == [expected.model_dump()]

    # On stdio too, with its own producer (the setting without a token: HTTP is off there).
    local_env = {**bare_env, "MCP_WRITE_ENABLED": "true", "MCP_HTTP_ENABLED": "false"}
    local_env["BROKER_URL"] = worker.env["BROKER_URL"]
    from_stdio = {**fields, "coin_id": "written-on-stdio"}
    async with Client(stdio_server(stocked, local_env)) as local:
        local_tools = {tool.name: tool for tool in (await local.list_tools()).tools}
        await call(local, local_tools, "store_price", **from_stdio)

    async def landed_too() -> list[dict[str, Any]] | None:
        sql = "SELECT * FROM crypto_prices WHERE coin_id = 'written-on-stdio'"
        return await fetch(stocked, sql) or None

    rows = await eventually(landed_too, worker, "the price written on stdio")
    assert rows == [CryptoPriceData.model_validate(from_stdio).model_dump()]
    keys = [m[2] or b"" for m in await kafka.read_all(CryptoPriceData.topic.name)]
    assert sorted(keys) == [b"written-coin", b"written-on-stdio"]  # one message each
