"""The one place that opens PostgreSQL connections, so every caller gets the same options."""

from __future__ import annotations

import asyncpg

# A statement that runs longer than this is stuck (a lock, a dead server): fail rather than hang.
COMMAND_TIMEOUT = 60.0
# UTC keeps any server-side rendering of timestamps (logs, partition names) independent of
# the server's configured zone; asyncpg's own timestamptz values are UTC-aware regardless.
SERVER_SETTINGS = {"application_name": "qicore-streams", "TimeZone": "UTC"}


async def connect(
    dsn: str, *, command_timeout: float | None = COMMAND_TIMEOUT
) -> asyncpg.Connection:
    """One connection (`command_timeout=None` for long migrations)."""
    return await asyncpg.connect(
        dsn, command_timeout=command_timeout, server_settings=SERVER_SETTINGS
    )


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        command_timeout=COMMAND_TIMEOUT,
        server_settings=SERVER_SETTINGS,
    )
    assert pool is not None  # asyncpg types it Optional; it only returns None if not awaited
    return pool
