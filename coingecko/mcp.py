"""CoinGecko through its MCP server: a `Transport` for `CoinGeckoClient` (COINGECKO_SOURCE=mcp).

The official server (`@coingecko/coingecko-mcp`) is generated from CoinGecko's API and exposes it
as one tool per endpoint (`get_coins_markets`, `get_global`, `get_coins_ohlc`, `get_simple_price`,
the path parameter as `id`), or as dynamic tools (`invoke_api_endpoint` with `endpoint_name` and
`args`), or, by default in recent releases, as "code mode" only (`search_docs`, `execute`), which
cannot be used here. Which ones a server offers is learnt from its tool list at connection; a
server with none of the poller's endpoints fails `start()` with one line naming the tools it has.

A tool's result is the endpoint's JSON in a text block, handed to the client as an HTTP 200 body
(so it is parsed exactly, as `Decimal`s); a tool error (`isError`) carries the HTTP status and
CoinGecko's error body in its text ("429 {...}"), handed on as that status. The client's limiter,
backoff and refusals then apply unchanged. Fidelity: the official server is JavaScript and has
already read every number as a double, so integers beyond 2^53 arrive rounded; REST is exact.

Transports: an http(s) COINGECKO_MCP_URL is Streamable HTTP, with the key in the plan's header;
COINGECKO_MCP_COMMAND starts a stdio server, with the key in the env vars the official server
reads; COINGECKO_MCP_URL=offline starts the bundled `coingecko.fake_mcp_server` over stdio.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx2
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, TextContent, Tool

from coingecko.client import KEY_HEADERS, Answer, CoinGeckoUnusable, TransportFailed
from common.redaction import redact, redact_url

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger(__name__)

DYNAMIC_TOOL = "invoke_api_endpoint"  # the official server's dynamic mode: endpoint_name + args
# The SDK's defaults for its HTTP transport (30 s; 300 s to read, for a held event stream).
SDK_HTTP_TIMEOUT = httpx2.Timeout(30.0, read=300.0)
CONNECT_SECONDS = 60.0  # spawning a stdio server or the HTTP handshake, then listing the tools
KEY_VARIABLES = {"demo": "COINGECKO_DEMO_API_KEY", "pro": "COINGECKO_PRO_API_KEY"}
# A tool error's text: CoinGecko's HTTP status, then its error body ("404 {"error":...}").
TOOL_ERROR_STATUS = re.compile(
    r"\s*(?:error:?\s*)?([1-5]\d\d)\b[\s:]*(.*)", re.IGNORECASE | re.DOTALL
)


@dataclass(frozen=True)
class Endpoint:
    """A REST path the poller asks for, and the official server's name for it."""

    path: re.Pattern[str]  # named groups are the path parameters, passed as arguments
    tool: str


ENDPOINTS = (
    Endpoint(re.compile(r"/coins/markets"), "get_coins_markets"),
    Endpoint(re.compile(r"/global"), "get_global"),
    Endpoint(re.compile(r"/coins/(?P<id>[^/]+)/ohlc"), "get_coins_ohlc"),
    Endpoint(re.compile(r"/simple/price"), "get_simple_price"),
)


