"""The worker's web views served in-process: Faust's own aiohttp application on a test server,
reading a given database, without starting a worker (no broker, no agents)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from aiohttp.test_utils import TestServer

import app as assembled  # registers every view
from store.db import LazyPool
from tables import views
from tables.answers import Answers


@asynccontextmanager
async def serve_views(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the views, their reads going to `dsn` (the views' own read pool,
    pointed elsewhere for the test)."""
    reads = LazyPool(dsn, 4, reads=True)
    monkeypatch.setattr(views, "read_pool", reads)
    # Answers belong to the database they were read from: none of another test's are reused.
    monkeypatch.setattr(views, "answers", Answers(views.answers.seconds))
    server = TestServer(await assembled.app.web.wsgi())  # Faust's aiohttp Application
    await server.start_server()
    try:
        async with httpx.AsyncClient(base_url=str(server.make_url("")), timeout=10) as client:
            yield client
    finally:
        await server.close()
        await reads.close()


class Events:
    """The events of an open Server-Sent Events response, parsed as a browser does (comments
    kept, as `{"comment": ...}`)."""

    def __init__(self, response: httpx.Response, timeout: float = 10.0) -> None:
        self.lines = response.aiter_lines()
        self.timeout = timeout

    async def next(self, *, comments: bool = False) -> dict[str, str]:
        """The next event; with `comments`, a comment (`: keepalive`) counts as one."""
        event: dict[str, str] = {}
        async with asyncio.timeout(self.timeout):
            async for line in self.lines:
                if not line:
                    if event and (comments or set(event) != {"comment"}):
                        return event
                    event = {}
                    continue
                field, _, value = line.partition(":")
                event[field or "comment"] = value.removeprefix(" ")
        raise AssertionError(f"the stream ended; last event so far {event}")
