"""Bulk delivery (app/bulk.py): the queue between Faust's fetch loop and a sink.

The queue is exercised on a real (not started) Faust app and consumer with Faust's own message
type: the states it must handle (a stale consumer generation, a suspension between a fetch and a
take, a rebalance while the fetch loop waits for room) cannot be produced on demand by a running
worker. What a worker does with it end to end (exact rows, crashes, rebalances, a backlog in
batches of SINK_BATCH_SIZE) runs on real workers, brokers and databases, here and in
test_sink.py and test_reliability.py.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from faust.transport.conductor import Conductor
from faust.types import TP, ConsumerMessage, Message

from app.bulk import App, Batches, Consumer, Taken, consumer_messages
from local.embedded import EmbeddedBroker, create_generated_topics
from models import CryptoPriceData
from testkit.records import prices
from testkit.workers import Kafka, Worker

TOPIC = CryptoPriceData.topic.name

Make = Callable[..., list[Message]]


@pytest.fixture
async def app() -> App:
    """An app as a worker has it once partitions are assigned: the topic subscribed with
    acknowledgements (a sink's agent does that), flow control resumed."""
    app = App(f"test-bulk-{uuid.uuid4().hex[:8]}", broker="kafka://127.0.0.1:1")
    app.topics.add(app.topic(TOPIC))
    await cast(
        Conductor, app.topics
    )._update_indices()  # what the conductor does when it subscribes
    app.flow_control.resume()
    return app


@pytest.fixture
def batches(app: App) -> Batches:
    return app.batches(TOPIC)


@pytest.fixture
def messages(app: App) -> Make:
    """Messages as the fetch loop makes them: of the current consumer generation by default."""
    offsets = itertools.count()

    def make(count: int, generation: int | None = None) -> list[Message]:
        made: list[Message] = []
        for offset in itertools.islice(offsets, count):
            made.append(
                ConsumerMessage(
                    TOPIC,
                    0,
                    offset,
                    0.0,
                    0,
                    [],
                    b"key",
                    b"value",
                    None,
                    tp=TP(TOPIC, 0),
                    generation_id=app.consumer_generation_id if generation is None else generation,
                )
            )
        return made

    return make


async def returns(wait_empty: asyncio.Future[None], consumer: Consumer) -> bool:
    """Whether Faust's `wait_empty` returns within 10 s. It cannot be cancelled (it takes a
    cancellation for the end of its wait for an ack): if it is still waiting, the consumer's
    stop flag ends it."""
    done, _ = await asyncio.wait({wait_empty}, timeout=10)
    if not done:
        consumer._stopped.set()
        await wait_empty
    return bool(done)


async def run_ready_tasks() -> None:
    """Let every task that can run, run, until each waits for something: a task still not done
    then is blocked, whatever the clock says."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_take_returns_everything_queued_up_to_the_limit_in_fetch_order(
    batches: Batches, messages: Make
) -> None:
    first, second, third = messages(5), messages(5), messages(2)
    for fetched in (first, second, third):
        batches.put_nowait(fetched)

    assert await batches.take(7) == first + second[:2]
    # The rest of a fetch beyond the limit is not lost: it leads the next batch.
    assert await batches.take(7) == second[2:] + third
    assert batches.empty() and not batches.carry


def waited_for(app: App) -> set[Message]:
    """The messages Faust's `Consumer.wait_empty` waits for: one `Taken` per take stands in the
    consumer's unacked set for its messages not yet acknowledged."""
    return {
        message
        for taken in app.consumer.unacked
        if not taken.acked
        for message in cast(Taken, taken).unacknowledged()
    }


async def test_taken_messages_are_pending_in_the_consumer_until_acknowledged(
    app: App, batches: Batches, messages: Make
) -> None:
    fetched = messages(4)
    batches.put_nowait(fetched)
    taken = await batches.take(10)
    # Tracked: Faust's stream_wait_empty (rebalance, shutdown) waits for exactly these.
    assert waited_for(app) == set(taken)

    batches.ack(taken[:3])
    assert waited_for(app) == {taken[3]}
    assert [repr(entry) for entry in app.consumer.unacked] == [
        "<Taken: 1 of 4 messages not acknowledged>"  # in Faust's log while a rebalance waits
    ]
    assert [message.acked for message in taken] == [True, True, True, False]
    batches.ack(taken[3:])
    assert not app.consumer.unacked


async def test_messages_of_an_earlier_consumer_generation_are_dropped_untracked(
    app: App, batches: Batches, messages: Make
) -> None:
    app.consumer_generation_id = 3
    stale = messages(3, generation=2)
    current = messages(2)
    batches.put_nowait(stale + current[:1])
    batches.put_nowait(current[1:])

    assert await batches.take(10) == current
    assert waited_for(app) == set(current)
    assert not any(message.acked for message in stale)


async def test_a_rebalance_clears_queued_and_carried_messages(
    app: App, batches: Batches, messages: Make
) -> None:
    before = messages(10)
    batches.put_nowait(before)
    assert await batches.take(3) == before[:3]  # seven are carried over
    batches.put_nowait(messages(2))

    # What Faust does on partitions revoked: suspend and clear every flow-controlled queue.
    app.flow_control.suspend()
    app.flow_control.clear()
    app.flow_control.resume()

    after = messages(2)
    batches.put_nowait(after)
    assert await batches.take(10) == after


async def test_messages_taken_while_flow_is_suspended_are_dropped(
    app: App, batches: Batches, messages: Make
) -> None:
    during = messages(3)
    app.flow_control.suspend()
    batches.put_nowait(during)
    assert await batches.take(10) == []  # dropped; while suspended, nothing is waited for
    assert not app.consumer.unacked

    app.flow_control.resume()
    after = messages(1)
    batches.put_nowait(after)
    assert await batches.take(10) == after


async def test_a_sink_waiting_for_messages_is_woken_by_a_rebalance(
    app: App, batches: Batches
) -> None:
    """A rebalance waits for every taken message to be acknowledged: a sink holding stored
    messages for its tables must get the chance to hand them over at once."""
    waiting = asyncio.ensure_future(batches.take(10))
    await run_ready_tasks()
    assert not waiting.done()
    app.flow_control.suspend()
    app.flow_control.clear()
    assert await asyncio.wait_for(waiting, 10) == []


async def test_a_take_that_times_out_returns_nothing_and_the_next_gets_later_fetches(
    batches: Batches, messages: Make
) -> None:
    assert await batches.take(10, timeout=0.05) == []
    later = messages(2)
    batches.put_nowait(later)
    assert await batches.take(10, timeout=0.05) == later


async def test_a_fetch_waiting_for_room_is_released_by_the_sink_or_by_a_rebalance(
    app: App, batches: Batches, messages: Make
) -> None:
    """The fetch loop waits while the queue is full; a rebalance that clears the queue must
    release it too, or the worker would stop fetching for good."""
    consumer = cast(Consumer, app.consumer)
    batches.put_nowait(messages(1))
    waiting = asyncio.ensure_future(batches.put_fetched(messages(1), consumer))
    await run_ready_tasks()
    assert not waiting.done()
    await batches.take(1)  # the sink takes one fetch
    await asyncio.wait_for(waiting, 10)

    waiting = asyncio.ensure_future(batches.put_fetched(messages(1), consumer))
    await run_ready_tasks()
    assert not waiting.done()
    app.flow_control.suspend()
    app.flow_control.clear()
    await asyncio.wait_for(waiting, 10)
    assert batches.get_nowait() == []  # only the empty fetch that wakes a waiting sink is left
    assert batches.empty()


async def test_a_fetch_is_queued_as_one_list_past_the_read_offset_with_its_gaps_recorded(
    app: App, batches: Batches, messages: Make
) -> None:
    """What Faust's fetch loop checks per message, the bulk path checks per partition: messages
    below the read offset are dropped, a jump in offsets is recorded as a gap (so that commits
    can pass it), and the read offset moves to the last message."""
    consumer = cast(Consumer, app.consumer)
    tp = TP(TOPIC, 0)
    made = messages(10)  # offsets 0..9
    consumer._read_offset[tp] = 3
    consumer._fetched_bulk = [(tp, [made[i] for i in (2, 3, 4, 7, 8)])]  # 5 and 6 are missing
    await consumer._deliver_bulk()
    assert batches.get_nowait() == [made[i] for i in (3, 4, 7, 8)]
    assert batches.empty()
    assert [(gap.begin, gap.end) for gap in consumer._gap[tp]] == [(5, 8)]  # as Faust records it
    assert consumer._read_offset[tp] == 8
    assert consumer._fetched_bulk == []


@pytest.mark.slow
async def test_a_backlog_is_written_in_batches_of_at_most_sink_batch_size(
    kafka: Kafka,
    own_broker: EmbeddedBroker,
    app_id: str,
    bare_env: dict[str, str],
    migrated: str,
    tmp_path: Path,
) -> None:
    """Rows written in one transaction share its `xmin`: that is the batch."""
    records = prices("coin", 300)
    sent = await kafka.send_records(records)  # a backlog before the worker starts
    worker = Worker(bare_env, own_broker, migrated, app_id, tmp_path, {"SINK_BATCH_SIZE": "7"})
    try:
        await kafka.wait_committed(sent, worker)
        connection = await asyncpg.connect(migrated)
        try:
            sizes = [
                row["rows"]
                for row in await connection.fetch(
                    "SELECT xmin::text, count(*) AS rows FROM crypto_prices GROUP BY 1"
                )
            ]
        finally:
            await connection.close()
    finally:
        worker.kill()
    assert sum(sizes) == len(records)
    assert max(sizes) == 7  # the limit holds, and a backlog fills batches up to it


async def test_a_commit_of_partitions_revoked_meanwhile_is_skipped_not_a_crash(
    app: App, own_broker: EmbeddedBroker, app_id: str
) -> None:
    """Faust keeps only assigned partitions' offsets when it asks the consumer thread to commit,
    and again in the thread; a rebalance in between can leave nothing to commit, which aiokafka
    refuses with a ValueError that Faust turns into a crash of the worker."""
    bootstrap = f"127.0.0.1:{own_broker.port}"
    await create_generated_topics(bootstrap)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=app_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(TOPIC, 0)])
        thread = cast(Consumer, app.consumer)._thread
        thread._consumer = consumer  # the thread's aiokafka consumer, as if started

        assert await thread._commit({TP(TOPIC, 1): 5}) is False  # partition 1: not assigned
        assert thread.crash_reason is None
        assert await thread._commit({TP(TOPIC, 0): 5, TP(TOPIC, 1): 9}) is True
        assert thread.crash_reason is None
        assert await consumer.committed(TopicPartition(TOPIC, 0)) == 5
        assert await consumer.committed(TopicPartition(TOPIC, 1)) is None
    finally:
        await consumer.stop()


