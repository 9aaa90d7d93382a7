"""Bulk delivery: a sink's topic reaches it as lists of fetched messages, not one event at a time.

Why: Faust hands every message to an agent through its per-event machinery — `wait_first` (four
tasks and an `asyncio.wait`) per message in `Consumer._drain_messages`, the conductor, an `Event`,
the channel queue, the stream iterator and its sensors — about 150 µs of Python per message, five
times what decoding and storing it costs (docs/performance.md). A sink wants none of it: it
decodes and writes whole batches. It does need Faust's bookkeeping, and keeps all of it:

- fetching, read offsets, offset gaps and `commit_every` run in Faust's own `_drain_messages`
  loop (copied below from the pinned faust-streaming 0.15.3) with one change: the records of a
  topic registered in `App.bulk` are set aside right after the fetch (`_wait_next_records`),
  turned into messages a partition at a time, checked against the read offset and for gaps as
  Faust checks each message, and put on their `Batches` queue as one list per fetch, instead of
  Faust's per-record generator and one `wait_first` per message;
- `Batches` is a `FlowControlQueue` managed by `app.flow_control`, like every agent's channel
  queue: a rebalance or shutdown suspends and clears it. While it holds `QUEUED_FETCHES` fetches
  the fetch loop waits (until the sink takes them, a rebalance clears them or flow is suspended),
  so a slow sink stops fetching instead of buffering without bound;
- `Batches.take()` tracks the messages it hands out in the consumer, as Faust's stream does when
  it takes an event (so `stream_wait_empty` on rebalance and shutdown waits for the batch in
  flight), and drops messages fetched under an earlier consumer generation or while flow is
  suspended, as the stream does; `Batches.ack()` acknowledges them, and Faust commits only
  acknowledged offsets. Both do per batch and partition what Faust's `track_message` and `ack`
  do per message (about 3.5 µs of a row's CPU): one `Taken` per take is tracked instead of each
  message, and an acknowledgement books a partition's offsets at once. Faust's monitor does not
  count the messages of bulk topics (the sinks' own metrics count their rows).

Everything else is Faust's: topics stay subscribed through their agents (with acks enabled), and
topics not registered here flow through the conductor to agents and tables as usual.

This is the project's only module that uses private names of Faust, mode or aiokafka: each comes
with an entry in `UPSTREAM` (why, what to re-check, a hash of the upstream source), checked by
tests/test_faust_seam.py. Why not a plain consumer instead: docs/performance.md, section 6.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.metadata
import inspect
import logging
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    MutableSet,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, cast

import faust
from aiokafka import TopicPartition
from faust import tables as faust_tables
from faust.exceptions import ConsumerNotStarted
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, AppT, ConsumerMessage, Message
from faust.types.tuples import ack_lock
from faust.utils import venusian as faust_venusian
from faust.utils.urls import urllist
from mode import Service, ServiceT
from mode.utils.futures import notify
from mode.utils.queues import FlowControlQueue

from app.positions import seek_back

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# The seam: every private name of Faust, mode and aiokafka the project uses, and why.
#
# Nothing outside this module may use one (docs/architecture.md). Each entry names the upstream
# function this module copies, overrides, mirrors or calls, the private names that come with it,
# and a hash of that function's source in the versions below. tests/test_faust_seam.py fails,
# naming the function and what to re-check, when an installed version's source differs, and
# when this module uses a private name that no entry lists.
# ---------------------------------------------------------------------------------------------

WRITTEN_AGAINST = {"faust-streaming": "0.15.3", "mode-streaming": "0.7.1", "aiokafka": "0.14.0"}


@dataclass(frozen=True)
class Upstream:
    """One upstream function this module depends on beyond its public API."""

    function: str  # "module:Qualified.name"
    sha256: str  # first 16 hex digits of the sha256 of its source, as written against
    names: tuple[str, ...]  # the private names this module uses because of it
    why: str
    recheck: str  # what to re-check in this module when its source changed

    def resolve(self) -> Any:
        module, qualified = self.function.split(":")
        found: Any = importlib.import_module(module)
        for part in qualified.split("."):
            found = getattr(found, part)
        return found

    def installed_sha256(self) -> str:
        source = inspect.getsource(self.resolve())
        return hashlib.sha256(source.encode()).hexdigest()[:16]


UPSTREAM = (
    Upstream(
        "faust.transport.consumer:Consumer._drain_messages",
        "44a2500309e83c63",
        ("_drain_messages", "_read_offset", "_commit_every", "_n_acked", "_stopped"),
        "copied into Consumer._drain_messages: Faust's fetch loop, which has no hook between a "
        "fetch and its per-message delivery; the copy delivers bulk topics after each fetch",
        "port the upstream change into the copy (it is unchanged except where it says bulk)",
    ),
    Upstream(
        "faust.transport.consumer:Consumer._wait_next_records",
        "6218e1969a636b3f",
        ("_wait_next_records",),
        "overridden: the one place that sees a whole fetch before getmany() iterates it record "
        "by record; the override takes the bulk topics' records out of it",
        "that it still returns (records per partition, active partitions or None)",
    ),
    Upstream(
        "faust.transport.consumer:Consumer.getmany",
        "4b168d84882a70d6",
        ("_buffered_partitions",),
        "mirrored by Consumer._wait_next_records: the checks getmany() makes before it turns a "
        "record into a message (flow suspended: nothing; partition not active and not buffered: "
        "skipped; the high-water mark tracked per partition)",
        "that _wait_next_records makes the same checks as getmany() does now",
    ),
    Upstream(
        "faust.transport.drivers.aiokafka:Consumer._to_message",
        "7c24f6511b2fcef7",
        (),
        "mirrored by consumer_messages: the message Faust makes of an aiokafka record (its "
        "timestamp in seconds, the consumer generation)",
        "that consumer_messages still makes what it makes (tests/test_bulk.py compares them)",
    ),
    Upstream(
        "faust.types.tuples:Message.__init__",
        "afe1f75975597bc3",
        (),
        "mirrored by consumer_messages, which sets every slot as __init__ sets it, without the "
        "call (aiokafka's records always carry their key and value sizes)",
        "that consumer_messages sets every slot __init__ sets, to the same value",
    ),
    Upstream(
        "faust.transport.consumer:Consumer._add_gap",
        "4df2573ded7c1c2c",
        ("_add_gap",),
        "called by Consumer._deliver_bulk, as the fetch loop calls it per message: commits can "
        "pass offsets missing from a topic (compaction, transactions)",
        "its arguments (first missing offset, next offset present)",
    ),
    Upstream(
        "faust.transport.consumer:Consumer.ack",
        "5fcf41cf45153475",
        ("_committed_offset", "_acked_index", "_acked", "_n_acked", "_waiting_for_ack"),
        "mirrored by Batches.ack per partition instead of per message: under faust's ack_lock, "
        "mark the message acked, book an offset not below the committed one and not yet in "
        "_acked_index into _acked_index and _acked, count it in _n_acked, notify a wait_empty",
        "that Batches.ack still checks and books what ack() does (and nothing else is needed "
        "for _new_offset to commit exactly the acknowledged offsets)",
    ),
    Upstream(
        "faust.transport.consumer:Consumer._new_offset",
        "1d2c7ea89a7ad4f1",
        (),
        "reads what Batches.ack books: the acknowledged offsets per partition (_acked, in any "
        "order), _acked_index and the gaps; commits up to the first offset missing from them",
        "that _acked and _acked_index still mean what Batches.ack books in them",
    ),
    Upstream(
        "faust.transport.consumer:Consumer.track_message",
        "217d7f1399a4cd8e",
        (),
        "replaced for bulk topics by one Taken per take in the consumer's `unacked` set; its "
        "Monitor.on_message_in (and ack's on_message_out) are not called for them",
        "that tracking is still just an entry in `unacked` plus the message-in sensors",
    ),
    Upstream(
        "faust.transport.consumer:Consumer.wait_empty",
        "e4662fe24f094819",
        (),
        "waits while `unacked` holds entries, reading `refcount` for its log and, through "
        "_clean_unacked_messages, `acked`: a Taken provides both",
        "that wait_empty still reads only `acked` and `refcount` of what `unacked` holds",
    ),
    Upstream(
        "faust.transport.consumer:Consumer._clean_unacked_messages",
        "11be2587e71c9162",
        (),
        "drops the entries of `unacked` whose `acked` is true: a Taken is, once all its "
        "messages are acknowledged or gone",
        "that it still decides by `acked` alone",
    ),
    Upstream(
        "faust.transport.drivers.aiokafka:Consumer._new_consumer_thread",
        "0870ec53dea75083",
        ("_new_consumer_thread", "_thread"),
        "overridden to make our ConsumerThread, which the consumer then holds as _thread",
        "that it is still the only place the consumer thread is made, kept as _thread",
    ),
    Upstream(
        "faust.transport.drivers.aiokafka:AIOKafkaConsumerThread._create_worker_consumer",
        "c2701bfc3e6f6cad",
        ("_create_worker_consumer",),
        "overridden: it hard-codes fetch_max_wait_ms=1500 and Faust has no setting for it",
        "whether Faust now has a fetch wait setting (then use it and drop the override)",
    ),
    Upstream(
        "aiokafka.consumer.consumer:AIOKafkaConsumer.start",
        "2f1ba70443327538",
        ("_fetch_max_wait_ms",),
        "start() hands the consumer's _fetch_max_wait_ms to its fetcher: setting it on the "
        "consumer made (not yet started) by _create_worker_consumer sets the fetch wait",
        "that start() still reads _fetch_max_wait_ms",
    ),
    Upstream(
        "faust.transport.drivers.aiokafka:AIOKafkaConsumerThread._commit",
        "932852ce7a23f658",
        ("_commit",),
        "wrapped: a commit of partitions a rebalance took away in between raises ValueError in "
        "aiokafka, and Faust crashes the worker on it (docs/reliability.md)",
        "whether Faust now skips such a commit itself (then drop the wrapper)",
    ),
    Upstream(
        "faust.transport.drivers.aiokafka:AIOKafkaConsumerThread._ensure_consumer",
        "ff4a4c693b7ec63f",
        ("_ensure_consumer",),
        "called: the thread's aiokafka consumer, to pause/resume partitions in aiokafka itself "
        "and to read which ones it pauses; Faust offers neither",
        "that it still returns the started consumer or raises ConsumerNotStarted",
    ),
    Upstream(
        "faust.transport.drivers.aiokafka:Producer._ensure_producer",
        "5592a4bbdf251325",
        ("_ensure_producer",),
        "called by broker_client(): /health asks the broker for metadata on the producer's own "
        "connection, in the app's event loop; Faust has no public accessor for it",
        "that it still returns the started aiokafka producer",
    ),
    Upstream(
        "faust.tables.manager:TableManager.on_start",
        "365dd25fbc0e0684",
        ("_update_channels",),
        "overridden by TableManager.on_start without its fixed `sleep(1.0)`: a second of every "
        "worker start (and of its first stored row) spent waiting for tables that are all "
        "declared at import",
        "that the rest of on_start is still _update_channels() then recovery.start()",
    ),
    Upstream(
        "faust.app.base:App.discover",
        "380e02ab03dc00e9",
        (),
        "the only reader of the marks Faust's decorators leave for venusian, which "
        "skip_discovery_marks() skips in a process whose app never discovers",
        "that discover() is still the only reader of venusian's marks",
    ),
    Upstream(
        "mode.utils.queues:FlowControlQueue.clear",
        "fa9a86f6b097c90f",
        (),
        "overridden by Batches.clear: flow control calls it on a rebalance, at the end of table "
        "recovery and at shutdown, the moments the queued fetches must be given up",
        "that flow control still clears its queues through clear()",
    ),
)

# Fetches a topic's queue holds before the fetch loop waits for its sink. A fetch holds at most
# `broker_max_poll_records` messages (app/main.py sets it to SINK_BATCH_SIZE).
QUEUED_FETCHES = 2


class Taken:
    """One take's messages, tracked as one entry in the consumer's unacked set: Faust's
    `Consumer.wait_empty` (a rebalance, shutdown) waits while that set holds entries not `acked`,
    and logs their `refcount`.

    A take is done once all its messages are acknowledged, or once the task that took them has
    ended (an agent that crashed or stopped acknowledges nothing more): Faust's own tracking
    refers to a message weakly for the same reason, so that a lost message does not hold a
    rebalance up for ever. Weak references to the messages themselves would cost ~1 µs each.
    """

    __slots__ = ("__weakref__", "messages", "taker")

    def __init__(self, messages: list[Message], taker: asyncio.Task[Any] | None) -> None:
        self.messages = tuple(messages)
        self.taker = taker

    @property
    def given_up(self) -> bool:
        """Its taker has ended: nothing acknowledges its messages any more."""
        return self.taker is not None and self.taker.done()

    def unacknowledged(self) -> list[Message]:
        """Its messages still to be acknowledged (none once given up)."""
        if self.given_up:
            return []
        return [message for message in self.messages if not message.acked]

    @property
    def acked(self) -> bool:
        return self.given_up or all(message.acked for message in self.messages)

    @property
    def refcount(self) -> int:
        """How many of its messages are still to be acknowledged."""
        return len(self.unacknowledged())

    def __repr__(self) -> str:  # in wait_empty's warning while it waits
        return f"<Taken: {self.refcount} of {len(self.messages)} messages not acknowledged>"


class Batches(FlowControlQueue[list[Message]]):
    """One topic's fetched messages, queued for its sink in fetch order."""

    def __init__(self, app: AppT, topic: str) -> None:
        # Unbounded as a queue: the fetch loop never blocks inside put() (clear() would not wake
        # it); `has_room` is the bound.
        super().__init__(flow_control=app.flow_control, clear_on_resume=True)
        self.app = app
        self.topic = topic
        self.carry: list[Message] = []  # fetched messages beyond the previous take's limit
        self.has_room = asyncio.Event()
        self.has_room.set()
        self.seeking: set[asyncio.Future[None]] = set()
        self.taken: list[Taken] = []  # the takes not yet acknowledged, in the order taken

    def clear(self) -> None:
        """Flow control clears the queue on rebalance, at the end of table recovery and at
        shutdown; the carry goes with it. None of these messages was tracked or acknowledged.

        The fetch loop already counted them as read and the fetcher's position is past them, and
        the end of recovery clears *after* Faust's seek to the committed offsets: each partition
        is sought back to its first dropped message, or that message would only be fetched again
        once a later one arrives (the sink's hole check) or after a restart.

        With the flow suspended (a rebalance or shutdown, which next wait for every taken message
        to be acknowledged), an empty fetch wakes a sink waiting in `take()`, which then returns.
        """
        dropped = list(self.carry)
        while not self.empty():
            dropped.extend(self.get_nowait())
        first: dict[TP, int] = {}
        for message in dropped:
            first[message.tp] = min(first.get(message.tp, message.offset), message.offset)
        super().clear()
        self.carry = []
        self.has_room.set()
        if not self.app.flow_control.is_active():
            self.put_nowait([])
        for tp, offset in first.items():
            seek = asyncio.ensure_future(seek_back(self.app, tp, offset))
            self.seeking.add(seek)  # a reference until it is done
            seek.add_done_callback(self.seeking.discard)

    async def take(self, limit: int, timeout: float | None = None) -> list[Message]:
        """Everything fetched so far, up to `limit` messages; waits only while nothing is queued,
        for at most `timeout` seconds, and not while the flow is suspended (then the answer is an
        empty list).

        A quiet stream gets each message as soon as it is fetched; a busy one gets bigger
        batches, because the queue fills while the previous batch is being written. A timeout
        cannot lose a fetch: it can only interrupt the wait in `get()`, which then leaves the
        fetch in the queue.
        """
        try:
            async with asyncio.timeout(timeout):
                while True:
                    messages = list(self.carry or await self.get())
                    while len(messages) < limit and not self.empty():
                        messages.extend(self.get_nowait())
                    messages, self.carry = messages[:limit], messages[limit:]
                    if self.qsize() < QUEUED_FETCHES:
                        self.has_room.set()
                    current = self._current(messages)
                    if current or not self.app.flow_control.is_active():
                        return current
        except TimeoutError:
            return []

    def _current(self, messages: list[Message]) -> list[Message]:
        """Track the messages of the current generation; drop those fetched before a rebalance
        or a suspension (as Faust's stream does): they are fetched again, and never acknowledged.
        """
        app = self.app
        if not app.flow_control.is_active():
            if messages:
                log.info("%s: %d messages dropped: flow suspended", self.topic, len(messages))
            return []
        generation = app.consumer_generation_id
        current = [message for message in messages if message.generation_id == generation]
        if len(current) < len(messages):
            log.info(
                "%s: %d fetched messages dropped: fetched before rebalance %s",
                self.topic,
                len(messages) - len(current),
                generation,
            )
        if current:
            taken = Taken(current, asyncio.current_task())
            self.taken.append(taken)
            self._unacked().add(taken)
        return current

    def ack(self, messages: Sequence[Message]) -> None:
        """Acknowledge taken messages: Faust may now commit past them.

        Faust's `Consumer.ack` per partition instead of per message, with the same checks and
        bookkeeping under one hold of its `ack_lock`: an offset below the committed one or
        already acknowledged is not booked again; Faust commits up to the first offset not
        acknowledged (nor a gap). A take no longer waited for leaves the consumer's unacked set.
        """
        consumer = cast(Consumer, self.app.consumer)
        offsets: dict[TP, list[int]] = {}
        with ack_lock:
            for message in messages:
                if not message.acked:
                    message.acked = True
                    offsets.setdefault(message.tp, []).append(message.offset)
            acks_enabled_for = self.app.topics.acks_enabled_for
            booked = 0
            for tp, tp_offsets in offsets.items():
                if not acks_enabled_for(tp.topic):
                    continue
                committed = consumer._committed_offset[tp]
                acked_index = consumer._acked_index[tp]
                new = [
                    offset
                    for offset in dict.fromkeys(tp_offsets)  # in order, each offset once
                    if (committed is None or offset >= committed) and offset not in acked_index
                ]
                acked_index.update(new)
                consumer._acked[tp].extend(new)
                booked += len(new)
            consumer._n_acked += booked
            if offsets:
                self._settle()
                notify(consumer._waiting_for_ack)

    def _settle(self) -> None:
        """Stop tracking the takes whose messages are all acknowledged (or whose taker ended)."""
        unacked = self._unacked()
        waiting = []
        for taken in self.taken:
            if taken.acked:
                unacked.discard(taken)
            else:
                waiting.append(taken)
        self.taken = waiting

    def _unacked(self) -> MutableSet[Any]:
        """The consumer's set of what `wait_empty` waits for (weak references)."""
        return cast(MutableSet[Any], self.app.consumer.unacked)

    async def put_fetched(self, messages: list[Message], consumer: Consumer) -> None:
        """Queue one fetch's messages; then, while the queue is full, wait for room (the sink
        takes, or a rebalance clears) unless the consumer's flow is suspended."""
        self.put_nowait(messages)
        if self.qsize() >= QUEUED_FETCHES:
            self.has_room.clear()
            await consumer.wait_first(self.has_room.wait(), consumer.suspend_flow.wait())


