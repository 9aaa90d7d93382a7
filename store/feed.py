"""A push feed of one record's stored rows (the web's `/stream/prices`), fanned out to clients.

The relay (store/notices.py) says which keys (coin ids) a commit stored; the feed's one pump
task reads those keys' new rows (`queries.newer_per_key`: rows after the newest the feed has
seen for each key) and offers each row to every matching subscriber's bounded queue, without
waiting: a subscriber whose queue is full is dropped (its queue emptied, a final `Dropped`
naming where to resume), so a slow client never holds up the sink, the relay or another client.
Notices that arrive while the pump reads are merged, so a busy stream costs one read per pump
round, whatever the number of clients.

Every row has a `Cursor`: its (time, key), the order `queries.after_cursor` resumes in. A client
that comes back with the last cursor it got is sent the stored rows after it, then the live ones.

What the feed does not see: a row that is not newer than a row already stored for its key (a
late or backfilled snapshot) is not pushed, and is not resent on resume if its cursor is not
after the client's. The poller publishes a coin's snapshot only when it is newer than the last
one, so live prices are all pushed; docs/architecture.md says what resume covers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

import asyncpg

from models.dsl import StreamRecord
from store import queries
from store.notices import StoredNotice, StoredRelay

log = logging.getLogger(__name__)

R = TypeVar("R", bound=StreamRecord)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)
BEFORE_ANY_ROW = datetime(1, 1, 1, tzinfo=UTC)  # the bound of a key the feed has not seen yet
ROWS_PER_KEY = 1000  # one pump round reads at most this many new rows of one key
RETRY_SECONDS = 1.0  # after a failed read the pump tries again this much later


@dataclass(frozen=True, order=True)
class Cursor:
    """A row's place in the feed: its time, then its key. Written `<µs since 1970>:<key>`; the
    key "" stands before every key of its microsecond."""

    time: datetime
    key: str

    def __str__(self) -> str:
        return f"{(self.time - EPOCH) // MICROSECOND}:{self.key}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        """The cursor `str` wrote; ValueError for anything else."""
        micros, colon, key = text.partition(":")
        if not colon or not micros.isdigit() or len(micros) > 18:
            raise ValueError(f"not a cursor: {text[:100]!r}")
        return cls(EPOCH + int(micros) * MICROSECOND, key)


@dataclass(frozen=True)
class Dropped:
    """A subscriber's last item: why it ends, and the cursor to resume after (None: its last
    delivered row's)."""

    reason: str
    resume_after: Cursor | None


class FeedFull(Exception):
    """The feed has as many subscribers as it allows."""


Item = tuple[Cursor, bytes]  # a row's cursor and the row as the feed renders it


class Subscription:
    """One client's bounded queue of items, ended by a `Dropped`."""

    def __init__(self, keys: frozenset[str] | None, size: int) -> None:
        self.keys = keys
        self.queue: asyncio.Queue[Item | Dropped] = asyncio.Queue(size)
        self.dropped = False

    def wants(self, key: str) -> bool:
        return self.keys is None or key in self.keys

    def offer(self, cursor: Cursor, rendered: bytes) -> bool:
        """Queue a row without waiting; False (and dropped) when the client fell behind."""
        if self.dropped:
            return False
        try:
            self.queue.put_nowait((cursor, rendered))
            return True
        except asyncio.QueueFull:
            undelivered = [cursor, *(item[0] for item in self._empty() if type(item) is tuple)]
            first = min(undelivered)
            self.drop(
                f"fell behind: more than {self.queue.maxsize} prices waiting",
                Cursor(first.time, ""),  # every row at the first undelivered row's time again
            )
            return False

    def drop(self, reason: str, resume_after: Cursor | None = None) -> None:
        """End the subscription: its queue is emptied and holds only the `Dropped`."""
        if not self.dropped:
            self.dropped = True
            self._empty()
            self.queue.put_nowait(Dropped(reason, resume_after))

    def _empty(self) -> list[Item | Dropped]:
        items = []
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items


