"""Two workers of one group against the fake CoinGecko: only the group's leader polls, the other
takes over when the leader dies, and /health answers 503 once the broker is gone.

Each worker gets a fake server of its own, so the calls each server sees are that worker's
calls. Both share the test's broker and database, as workers of one deployment do.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from coingecko.fake_server import FakeCoinGecko
from local.embedded import EmbeddedBroker
from testkit.workers import Worker, eventually

pytestmark = pytest.mark.slow

MARKETS = "/coins/markets"
POLLS = 3  # polls seen before judging who polls


async def settled_members(group: list[Worker]) -> bool | None:
    """True once every worker holds partitions and none is rebalancing: the leader is chosen."""
    try:
        brokers = [(await worker.health()).body["broker"] for worker in group]
    except httpx.TransportError:  # a web server not up yet
        return None
    done = all(b["assigned_partitions"] > 0 and not b["rebalancing"] for b in brokers)
    return True if done else None


async def test_only_the_leader_polls_the_other_takes_over_and_health_sees_the_broker_go(
    workers: Callable[..., Worker],
    own_broker: EmbeddedBroker,
    migrated: str,
    fakes: tuple[FakeCoinGecko, FakeCoinGecko],
) -> None:
    def polling_to(fake: FakeCoinGecko) -> dict[str, str]:
        return {
            "COINGECKO_BASE_URL": fake.base_url,
            "PRICE_POLL_SECONDS": "1",
            "COINGECKO_CALLS_PER_MINUTE": "1000",  # the keyless budget would space the polls out
        }

    group = [workers(migrated, polling_to(fake)) for fake in fakes]
    await eventually(lambda: settled_members(group), group[0], "two settled members")

    before = [fake.count(MARKETS) for fake in fakes]

    async def polled() -> list[int] | None:
        calls = [fake.count(MARKETS) - start for fake, start in zip(fakes, before, strict=True)]
        return calls if sum(calls) >= POLLS else None

    calls = await eventually(polled, group[0], f"{POLLS} polls")
    assert sorted(calls)[0] == 0, calls  # one worker polled, the other did not
    leader = 0 if calls[0] else 1
    follower, follower_fake = group[1 - leader], fakes[1 - leader]

    # The leader dies without a word; once its session times out, the other one polls.
    group[leader].kill()
    taken_over_from = follower_fake.count(MARKETS)

    async def follower_polls() -> bool | None:
        return True if follower_fake.count(MARKETS) >= taken_over_from + POLLS else None

    await eventually(follower_polls, follower, "polls by the remaining worker")

    # The broker goes away: /health says so with 503, while the database is still reachable.
    assert (await follower.health()).code == 200
    own_broker.stop()

    async def degraded() -> dict[str, object] | None:
        health = await follower.health()
        return health.body if health.code == 503 else None

    body = await eventually(degraded, follower, "503 from /health")
    assert body["status"] == "degraded"
    assert body["broker"]["connected"] is False  # type: ignore[index]
    assert body["database"] == {"reachable": True}
