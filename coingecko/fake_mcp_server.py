"""A local MCP server that answers like CoinGecko's, for tests and offline runs (`mcp` SDK).

Like the official server, it is a front for CoinGecko's REST API: each tool call is one GET to
`--upstream` (the fake of `coingecko.fake_server`, whose data, faults and request log tests
control), answered with the body in a text block, or, for an HTTP error, as a tool error whose
text is the status and the body (`429 {"status":{...}}`). The key arrives as the official server
takes it (`x-cg-demo-api-key`/`x-cg-pro-api-key` headers over HTTP, `COINGECKO_DEMO_API_KEY`/
`COINGECKO_PRO_API_KEY` over stdio) and goes upstream in the plan's header.

`--js-numbers` passes every body through JavaScript's number handling, as the official server
(JavaScript) does: integers beyond 2^53 rounded, decimals in JS's shortest form (`6.31917e-7`).

`--tools` picks one of the official server's three shapes: `endpoints` (one tool per endpoint:
`get_coins_markets`, `get_global`, `get_coins_ohlc`, `get_simple_price`), `dynamic`
(`list_api_endpoints`, `invoke_api_endpoint`) or `code` (`search_docs`, `execute`: nothing the
poller can use); `--tool NAME` (repeatable) keeps only those, as the official server's
`--tool` filter does.

    python -m coingecko.fake_mcp_server                          # stdio, its own offline fake
    python -m coingecko.fake_mcp_server --upstream URL           # stdio, in front of URL
    python -m coingecko.fake_mcp_server --http --port 0 [...]    # Streamable HTTP; prints its URL
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator, Mapping
from decimal import Decimal
from typing import Any, Literal

import httpx
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import CallToolResult, TextContent

from coingecko.client import KEY_HEADERS
from coingecko.fake_server import RawNumber, dump_raw, serve_offline_coingecko

ToolSet = Literal["endpoints", "dynamic", "code"]
PATHS = {  # the official server's endpoint names, and the REST path each one calls
    "get_coins_markets": "/coins/markets",
    "get_global": "/global",
    "get_coins_ohlc": "/coins/{id}/ohlc",
    "get_simple_price": "/simple/price",
}
TOOL_SETS: dict[ToolSet, tuple[str, ...]] = {
    "endpoints": tuple(PATHS),
    "dynamic": ("list_api_endpoints", "invoke_api_endpoint"),
    "code": ("search_docs", "execute"),
}
KEY_VARIABLES = {
    "COINGECKO_DEMO_API_KEY": "x-cg-demo-api-key",
    "COINGECKO_PRO_API_KEY": "x-cg-pro-api-key",
}


class Upstream:
    """GETs against the CoinGecko-shaped REST API, answered as CoinGecko's MCP server does."""

    def __init__(self, base_url: str, js_numbers: bool = False) -> None:
        self.base_url = base_url
        self.js_numbers = js_numbers
        self._http = httpx.AsyncClient(timeout=30.0)
        # stdio: the key comes from the environment, once; HTTP: from each request's headers
        self._env_headers = {
            header: os.environ[variable]
            for variable, header in KEY_VARIABLES.items()
            if os.environ.get(variable)
        }

    async def call(self, ctx: Context, endpoint: str, args: Mapping[str, Any]) -> CallToolResult:
        if endpoint not in PATHS:
            return _error(f"Endpoint {endpoint} not found")
        query = {name: _query_value(value) for name, value in args.items() if value is not None}
        try:
            path = PATHS[endpoint].format_map(query)
        except KeyError as missing:
            return _error(f"Missing required parameter {missing}")
        query.pop("id", None)
        headers = dict(self._env_headers)
        sent = ctx.headers or {}
        headers.update((name, sent[name]) for name in KEY_HEADERS.values() if name in sent)
        try:
            response = await self._http.get(self.base_url + path, params=query, headers=headers)
        except httpx.HTTPError:
            return _error("Connection error.")
        if response.status_code != 200:
            return _error(f"{response.status_code} {response.text}")
        text = response.text
        if self.js_numbers:
            try:
                text = dump_raw(_as_javascript_reads_it(json.loads(text)))
            except ValueError:
                pass  # not JSON: JavaScript would not have read it either; passed on as is
        return CallToolResult(content=[TextContent(type="text", text=text)])

    async def aclose(self) -> None:
        await self._http.aclose()


