"""The MCP server: the read tools of `mcpserver.tools` on the official SDK's `MCPServer`.

`faust -A app mcp` serves it on stdin/stdout for desktop assistants. It needs only the database:
it starts no Faust worker, joins no consumer group and opens no broker connection (unless
MCP_WRITE_ENABLED, whose write tool publishes to the broker).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager

import anyio
from aiokafka import AIOKafkaProducer
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth, server_list
from mcp.server.mcpserver import MCPServer
from mcp.server.subscriptions import InMemorySubscriptionBus, SubscriptionBus
from yarl import URL

from app.settings import Settings
from mcpserver.feeds import add_price_feeds, relay_stored_prices
from mcpserver.tools import Publish, publish_tool, read_tools
from models.codec import encode_record
from models.dsl import StreamRecord
from models.market import COINGECKO_ATTRIBUTION, CryptoPriceData
from store.db import LazyPool

NAME = "qicore-streams"
DEFAULT_BROKER_PORT = 9092
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
    with _root_logging_kept():
        server = MCPServer(NAME, instructions=INSTRUCTIONS, tools=tools, subscriptions=bus)
    add_price_feeds(server, database)
    return server


@contextmanager
def _root_logging_kept() -> Iterator[None]:
    """`MCPServer()` calls `logging.basicConfig` (the SDK's `configure_logging`): built at import
    by the web process, it would print every INFO line of every `faust -A app` command, such as
    `up`'s and `migrate`'s, whose failures are one line. The app's logging stays Faust's."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@asynccontextmanager
async def broker_publisher(settings: Settings) -> AsyncIterator[Publish]:
    """For the write tool on stdio, where no Faust worker runs: a producer of its own, with the
    app's broker URL and credentials, waiting for every acknowledgement."""
    from app.main import broker_credentials

    urls = [URL(url) for url in settings.broker_url.split(";")]
    producer = AIOKafkaProducer(
        bootstrap_servers=server_list(urls, DEFAULT_BROKER_PORT),
        acks="all",
        **credentials_to_aiokafka_auth(broker_credentials(settings)),
    )
    await producer.start()

    async def publish(record: StreamRecord) -> None:
        await producer.send_and_wait(record.topic.name, encode_record(record), key=record.key())

    try:
        yield publish
    finally:
        await producer.stop()


async def serve_stdio(settings: Settings) -> None:
    """Serve on stdin/stdout until the client closes them, relaying stored-price notices. The
    broker is reached only with MCP_WRITE_ENABLED, for the write tool."""
    database = LazyPool(settings.database_dsn, settings.database_pool_size, reads=True)
    bus = InMemorySubscriptionBus()
    try:
        async with AsyncExitStack() as stack:
            publish = None
            if settings.mcp_write_enabled:
                publish = await stack.enter_async_context(broker_publisher(settings))
            tasks = await stack.enter_async_context(anyio.create_task_group())
            await tasks.start(relay_stored_prices, settings.database_dsn, bus)
            await build_server(database, settings, bus, publish).run_stdio_async()
            tasks.cancel_scope.cancel()
    finally:
        await database.close()
