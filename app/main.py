"""The Faust application, built from environment settings.

Every record topic (and its dead-letter topic) is declared from `schema.topics.topic_configs()`,
the same function that writes the operator's topic file, so the app and the file cannot disagree.
Messages travel as raw bytes; `models.codec` decodes them, so a bad message becomes a dead letter
instead of an exception inside Faust's deserializer.
"""

from __future__ import annotations

from pathlib import Path

import faust

from app.settings import load_settings
from models.market import PARTITIONS
from schema.topics import topic_configs

settings = load_settings()

app = faust.App(
    settings.app_id,
    broker=settings.broker_url,
    store="memory://",
    autodiscover=False,
    datadir=str(Path(settings.data_dir) / "faust"),
    # Changelog topics of tables keyed like the record topics need the same partition count.
    topic_partitions=PARTITIONS,
    topic_replication_factor=settings.topic_replication_factor,
    broker_session_timeout=settings.broker_session_timeout,
    broker_heartbeat_interval=settings.broker_heartbeat_interval,
    web_enabled=settings.web_enabled,
    web_bind=settings.web_bind,
    web_port=settings.web_listen_port,
)

topics: dict[str, faust.TopicT] = {
    config.name: app.topic(
        config.name,
        partitions=config.partitions,
        replicas=settings.topic_replication_factor,
        config=config.config,
        key_serializer="raw",
        value_serializer="raw",
    )
    for config in topic_configs()
}


@app.task
async def declare_topics() -> None:
    """Create every generated topic up front: Redpanda does not auto-create them."""
    for topic in topics.values():
        await topic.maybe_declare()