class Feed(Generic[R]):
    """The rows of `record` matching `filters` (equality on columns, e.g. the aggregate
    exchange), pushed as they are stored, to at most `max_subscribers` subscribers. Each row is
    rendered once (`render`, e.g. as an SSE event), whatever the number of subscribers."""

    def __init__(
        self,
        relay: StoredRelay,
        pool: Callable[[], Awaitable[asyncpg.Pool]],
        record: type[R],
        filters: Mapping[str, object],
        render: Callable[[Cursor, R], bytes],
        *,
        max_subscribers: int,
        queue_size: int,
    ) -> None:
        self.record = record
        self.filters = dict(filters)
        self.render = render
        self.max_subscribers = max_subscribers
        self.queue_size = queue_size
        self._key = record.topic.key_field
        self._time = record.table.time_column
        self._pool = pool
        self._subscribers: list[Subscription] = []
        # Per key, the newest time the feed has read; None while nobody subscribes (it is then
        # read afresh, so a new subscriber does not get what was stored while nobody listened).
        self._seen: dict[str, datetime] | None = None
        self._pending: set[str] = set()
        self._wake = asyncio.Event()
        self._start = asyncio.Lock()
        self._pump_task: asyncio.Task[None] | None = None
        relay.subscribe(self._notice)  # for good: it returns at once while nobody subscribes

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    @contextlib.asynccontextmanager
    async def subscribe(self, keys: frozenset[str] | None = None) -> AsyncIterator[Subscription]:
        """A subscription to the rows stored from now on (of `keys` only, when given); FeedFull
        beyond `max_subscribers`."""
        if len(self._subscribers) >= self.max_subscribers:
            raise FeedFull(f"at most {self.max_subscribers} clients")
        async with self._start:
            if self._seen is None:
                newest = await queries.latest_per_group(
                    await self._pool(), self.record, self._key, self.filters
                )
                self._seen = {getattr(row, self._key): getattr(row, self._time) for row in newest}
            if self._pump_task is None or self._pump_task.done():
                self._pump_task = asyncio.create_task(self._pump(), name="feed pump")
        if len(self._subscribers) >= self.max_subscribers:  # others got in while this waited
            raise FeedFull(f"at most {self.max_subscribers} clients")
        subscription = Subscription(keys, self.queue_size)
        self._subscribers.append(subscription)
        try:
            yield subscription
        finally:
            self._leave(subscription)

    def _leave(self, subscription: Subscription) -> None:
        if subscription in self._subscribers:
            self._subscribers.remove(subscription)
        if not self._subscribers:  # the pump ends; the next subscriber starts it again
            self._seen = None
            self._pending.clear()
            self._wake.set()

    async def catch_up(self, after: Cursor, keys: frozenset[str] | None, limit: int) -> list[Item]:
        """The stored rows after `after`, in cursor order, at most `limit`, rendered."""
        among = None if keys is None else sorted(keys)
        rows = await queries.after_cursor(
            await self._pool(),
            self.record,
            self.filters,
            (after.time, after.key),
            among=among,
            limit=limit,
        )
        return [self._item(row) for row in rows]

    def _item(self, row: R) -> Item:
        cursor = Cursor(getattr(row, self._time), getattr(row, self._key))
        return cursor, self.render(cursor, row)

    def close(self, reason: str) -> None:
        """Drop every subscriber (the server is stopping)."""
        for subscription in list(self._subscribers):
            subscription.drop(reason)
            self._leave(subscription)

    async def _notice(self, notice: StoredNotice | None) -> None:
        """The relay's subscriber: remember which keys to read; never waits."""
        if self._seen is None:
            return
        if notice is None:  # notices may be lost: read every key seen so far
            self._pending.update(self._seen)
        elif notice.table == self.record.table.name:
            self._pending.update(notice.keys)
        else:
            return
        self._wake.set()

    async def _pump(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._seen is None:
                return
            keys, self._pending = self._pending, set()
            if not keys:
                continue
            try:
                await self._read(keys, self._seen)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                log.warning("feed: reading new rows failed (%s)", type(error).__name__)
                self._pending |= keys
                await asyncio.sleep(RETRY_SECONDS)
                self._wake.set()

    async def _read(self, keys: set[str], seen: dict[str, datetime]) -> None:
        after = {key: seen.get(key, BEFORE_ANY_ROW) for key in sorted(keys)}
        rows = await queries.newer_per_key(
            await self._pool(), self.record, self.filters, after, limit_per_key=ROWS_PER_KEY
        )
        for row in rows:
            key, time = getattr(row, self._key), getattr(row, self._time)
            if time > seen.get(key, BEFORE_ANY_ROW):
                seen[key] = time
            wanting = [s for s in self._subscribers if s.wants(key)]
            if wanting:
                cursor, rendered = self._item(row)
                for subscription in wanting:
                    if not subscription.offer(cursor, rendered):
                        self._leave(subscription)
        counts = Counter(getattr(row, self._key) for row in rows)
        more = {key for key, count in counts.items() if count == ROWS_PER_KEY}
        if more:  # a key with more new rows than one round reads: read on
            self._pending |= more
            self._wake.set()
