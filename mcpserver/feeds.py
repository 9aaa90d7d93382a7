"""Live price feeds: MCP resources `prices://latest` and `prices://{coin_id}`, and the relay that
tells subscribed clients when a new price has been stored.

The sink's write transaction calls `pg_notify` (store/writer.py), so PostgreSQL delivers a
notice to every listening connection exactly when the rows commit, whichever process stored
them. Each MCP server process (the stdio one and every worker's `/mcp`) holds one LISTEN
connection and turns each notice into `ResourceUpdated` events on its subscription bus, which
the SDK's `subscriptions/listen` streams deliver to the clients that asked for those URIs.
The LISTEN connection is `store.notices.StoredRelay`, the one every feed of a process shares
(the worker's `/mcp` and `/stream/prices`; the stdio server has its own). A lost connection is
reopened; notices sent meanwhile are lost (PostgreSQL does not queue them for a listener that is
gone), so `prices://latest` is announced as changed then, and a client that needs every change
should also re-read.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError
from mcp.server.subscriptions import ResourceUpdated, SubscriptionBus

from mcpserver.tools import reading
from models.codec import plain_json
from models.market import AGGREGATE_EXCHANGE, CryptoPriceData
from store import queries
from store.db import LazyPool
from store.notices import StoredNotice, StoredRelay

LATEST_URI = "prices://latest"
COIN_URI = "prices://{coin_id}"
AGGREGATE = {"exchange_id": AGGREGATE_EXCHANGE}


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


def updated_uris(notice: StoredNotice) -> list[str]:
    """The resources a stored-rows notice changes: the latest prices and each stored coin's."""
    if notice.table != CryptoPriceData.table.name:
        return []
    return [LATEST_URI, *(COIN_URI.format(coin_id=key) for key in notice.keys)]


def follow_stored_prices(relay: StoredRelay, bus: SubscriptionBus) -> Callable[[], None]:
    """Publish the resources each of `relay`'s notices changes on `bus`; returns the
    unsubscribe call. After a lost connection every coin may have changed: `prices://latest`
    is published (a client re-reads it)."""

    async def publish(notice: StoredNotice | None) -> None:
        for uri in [LATEST_URI] if notice is None else updated_uris(notice):
            await bus.publish(ResourceUpdated(uri=uri))

    return relay.subscribe(publish)


async def relay_stored_prices(
    dsn: str, bus: SubscriptionBus, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Forever: a relay of this process's own (the stdio server) feeding `bus`. Reports started
    (`task_status`) once listening or after a first failure (`StoredRelay.run`)."""
    relay = StoredRelay(dsn)
    follow_stored_prices(relay, bus)
    await relay.run(task_status.started)
