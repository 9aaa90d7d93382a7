"""The MCP server: the read tools of `mcpserver.tools` on the official SDK's `MCPServer`.

`faust -A app mcp` serves it on stdin/stdout for desktop assistants. It needs only the database:
it starts no Faust worker, joins no consumer group and opens no broker connection.
"""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer

from app.settings import Settings
from mcpserver.tools import read_tools
from models.market import COINGECKO_ATTRIBUTION
from store.db import LazyPool

NAME = "qicore-streams"
INSTRUCTIONS = (
    "Crypto market data stored by the QiCore Streams pipeline: latest prices with their 24 h "
    "range, price history, candles, CoinGecko OHLC candles, market analytics, the tracked coins "
    "and the pipeline's status. Coins are named by CoinGecko id (e.g. 'bitcoin'); symbols are "
    "not unique. Decimals are exact strings, times RFC 3339 (UTC). " + COINGECKO_ATTRIBUTION + "."
)


def build_server(database: LazyPool, settings: Settings) -> MCPServer:
    return MCPServer(NAME, instructions=INSTRUCTIONS, tools=read_tools(database, settings.app_id))


async def serve_stdio(settings: Settings) -> None:
    """Serve on stdin/stdout until the client closes them."""
    database = LazyPool(settings.database_dsn, settings.database_pool_size, reads=True)
    try:
        await build_server(database, settings).run_stdio_async()
    finally:
        await database.close()
