"""Topic configurations derived from the records: what the app declares and an operator applies,
and the plan that brings a broker's topics to them (`faust -A app topics plan|apply`; the broker
side is `app/topic_admin.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from models import RECORDS, StreamRecord


@dataclass(frozen=True)
class TopicConfig:
    name: str
    partitions: int
    replication_factor: int
    key_field: str | None
    config: dict[str, str]
    record: str | None  # the record type carried (dead-letter topics carry raw bytes)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "partitions": self.partitions,
            "replication_factor": self.replication_factor,
            "key_field": self.key_field,
            "record": self.record,
            "config": self.config,
        }


def topic_configs(records: tuple[type[StreamRecord], ...] = RECORDS) -> list[TopicConfig]:
    """Each record's topic, then its dead-letter topic (same partitions, keeps 30 days)."""
    configs: list[TopicConfig] = []
    for record in records:
        spec = record.topic
        configs.append(
            TopicConfig(
                name=spec.name,
                partitions=spec.partitions,
                replication_factor=spec.replication_factor,
                key_field=spec.key_field,
                config={
                    "cleanup.policy": spec.cleanup_policy,
                    "retention.ms": str(spec.retention_ms),
                },
                record=record.__name__,
            )
        )
        configs.append(
            TopicConfig(
                name=spec.dead_letter_name,
                partitions=spec.partitions,
                replication_factor=spec.replication_factor,
                key_field=spec.key_field,
                config={"cleanup.policy": "delete", "retention.ms": str(30 * 24 * 3600 * 1000)},
                record=None,
            )
        )
    return configs


@dataclass(frozen=True)
class BrokerTopic:
    """What a broker reports of a topic: its partitions, replicas, and the values it holds for
    the configuration keys asked about (a key it leaves at its default is absent)."""

    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str]  # effective values, defaults included
    config_error: str | None = None  # why the config could not be read (e.g. an ACL)


# What `topics apply` does for a topic: create it, raise its partitions, change its config, drop
# and create it again (only with --recreate: its records are lost), or nothing (up to date, or a
# difference it cannot change, said in `notes`).
Action = Literal["create", "add-partitions", "alter-config", "recreate", "none"]


@dataclass(frozen=True)
class TopicPlan:
    topic: TopicConfig  # as the DSL wants it, with the replication factor the app uses
    action: Action
    changes: tuple[str, ...] = ()  # what the action changes, one "what: from → to" each
    notes: tuple[str, ...] = ()  # what it will not change, and why
    config_changes: dict[str, str] = field(default_factory=dict)  # key → the DSL's value

    def as_json(self) -> dict[str, Any]:
        return {
            "topic": self.topic.name,
            "action": self.action,
            "changes": list(self.changes),
            "notes": list(self.notes),
        }

    def describe(self) -> str:
        """One line for the plan: `name  action: what, what (note)`."""
        if self.action == "create":
            settings = ", ".join(f"{k}={v}" for k, v in sorted(self.topic.config.items()))
            what = f"create: {self.topic.partitions} partitions, {settings}"
        elif self.action == "none":
            what = "up to date" if not self.notes else "no change"
        else:
            what = f"{self.action}: {'; '.join(self.changes)}"
        return "".join([what, *(f" ({note})" for note in self.notes)])


def plan_topics(
    wanted: list[TopicConfig], found: dict[str, BrokerTopic], *, recreate: bool = False
) -> list[TopicPlan]:
    """What brings the broker's topics to the DSL's, topic by topic, never losing records unless
    `recreate`: partitions are only ever raised (Kafka cannot remove one; fewer partitions means
    dropping the topic), a replication factor is left alone (it takes a partition reassignment,
    an operator's job), and a config key the DSL does not name is kept."""
    plans = []
    for topic in wanted:
        broker = found.get(topic.name)
        if broker is None:
            plans.append(TopicPlan(topic, "create"))
            continue
        changes: list[str] = []
        notes: list[str] = []
        config = {k: v for k, v in topic.config.items() if broker.config.get(k) != v}
        if broker.config_error is not None:
            config = {}
            notes.append(f"config not compared: {broker.config_error}")
        changes += [f"{k} {broker.config.get(k, 'default')} → {v}" for k, v in config.items()]
        if broker.replication_factor != topic.replication_factor:
            notes.append(
                f"replication factor {broker.replication_factor}, wanted "
                f"{topic.replication_factor}: not changed here (a partition reassignment)"
            )
        action: Action = "alter-config" if config else "none"
        if broker.partitions < topic.partitions:
            changes.insert(0, f"partitions {broker.partitions} → {topic.partitions}")
            action = "add-partitions"
        elif broker.partitions > topic.partitions and recreate:
            changes.insert(0, f"partitions {broker.partitions} → {topic.partitions}")
            action = "recreate"
        elif broker.partitions > topic.partitions:
            notes.append(
                f"{broker.partitions} partitions, the DSL wants {topic.partitions}: partitions "
                "cannot be removed; --recreate drops the topic and its records"
            )
        plans.append(TopicPlan(topic, action, tuple(changes), tuple(notes), config))
    return plans
