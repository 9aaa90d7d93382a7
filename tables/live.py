"""Live state in Faust tables, fed from the sinks' batches once they are stored.

- `latest_prices`: the newest `CryptoPriceData` snapshot of each coin, by `last_updated` (a late,
  older snapshot never overwrites a newer one; an equal timestamp keeps the first, as the sink's
  primary key does).
- `latest_analytics`: the newest `CryptoMarketAnalytics` per source, by `timestamp`.
- `price_ranges`: high/low of each coin's USD price per hour, in tumbling 1 h windows placed by
  the snapshot's own `last_updated` (event time), expiring after 25 h. The 24 h range the views
  report is the merge of the 24 hourly windows of `range_window` (`local_range`); a snapshot
  older than its first hour (a backfill's, a long catch-up's) opens no window.

Why fed from the sinks (`agents.sink.Sink.observers`) and not by agents of their own: a second
agent on a record topic doubles Faust's per-message cost (a second channel, stream and event per
message), and updating per message wrote the changelog once per snapshot (24 times with the
former 24 h/1 h hopping window), which filled the producer buffer and throttled the whole worker
to ~150 messages/s. Per update, each key is written at most once: the newest snapshot per coin,
one merged high/low per coin and hour; the sink hands over what it stored at most every
LIVE_TABLE_UPDATE_SECONDS, so a busy stream of small batches (at 1,000 records/s, tens of them a
second) costs one write per key per second, not one per batch. Every update is idempotent (newest
wins, max/min), so a replayed or re-fetched batch changes nothing.

A process declares only the tables that a topic it sinks (SINK_TOPICS) fills; in the others the
names are None and the views answer from the database alone.

Only CoinGecko's aggregate quotes (`exchange_id == AGGREGATE_EXCHANGE`) feed these tables, the
same rows `store.queries` reads for the views, so the two sources agree.

Values are JSON (decimals as strings), so the changelog round-trips exactly. Tables are keyed like
their topics, with the same partition count, and every write goes to the changelog partition of
the message it came from (`LiveTable.routed_to`), so each changelog partition matches its source
partition, the one Faust assigns together with it. A worker holds only its assigned
partitions, and table recovery is unreliable on brokers with wrong high-water marks, so the views
treat these tables as a freshness layer over the database, never as the only source (see
`tables.views`).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from functools import partial
from operator import attrgetter
from typing import Any, Generic, TypeVar, cast

import faust
from faust.exceptions import PartitionsMismatch
from faust.tables.wrappers import WindowWrapper
from faust.types import Message
from faust.types.transports import ProducerBufferT

from app.main import app, settings
from models.dsl import StreamRecord
from models.market import AGGREGATE_EXCHANGE, CryptoMarketAnalytics, CryptoPriceData

R = TypeVar("R", bound=StreamRecord)
T = TypeVar("T")

RANGE_SIZE = timedelta(hours=24)
RANGE_STEP = timedelta(hours=1)
RANGE_EXPIRES = timedelta(hours=25)
WRITES_PER_SLICE = 20  # table writes between two turns of the event loop (~2 ms here)
CHANGELOG_BACKLOG = 200  # unsent changelog messages a publication lets the producer buffer hold

# How many stored batches the tables have been given: an answer of the views computed at
# another count may lack this worker's newest data (`tables.answers`).
_batches_given = 0


def generation() -> int:
    return _batches_given


def _given() -> None:
    global _batches_given
    _batches_given += 1


# Messages that could not be decoded, per topic. The sink dead-letters them; the tables only
# skip and count them (shown by /health).
UNDECODABLE: Counter[str] = Counter()


class LiveTable(faust.Table):
    """A table written outside any stream: each write names the message it comes from.

    Faust takes a write's changelog partition from the current stream event
    (`partition_for_key`); the sinks take their messages in bulk, without events, so a write is
    made inside `routed_to(message)` instead, and goes to that message's partition, checked
    once per source topic as Faust checks it. (`use_partitioner=True` would not do: the producer
    would hash the table's JSON key, and a window's key with its time range, onto other
    partitions than the record's own.)"""

    partition: int | None = None
    verified: frozenset[str] = frozenset()  # source topics whose partition count matches

    @contextmanager
    def routed_to(self, message: Message) -> Iterator[None]:
        if message.topic not in self.verified:
            self.check_partition_count(message.topic)
        self.partition = message.partition
        try:
            yield
        finally:
            self.partition = None

    def check_partition_count(self, source_topic: str) -> None:
        """The changelog has as many partitions as the source topic (or a write would land on
        another key's partition, or on none). Unknown counts are checked at the next write."""
        source = self.app.consumer.topic_partitions(source_topic)
        changelog = self.app.consumer.topic_partitions(self.changelog_topic_name)
        if source is None or changelog is None:
            return
        if source != changelog:
            raise PartitionsMismatch(
                f"table {self.name}: source topic {source_topic} has {source} partitions, its "
                f"changelog {self.changelog_topic_name} {changelog}"
            )
        self.verified |= {source_topic}

    def partition_for_key(self, key: Any) -> int | None:
        if self.partition is None:
            raise TypeError(f"table {self.name}: written outside routed_to(message)")
        return self.partition


def _table(name: str, record: type[StreamRecord], **options: Any) -> LiveTable | None:
    """A table with JSON keys and values (Faust's default codec when no type is given); None in
    a process that does not sink `record`'s topic (SINK_TOPICS): nothing would ever fill it, yet
    declaring it would create its process type's own changelog topic and fetch it."""
    if record.topic.name not in settings.sink_topics:
        return None
    table = LiveTable(
        app, name=name, beacon=app.tables.beacon, partitions=record.topic.partitions, **options
    )
    return cast(LiveTable, app.tables.add(table))


latest_prices = _table(
    "latest-prices",
    CryptoPriceData,
    default=None,
    help="Newest CryptoPriceData snapshot (aggregate quote) per coin id, fed by the crypto-prices "
    "sink once stored; /prices and /prices/{coin_id} merge it with the database.",
)
latest_analytics = _table(
    "latest-analytics",
    CryptoMarketAnalytics,
    default=None,
    help="Newest CryptoMarketAnalytics per source, fed by the market-analytics sink once stored; "
    "/analytics merges it with the database.",
)
price_ranges_table = _table(
    "price-ranges",
    CryptoPriceData,
    default=dict,
    help="USD high/low per coin id and hour of last_updated (1 h tumbling windows, kept "
    "25 h); /prices/{coin_id} merges 24 of them into its 24 h range.",
)
# `tumbling()` is typed as the abstract wrapper, which lacks the `relative_to()` used below.
price_ranges = (
    None
    if price_ranges_table is None
    else cast(WindowWrapper, price_ranges_table.tumbling(RANGE_STEP, expires=RANGE_EXPIRES))
)


def items_of(table: LiveTable | None) -> list[tuple[Any, Any]]:
    """A live table's items (none where the table is not declared here)."""
    return [] if table is None else list(table.items())


def value_of(table: LiveTable | None, key: str) -> Any:
    """A live table's value for `key` (None if absent, or the table is not declared here)."""
    return None if table is None else table.get(key)


def stored(record: type[R], value: dict[str, Any] | None) -> R | None:
    """A table value back as its record (values are stored as the record's JSON form)."""
    return None if value is None else record.model_validate(value)


def newest(*candidates: R | None) -> R | None:
    """The candidate with the latest time column; the earlier one on a tie."""
    best: R | None = None
    for candidate in candidates:
        if candidate is not None and (best is None or candidate.event_time() > best.event_time()):
            best = candidate
    return best


def widen(bounds: dict[str, str], price: str) -> dict[str, str]:
    """Extend a window's {"high", "low"} (decimal strings) by one price."""
    if not bounds:
        return {"high": price, "low": price}
    value = Decimal(price)
    return {
        "high": price if value > Decimal(bounds["high"]) else bounds["high"],
        "low": price if value < Decimal(bounds["low"]) else bounds["low"],
    }


def merge_bounds(bounds: dict[str, str], other: dict[str, str]) -> dict[str, str]:
    """Extend a window's {"high", "low"} by another one."""
    return widen(widen(bounds, other["high"]), other["low"]) if other else bounds


def _hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def range_window(now: datetime) -> tuple[datetime, datetime]:
    """The 24 h window that the views report at `now`: [start of the hour 23 h ago, that + 24 h),
    the 24 whole hourly windows that end with the current one."""
    begin = _hour(now.astimezone(UTC)) - RANGE_SIZE + RANGE_STEP
    return begin, begin + RANGE_SIZE


def local_range(coin_id: str, window_start: datetime) -> dict[str, str]:
    """This worker's {"high", "low"} over the 24 hourly windows from `window_start` ({} if none).

    Read relative to an hour's own start, `value()` selects exactly that hour's window.
    """
    bounds: dict[str, str] = {}
    if price_ranges is None:
        return bounds
    hour = window_start
    while hour < window_start + RANGE_SIZE:
        bounds = merge_bounds(bounds, price_ranges.relative_to(hour)[coin_id].value())
        hour += RANGE_STEP
    return bounds


async def _yielding(items: Iterable[T], buffer: ProducerBufferT | None = None) -> AsyncIterator[T]:
    """`items`, letting the event loop run between slices of them: a publication's table writes
    (a changelog message each) then never hold up the sink and the fetch loop for long.

    Between slices it also waits while more than CHANGELOG_BACKLOG changelog messages are still
    unsent: a table write only queues its message in the producer buffer, which sends one at a
    time, so tens of thousands of new hourly windows (a backfill) queued them all at once, tens
    of MiB that the allocator then kept (docs/performance.md, section 5)."""
    if buffer is None:
        buffer = app.producer.buffer
    for number, item in enumerate(items, 1):
        yield item
        if not number % WRITES_PER_SLICE:
            if buffer.size > CHANGELOG_BACKLOG:
                await buffer.flush_atmost(buffer.size - CHANGELOG_BACKLOG)
            await asyncio.sleep(0)


async def _write_newest(
    table: LiveTable, record_type: type[R], newest_of: dict[str, tuple[datetime, Message, R]]
) -> None:
    """Write each key's newest record of the stored batches, if it is newer than the table's."""
    async for name, (at, message, record) in _yielding(newest_of.items()):
        current = table.get(name)
        # Only the stored time matters here: no need to validate the whole stored record.
        if current is not None:
            stored_at = datetime.fromisoformat(current[record_type.table.time_column])
            if stored_at >= at:  # a tie keeps the stored one, as the sink's does
                continue
        with table.routed_to(message):
            table[name] = record.model_dump(mode="json")


async def _write_ranges(
    table: LiveTable, ranges: WindowWrapper, merged: dict[tuple[str, int, int], list[Any]]
) -> None:
    """Merge the stored batches' high/low per coin and hour into the hourly windows: one write
    for each window they widen, none for the others (most snapshots set no new high or low)."""
    async for (coin_id, day, hour), (message, high, low) in _yielding(merged.items()):
        start = datetime.combine(date.fromordinal(day), time(hour), UTC)
        window = ranges.relative_to(start)
        held = window[coin_id].value()
        bounds = merge_bounds(held, {"high": str(high), "low": str(low)})
        if bounds != held:
            with table.routed_to(message):
                window[coin_id] = bounds


class NewestFold:
    """Each key's newest record among those added (a tie keeps the first: the stored one, as the
    sink's primary key does), and how many messages were not decoded (dead-lettered)."""

    def __init__(self, key: str, time_column: str) -> None:
        self.key_of, self.time_of = attrgetter(key), attrgetter(time_column)
        self.newest: dict[str, tuple[datetime, Message, StreamRecord]] = {}
        self.undecodable = 0

    def add(self, message: Message, record: StreamRecord | None) -> None:
        if record is None:
            self.undecodable += 1
            return
        name, at = self.key_of(record), self.time_of(record)
        best = self.newest.get(name)
        if best is None or at > best[0]:
            self.newest[name] = (at, message, record)

    def merge(self, later: NewestFold) -> None:
        """Add what a fold of later messages holds."""
        self.undecodable += later.undecodable
        _merge_newest(self.newest, later.newest)


class PriceFold:
    """What stored price snapshots change: each coin's newest aggregate snapshot, [message, high,
    low] of its USD price per coin and hour, and how many messages were not decoded.

    The hour is (day ordinal, hour of the day) of the UTC time the record holds: a third of what
    timestamp() costs, and far cheaper than _hour().

    Hours before `since` (by default the first hour of `range_window` when the fold starts) get
    no range: no view reads them now or later, as the window only moves forward. A backfill or a
    catch-up of older snapshots would otherwise write, changelog and hold (until they expire by
    event time) windows nobody reads."""

    def __init__(self, since: datetime | None = None) -> None:
        self.since = range_window(datetime.now(UTC))[0] if since is None else since
        self.newest: dict[str, tuple[datetime, Message, CryptoPriceData]] = {}
        self.ranges: dict[tuple[str, int, int], list[Any]] = {}
        self.undecodable = 0

    def add(self, message: Message, price: CryptoPriceData | None) -> None:
        """Per record: kept to a few operations."""
        if price is None:
            self.undecodable += 1
            return
        if price.exchange_id != AGGREGATE_EXCHANGE:
            return
        coin_id, at, value = price.coin_id, price.last_updated, price.usd_price
        best = self.newest.get(coin_id)
        if best is None or at > best[0]:  # a tie keeps the first
            self.newest[coin_id] = (at, message, price)
        if at < self.since:
            return
        where = (coin_id, at.toordinal(), at.hour)
        seen = self.ranges.get(where)
        if seen is None:
            self.ranges[where] = [message, value, value]
        elif value > seen[1]:
            seen[1] = value
        elif value < seen[2]:
            seen[2] = value

    def merge(self, later: PriceFold) -> None:
        """Add what a fold of later messages holds."""
        self.undecodable += later.undecodable
        _merge_newest(self.newest, later.newest)
        for where, (message, high, low) in later.ranges.items():
            seen = self.ranges.get(where)
            if seen is None:
                self.ranges[where] = [message, high, low]
                continue
            seen[1], seen[2] = max(seen[1], high), min(seen[2], low)


def _merge_newest(
    newest: dict[str, tuple[datetime, Message, R]], later: dict[str, tuple[datetime, Message, R]]
) -> None:
    for name, entry in later.items():
        best = newest.get(name)
        if best is None or entry[0] > best[0]:  # a tie keeps the earlier
            newest[name] = entry


F = TypeVar("F", NewestFold, PriceFold)


class LiveUpdates(Generic[F]):
    """A sink's observer (`agents.sink.Observer`) for the live tables: each message of the batch
    being stored is folded as the sink decodes it, the fold joins those of the stored batches
    once its batch is durable (folded once, however often its write is retried; a batch that
    is never stored is never published), and the sink's publication writes them: each key at
    most once (`write`). Messages after a hole are published with their batch although they are
    stored only after the re-fetch, as before the folds: the updates are idempotent."""

    def __init__(
        self, topic: str, fold: Callable[[], F], write: Callable[[F], Awaitable[None]]
    ) -> None:
        self.topic = topic
        self.new_fold: Callable[[], F] = fold
        self.write: Callable[[F], Awaitable[None]] = write
        self.incoming: F = fold()  # the batch being stored
        self.pending: F = fold()  # stored batches, not yet written
        self.batches_pending = 0

    def __repr__(self) -> str:
        return f"LiveUpdates({self.topic})"

    def start_batch(self) -> Callable[[Message, Any], None]:
        self.incoming = self.new_fold()
        return self.incoming.add

    def batch_stored(self) -> None:
        if self.batches_pending:
            self.pending.merge(self.incoming)  # type: ignore[arg-type]  # the same fold type
        else:
            self.pending = self.incoming
        self.batches_pending += 1
        self.incoming = self.new_fold()

    def take(self) -> Callable[[], Awaitable[None]]:
        """The stored batches' updates, to be written; the next ones start anew."""
        taken = self.pending
        self.pending, self.batches_pending = self.new_fold(), 0
        return partial(self._write, taken)

    async def _write(self, fold: F) -> None:
        UNDECODABLE[self.topic] += fold.undecodable
        await self.write(fold)
        _given()


async def write_prices(
    table: LiveTable, ranges_table: LiveTable, ranges: WindowWrapper, fold: PriceFold
) -> None:
    """Latest snapshot and hourly high/low per coin, from stored batches of the price topic."""
    await _write_newest(table, CryptoPriceData, fold.newest)
    await _write_ranges(ranges_table, ranges, fold.ranges)


async def write_analytics(table: LiveTable, fold: NewestFold) -> None:
    """Latest market analytics per source, from stored batches of the analytics topic."""
    await _write_newest(table, CryptoMarketAnalytics, fold.newest)


# What observes each sink, for the tables declared here; the app wires them up (app/__init__.py).
OBSERVERS: dict[str, LiveUpdates[Any]] = {}
if latest_prices is not None and price_ranges_table is not None and price_ranges is not None:
    OBSERVERS[CryptoPriceData.topic.name] = LiveUpdates(
        CryptoPriceData.topic.name,
        PriceFold,
        partial(write_prices, latest_prices, price_ranges_table, price_ranges),
    )
if latest_analytics is not None:
    OBSERVERS[CryptoMarketAnalytics.topic.name] = LiveUpdates(
        CryptoMarketAnalytics.topic.name,
        partial(NewestFold, "source", CryptoMarketAnalytics.table.time_column),
        partial(write_analytics, latest_analytics),
    )
