"""The sink agents: one per record topic in SINK_TOPICS (default: every record in
`models.RECORDS`), each an `agents.sink.Sink` given the worker's collaborators. Nothing here
decides anything; it is where the app meets the sinks.

The stored offsets are kept under APP_ID, the deployment, not under the process's consumer group
(`settings.consumer_group`): process types of one deployment that sink the same topic, or a
deployment re-scoped from one worker to several process types, continue one stored sequence per
partition, so every record is stored once whichever group fetched it (store/offsets.py)."""

from __future__ import annotations

import logging
from functools import partial

import faust

from agents.sink import Sink, SinkLimits, SinkStatuses, describe_error
from app.broker_logs import BrokerLogs
from app.main import app, settings, topics
from app.positions import ConsumerPositions
from models import RECORDS, StreamRecord
from store.db import LazyPool

log = logging.getLogger(__name__)

# What every sink has done, for /health.
SINK_STATUS = SinkStatuses()
# The worker's one write pool, shared by all sinks.
DATABASE = LazyPool(settings.database_dsn, settings.database_pool_size)
# The broker's side of the stored offsets, shared by all sinks.
BROKER_LOGS = BrokerLogs.of(app)
LIMITS = SinkLimits(
    batch_size=settings.sink_batch_size,
    live_table_update_seconds=settings.live_table_update_seconds,
    log_check_seconds=settings.sink_log_check_seconds,
)


async def send_and_wait(
    topic: faust.TopicT, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
) -> None:
    """Publish to `topic` now (force=True: whatever Faust's current event is) and return once
    the broker has it."""
    delivery = await topic.send(key=key, value=value, headers=headers, force=True)
    await delivery


def _register(record: type[StreamRecord]) -> Sink:
    topic = record.topic.name
    sink = Sink(
        record,
        consumer_group=settings.app_id,
        database=DATABASE,
        batches=app.batches(topic),
        positions=ConsumerPositions(app),
        look_at_logs=partial(BROKER_LOGS.look, topic),
        dead_letters=partial(send_and_wait, topics[record.topic.dead_letter_name]),
        status=SINK_STATUS.add(record),
        limits=LIMITS,
    )
    agent = app.agent(topics[topic], name=f"sink_{record.table.name}")(sink.consume)
    # What `faust -A app agents` shows (Faust's default is the docstring of `consume`).
    agent.help = (
        f"Stores {record.__name__} records in the {record.table.name} table, batched and "
        f"idempotent; bad messages go to {record.topic.dead_letter_name}."
    )
    return sink


SINKS: dict[str, Sink] = {
    record.topic.name: _register(record)
    for record in RECORDS
    if record.topic.name in settings.sink_topics
}


@app.task_while_joining
async def connect_sinks() -> None:
    """Open the write pool and the log check's broker clients while the group join is held:
    the first batch needs both, and opening them took ~25-60 ms of it. One attempt: a database
    or broker that is down now is left to the first batch, which retries."""
    if not SINKS:
        return
    try:
        await DATABASE.get()
        await BROKER_LOGS.start()
    except Exception as error:
        log.info(
            "sinks: not connected ahead of the first batch: %s", describe_error(error, DATABASE.dsn)
        )


@app.on_before_shutdown.connect
async def _close_pool(sender: object, /, *args: object, signal: object, **kwargs: object) -> None:
    """Runs after Faust waited for every stream to acknowledge its events: nothing is in flight."""
    await DATABASE.close()
    await BROKER_LOGS.close()