class McpTransport:
    """One MCP session, held open by a task of its own (the SDK's task groups must be entered
    and left by the same task) and opened again after it breaks."""

    def __init__(self, settings: Settings, secret: str | None) -> None:
        self.base_url = settings.coingecko_url  # the API the MCP server calls for us
        self.server = describe_server(settings)
        self._target = _target(settings, secret)
        self._timeout = settings.coingecko_timeout
        self._secret = secret  # only to keep it out of this module's own log line
        self._http_headers = (
            {KEY_HEADERS[settings.plan]: secret}
            if settings.plan in KEY_HEADERS and secret and isinstance(self._target, str)
            else {}
        )
        self._client: Client | None = None
        self._holder: asyncio.Task[None] | None = None
        self._tools: dict[str, Tool] = {}
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self._connected()

    async def aclose(self) -> None:
        await self._disconnect()

    async def request(self, path: str, params: Mapping[str, str | int] | None) -> Answer:
        client = await self._connected()
        name, arguments = self._call_for(path, dict(params or {}))
        if name is None:
            return _not_offered(path, self._tools)
        try:
            result = await client.call_tool(name, arguments, read_timeout_seconds=self._timeout)
        except MCPError as error:  # a JSON-RPC error answer: the session itself is fine
            raise TransportFailed(f"MCP {name}: error {error.code}: {error}") from error
        except Exception as error:  # timeouts and broken sessions: connect again next time
            await self._disconnect()
            raise TransportFailed(f"MCP {name} failed ({_why(error)})") from error
        return _answer(result)

    def _call_for(
        self, path: str, params: dict[str, str | int]
    ) -> tuple[str | None, dict[str, Any]]:
        """The tool and arguments that ask the server for `path`, or (None, {}) if none can."""
        for endpoint in ENDPOINTS:
            match = endpoint.path.fullmatch(path)
            if match is None:
                continue
            arguments: dict[str, Any] = {**_unquoted(match.groupdict()), **params}
            tool = self._tools.get(endpoint.tool)
            if tool is not None:
                return endpoint.tool, _typed(arguments, tool.input_schema)
            if DYNAMIC_TOOL in self._tools:
                return DYNAMIC_TOOL, {"endpoint_name": endpoint.tool, "args": arguments}
        return None, {}

    async def _connected(self) -> Client:
        async with self._lock:
            if self._client is None or self._holder is None or self._holder.done():
                ready: asyncio.Future[Client] = asyncio.get_running_loop().create_future()
                self._holder = asyncio.create_task(self._hold(ready), name="coingecko-mcp")
                try:
                    self._client = await asyncio.wait_for(ready, CONNECT_SECONDS)
                    self._tools = await _list_tools(self._client, self._timeout)
                except Exception as error:
                    await self._disconnect()
                    raise TransportFailed(
                        f"MCP server {self.server}: could not connect ({_why(error)})"
                    ) from error
                usable = [e.tool for e in ENDPOINTS if e.tool in self._tools]
                if not usable and DYNAMIC_TOOL not in self._tools:
                    found = ", ".join(sorted(self._tools)) or "none"
                    await self._disconnect()
                    raise CoinGeckoUnusable(
                        f"MCP server {self.server} has no CoinGecko tool the poller can use "
                        f"(needs {', '.join(e.tool for e in ENDPOINTS)} or {DYNAMIC_TOOL}); "
                        f"its tools: {found}"
                    )
                log.info(
                    "coingecko: MCP server %s, tools %s",
                    self.server,
                    ", ".join(usable) or f"{DYNAMIC_TOOL} (dynamic)",
                )
            return self._client

    async def _hold(self, ready: asyncio.Future[Client]) -> None:
        """Open the session, hand it over, and keep it open until cancelled."""
        try:
            async with contextlib.AsyncExitStack() as stack:
                if isinstance(self._target, str):
                    # Headers go on a client of our own, as the SDK documents for
                    # `streamable_http_client`, with the SDK's own default timeouts: its idle
                    # event stream must outlive COINGECKO_TIMEOUT, which bounds each tool call
                    # instead (read_timeout_seconds).
                    http = await stack.enter_async_context(
                        httpx2.AsyncClient(headers=self._http_headers, timeout=SDK_HTTP_TIMEOUT)
                    )
                    transport = streamable_http_client(self._target, http_client=http)
                    client = Client(transport, read_timeout_seconds=self._timeout)
                else:  # the child's stderr: the real one (Faust's sys.stderr has no fileno)
                    stdio = stdio_client(self._target, errlog=sys.__stderr__ or sys.stderr)
                    client = Client(stdio, read_timeout_seconds=self._timeout)
                ready.set_result(await stack.enter_async_context(client))
                await asyncio.Event().wait()  # until cancelled
        except Exception as error:
            if not ready.done():
                ready.set_exception(error)
            else:
                why = redact(_why(error), self._secret)
                log.warning("coingecko: MCP session to %s ended (%s)", self.server, why)

    async def _disconnect(self) -> None:
        holder, self._holder, self._client = self._holder, None, None
        if holder is not None and not holder.done():
            holder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holder