async def test_faust_waits_for_a_taken_batch_until_the_sink_acknowledges_it(
    app: App, batches: Batches, messages: Make
) -> None:
    """A rebalance or shutdown runs Faust's `Consumer.wait_empty` after clearing the queues: it
    must not return while a taken batch is not yet stored (nor acknowledged)."""
    cast(Consumer, app.consumer)._committed_offset[TP(TOPIC, 0)] = 1000  # no commit: no broker
    batches.put_nowait(messages(3))
    batches.put_nowait(messages(2))
    first = await batches.take(3)
    second = await batches.take(3)
    waiting = asyncio.ensure_future(app.consumer.wait_empty())
    await run_ready_tasks()
    assert not waiting.done()

    batches.ack(first + second[:1])
    await run_ready_tasks()
    assert not waiting.done()  # one message of the second batch is not acknowledged yet

    batches.ack(second[1:])
    assert await returns(waiting, cast(Consumer, app.consumer))
    assert not app.consumer.unacked


async def test_a_batch_taken_by_a_task_that_ended_unacknowledged_is_not_waited_for(
    app: App, batches: Batches, messages: Make
) -> None:
    """As Faust's own per-message tracking lets a lost message go (it refers to it weakly): a
    sink's agent that crashed acknowledges nothing more, and must not hold a rebalance up for
    ever. Its offsets are not committed: the sink reads them again."""
    cast(Consumer, app.consumer)._committed_offset[TP(TOPIC, 0)] = 1000  # no commit: no broker
    batches.put_nowait(messages(3))
    kept = await batches.take(2)

    async def crashing_agent() -> None:
        await batches.take(2)
        raise RuntimeError("a bug in the sink")

    agent = asyncio.ensure_future(crashing_agent())
    waiting = asyncio.ensure_future(app.consumer.wait_empty())
    await run_ready_tasks()
    assert agent.done() and not waiting.done()  # `kept` is still being worked on

    batches.ack(kept)
    assert await returns(waiting, cast(Consumer, app.consumer))
    assert not app.consumer.unacked
    with pytest.raises(RuntimeError):
        agent.result()


