"""The offline CoinGecko stand-in moves its prices, so an offline run shows data changing."""

from __future__ import annotations

import random
from decimal import Decimal

from coingecko.fake_server import FakeCoinGecko


def prices(fake: FakeCoinGecko) -> list[Decimal | None]:
    return [None if c["current_price"] is None else Decimal(c["current_price"]) for c in fake.coins]


def test_wandering_prices_move_a_little_stay_positive_and_repeat_with_the_seed() -> None:
    fake, again = FakeCoinGecko(extra_coins=5), FakeCoinGecko(extra_coins=5)
    before = prices(fake)
    for _ in range(20):
        fake.wander(random.Random(7))
        again.wander(random.Random(7))
    after = prices(fake)
    assert after == prices(again)
    assert after != before
    for old, new in zip(before, after, strict=True):
        assert (old is None) == (new is None)
        if old is not None and new is not None:
            assert new > 0
            assert abs(new / old - 1) <= Decimal("0.11")  # 20 steps of at most 0.5%
