"""Recently computed answers of the read views, shared by the requests that ask the same thing.

Dashboards and agents poll the same few URLs, many times a second, while each answer costs
database round trips and serialising up to 1,000 records: fifty clients asking for /prices
would otherwise compute it fifty times over, and take the CPU the sink needs. An answer is
reused while both hold:

- its computation started less than VIEW_CACHE_SECONDS ago: rows that *other* workers store
  reach an answer that much later at most (they reach this worker's tables no sooner than
  LIVE_TABLE_UPDATE_SECONDS either);
- this worker's live tables have not been given a stored batch since (`live.generation()`).

Past that, the next request computes a new answer and waits for it, so a client asking one
request after another sees what this worker stored as soon as its tables have it, as without
the cache. Requests that arrive while that computation runs get the previous answer at once
instead of queueing behind it (unless it is more than STALE_SECONDS past its reuse time):
under load an answer is at most VIEW_CACHE_SECONDS plus one computation old. Errors (404, 503)
are never kept. Entries are evicted oldest first beyond MAX_BYTES.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tables import live

MAX_BYTES = 64 * 2**20  # /prices of 1,000 coins is ~0.5 MB; a coin's history ~0.3 MB
STALE_SECONDS = 5.0  # the views' own bound on a computation (READ_TIMEOUT)


@dataclass(frozen=True)
class Answer:
    """A serialised JSON answer, as is and gzipped."""

    body: bytes
    gzipped: bytes

    @property
    def size(self) -> int:
        return len(self.body) + len(self.gzipped)


@dataclass
class _Entry:
    answer: Answer
    started: float  # loop time when its computation started
    generation: int


class Answers:
    """Answers by key (a view and its canonical request), reused for `seconds` (0: never)."""

    def __init__(self, seconds: float, max_bytes: int = MAX_BYTES) -> None:
        self.seconds = seconds
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._computing: dict[str, asyncio.Future[Answer]] = {}

    async def get(self, key: str, compute: Callable[[], Awaitable[Answer]]) -> Answer:
        if self.seconds <= 0:
            return await compute()
        now = asyncio.get_running_loop().time()
        entry = self._entries.get(key)
        current = entry is not None and entry.generation == live.generation()
        if entry is not None and current and now - entry.started < self.seconds:
            return entry.answer
        computing = self._computing.get(key)
        if computing is None:
            computing = asyncio.ensure_future(self._compute(key, compute))
            self._computing[key] = computing
        elif entry is not None and now - entry.started < self.seconds + STALE_SECONDS:
            return entry.answer  # another request is computing its successor
        # One client going away does not cancel the answer the others wait for.
        return await asyncio.shield(computing)

    async def _compute(self, key: str, compute: Callable[[], Awaitable[Answer]]) -> Answer:
        started, generation = asyncio.get_running_loop().time(), live.generation()
        try:
            answer = await compute()
        finally:
            del self._computing[key]
        self._store(key, _Entry(answer, started, generation))
        return answer

    def _store(self, key: str, entry: _Entry) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.answer.size
        self._entries[key] = entry
        self._bytes += entry.answer.size
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.answer.size