async def test_acknowledging_a_batch_books_what_faust_books_acknowledging_each_message() -> None:
    """`Batches.ack` does per partition what Faust's `Consumer.ack` does per message, so Faust
    commits the same offsets: up to the first one not acknowledged, across recorded gaps, never
    below the committed offset, and an offset acknowledged twice counts once."""
    offsets = {0: [10, 11, 12, 13, 14, 15, 16, 20, 21, 22], 1: [3, 4, 5, 6, 7, 8, 9], 2: [0, 1]}
    committed = {0: 12, 1: None, 2: None}  # partition 0: committed up to 12 before
    gaps = {0: (17, 19)}  # partition 0: offsets 17..19 are missing from the log (compaction)
    acknowledged: tuple[list[tuple[int | str, ...]], ...] = (  # in this order, in these calls
        # 0:15 and 1:5 are acknowledged twice, 1:5 in one call, as 1:6 and its second fetch
        [(1, 3), (1, 4), (0, 10), (0, 11), (0, 12), (0, 13)],
        [(0, 14), (0, 16), (1, 6), (1, 5), (0, 15), (1, 5), (2, 0), (1, 6, "again")],
        [(0, 20), (0, 21), (2, 1), (1, 9), (0, 15)],  # never: 0:22, 1:7, 1:8
    )

    async def booked(acknowledge: Callable[[App, Batches, list[Message]], None]) -> tuple[Any, ...]:
        app = App(f"test-bulk-{uuid.uuid4().hex[:8]}", broker="kafka://127.0.0.1:1")
        app.topics.add(app.topic(TOPIC))
        await cast(Conductor, app.topics)._update_indices()
        app.flow_control.resume()
        batches = app.batches(TOPIC)
        consumer = cast(Consumer, app.consumer)

        def message(partition: int, offset: int) -> Message:
            return ConsumerMessage(
                TOPIC, partition, offset, 0.0, 0, [], b"k", b"v", None,
                tp=TP(TOPIC, partition), generation_id=app.consumer_generation_id,
            )  # fmt: skip

        made: dict[tuple[int | str, ...], Message] = {
            (partition, offset): message(partition, offset)
            for partition, partition_offsets in offsets.items()
            for offset in partition_offsets
        }
        # 1:6 fetched again (a seek back) and taken before the first one is acknowledged.
        made[(1, 6, "again")] = message(1, 6)
        for partition, offset in committed.items():
            consumer._committed_offset[TP(TOPIC, partition)] = offset
        for partition, (first, last) in gaps.items():
            await consumer._add_gap(TP(TOPIC, partition), first, last)
        batches.put_nowait(list(made.values()))
        assert await batches.take(len(made)) == list(made.values())
        commits = []
        for call in acknowledged:
            acknowledge(app, batches, [made[key] for key in call])
            commits.append(consumer._filter_committable_offsets(list(consumer._acked)))
            consumer._committed_offset.update(commits[-1])  # as if committed
        return (
            commits,
            {tp: sorted(acked) for tp, acked in consumer._acked.items()},
            dict(consumer._acked_index),
            consumer._n_acked,
            {key: message.acked for key, message in made.items()},
        )

    def one_by_one(app: App, batches: Batches, acknowledged: list[Message]) -> None:
        for message in acknowledged:
            app.consumer.ack(message)

    def in_bulk(app: App, batches: Batches, acknowledged: list[Message]) -> None:
        batches.ack(acknowledged)

    by_faust, by_batches = await booked(one_by_one), await booked(in_bulk)
    assert by_batches == by_faust
    commits = by_faust[0]
    tp0, tp1, tp2 = (TP(TOPIC, partition) for partition in range(3))
    # Partition 0: 12..13 (10, 11 are below the committed offset), then 14..16, then the gap
    # 17..19 and 20, 21 (22 is not acknowledged); partition 1: 3, 4, then 5, 6 (7 and 8 are
    # not acknowledged: 9 waits); partition 2: 0, then 1.
    assert commits == [{tp0: 14, tp1: 5}, {tp0: 17, tp1: 7, tp2: 1}, {tp0: 22, tp2: 2}]


