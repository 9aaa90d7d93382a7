"""The Faust application, built from environment settings.

Every record topic (and its dead-letter topic) is declared from `generators.topics.topic_configs()`,
the same function that writes the operator's topic file and that `faust -A app topics apply`
applies (app/topic_admin.py, whose creations the worker makes at start), so they cannot disagree.
Messages travel as raw bytes; `models.codec` decodes them, so a bad message becomes a dead letter
instead of an exception inside Faust's deserializer.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import faust
from faust.types.auth import CredentialsT

from app import topic_admin
from app.bulk import App
from app.settings import SASL_PROTOCOLS, TLS_PROTOCOLS, Settings, load_settings
from app.web import web_application_options
from common.logs import logging_config
from models.market import PARTITIONS

log = logging.getLogger(__name__)


def broker_credentials(settings: Settings) -> CredentialsT | None:
    """Faust's credentials for BROKER_SECURITY_PROTOCOL: Faust hands them to every aiokafka
    client it makes (consumer, producer, topic admin). None is PLAINTEXT."""
    protocol = settings.broker_security_protocol
    context = None
    if protocol in TLS_PROTOCOLS:
        # Verifies the broker's certificate and host name; no cafile means the system's CAs.
        context = ssl.create_default_context(cafile=settings.broker_ssl_cafile)
    if protocol in SASL_PROTOCOLS:
        assert settings.broker_sasl_password is not None  # Settings requires it with SASL
        return faust.SASLCredentials(
            username=settings.broker_sasl_username,
            password=settings.broker_sasl_password.get_secret_value(),
            ssl_context=context,
            mechanism=settings.broker_sasl_mechanism,
        )
    return faust.SSLCredentials(context) if context is not None else None


settings = load_settings()

app = App(
    # The consumer group of this process's scope (SINK_TOPICS, POLLER_ENABLED): processes that
    # subscribe differently never share a group (docs/deployment.md).
    settings.consumer_group,
    fetch_max_wait_ms=settings.broker_fetch_max_wait_ms,
    broker=settings.broker_url,
    broker_credentials=broker_credentials(settings),
    store="memory://",
    # Faust's check that a table's recovered offset is not above its changelog's high-water
    # mark guards persisted stores against a changelog deleted under them. A memory store
    # persists nothing, so on a correct broker the check cannot fire; on one whose high-water
    # marks lag (the embedded broker) it did, at the rebalance after a recovery that read past
    # the mark, and Faust crashed the worker on it (docs/reliability.md).
    recovery_consistency_check=False,
    autodiscover=False,
    datadir=str(Path(settings.data_dir) / "faust"),
    # Changelog topics of tables keyed like the record topics need the same partition count.
    topic_partitions=PARTITIONS,
    topic_replication_factor=settings.topic_replication_factor,
    broker_session_timeout=settings.broker_session_timeout,
    broker_heartbeat_interval=settings.broker_heartbeat_interval,
    # One fetch hands over at most one sink batch: bounds what waits in memory (app/bulk.py).
    broker_max_poll_records=settings.sink_batch_size,
    web_enabled=settings.web_enabled,
    web_bind=settings.web_bind,
    web_port=settings.web_listen_port,
    web_application_options=web_application_options(),  # JSON errors, quiet oversized requests
    logging_config=logging_config(settings.log_format),  # LOG_FORMAT=json: one object a line
    # Checks the broker, the database and the settings before it starts (app/worker.py).
    Worker="app.worker:Worker",
)

# `faust worker` overwrites conf.web_enabled with its own --with-web flag (on by default); the
# boot strategy has the last word on what starts, so WEB_ENABLED=false really opens no port.
if not settings.web_enabled:
    app.boot_strategy.enable_web = False


@app.on_worker_init.connect
def _create_data_dir(sender: object, /, *args: object, signal: object, **kwargs: object) -> None:
    """Faust creates only the last level of its datadir; a fresh checkout has no DATA_DIR yet."""
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)


topics: dict[str, faust.TopicT] = {
    config.name: app.topic(
        config.name,
        partitions=config.partitions,
        replicas=config.replication_factor,
        config=config.config,
        key_serializer="raw",
        value_serializer="raw",
        # Faust declares internal topics before it subscribes to them; otherwise a broker that
        # auto-creates topics (Kafka, Tansu) creates them on subscription with its default count.
        internal=True,
    )
    for config in topic_admin.wanted_topics(settings.topic_replication_factor)
}


@app.task_while_joining
async def declare_topics() -> None:
    """Create every generated topic that is missing, up front (as the app starts): Redpanda does
    not auto-create them. The same plan as `faust -A app topics apply` (app/topic_admin.py),
    restricted to creations; any other difference from the DSL is logged for an operator to
    apply."""
    for plan in await topic_admin.declare_topics(app, settings.topic_replication_factor):
        log.warning(
            "topics: %s %s; `faust -A app topics apply` applies it",
            plan.topic.name,
            plan.describe(),
        )
