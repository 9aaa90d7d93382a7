"""The one place that opens PostgreSQL connections, so every caller gets the same options."""

from __future__ import annotations

import asyncio

import asyncpg

# A statement that runs longer than this is stuck (a lock, a dead server): fail rather than hang.
COMMAND_TIMEOUT = 60.0
# UTC keeps any server-side rendering of timestamps (logs, partition names) independent of
# the server's configured zone; asyncpg's own timestamptz values are UTC-aware regardless.
SERVER_SETTINGS = {"application_name": "qicore-streams", "TimeZone": "UTC"}
# Reads answer people and agents: one that runs longer than this is cancelled by the server
# itself (a client-side timeout alone would leave the query running).
READ_STATEMENT_TIMEOUT_MS = 5000
READ_SETTINGS = {**SERVER_SETTINGS, "statement_timeout": str(READ_STATEMENT_TIMEOUT_MS)}


async def connect(
    dsn: str, *, command_timeout: float | None = COMMAND_TIMEOUT, timeout: float = 60.0
) -> asyncpg.Connection:
    """One connection (`command_timeout=None` for long migrations; `timeout`: to connect)."""
    return await asyncpg.connect(
        dsn, command_timeout=command_timeout, timeout=timeout, server_settings=SERVER_SETTINGS
    )


async def create_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 4, reads: bool = False
) -> asyncpg.Pool:
    """A pool; `reads=True` for read-only callers: statements get READ_STATEMENT_TIMEOUT_MS."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        command_timeout=COMMAND_TIMEOUT,
        server_settings=READ_SETTINGS if reads else SERVER_SETTINGS,
    )
    assert pool is not None  # asyncpg types it Optional; it only returns None if not awaited
    return pool


class LazyPool:
    """A pool opened on first use and closed on shutdown.

    Lazy, so that a database that is down when the worker starts is a retried failure (the sink)
    or a 503 (the views) instead of a worker that does not start.
    """

    def __init__(self, dsn: str, max_size: int, *, reads: bool = False) -> None:
        self.dsn = dsn
        self._max_size = max_size
        self._reads = reads
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> asyncpg.Pool:
        async with self._lock:
            if self._pool is None:
                self._pool = await create_pool(
                    self.dsn, min_size=1, max_size=self._max_size, reads=self._reads
                )
            return self._pool

    async def close(self) -> None:
        async with self._lock:
            if self._pool is not None:
                await self._pool.close()
                self._pool = None