def test_the_bulk_path_makes_the_messages_faust_makes_of_the_same_records(app: App) -> None:
    """`consumer_messages` sets a message's slots itself instead of calling Faust's
    `_to_message` per record: every slot (and anything else an instance holds) must be what
    Faust's own gives."""
    tp = TP(TOPIC, 3)
    records = [
        ConsumerRecord(TOPIC, 3, 41, 1_700_000_000_123, 0, b"bitcoin", b"{}", None, 7, 2, ()),
        ConsumerRecord(TOPIC, 3, 42, None, 1, None, b"[]", 12345, -1, 2, (("h", b"1"),)),  # type: ignore[arg-type]
    ]
    app.consumer_generation_id = 7
    missing = object()

    def state(message: Message) -> dict[str, object]:
        slots = [
            slot
            for cls in type(message).__mro__
            for slot in cls.__dict__.get("__slots__", ())
            if slot != "__weakref__"
        ]
        held = {slot: getattr(message, slot, missing) for slot in slots}
        held["__class__"] = type(message)
        held["__dict__"] = getattr(message, "__dict__", None)
        return held

    by_faust = [cast(Consumer, app.consumer)._to_message(tp, record) for record in records]
    ours = consumer_messages(tp, records, app.consumer_generation_id)
    assert [state(message) for message in ours] == [state(message) for message in by_faust]
    assert ours[0].timestamp == 1_700_000_000.123 and ours[1].timestamp is None
