"""The stored-rows notices of this process: one LISTEN connection, fanned out to subscribers.

Every transaction that stores rows calls `pg_notify(STORED_CHANNEL, ...)` (store/writer.py), so
PostgreSQL delivers a notice to every listening connection exactly when the rows commit,
whichever process stored them. A process needs one such connection however many feeds follow
it (the MCP servers' resource subscriptions, the web's `/stream/prices`): `StoredRelay` holds
it, reopens it when it is lost, and calls each subscriber with every notice.

A lost connection loses the notices sent meanwhile (PostgreSQL queues none for a listener that
is gone); subscribers are then called with `None`, so one that must see every change re-reads.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from store.db import connect
from store.writer import STORED_CHANNEL

log = logging.getLogger(__name__)

PING_SECONDS = 30.0  # a quiet LISTEN connection is checked this often
CONNECT_SECONDS = 5.0
RECONNECT_MAX_SECONDS = 30.0


@dataclass(frozen=True)
class StoredNotice:
    """Rows of `table` were stored, for these topic keys (e.g. coin ids)."""

    table: str
    keys: tuple[str, ...]


def parse_notice(payload: str) -> StoredNotice:
    """The notice `RecordWriter.notices` wrote; ValueError for anything else."""
    try:
        notice = json.loads(payload)
        table, keys = notice["table"], notice["keys"]
    except (ValueError, KeyError, TypeError):
        raise ValueError("not a stored-rows notice") from None
    if not isinstance(table, str) or not all(isinstance(key, str) for key in keys):
        raise ValueError("not a stored-rows notice")
    return StoredNotice(table, tuple(keys))


# Called with each notice, or None after the connection was reopened (notices may be lost). It
# runs on the listening connection's callback and must not wait on anything slow.
Subscriber = Callable[[StoredNotice | None], Awaitable[None]]


class StoredRelay:
    """One LISTEN connection on STORED_CHANNEL, and the subscribers it calls with each notice."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._subscribers: dict[object, Subscriber] = {}

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call `subscriber` with every notice from now on; returns the unsubscribe call."""
        token = object()
        self._subscribers[token] = subscriber

        def unsubscribe() -> None:
            self._subscribers.pop(token, None)

        return unsubscribe

    async def _publish(self, notice: StoredNotice | None) -> None:
        for subscriber in list(self._subscribers.values()):
            try:
                await subscriber(notice)
            except Exception:  # one subscriber's bug must not starve the others
                log.exception("stored notices: a subscriber failed")

    async def run(self, started: Callable[[], None] = lambda: None) -> None:
        """Forever: listen, reconnecting with a growing pause. Calls `started` once, when first
        listening (so a server started after it misses no notice) or after a first failure (so
        a database that is down does not hold the server back)."""
        reported = False

        def report() -> None:
            nonlocal reported
            if not reported:
                reported = True
                started()

        failures = 0
        while True:
            try:
                await self._listen(report, resumed=reported)
                failures = 0
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                failures += 1
                log.warning("stored notices: LISTEN connection lost (%s)", type(error).__name__)
                report()
            await asyncio.sleep(min(2.0**failures, RECONNECT_MAX_SECONDS))

    async def _listen(self, listening: Callable[[], None], *, resumed: bool) -> None:
        """One LISTEN connection, until it is lost; `listening` is called once it listens."""

        async def relay(connection: object, pid: int, channel: str, payload: str) -> None:
            try:
                notice = parse_notice(payload)
            except ValueError:
                log.warning("stored notices: unreadable notice on %s", channel)
                return
            await self._publish(notice)

        # A short connect: a server waiting for `listening` answers once it failed to.
        connection = await connect(self.dsn, timeout=CONNECT_SECONDS)
        try:
            await connection.add_listener(STORED_CHANNEL, relay)
            listening()
            if resumed:
                await self._publish(None)
            while not connection.is_closed():
                await asyncio.sleep(PING_SECONDS)
                await connection.fetchval("SELECT 1", timeout=PING_SECONDS)
        finally:
            await connection.close(timeout=5)
