"""The sink's retries (agents/sink.py): a failed write or dead letter is retried for as long as it
takes, with a delay that doubles from BACKOFF_FIRST up to BACKOFF_CAP, with jitter, and starts
over after a success. The database-down scenarios (test_sink.py, test_reliability.py) show the
worker waits and resumes; this shows the schedule of its attempts, which they cannot observe
without timing them.
"""

from __future__ import annotations

import pytest

import agents.sink
from agents.sink import BACKOFF_CAP, BACKOFF_FIRST, SinkStatus, backoff
from agents.sinks import SINKS
from models import CryptoPriceData

PRICES = CryptoPriceData.topic.name


class Outage:
    """An attempt that fails `failures` times with a connection error, then succeeds."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts = 0

    async def __call__(self) -> str:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise ConnectionRefusedError("the database is down")
        return "stored"


async def test_retries_back_off_doubling_to_the_cap_and_start_over_after_a_success(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sink = SINKS[PRICES]
    status = SinkStatus(topic=PRICES, table=CryptoPriceData.table.name)
    monkeypatch.setattr(sink, "status", status)
    delays: list[tuple[int, float]] = []  # (failures so far, seconds chosen)

    def recorded(failures: int) -> float:
        delays.append((failures, backoff(failures)))
        return 0.0  # the schedule is what is checked, not the clock

    monkeypatch.setattr(agents.sink, "backoff", recorded)

    first = Outage(8)
    assert await sink._until_done("write", first) == "stored"
    assert first.attempts == 9
    assert (status.consecutive_failures, status.last_error) == (
        0,
        "ConnectionRefusedError: the database is down",
    )
    second = Outage(2)
    assert await sink._until_done("dead-letter", second) == "stored"

    # Each failure counts, and the second outage starts again from the first delay.
    assert [failures for failures, _ in delays] == [1, 2, 3, 4, 5, 6, 7, 8, 1, 2]
    ceilings = [min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (n - 1)) for n, _ in delays]
    assert ceilings == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 0.2, 0.4]
    for (_, delay), ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling  # jitter: 50-100 % of the step