def consumer_messages(tp: TP, records: Iterable[Any], generation_id: int) -> list[Message]:
    """The messages Faust's `_to_message` makes of a partition's aiokafka records, made without
    calling `ConsumerMessage(...)` per record: its keyword call and `__init__` cost about 1 µs per
    message, setting the same slots directly about 0.4 µs."""
    new = ConsumerMessage.__new__
    messages: list[Message] = []
    append = messages.append
    topic, partition = tp
    for record in records:
        message = new(ConsumerMessage)
        message.topic = topic
        message.partition = partition
        message.offset = record.offset
        timestamp = record.timestamp
        message.timestamp = cast(float, None) if timestamp is None else timestamp / 1000.0
        message.timestamp_type = record.timestamp_type
        message.headers = record.headers
        message.key = record.key
        message.value = record.value
        message.checksum = record.checksum
        message.serialized_key_size = record.serialized_key_size
        message.serialized_value_size = record.serialized_value_size
        message.acked = False
        message.refcount = 0
        message.tp = tp
        message.tracked = False  # not ConsumerMessage.use_tracking
        message.time_in = None
        message.time_out = None
        message.time_total = None
        message.generation_id = generation_id
        append(message)
    return messages


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread, with the worker consumer's fetch wait from `App`, and Faust's
    partition pauses applied to aiokafka's fetcher."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        """Faust 0.15.3 hard-codes `fetch_max_wait_ms` to 1500 ms and has no setting for it: a
        broker that holds a fetch that long adds it to the latency of every quiet stream."""
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = cast(App, self.app).fetch_max_wait_ms
        return consumer

    async def _commit(self, offsets: Mapping[TP, int]) -> bool:
        """Faust keeps the offsets of assigned partitions twice: in the app's loop, then here in
        the consumer thread's, where a rebalance may have taken them all away in between. Faust
        then asks aiokafka to commit nothing, which raises ValueError, and Faust crashes the
        worker on it; here that commit is skipped, as Faust skips one of revoked partitions (the
        new owner reads them again; the sink's stored offsets decide what is written)."""
        assigned = self.assignment()
        if not any(tp in assigned for tp in offsets):
            log.info("commit of %s skipped: no longer assigned", sorted(offsets))
            return False
        return cast(bool, await super()._commit(offsets))

    def set_fetching(self, tps: set[TP], fetching: bool) -> None:
        """Pause (or resume) fetching `tps` in aiokafka; callable from the app's thread. Runs in
        this thread's loop, where aiokafka's fetcher lives, in the order of the calls."""
        if not self.thread_loop.is_closed():
            self.thread_loop.call_soon_threadsafe(self._set_fetching, tps, fetching)

    def _set_fetching(self, tps: set[TP], fetching: bool) -> None:
        try:
            consumer = self._ensure_consumer()
        except ConsumerNotStarted:  # nothing is fetched yet
            return
        assigned = consumer.assignment()  # a rebalance may have moved some away meanwhile
        partitions = [TopicPartition(tp.topic, tp.partition) for tp in tps if tp in assigned]
        if fetching:
            consumer.resume(*partitions)
        else:
            consumer.pause(*partitions)

    async def paused(self) -> set[TP]:
        """The partitions aiokafka does not fetch right now (raises ConsumerNotStarted)."""
        return {TP(tp.topic, tp.partition) for tp in self._ensure_consumer().paused()}


class Consumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer; messages of `App.bulk` topics are delivered in lists."""

    # Messages of bulk topics from the latest fetch, per partition, for `_drain_messages`.
    _fetched_bulk: list[tuple[TP, list[Message]]] = []

    _thread: ConsumerThread

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def pause_partitions(self, tps: Iterable[TP]) -> None:
        """Faust pauses a partition in its own bookkeeping only (it stops asking aiokafka for its
        records): aiokafka goes on fetching it and buffers what it gets, and while a partition's
        buffered records are not taken, aiokafka sends no fetch to that broker for up to its
        `prefetch_backoff` (100 ms). Faust pauses every table's changelog once it is recovered, so
        a table's first write to each changelog partition (after every rebalance) held every
        partition's fetches up for 100 ms (docs/performance.md, section 3); so did the stream
        partitions during recovery. Here a Faust pause is an aiokafka pause too."""
        paused = faust_consumer.ensure_TPset(tps)
        super().pause_partitions(paused)
        self._thread.set_fetching(paused, False)

    def resume_partitions(self, tps: Iterable[TP]) -> None:
        resumed = faust_consumer.ensure_TPset(tps)
        super().resume_partitions(resumed)
        self._thread.set_fetching(resumed, True)

    async def paused_partitions(self) -> set[TP]:
        """The partitions not fetched right now, as the consumer thread sees them."""
        paused: set[TP] = await self._thread.call_thread(self._thread.paused)
        return paused

    async def _wait_next_records(self, timeout: float) -> tuple[Any, set[TP] | None]:
        """Faust's fetch, with the records of bulk topics taken out of what its `getmany`
        iterates one by one. They become messages here, at once, so they carry the consumer
        generation of this fetch (what `getmany` gives the messages it yields); partitions that
        `getmany` would skip (not active, not buffered) are skipped too."""
        self._fetched_bulk = []  # a fetch skipped at shutdown is never delivered later
        records, active = await super()._wait_next_records(timeout)
        bulk = cast(App, self.app).bulk
        if not records or not self.flow_active:  # Faust's getmany seeks back; nothing is lost
            return records, active
        buffered, generation = self._buffered_partitions, self.app.consumer_generation_id
        fetched: list[tuple[TP, list[Message]]] = []
        rest = {}
        for tp, tp_records in records.items():
            if tp.topic not in bulk:
                rest[tp] = tp_records
            elif active is None or tp in active or tp in buffered:
                self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
                messages = consumer_messages(tp, tp_records, generation)
                fetched.append((tp, messages))
        self._fetched_bulk = fetched
        return rest, active

    async def _deliver_bulk(self) -> None:
        """Queue the set-aside messages of the latest fetch for their sinks, one list per topic,
        after the checks `_drain_messages` makes per message: a message below the read offset
        is dropped, a jump in offsets is recorded as a gap (so commits can pass it)."""
        fetched, self._fetched_bulk = self._fetched_bulk, []
        lists: dict[str, list[Message]] = {}
        for tp, messages in fetched:
            read = self._read_offset[tp]
            if read is not None:
                messages = [message for message in messages if message.offset >= read]
            if not messages:
                continue
            if self.app.topics.acks_enabled_for(tp.topic):
                previous = read
                for message in messages:
                    if previous and message.offset - previous > 1:
                        await self._add_gap(tp, previous + 1, message.offset)
                    previous = message.offset
            self._read_offset[tp] = messages[-1].offset
            lists.setdefault(tp.topic, []).extend(messages)
        for topic, messages in lists.items():
            await cast(App, self.app).bulk[topic].put_fetched(messages, self)

    async def _drain_messages(self, fetcher: ServiceT) -> None:
        """Faust 0.15.3's loop, unchanged except where it says "bulk"."""
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = cast(Service, self)._stopped.is_set
        fetcher_should_stop = cast(Service, fetcher)._stopped.is_set

        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        flag_consumer_fetching = faust_consumer.CONSUMER_FETCHING
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for

        yield_every = 100
        num_since_yield = 0
        sleep = asyncio.sleep

        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(flag_consumer_fetching)
                ait = cast(AsyncIterator, getmany(timeout=1.0))

                # Sleeping because sometimes getmany is called in a loop
                # never releasing to the event loop
                await self.sleep(0)
                if not self.should_stop:
                    async for tp, message in ait:
                        num_since_yield += 1
                        if num_since_yield > yield_every:
                            await sleep(0)
                            num_since_yield = 0

                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            # We have a gap in income messages
                            if gap > 1 and r_offset:
                                acks_enabled = acks_enabled_for(message.topic)
                                if acks_enabled:
                                    await self._add_gap(tp, r_offset + 1, offset)
                            if commit_every is not None:
                                if self._n_acked >= commit_every:
                                    self._n_acked = 0
                                    await self.commit()
                            await self.wait_first(callback(message), self.suspend_flow.wait())
                            set_read_offset(tp, offset)
                        else:
                            self.log.dev(
                                "DROPPED MESSAGE ROFF %r: k=%r v=%r",
                                offset,
                                message.key,
                                message.value,
                            )
                    if commit_every is not None and self._n_acked >= commit_every:  # bulk
                        self._n_acked = 0
                        await self.commit()
                    await self._deliver_bulk()  # bulk: one list per topic and fetch
                    unset_flag(flag_consumer_fetching)

        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                # we're already stopping so ignore
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                # we're already stopping so ignore
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(flag_consumer_fetching)


class Transport(faust_aiokafka.Transport):
    """Faust's aiokafka transport with the bulk-delivering consumer.

    Registered as Faust registers transports, in the `faust.transports` entry-point group
    (pyproject.toml): a consumer broker URL with the scheme `TRANSPORT_SCHEME` selects it.
    """

    Consumer = Consumer


TRANSPORT_SCHEME = "kafka-bulk"


def broker_client(app: AppT) -> Any:
    """The aiokafka client of the app's producer (a started worker's), for metadata requests in
    the app's own event loop."""
    return cast(faust_aiokafka.Producer, app.producer)._ensure_producer().client


class TableManager(faust_tables.TableManager):
    """Faust's table manager, started without Faust's fixed one-second sleep: it gives tables
    declared after the app starts time to register, and every table of this app is declared when
    its module is imported (tables/), long before. Its channels are set up and recovery starts at
    once, so the consumer subscribes, joins the group and fetches a second earlier."""

    async def on_start(self) -> None:
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


def skip_discovery_marks() -> None:
    """Faust's decorators (agent, task, timer, page, command) mark what they decorate for
    venusian, whose scan only `App.discover()` runs, and each mark reads its caller's source file
    (inspect.getframeinfo): ~40-50 ms of a worker's start for this app's 26 decorators. Skipped
    in a process whose app never discovers (autodiscover off): Faust's module, and so the skip,
    is shared by every app of the process."""
    faust_venusian.attach = _no_discovery_mark


def _no_discovery_mark(fun: object, category: str, **kwargs: object) -> None:
    """`faust.utils.venusian.attach` in a process that never discovers: nothing to mark."""


class App(faust.App):
    """A Faust app whose sinks can take their topics in bulk (`App.bulk`): it consumes through
    `Transport`, at the addresses of its `broker` setting; it produces through Faust's own."""

    def __init__(
        self,
        *args: Any,
        broker: str = "kafka://localhost:9092",
        fetch_max_wait_ms: int = 1500,
        **kwargs: Any,
    ) -> None:
        """`fetch_max_wait_ms`: the worker consumer's fetch wait (Faust's own value: 1500)."""
        if not any(
            entry.name == TRANSPORT_SCHEME
            for entry in importlib.metadata.entry_points(group="faust.transports")
        ):
            raise RuntimeError(
                f"transport {TRANSPORT_SCHEME!r} is not registered: install the project "
                "(pip install -e .; ./dev does it whenever pyproject.toml changes)"
            )
        urls = urllist(broker, default_scheme="kafka")
        consumer = [url.with_scheme(TRANSPORT_SCHEME) for url in urls]
        kwargs.setdefault("TableManager", TableManager)
        super().__init__(*args, broker=broker, broker_consumer=consumer, **kwargs)
        # A Param descriptor whose value may be a callable: mypy reads it as a method (as Faust's
        # own App.discover notes).
        if not self.conf.autodiscover:  # type: ignore[misc]
            skip_discovery_marks()
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.bulk: dict[str, Batches] = {}
        self.tasks_while_joining: list[Callable[[], Awaitable[None]]] = []
        self.joining_tasks_started = False
        self.on_partitions_revoked.connect(self._joining)

    def task_while_joining(
        self, fun: Callable[[], Awaitable[None]]
    ) -> Callable[[], Awaitable[None]]:
        """Like `app.task`, but started once the worker has asked to join its consumer group,
        not once it has joined and recovered its tables: for work that needs neither. It then
        runs while the broker holds the join (half the session timeout) instead of beside the
        first fetched batch, which it delayed (docs/performance.md, section 7). Not at the app's
        start either: on the event loop before the join request, it delayed the request."""
        self.tasks_while_joining.append(fun)
        return fun

    async def _joining(self, sender: object, /, *args: object, **kwargs: object) -> None:
        """Faust's revocation signal, sent before every (re-)join request: the first starts the
        tasks. They are scheduled, not awaited: the join request waits for this signal."""
        self.start_joining_tasks()

    async def on_started(self) -> None:
        """Faust's; then the tasks, should no join have begun (nothing was revoked)."""
        await super().on_started()
        self.start_joining_tasks()

    def start_joining_tasks(self) -> None:
        if not self.joining_tasks_started:
            self.joining_tasks_started = True
            for task in self.tasks_while_joining:
                self.add_future(task())

    def batches(self, topic: str) -> Batches:
        """The queue `topic` is delivered on from now on, instead of to its agent's stream."""
        batches = self.bulk[topic] = Batches(self, topic)
        return batches
