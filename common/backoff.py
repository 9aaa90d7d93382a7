"""The one retry delay schedule of the project (the sinks' and the CoinGecko client's)."""

from __future__ import annotations

import random


def jittered_backoff(attempt: int, first: float, cap: float) -> float:
    """Seconds before retry number `attempt` (from 1): `first` doubling up to `cap`, then 50-100 %
    of that at random ("equal jitter"), so workers that failed together do not retry in step."""
    return min(cap, first * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
