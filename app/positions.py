"""The worker consumer's positions, as the sinks and the bulk queues move them: the one place
that seeks a partition back (`seek_back`), and the consumer as a sink sees it (`ConsumerPositions`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from faust.exceptions import ConsumerNotStarted
from faust.types import TP, AppT

log = logging.getLogger(__name__)


async def seek_back(app: AppT, tp: TP, offset: int) -> None:
    """Fetch `tp` again from `offset`. A partition no longer assigned (a rebalance) is left to
    its new owner, which resumes it from the stored (or committed) offset."""
    try:
        await app.consumer.seek(tp, offset)
    except Exception as error:
        log.info("seek of %s back to %d skipped: %s", tp, offset, error)


class ConsumerPositions:
    """The app's worker consumer: what is assigned, where it may fetch from, and seeking."""

    def __init__(self, app: AppT) -> None:
        self.app = app

    def flowing(self) -> bool:
        """False during a rebalance or shutdown (flow suspended)."""
        return self.app.flow_control.is_active()

    def generation(self) -> int:
        """The consumer group generation: a new one after every rebalance."""
        return self.app.consumer_generation_id

    def assigned(self, topic: str) -> list[int]:
        """The partitions of `topic` assigned to this worker (none before the consumer starts)."""
        try:
            assignment = self.app.consumer.assignment()
        except ConsumerNotStarted:
            return []
        return sorted(tp.partition for tp in assignment if tp.topic == topic)

    async def earliest(self, topic: str, partitions: Sequence[int]) -> dict[int, int]:
        """The broker's earliest offsets of the partitions."""
        earliest = await self.app.consumer.earliest_offsets(*(TP(topic, p) for p in partitions))
        return {tp.partition: offset for tp, offset in earliest.items()}

    async def seek(self, topic: str, partition: int, offset: int) -> None:
        await seek_back(self.app, TP(topic, partition), offset)
