"""The views' shared answers (tables/answers.py), in-process: when an answer is reused, when it is
computed again, and that concurrent requests share one computation."""

from __future__ import annotations

import asyncio

import pytest

from tables import live
from tables.answers import Answer, Answers


class Source:
    """Counts computations; each answer names its number. `gate` holds a computation open."""

    def __init__(self) -> None:
        self.computed = 0
        self.gate: asyncio.Event | None = None
        self.fail = False

    async def __call__(self) -> Answer:
        self.computed += 1
        number = self.computed
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise LookupError("unknown coin")
        return Answer(f'{{"n":{number}}}'.encode(), b"")


@pytest.fixture
def generation(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """This worker's live-table generation, set by the test."""
    current = [0]
    monkeypatch.setattr(live, "generation", lambda: current[0])
    return current


async def test_an_answer_is_reused_until_it_expires_or_the_tables_change(
    generation: list[int],
) -> None:
    answers, source = Answers(0.2), Source()
    assert (await answers.get("a", source)).body == b'{"n":1}'
    assert (await answers.get("a", source)).body == b'{"n":1}'
    assert (await answers.get("b", source)).body == b'{"n":2}'  # another request
    generation[0] += 1  # this worker's tables got a stored batch
    assert (await answers.get("a", source)).body == b'{"n":3}'
    await asyncio.sleep(0.25)
    assert (await answers.get("a", source)).body == b'{"n":4}'


async def test_concurrent_requests_share_one_computation(generation: list[int]) -> None:
    answers, source = Answers(10), Source()
    source.gate = asyncio.Event()
    waiting = [asyncio.ensure_future(answers.get("a", source)) for _ in range(20)]
    await asyncio.sleep(0.01)
    source.gate.set()
    assert {answer.body for answer in await asyncio.gather(*waiting)} == {b'{"n":1}'}
    assert source.computed == 1


async def test_while_one_request_computes_the_others_get_the_previous_answer(
    generation: list[int],
) -> None:
    answers, source = Answers(10), Source()
    await answers.get("a", source)
    generation[0] += 1
    source.gate = asyncio.Event()
    first = asyncio.ensure_future(answers.get("a", source))  # computes, and waits for it
    await asyncio.sleep(0.01)
    assert (await answers.get("a", source)).body == b'{"n":1}'  # not held up
    source.gate.set()
    assert (await first).body == b'{"n":2}'
    assert (await answers.get("a", source)).body == b'{"n":2}'


async def test_errors_are_not_kept_and_zero_seconds_keeps_nothing(generation: list[int]) -> None:
    answers, source = Answers(10), Source()
    source.fail = True
    for _ in range(2):
        with pytest.raises(LookupError):
            await answers.get("a", source)
    assert source.computed == 2
    never, counted = Answers(0), Source()
    await never.get("a", counted)
    await never.get("a", counted)
    assert counted.computed == 2


async def test_the_oldest_answers_go_beyond_the_byte_bound(generation: list[int]) -> None:
    answers, source = Answers(10, max_bytes=16), Source()  # each answer is 7 bytes
    for key in ("a", "b", "c"):
        await answers.get(key, source)
    await answers.get("c", source)
    await answers.get("b", source)
    assert source.computed == 3
    await answers.get("a", source)  # evicted
    assert source.computed == 4
