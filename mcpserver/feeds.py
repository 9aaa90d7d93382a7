"""Live price feeds: MCP resources `prices://latest` and `prices://{coin_id}`, and the relay that
tells subscribed clients when a new price has been stored.

The sink's write transaction calls `pg_notify` (store/writer.py), so PostgreSQL delivers a
notice to every listening connection exactly when the rows commit, whichever process stored
them. Each MCP server process (the stdio one and every worker's `/mcp`) holds one LISTEN
connection and turns each notice into `ResourceUpdated` events on its subscription bus, which
the SDK's `subscriptions/listen` streams deliver to the clients that asked for those URIs.
A lost connection is reopened; notices sent meanwhile are lost (PostgreSQL does not queue them
for a listener that is gone), so a client that needs every change should also re-read.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import anyio
import asyncpg
from anyio.abc import TaskStatus
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError
from mcp.server.subscriptions import ResourceUpdated, SubscriptionBus

from mcpserver.tools import reading
from models.codec import plain_json
from models.market import AGGREGATE_EXCHANGE, CryptoPriceData
from store import queries
from store.db import LazyPool, connect
from store.writer import STORED_CHANNEL

log = logging.getLogger(__name__)

LATEST_URI = "prices://latest"
COIN_URI = "prices://{coin_id}"
AGGREGATE = {"exchange_id": AGGREGATE_EXCHANGE}
PING_SECONDS = 30.0  # a quiet LISTEN connection is checked this often
LISTEN_CONNECT_SECONDS = 5.0
RECONNECT_MAX_SECONDS = 30.0


def add_price_feeds(server: MCPServer, database: LazyPool) -> None:
    """Register the two price resources on `server`, read through `store.queries`."""

    @server.resource(
        LATEST_URI,
        name="latest_prices",
        mime_type="application/json",
        description="The latest aggregate price of every tracked coin, keyed by coin id. "
        "Subscribe to be told when a new price is stored.",
    )
    async def latest_prices() -> str:
        async with reading(database, ResourceError) as db:
            rows = await queries.latest_per_group(db, CryptoPriceData, "coin_id", AGGREGATE)
        return json.dumps({"count": len(rows), "prices": {r.coin_id: plain_json(r) for r in rows}})

    @server.resource(
        COIN_URI,
        name="coin_price",
        mime_type="application/json",
        description="One coin's latest aggregate price (by CoinGecko id, e.g. prices://bitcoin). "
        "Subscribe to be told when a new price for it is stored.",
    )
    async def coin_price(coin_id: str) -> str:
        async with reading(database, ResourceError) as db:
            row = await queries.latest(db, CryptoPriceData, {"coin_id": coin_id, **AGGREGATE})
        if row is None:
            raise ResourceError(f"unknown coin_id {coin_id!r}")
        return json.dumps(plain_json(row))


def updated_uris(payload: str) -> list[str]:
    """The resources a stored-rows notice changes: the latest prices and each stored coin's."""
    notice: dict[str, Any] = json.loads(payload)
    if notice.get("table") != CryptoPriceData.table.name:
        return []
    return [LATEST_URI, *(COIN_URI.format(coin_id=key) for key in notice["keys"])]


async def relay_stored_prices(
    dsn: str, bus: SubscriptionBus, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Forever: LISTEN for stored rows and publish the changed resources on `bus`. Reports
    started (`task_status`) once listening, so a server started after it misses no notice;
    or after a first failure, so a database that is down does not hold the server back."""
    reported = False

    def report() -> None:
        nonlocal reported
        if not reported:
            reported = True
            task_status.started()

    failures = 0
    while True:
        try:
            await _listen(dsn, bus, report)
            failures = 0
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            failures += 1
            log.warning("mcp feeds: LISTEN connection lost (%s)", type(error).__name__)
            report()
        await asyncio.sleep(min(2.0**failures, RECONNECT_MAX_SECONDS))


async def _listen(dsn: str, bus: SubscriptionBus, listening: Callable[[], None]) -> None:
    """One LISTEN connection, until it is lost; `listening` is called once it listens."""

    async def relay(connection: object, pid: int, channel: str, payload: str) -> None:
        try:
            uris = updated_uris(payload)
        except (ValueError, KeyError, TypeError):
            log.warning("mcp feeds: unreadable notice on %s", channel)
            return
        for uri in uris:
            await bus.publish(ResourceUpdated(uri=uri))

    # A short connect: the stdio server answers only once it listens (or has failed to).
    connection = await connect(dsn, timeout=LISTEN_CONNECT_SECONDS)
    try:
        await connection.add_listener(STORED_CHANNEL, relay)
        listening()
        while not connection.is_closed():
            await asyncio.sleep(PING_SECONDS)
            await connection.fetchval("SELECT 1", timeout=PING_SECONDS)
    finally:
        await connection.close(timeout=5)
