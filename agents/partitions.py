"""Plain PostgreSQL: the worker keeps each table's partitions ahead of time.

`migrate` creates the partitions of the current chunk and the next ones (`sql.PARTITIONS_AHEAD`);
without this task, rows past the last one landed in the DEFAULT partition until the next
`migrate`. Every worker checks at start and then hourly; the migration's advisory lock lets one
at a time do it, and creating a partition is idempotent. On TimescaleDB there is nothing to do.
"""

from __future__ import annotations

import asyncio
import logging

from app.checks import DATABASE_ERRORS, describe_database_error
from app.main import app, settings

log = logging.getLogger(__name__)

# The shortest chunk is a day and three are created ahead: an hourly check leaves ample margin,
# and a failed one (database down, a lock not granted in time) is retried sooner.
CHECK_SECONDS = 3600.0
RETRY_SECONDS = 60.0


@app.task_while_joining
async def keep_partitions_ahead() -> None:
    """Create the partitions that time has made due (see the module docstring), for ever; the
    first check runs as the worker starts, before it stores anything."""
    # Imported here, while the broker holds the group join, rather than before the worker starts.
    from generators.migrate import create_partitions_ahead

    while True:
        try:
            created = await create_partitions_ahead(settings.database_dsn)
        except DATABASE_ERRORS as error:
            log.warning(
                "partitions ahead not checked, retrying in %.0f s: %s",
                RETRY_SECONDS,
                describe_database_error(error, settings.database_dsn),
            )
            await asyncio.sleep(RETRY_SECONDS)
            continue
        for line in created or ():
            log.info("partitions ahead: %s", line)
        await asyncio.sleep(CHECK_SECONDS if created is not None else RETRY_SECONDS)
