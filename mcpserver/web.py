"""The MCP server on the worker's web server: Streamable HTTP at `/mcp`, on the views' port, so
one Heroku `web` dyno serves both.

Faust's web server is aiohttp; the SDK's Streamable HTTP transport is ASGI. `serve_asgi` drives
the SDK's own `StreamableHTTPSessionManager.handle_request` from an aiohttp view: the request
becomes an ASGI scope, its body the first `receive`, and each `send` a write to a streamed aiohttp
response (an SSE stream stays open as long as the SDK writes to it). That is the whole bridge,
so no adapter package is needed; the SDK's session handling, DNS-rebinding protection and body
limit all run unchanged behind it.

The SDK (with Starlette, its schemas and the MCP types: ~30 MiB of RSS) is imported on the first
request to `/mcp`, not when the worker starts: a worker that never serves MCP does not carry it.

Safety: a request must carry `Authorization: Bearer <MCP_TOKEN>` whenever a token is set (the
settings require one when the web server listens beyond loopback), and the SDK's DNS-rebinding
protection accepts only loopback Host/Origin values and MCP_ALLOWED_HOSTS.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import TYPE_CHECKING, Any

from aiohttp import web
from faust.web import Request, View

from app.main import app, settings, topics
from app.settings import Settings
from app.web import json_error
from models.codec import encode_record
from models.dsl import StreamRecord
from tables.stream import relay
from tables.views import read_pool

if TYPE_CHECKING:
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
    from mcp.server.transport_security import TransportSecuritySettings

PATH = "/mcp"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
DISCONNECT_CHECK_SECONDS = 1.0  # how often a waiting `receive` looks for a gone client
READY_TIMEOUT = 10.0  # a request that arrives before the session manager runs waits this long


def transport_security(settings: Settings) -> TransportSecuritySettings:
    """The SDK's DNS-rebinding protection: loopback hosts (any port) and MCP_ALLOWED_HOSTS."""
    from mcp.server.transport_security import TransportSecuritySettings

    hosts = [*LOOPBACK_HOSTS, *settings.mcp_allowed_hosts]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[form for host in hosts for form in (host, f"{host}:*")],
        allowed_origins=[
            form
            for host in hosts
            for scheme in ("http", "https")
            for form in (f"{scheme}://{host}", f"{scheme}://{host}:*")
        ],
    )


def authorized(request: web.Request, token: str) -> bool:
    """Whether the request carries the bearer token (compared in constant time)."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


async def serve_asgi(asgi: Any, request: web.Request) -> web.StreamResponse:
    """Run one request through an ASGI application, streaming its answer."""
    body = await request.read()  # aiohttp's client_max_size bounds it
    finished = asyncio.Event()
    delivered = False
    response: web.StreamResponse | None = None

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        while not finished.is_set():  # the SDK waits here to learn of a disconnect
            transport = request.transport
            if transport is None or transport.is_closing():
                break
            try:
                await asyncio.wait_for(finished.wait(), DISCONNECT_CHECK_SECONDS)
            except TimeoutError:
                continue
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal response
        if message["type"] == "http.response.start":
            response = web.StreamResponse(status=message["status"])
            for name, value in message.get("headers", []):
                response.headers.add(name.decode("latin-1"), value.decode("latin-1"))
            await response.prepare(request)
        elif message["type"] == "http.response.body" and response is not None:
            try:
                await response.write(message.get("body", b""))
                if not message.get("more_body", False):
                    await response.write_eof()
                    finished.set()
            except ConnectionResetError:  # the client left; `receive` tells the SDK so
                finished.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": f"{request.version.major}.{request.version.minor}",
        "method": request.method,
        "scheme": request.scheme,
        "path": request.path,
        "raw_path": request.raw_path.split("?", 1)[0].encode(),
        "query_string": request.query_string.encode(),
        "root_path": "",
        "headers": [(name.lower(), value) for name, value in request.raw_headers],
        "client": (request.remote or "", 0),
        "server": None,
    }
    try:
        await asgi(scope, receive, send)
    finally:
        finished.set()
    if response is None:  # the application answered nothing: its failure, not the client's
        return json_error(500, "internal server error")
    return response


async def publish(record: StreamRecord) -> None:
    """Send a record to its topic on the worker's own producer and wait for the broker's ack."""
    delivered = await topics[record.topic.name].send(key=record.key(), value=encode_record(record))
    await delivered


wanted = asyncio.Event()  # set by the first request: the SDK is imported and started then
sessions: list[StreamableHTTPSessionManager] = []  # the running session manager, once it runs
sessions_running = asyncio.Event()


async def handle(request: web.Request) -> web.StreamResponse:
    token = settings.mcp_token
    if token is not None and not authorized(request, token.get_secret_value()):
        refused = json_error(401, "a bearer token is required (Authorization: Bearer <MCP_TOKEN>)")
        refused.headers["WWW-Authenticate"] = 'Bearer realm="mcp"'
        return refused
    wanted.set()
    try:
        await asyncio.wait_for(sessions_running.wait(), READY_TIMEOUT)
    except TimeoutError:
        return json_error(503, "the MCP session manager is not running yet")
    return await serve_asgi(sessions[0].handle_request, request)


if settings.web_enabled and settings.mcp_http_enabled:

    @app.task
    async def run_mcp_sessions() -> None:
        """From the first request on, the session manager's task group lives as long as the
        worker (cancelled at stop)."""
        await wanted.wait()
        import anyio
        from mcp.server.subscriptions import InMemorySubscriptionBus

        from mcpserver.feeds import follow_stored_prices
        from mcpserver.server import build_server

        bus = InMemorySubscriptionBus()
        # Stored-price notices come from the web's one LISTEN connection (tables/stream.py).
        follow_stored_prices(relay, bus)
        # The write tool only with a token: the settings refuse MCP_WRITE_ENABLED without one.
        write = publish if settings.mcp_write_enabled and settings.mcp_token else None
        server = build_server(read_pool, settings, bus, write)
        server.streamable_http_app(
            transport_security=transport_security(settings), host=settings.web_bind
        )
        async with server.session_manager.run():
            sessions.append(server.session_manager)
            sessions_running.set()
            await anyio.sleep_forever()

    @app.page(PATH)
    class MCPEndpoint(View):
        """POST/GET/DELETE /mcp: the MCP Streamable HTTP transport."""

        async def get(self, request: Request) -> web.StreamResponse:
            return await handle(request)  # type: ignore[arg-type]  # aiohttp's request

        async def post(self, request: Request) -> web.StreamResponse:
            return await handle(request)  # type: ignore[arg-type]

        async def delete(self, request: Request) -> web.StreamResponse:
            return await handle(request)  # type: ignore[arg-type]
