"""The poller agent: the `coingecko.poller.Poller` cycles, run by the consumer group's leader.

Only the leader polls, so scaling out does not multiply API calls; a process with
POLLER_ENABLED=false registers no poll task at all (its consumer group has no pollers, so no
leader of a polling group is ever one that does not poll). Each endpoint is polled as soon
as a process becomes the leader (a fresh start fills /analytics and the candles at once, instead
of one full interval later, which Faust's own `app.timer` would wait), then every interval; OHLC
waits for the first price poll, which tells it the coins. Before its first poll each task
connects the client (`start_client`: for COINGECKO_SOURCE=mcp, the MCP session and its tool
list). `POLL_STATUS` (what /health shows) is re-exported from `coingecko.poller`, which does not
import the app; import it from there in modules the app itself imports.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from app.main import app, settings, topics
from coingecko.client import CoinGeckoClient, CoinGeckoError, CoinGeckoUnusable
from coingecko.poller import POLL_STATUS, Poller
from models.codec import encode_record
from models.dsl import StreamRecord

__all__ = ["POLL_STATUS", "poll_global", "poll_ohlc", "poll_prices", "publish_to_topics"]

log = logging.getLogger(__name__)

LEADER_CHECK_SECONDS = 1.0  # how soon a new leader starts polling


async def publish_to_topics(records: Sequence[StreamRecord]) -> None:
    """Send each record to its topic keyed by its key field; return once the broker has all."""
    pending = [
        await topics[r.topic.name].send(key=r.key(), value=encode_record(r)) for r in records
    ]
    await asyncio.gather(*pending)


@functools.cache
def _poller() -> Poller:
    """Built on first use, inside the worker's event loop (where the HTTP client must live)."""
    return Poller(settings, CoinGeckoClient(settings), publish_to_topics)


async def start_client() -> bool:
    """Connect before the first poll. A source that can never serve the poller (an MCP server
    without CoinGecko's tools) stops the worker with its one-line reason (False); one that is
    only down now is left to the polls, which retry."""
    try:
        await _poller().client.start()
    except CoinGeckoUnusable as error:
        log.error("coingecko: %s", error)
        await app.crash(error)
        return False
    except CoinGeckoError as error:
        log.warning("coingecko: not reachable at start, the polls will retry: %s", error)
    return True


async def poll_while_leader(
    interval: float,
    poll: Callable[[], Awaitable[None]],
    ready: Callable[[], bool] = lambda: True,
) -> None:
    """Run `poll` whenever this process leads the group, `ready()` holds and `interval` seconds
    have passed since its last run here (at once the first time)."""
    due = 0.0
    while not app.should_stop:
        now = time.monotonic()
        if now >= due and app.is_leader() and ready():
            if not due and not await start_client():
                return
            due = now + interval
            await poll()
        await app.sleep(LEADER_CHECK_SECONDS)


async def poll_prices() -> None:
    await poll_while_leader(settings.price_poll_seconds, lambda: _poller().poll_prices())


async def poll_global() -> None:
    await poll_while_leader(settings.global_poll_seconds, lambda: _poller().poll_global())


async def poll_ohlc() -> None:
    await poll_while_leader(
        settings.ohlc_poll_seconds,
        lambda: _poller().poll_ohlc(),
        ready=lambda: bool(_poller().symbols),
    )


async def build_poller() -> None:
    """Build the poller, and its HTTP client, while the worker waits for its group join: the
    client's TLS context (httpx loads its CA bundle, ~0.1-0.25 s of CPU) otherwise blocked the
    event loop just as the first fetched batch arrived, when the polls start. httpx itself is
    imported here too (coingecko/client.py), not before the worker starts."""
    _poller()


if settings.poller_enabled:
    app.task_while_joining(build_poller)
    for _task in (poll_prices, poll_global, poll_ohlc):
        app.task(_task)