def _as_javascript_reads_it(value: Any) -> Any:
    """Every number as a JavaScript double, printed back as JavaScript prints it."""
    if isinstance(value, dict):
        return {key: _as_javascript_reads_it(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_as_javascript_reads_it(item) for item in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return RawNumber(js_number(float(value)))
    return value


def js_number(number: float) -> str:
    """JavaScript's `String(number)`: shortest round-trip digits; plain notation from 1e-7 up
    to 1e21, exponent notation (`6.31917e-7`, `1e+21`) outside."""
    if number == 0:
        return "0"  # -0 too
    sign, digit_tuple, exponent = Decimal(repr(number)).normalize().as_tuple()
    assert isinstance(exponent, int)  # finite: JSON has no NaN or Infinity
    digits = "".join(map(str, digit_tuple))
    point = exponent + len(digits)  # the value is 0.DIGITS x 10^point
    if len(digits) <= point <= 21:  # an integer: its shortest digits, then zeros
        text = digits + "0" * (point - len(digits))
    elif 0 < point <= 21:
        text = digits[:point] + "." + digits[point:]
    elif -6 < point <= 0:
        text = "0." + "0" * -point + digits
    else:
        shown = point - 1
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        text = f"{mantissa}e{'+' if shown > 0 else '-'}{abs(shown)}"
    return ("-" if sign else "") + text


def _query_value(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _error(text: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)], is_error=True)


def build_server(
    upstream: Upstream, tools: ToolSet = "endpoints", only: list[str] | None = None
) -> MCPServer:
    server = MCPServer(
        "fake-coingecko-mcp", instructions="CoinGecko's API v3 (local fake).", log_level="WARNING"
    )
    if tools == "endpoints":
        _add_endpoint_tools(server, upstream)
    elif tools == "dynamic":
        _add_dynamic_tools(server, upstream)
    else:
        _add_code_mode_tools(server)
    for name in TOOL_SETS[tools]:
        if only and name not in only:
            server.remove_tool(name)
    return server


def _add_endpoint_tools(server: MCPServer, upstream: Upstream) -> None:
    @server.tool()
    async def get_coins_markets(
        ctx: Context,
        vs_currency: str,
        ids: str | None = None,
        order: str | None = None,
        per_page: int | None = None,
        page: int | None = None,
        price_change_percentage: str | None = None,
    ) -> CallToolResult:
        """Coins' prices, market caps and volumes (/coins/markets)."""
        args = {"vs_currency": vs_currency, "ids": ids, "order": order, "per_page": per_page}
        args.update(page=page, price_change_percentage=price_change_percentage)
        return await upstream.call(ctx, "get_coins_markets", args)

    @server.tool()
    async def get_global(ctx: Context) -> CallToolResult:
        """Global cryptocurrency market data (/global)."""
        return await upstream.call(ctx, "get_global", {})

    @server.tool()
    async def get_coins_ohlc(ctx: Context, id: str, vs_currency: str, days: str) -> CallToolResult:
        """A coin's OHLC candles (/coins/{id}/ohlc); `days` is a string, as CoinGecko's schema."""
        args = {"id": id, "vs_currency": vs_currency, "days": days}
        return await upstream.call(ctx, "get_coins_ohlc", args)

    @server.tool()
    async def get_simple_price(
        ctx: Context,
        ids: str,
        vs_currencies: str,
        include_last_updated_at: bool | None = None,
    ) -> CallToolResult:
        """Coins' prices in other currencies (/simple/price)."""
        args = {"ids": ids, "vs_currencies": vs_currencies}
        return await upstream.call(
            ctx, "get_simple_price", {**args, "include_last_updated_at": include_last_updated_at}
        )


def _add_dynamic_tools(server: MCPServer, upstream: Upstream) -> None:
    @server.tool()
    async def list_api_endpoints() -> str:
        """The endpoints invoke_api_endpoint can call."""
        return json.dumps(sorted(PATHS))

    @server.tool()
    async def invoke_api_endpoint(
        ctx: Context, endpoint_name: str, args: dict[str, Any]
    ) -> CallToolResult:
        """Call any endpoint by name with its arguments."""
        return await upstream.call(ctx, endpoint_name, args)


def _add_code_mode_tools(server: MCPServer) -> None:
    @server.tool()
    async def search_docs(query: str) -> str:
        """Search CoinGecko's API documentation."""
        return "[]"

    @server.tool()
    async def execute(code: str) -> CallToolResult:
        """Run a TypeScript snippet against the SDK (not in this fake)."""
        return _error("code mode is not available in the local fake")


@contextlib.asynccontextmanager
async def _upstream(base_url: str | None, tick: int, js_numbers: bool) -> AsyncIterator[Upstream]:
    """`base_url`, or the offline fake started on this event loop."""
    if base_url is None:
        async with serve_offline_coingecko(tick=tick) as fake:
            async with _upstream(fake.base_url, tick, js_numbers) as upstream:
                yield upstream
        return
    upstream = Upstream(base_url, js_numbers)
    try:
        yield upstream
    finally:
        await upstream.aclose()


async def _serve_http(server: MCPServer, host: str, port: int) -> None:
    """Streamable HTTP at /mcp on a socket bound first, so port 0 works and the URL is exact."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    app = server.streamable_http_app(host=host)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    print(f"fake CoinGecko MCP serving http://{host}:{bound}/mcp", flush=True)
    await uvicorn.Server(config).serve(sockets=[sock])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", help="CoinGecko-shaped base URL (default: offline fake)")
    parser.add_argument("--tools", choices=["endpoints", "dynamic", "code"], default="endpoints")
    parser.add_argument("--tool", action="append", help="serve only this tool (repeatable)")
    parser.add_argument("--js-numbers", action="store_true", help="numbers as JavaScript's")
    parser.add_argument("--http", action="store_true", help="Streamable HTTP instead of stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--tick", type=int, default=60, help="offline fake: seconds per snapshot")
    args = parser.parse_args()

    async def serve() -> None:
        async with _upstream(args.upstream, args.tick, args.js_numbers) as upstream:
            server = build_server(upstream, args.tools, args.tool)
            if args.http:
                await _serve_http(server, args.host, args.port)
            else:
                await server.run_stdio_async()

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how it is meant to stop
        asyncio.run(serve())


if __name__ == "__main__":
    main()
