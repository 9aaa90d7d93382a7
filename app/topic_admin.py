"""The broker's side of `faust -A app topics plan|apply` and of the worker's start-up
declaration: what the broker has (Metadata, DescribeConfigs), and the changes of a plan
(`generators.topics.plan_topics`) made through the Kafka admin API (CreateTopics,
CreatePartitions, IncrementalAlterConfigs, DeleteTopics for --recreate).

A config change is IncrementalAlterConfigs (Kafka 2.3+, Redpanda, the embedded broker): it sets
the keys it names and leaves the topic's other settings alone, where AlterConfigs, the only one
aiokafka's admin client speaks, replaces them all. aiokafka has no request class for it, so its
wire format (Kafka's protocol, version 0) is declared here, with aiokafka's own protocol types.

Topics are always listed whole (Metadata for all topics): the embedded broker creates a topic
that a Metadata request names, with its default partition count, so asking about a missing
topic by name would create it. Brokers without an API (the embedded broker has no
CreatePartitions) fail the change that needs it, with the API named; the other changes are still
made.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from aiokafka import AIOKafkaClient
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import IncompatibleBrokerVersion, KafkaError, for_code
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import Array, Boolean, Int8, Int16, Int32, Schema, String
from faust.types import AppT

from app.broker_logs import client_options
from generators.topics import BrokerTopic, TopicConfig, TopicPlan, plan_topics, topic_configs

log = logging.getLogger(__name__)

TOPIC_ALREADY_EXISTS = 36  # Kafka's error code
SET = 0  # IncrementalAlterConfigs' operation on a key
RECREATE_SECONDS = 30.0  # how long a deleted topic may take to go before its creation fails
# The admin API each change needs, by aiokafka's request name (in its IncompatibleBrokerVersion).
APIS = {
    "CreatePartitionsRequest": "CreatePartitions (Kafka API 37)",
    "IncrementalAlterConfigsRequest": "IncrementalAlterConfigs (Kafka API 44)",
}


class IncrementalAlterConfigsResponse_v0(Response):  # aiokafka names its versions so
    API_KEY = 44
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "responses",
            Array(
                ("error_code", Int16),
                ("error_message", String("utf-8")),
                ("resource_type", Int8),
                ("resource_name", String("utf-8")),
            ),
        ),
    )


class IncrementalAlterConfigsRequest_v0(RequestStruct):
    API_KEY = 44
    API_VERSION = 0
    RESPONSE_TYPE = IncrementalAlterConfigsResponse_v0
    SCHEMA = Schema(
        (
            "resources",
            Array(
                ("resource_type", Int8),
                ("resource_name", String("utf-8")),
                (
                    "configs",
                    Array(
                        ("name", String("utf-8")),
                        ("config_operation", Int8),
                        ("value", String("utf-8")),
                    ),
                ),
            ),
        ),
        ("validate_only", Boolean),
    )


class IncrementalAlterConfigsRequest(Request[IncrementalAlterConfigsRequest_v0]):
    """Set `configs` on topic `topic`, each key alone."""

    API_KEY = 44

    def __init__(self, topic: str, configs: dict[str, str]) -> None:
        self.resource = (
            int(ConfigResourceType.TOPIC),
            topic,
            [(key, SET, value) for key, value in configs.items()],
        )

    def build(
        self, request_struct_class: type[IncrementalAlterConfigsRequest_v0]
    ) -> IncrementalAlterConfigsRequest_v0:
        return request_struct_class([self.resource], False)


def wanted_topics(replication_factor: int) -> list[TopicConfig]:
    """The DSL's topics with the replication factor the app uses (TOPIC_REPLICATION_FACTOR):
    what the worker declares and `topics apply` applies, from one source."""
    return [replace(c, replication_factor=replication_factor) for c in topic_configs()]


def changelog_topics(
    listed: Iterable[str], app_id: str, tables: Sequence[tuple[str, int]], replication_factor: int
) -> list[TopicConfig]:
    """The live tables' changelog topics on the broker, of every consumer group of the
    deployment (`APP_ID-<table>-changelog`, `APP_ID.<scope>-<table>-changelog`), each wanted with
    its table's partitions (`tables`: name and partitions), which are its source topic's: a record
    topic's partitions raised in the DSL raise them too, or the table would refuse the writes
    (`tables.live.LiveTable`). Their configuration is Faust's, and left alone."""
    return [
        TopicConfig(name, partitions, replication_factor, None, {}, None)
        for name in sorted(listed)
        for table, partitions in tables
        if name.endswith(f"-{table}-changelog")
        and (name == f"{app_id}-{table}-changelog" or name.startswith(f"{app_id}."))
    ]


@dataclass(frozen=True)
class Outcome:
    """One step of a plan: what it does, and why it was not done (None: done)."""

    plan: TopicPlan
    done: str
    error: str | None = None

    def describe(self) -> str:
        what = self.done if self.error is None else f"FAILED ({self.done}): {self.error}"
        return f"{self.plan.topic.name}: {what}"


