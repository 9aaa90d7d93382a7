"""What the live tables take from a sink's batches (tables/live.py's folds and `LiveUpdates`),
in-process: batches folded one by one add up to what one fold of all their records holds, and
only stored batches reach the tables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any

from models.market import AGGREGATE_EXCHANGE, CryptoPriceData
from tables import live
from tables.live import LiveUpdates, NewestFold, PriceFold
from testkit.records import T0, prices


def snapshot(coin: str, minutes: float, price: str, exchange: str = AGGREGATE_EXCHANGE) -> Any:
    base = prices(coin, 1)[0]
    return base.model_copy(
        update={
            "coin_id": coin,
            "exchange_id": exchange,
            "usd_price": Decimal(price),
            "last_updated": T0 + timedelta(minutes=minutes),
        }
    )


# (message, record) in offset order; None: a message that was not decoded. The messages are
# stand-ins: the folds only keep them (to route a table write to the message's partition).
BATCHES: list[list[tuple[str, CryptoPriceData | None]]] = [
    [
        ("m0", snapshot("btc", 0, "100")),
        ("m1", snapshot("eth", 1, "10")),
        ("m2", None),
        ("m3", snapshot("btc", 2, "105")),
        ("m4", snapshot("btc", 2, "999", exchange="binance")),  # not the aggregate quote
    ],
    [
        ("m5", snapshot("btc", 2, "101")),  # the same time as m3: the first one stays newest
        ("m6", snapshot("btc", 3, "95")),  # a new low of btc's hour
        ("m7", snapshot("eth", 0.5, "12")),  # older than m1, yet a new high of eth's hour
        ("m8", snapshot("btc", 70, "120")),  # the next hour
        ("m9", None),
    ],
    [("m10", snapshot("eth", 2, "11"))],
]


def folded(fold: PriceFold | NewestFold, batches: list[list[tuple[str, Any]]]) -> None:
    for batch in batches:
        for message, record in batch:
            fold.add(message, record)  # type: ignore[arg-type]


def shown(fold: PriceFold) -> tuple[dict[str, Any], dict[tuple[str, int, int], list[Any]], int]:
    newest = {coin: message for coin, (_, message, _) in fold.newest.items()}
    return newest, fold.ranges, fold.undecodable


def test_price_batches_merged_hold_what_one_fold_of_all_their_records_holds() -> None:
    whole = PriceFold(since=T0)
    folded(whole, BATCHES)
    merged = PriceFold(since=T0)
    folded(merged, BATCHES[:1])
    for batch in BATCHES[1:]:
        later = PriceFold(since=T0)
        folded(later, [batch])
        merged.merge(later)

    day, hour = T0.toordinal(), T0.hour  # T0 is at the start of an hour
    expected = (
        {"btc": "m8", "eth": "m10"},
        {  # [first message, high, low] per coin and hour
            ("btc", day, hour): ["m0", Decimal("105"), Decimal("95")],
            ("eth", day, hour): ["m1", Decimal("12"), Decimal("10")],
            ("btc", day, hour + 1): ["m8", Decimal("120"), Decimal("120")],
        },
        2,
    )
    assert shown(whole) == expected
    assert shown(merged) == expected


def test_hours_before_the_views_window_get_no_range_but_still_the_newest_snapshot() -> None:
    fold = PriceFold(since=T0 + timedelta(hours=1))
    folded(fold, BATCHES)  # all in T0's hour but m8, 70 minutes after T0

    newest, ranges, undecodable = shown(fold)
    assert newest == {"btc": "m8", "eth": "m10"}
    assert ranges == {("btc", T0.toordinal(), T0.hour + 1): ["m8", Decimal("120"), Decimal("120")]}
    assert undecodable == 2


def test_by_default_the_range_starts_where_the_views_24_hours_start() -> None:
    before = datetime.now(UTC)
    fold = PriceFold()
    now = datetime.now(UTC)
    assert fold.since in {live.range_window(before)[0], live.range_window(now)[0]}
    old, recent = (
        snapshot("btc", 0, "100").model_copy(update={"last_updated": at})
        for at in (fold.since - timedelta(microseconds=1), now)
    )
    fold.add("m-old", old)  # type: ignore[arg-type]
    fold.add("m-recent", recent)  # type: ignore[arg-type]

    assert list(fold.ranges) == [("btc", now.toordinal(), now.hour)]
    assert fold.newest["btc"][1] == "m-recent"


def test_newest_batches_merged_keep_the_first_of_a_tie() -> None:
    fold = partial(NewestFold, "coin_id", "last_updated")
    tie = [("m5", snapshot("btc", 2, "101"))]  # the time of m3 (and m4): newest of btc so far
    whole, merged, later = fold(), fold(), fold()
    folded(whole, [BATCHES[0], tie])
    folded(merged, BATCHES[:1])
    folded(later, [tie])
    merged.merge(later)

    for result in (whole, merged):
        newest = {coin: message for coin, (_, message, _) in result.newest.items()}
        assert newest == {"btc": "m3", "eth": "m1"}
        assert result.undecodable == 1


async def test_only_stored_batches_are_written_each_once() -> None:
    written: list[tuple[dict[str, Any], int]] = []

    async def write(fold: PriceFold) -> None:
        written.append(({coin: m for coin, (_, m, _) in fold.newest.items()}, fold.undecodable))

    updates = LiveUpdates("prices-under-test", PriceFold, write)
    generation = live.generation()

    def store(batch: list[tuple[str, Any]], durable: bool = True) -> None:
        add = updates.start_batch()
        for message, record in batch:
            add(message, record)  # type: ignore[arg-type]
        if durable:
            updates.batch_stored()

    store(BATCHES[0])
    store(BATCHES[1], durable=False)  # failed to store: taken again as the next batch
    store(BATCHES[1])
    first = updates.take()
    store(BATCHES[2])
    second = updates.take()
    await first()
    await second()
    await updates.take()()  # nothing stored since: writes nothing new

    assert written == [({"btc": "m8", "eth": "m1"}, 2), ({"eth": "m10"}, 0), ({}, 0)]
    assert live.UNDECODABLE["prices-under-test"] == 2
    assert live.generation() == generation + 3


class SlowBuffer:
    """A producer buffer (Faust's `ProducerBufferT` interface) that sends one message per
    `flush_atmost` turn; each item taken queues one message, as a table write does."""

    def __init__(self) -> None:
        self.size = 0
        self.largest = 0

    def put(self) -> None:
        self.size += 1
        self.largest = max(self.largest, self.size)

    async def flush_atmost(self, n: int) -> int:
        sent = min(n, self.size)
        self.size -= sent
        return sent


async def test_a_publication_waits_for_the_changelog_backlog_to_shrink() -> None:
    buffer = SlowBuffer()
    taken = 0
    async for _ in live._yielding(range(10 * live.CHANGELOG_BACKLOG), buffer):  # type: ignore[arg-type]
        buffer.put()
        taken += 1
    assert taken == 10 * live.CHANGELOG_BACKLOG
    assert buffer.largest <= live.CHANGELOG_BACKLOG + live.WRITES_PER_SLICE
