"""The MCP server: the read tools of `mcpserver.tools` on the official SDK's `MCPServer`.

`faust -A app mcp` serves it on stdin/stdout for desktop assistants. It needs only the database:
it starts no Faust worker, joins no consumer group and opens no broker connection.
"""

from __future__ import annotations

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.subscriptions import InMemorySubscriptionBus, SubscriptionBus

from app.settings import Settings
from mcpserver.feeds import add_price_feeds, relay_stored_prices
from mcpserver.tools import Publish, publish_tool, read_tools
from models.market import COINGECKO_ATTRIBUTION, CryptoPriceData
from store.db import LazyPool

NAME = "qicore-streams"
INSTRUCTIONS = (
    "Crypto market data stored by the QiCore Streams pipeline: latest prices with their 24 h "
    "range, price history, candles, CoinGecko OHLC candles, market analytics, the tracked coins "
    "and the pipeline's status. Coins are named by CoinGecko id (e.g. 'bitcoin'); symbols are "
    "not unique. Decimals are exact strings, times RFC 3339 (UTC). " + COINGECKO_ATTRIBUTION + "."
)


def build_server(
    database: LazyPool, settings: Settings, bus: SubscriptionBus, publish: Publish | None = None
) -> MCPServer:
    """The tools and the price feeds; `bus` carries the feeds' change events to subscribers
    (`relay_stored_prices` fills it). With `publish`, also the write tool `store_price`."""
    tools = read_tools(database, settings.app_id)
    if publish is not None:
        tools.append(publish_tool(CryptoPriceData, "store_price", publish))
    server = MCPServer(NAME, instructions=INSTRUCTIONS, tools=tools, subscriptions=bus)
    add_price_feeds(server, database)
    return server


async def serve_stdio(settings: Settings) -> None:
    """Serve on stdin/stdout until the client closes them, relaying stored-price notices."""
    database = LazyPool(settings.database_dsn, settings.database_pool_size, reads=True)
    bus = InMemorySubscriptionBus()
    try:
        async with anyio.create_task_group() as tasks:
            await tasks.start(relay_stored_prices, settings.database_dsn, bus)
            await build_server(database, settings, bus).run_stdio_async()
            tasks.cancel_scope.cancel()
    finally:
        await database.close()
