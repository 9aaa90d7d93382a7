"""Topic configurations derived from the records: what the app declares and an operator applies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
