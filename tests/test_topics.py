"""`faust -A app topics plan|apply`: the plan from the DSL against the broker's topics, applied
idempotently through the admin API, on the session's embedded broker (in-process: no worker).

Each test plans topics of its own (the generated ones under a unique prefix), so the session
broker's other topics do not matter. The embedded broker (Tansu 0.6) has no CreatePartitions: a
partition raise is planned and fails with the API named, the other changes are made.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from app.topic_admin import TopicAdmin, changelog_topics, wanted_topics
from generators.topics import BrokerTopic, TopicConfig, plan_topics
from local.embedded import EmbeddedBroker


@pytest.fixture
async def admin(broker: EmbeddedBroker) -> AsyncIterator[TopicAdmin]:
    async with TopicAdmin(bootstrap_servers=f"127.0.0.1:{broker.port}") as running:
        yield running


def own_topics() -> list[TopicConfig]:
    """The generated topics under names no other test uses."""
    prefix = f"t{uuid.uuid4().hex[:8]}-"
    return [replace(c, name=prefix + c.name) for c in wanted_topics(1)]


async def test_plan_on_a_fresh_broker_creates_everything_and_apply_twice_changes_nothing(
    admin: TopicAdmin,
) -> None:
    wanted = own_topics()
    first = await admin.plan(wanted)
    assert [(p.topic.name, p.action) for p in first] == [(t.name, "create") for t in wanted]
    assert "create: 6 partitions, cleanup.policy=delete, retention.ms=604800000" in [
        p.describe() for p in first
    ]

    outcomes = await admin.apply(first)
    assert [(o.plan.topic.name, o.error) for o in outcomes] == [(t.name, None) for t in wanted]
    found = await admin.describe([t.name for t in wanted])
    for topic in wanted:
        assert found[topic.name].partitions == topic.partitions
        assert found[topic.name].config == topic.config  # what the broker reports back

    second = await admin.plan(wanted)
    assert {p.action for p in second} == {"none"}
    assert await admin.apply(second) == []


async def test_differences_are_planned_made_where_the_broker_can_and_never_lose_records(
    admin: TopicAdmin,
) -> None:
    prices, prices_dlq, ohlcv, ohlcv_dlq, *_ = wanted = own_topics()
    # On the broker: prices with fewer partitions, another retention and a setting of its own
    # (segment.ms), the candles with more
    # partitions than the DSL's, their dead letters with fewer, the prices' dead letters missing.
    await admin.apply(
        plan_topics(
            [
                replace(
                    prices,
                    partitions=4,
                    config={**prices.config, "retention.ms": "1000", "segment.ms": "60000"},
                ),
                replace(ohlcv, partitions=8),
                replace(ohlcv_dlq, partitions=4),
            ],
            {},
        )
    )
    plans = {p.topic.name: p for p in await admin.plan(wanted)}
    assert plans[prices.name].action == "add-partitions"
    assert plans[prices.name].changes == ("partitions 4 → 6", "retention.ms 1000 → 604800000")
    assert plans[prices_dlq.name].action == "create"
    assert plans[ohlcv.name].action == "none"  # fewer partitions only with --recreate
    assert plans[ohlcv.name].notes == (
        "8 partitions, the DSL wants 6: partitions cannot be removed; --recreate drops the "
        "topic and its records",
    )

    assert plans[ohlcv_dlq.name].changes == ("partitions 4 → 6",)

    applied = await admin.apply(list(plans.values()))
    steps = {
        name: [(o.done, o.error) for o in applied if o.plan.topic.name == name] for name in plans
    }
    raise_failed = "the broker does not support CreatePartitions (Kafka API 37)"
    assert steps[prices.name] == [
        ("config changed", None),  # first, so it does not wait for the partitions
        ("partitions raised", raise_failed),
    ]
    assert steps[ohlcv_dlq.name] == [("partitions raised", raise_failed)]
    assert steps[prices_dlq.name] == [("created", None)]  # a failure does not stop the others
    assert steps[ohlcv.name] == []
    found = await admin.describe([prices.name, prices_dlq.name, ohlcv.name])
    assert (found[prices.name].partitions, found[ohlcv.name].partitions) == (4, 8)
    # Set alone: the topic's own other settings stay (AlterConfigs would have reset them).
    assert found[prices.name].config == {**prices.config, "segment.ms": "60000"}
    assert found[prices_dlq.name].partitions == 6
    again = {p.topic.name: p for p in await admin.plan(wanted)}
    assert again[prices.name].changes == ("partitions 4 → 6",)  # the config is done

    recreated = {p.topic.name: p for p in await admin.plan(wanted, recreate=True)}
    assert recreated[ohlcv.name].action == "recreate"
    assert [(o.plan.topic.name, o.error) for o in await admin.apply([recreated[ohlcv.name]])] == [
        (ohlcv.name, None)
    ]
    assert (await admin.describe([ohlcv.name]))[ohlcv.name].partitions == 6


async def test_the_start_up_declaration_creates_what_is_missing_and_leaves_the_rest(
    admin: TopicAdmin,
) -> None:
    """What a worker does at start (`create_missing`), on a broker whose prices topic differs."""
    prices, prices_dlq, *others = wanted = own_topics()
    await admin.apply(plan_topics([replace(prices, partitions=4)], {}))
    pending = await admin.create_missing(wanted)
    assert [(p.topic.name, p.action) for p in pending] == [(prices.name, "add-partitions")]
    found = await admin.describe([t.name for t in wanted])
    assert found[prices.name].partitions == 4  # left to `topics apply`
    assert {found[t.name].partitions for t in [prices_dlq, *others]} == {6}
    assert await admin.create_missing(wanted) == pending  # nothing else to do the next time


def test_a_config_the_broker_would_not_show_is_not_compared_and_replicas_are_not_changed() -> None:
    topic = wanted_topics(3)[0]
    hidden = BrokerTopic(
        topic.name,
        partitions=topic.partitions,
        replication_factor=1,
        config={},
        config_error="TopicAuthorizationFailedError",  # an ACL
    )
    (plan,) = plan_topics([topic], {topic.name: hidden})
    assert (plan.action, plan.config_changes) == ("none", {})  # not taken for the defaults
    assert plan.notes == (
        "config not compared: TopicAuthorizationFailedError",
        "replication factor 1, wanted 3: not changed here (a partition reassignment)",
    )


def test_the_changelogs_of_every_group_of_the_deployment_follow_their_tables() -> None:
    listed = [
        "qi-latest-prices-changelog",  # the full scope's group: APP_ID
        "qi.crypto-prices-latest-prices-changelog",
        "qi.crypto-prices-price-ranges-changelog",
        "other-latest-prices-changelog",  # another deployment's
        "qi-unknown-changelog",
        "crypto-prices",
    ]
    tables = [("latest-prices", 6), ("price-ranges", 6)]
    found = changelog_topics(listed, "qi", tables, replication_factor=1)
    assert [(c.name, c.partitions, c.config) for c in found] == [
        ("qi-latest-prices-changelog", 6, {}),
        ("qi.crypto-prices-latest-prices-changelog", 6, {}),
        ("qi.crypto-prices-price-ranges-changelog", 6, {}),
    ]