class TopicAdmin:
    """An admin client on the app's broker (its credentials too), for one command or start."""

    def __init__(self, **options: Any) -> None:
        """`options`: aiokafka's client arguments."""
        self.client = AIOKafkaAdminClient(**options)
        self.wire = AIOKafkaClient(**options)  # for what the admin client cannot send

    @classmethod
    def of(cls, app: AppT) -> TopicAdmin:
        return cls(**client_options(app, "topics"))

    async def __aenter__(self) -> TopicAdmin:
        await self.client.start()
        try:
            await self.wire.bootstrap()
        except BaseException:
            await self.client.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.wire.close()
        await self.client.close()

    async def topic_names(self) -> list[str]:
        return list(await self.client.list_topics())

    async def describe(self, names: Sequence[str]) -> dict[str, BrokerTopic]:
        """Those of `names` the broker has, with their partitions, replicas and configuration."""
        listed = {t["topic"]: t for t in await self.client.describe_topics() if not t["error_code"]}
        present = [name for name in names if name in listed]
        configs: dict[str, list[dict[str, Any]]] = {}
        errors: dict[str, str] = {}
        if present:
            resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in present]
            for response in await self.client.describe_configs(resources):
                for resource in response.to_object()["resources"]:
                    name = resource["resource_name"]
                    configs[name] = resource["config_entries"]
                    if resource["error_code"]:
                        error = for_code(resource["error_code"])
                        errors[name] = f"{error.__name__} ({resource['error_message']})"
        found = {}
        for name in present:
            partitions = listed[name]["partitions"]
            entries = configs.get(name, [])
            found[name] = BrokerTopic(
                name=name,
                partitions=len(partitions),
                replication_factor=len(partitions[0]["replicas"]) if partitions else 0,
                config={e["config_names"]: e["config_value"] for e in entries},
                config_error=errors.get(name),
            )
        return found

    async def plan(self, wanted: list[TopicConfig], *, recreate: bool = False) -> list[TopicPlan]:
        return plan_topics(wanted, await self.describe([t.name for t in wanted]), recreate=recreate)

    async def create_missing(self, wanted: list[TopicConfig]) -> list[TopicPlan]:
        """`topics apply` restricted to creating missing topics: what a worker does at start.
        Returns the other differences from the DSL, left to an operator's `topics apply`."""
        plans = await self.plan(wanted)
        for outcome in await self.apply([p for p in plans if p.action == "create"]):
            if outcome.error is not None:
                raise KafkaError(outcome.describe())
            log.info("topics: %s", outcome.describe())
        return [p for p in plans if p.action not in ("create", "none") or p.notes]

    async def apply(self, plans: Sequence[TopicPlan]) -> list[Outcome]:
        """Make each planned change, step by step (a topic's config, then its partitions); a
        failed step is reported in its outcome, not raised, and ends that topic's steps."""
        outcomes = []
        for plan in plans:
            for done, step in self._steps(plan):
                try:
                    await step()
                except (KafkaError, TimeoutError) as error:
                    reason = f"{type(error).__name__}: {error}"
                    if isinstance(error, IncompatibleBrokerVersion):
                        request = str(error).split(": ")[-1].split()[0]
                        reason = f"the broker does not support {APIS.get(request, request)}"
                    outcomes.append(Outcome(plan, done, reason))
                    break
                outcomes.append(Outcome(plan, done))
        return outcomes

    def _steps(self, plan: TopicPlan) -> list[tuple[str, Callable[[], Awaitable[object]]]]:
        """What `plan` takes, each step with what it does once done."""
        topic = plan.topic
        if plan.action == "recreate":
            return [
                ("dropped and created again: its records are gone", partial(self._recreate, topic))
            ]
        if plan.action == "create":
            return [("created", partial(self._create, topic, exists_ok=True))]
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = []
        if plan.config_changes:  # first: a retention change does not wait for partitions
            steps.append(
                ("config changed", partial(self._configure, topic.name, plan.config_changes))
            )
        if plan.action == "add-partitions":
            raised = {topic.name: NewPartitions(topic.partitions)}
            steps.append(("partitions raised", partial(self.client.create_partitions, raised)))
        return steps

    async def _configure(self, name: str, changes: dict[str, str]) -> None:
        request = IncrementalAlterConfigsRequest(name, changes)
        response = await self.wire.send(self.wire.get_random_node(), request)
        for error_code, message, *_ in response.responses:
            if error_code:
                raise for_code(error_code)(message)

    async def _recreate(self, topic: TopicConfig) -> None:
        for _, error_code in (await self.client.delete_topics([topic.name])).topic_error_codes:
            if error_code:
                raise for_code(error_code)(f"cannot delete {topic.name}")
        async with asyncio.timeout(RECREATE_SECONDS):
            while not await self._create(topic, exists_ok=False):
                await asyncio.sleep(0.5)  # Kafka deletes in the background

    async def _create(self, topic: TopicConfig, *, exists_ok: bool) -> bool:
        """Create `topic`; False if it already exists (fine when `exists_ok`: someone else, a
        worker starting, created it meanwhile)."""
        new = NewTopic(
            topic.name, topic.partitions, topic.replication_factor, topic_configs=topic.config
        )
        response = await self.client.create_topics([new])
        for _, error_code, message in response.topic_errors:
            if error_code == TOPIC_ALREADY_EXISTS:
                return exists_ok
            if error_code:
                raise for_code(error_code)(message)
        return True


async def declare_topics(app: AppT, replication_factor: int) -> list[TopicPlan]:
    """The worker's start-up declaration (`TopicAdmin.create_missing`) on the app's broker."""
    async with TopicAdmin.of(app) as admin:
        return await admin.create_missing(wanted_topics(replication_factor))
