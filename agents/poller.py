"""The poller agent: leader-only Faust timers around `coingecko.poller.Poller`.

`on_leader=True` makes one worker of the group poll, so scaling out does not multiply API calls.
`POLL_STATUS` (what /health shows) is re-exported from `coingecko.poller`, which does not import
the app; import it from there in modules the app itself imports.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence

from app.main import app, settings, topics
from coingecko.client import CoinGeckoClient
from coingecko.poller import POLL_STATUS, Poller
from models.codec import encode_record
from models.dsl import StreamRecord

__all__ = ["POLL_STATUS", "poll_global", "poll_ohlc", "poll_prices", "publish_to_topics"]


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


@app.timer(settings.price_poll_seconds, on_leader=True)
async def poll_prices() -> None:
    await _poller().poll_prices()


@app.timer(settings.global_poll_seconds, on_leader=True)
async def poll_global() -> None:
    await _poller().poll_global()


@app.timer(settings.ohlc_poll_seconds, on_leader=True)
async def poll_ohlc() -> None:
    await _poller().poll_ohlc()
