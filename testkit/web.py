"""The worker's web views served in-process: Faust's own aiohttp application on a test server,
reading a given database, without starting a worker (no broker, no agents)."""

from __future__ import annotations

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