async def _list_tools(client: Client, timeout: float) -> dict[str, Tool]:
    tools: dict[str, Tool] = {}
    cursor: str | None = None
    while True:
        page = await asyncio.wait_for(client.list_tools(cursor=cursor), timeout)
        tools.update((tool.name, tool) for tool in page.tools)
        cursor = page.next_cursor
        if not cursor:
            return tools


def _why(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _answer(result: CallToolResult) -> Answer:
    """A tool result as the HTTP answer it stands for."""
    text = "".join(block.text for block in result.content if isinstance(block, TextContent))
    if not result.is_error:
        return Answer(200, text.encode(), "MCP text" if text else "MCP result without text")
    match = TOOL_ERROR_STATUS.fullmatch(text)
    if match is None:  # no status to judge it by: treat it as an outage, which is retried
        return Answer(502, text.encode(), "MCP tool error without an HTTP status")
    return Answer(int(match[1]), match[2].encode(), "MCP tool error")


def _not_offered(path: str, tools: Mapping[str, Tool]) -> Answer:
    """A refusal (as a 404 would be): this server cannot answer `path` until restart."""
    message = f"the MCP server has no tool for {path} (its tools: {', '.join(sorted(tools))})"
    return Answer(404, json.dumps({"error": message}).encode(), "MCP tool list")


def _unquoted(values: Mapping[str, str]) -> dict[str, str]:
    return {name: unquote(value) for name, value in values.items()}


def _typed(arguments: Mapping[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments as the tool's input schema types them: the REST query is all text, but the
    official server validates `days` as a string and `per_page` as a number."""
    properties = schema.get("properties") or {}
    typed: dict[str, Any] = {}
    for name, value in arguments.items():
        kinds = _json_types(properties.get(name) or {})
        if isinstance(value, int) and "string" in kinds and not kinds & {"integer", "number"}:
            value = str(value)
        elif isinstance(value, str) and kinds & {"integer", "number"} and "string" not in kinds:
            with contextlib.suppress(ValueError):
                value = int(value)
        typed[name] = value
    return typed


def _json_types(prop: Mapping[str, Any]) -> set[str]:
    kinds = prop.get("type")
    found = set(kinds) if isinstance(kinds, list) else {kinds} if isinstance(kinds, str) else set()
    for option in prop.get("anyOf") or []:
        found |= _json_types(option)
    return found


def _target(settings: Settings, secret: str | None) -> str | StdioServerParameters:
    """A Streamable HTTP URL, or the stdio server to start (with the key in its environment)."""
    if settings.coingecko_mcp_command is None and not settings.coingecko_mcp_offline:
        return settings.coingecko_mcp_url
    if settings.coingecko_mcp_command is not None:
        argv = shlex.split(settings.coingecko_mcp_command)
    else:
        tick = max(1, round(settings.price_poll_seconds))
        argv = [sys.executable, "-m", "coingecko.fake_mcp_server", "--tick", str(tick)]
    env: dict[str, str] = {}
    if settings.plan in KEY_VARIABLES and secret:
        env = {KEY_VARIABLES[settings.plan]: secret, "COINGECKO_ENVIRONMENT": settings.plan}
    return StdioServerParameters(command=argv[0], args=argv[1:], env=env)


def describe_server(settings: Settings) -> str:
    """The server as logs and the banner name it: a command's arguments and a URL's query string
    or password may hold secrets, so only the program, or the URL without them."""
    if settings.coingecko_mcp_command is not None:
        return f"stdio:{shlex.split(settings.coingecko_mcp_command)[0]}"
    if settings.coingecko_mcp_offline:
        return "offline (coingecko.fake_mcp_server over stdio)"
    return redact_url(urlunsplit(urlsplit(settings.coingecko_mcp_url)._replace(query="")))
