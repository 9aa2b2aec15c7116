"""bot.interactions: when a first response is deferred (the timer, and the burst rule)."""

from __future__ import annotations

import asyncio
from typing import Any

import discord

from bot.interactions import BACKLOG_BUSY, BACKLOG_REQUESTS, FirstResponse


class FakeResponse:
    def __init__(self) -> None:
        self.deferred_at: float | None = None

    def is_done(self) -> bool:
        return self.deferred_at is not None

    async def defer(self, **kwargs: Any) -> None:
        self.deferred_at = asyncio.get_running_loop().time()


class SlowResponse(FakeResponse):
    async def defer(self, **kwargs: Any) -> None:
        await asyncio.sleep(0.1)  # the HTTP round trip
        await super().defer(**kwargs)


class FakeInteraction:
    """What FirstResponse reads of a discord.Interaction: its age, id and response."""

    def __init__(self, number: int) -> None:
        self.id = number
        self.created_at = discord.utils.utcnow()
        self.response = FakeResponse()


def burst_of_slow_deferrals() -> list[FirstResponse]:
    """Enough requests at once for the burst rule: all deferred at once, each deferral taking 0.1 s."""
    answers = []
    for i in range(BACKLOG_REQUESTS + 2):
        interaction = FakeInteraction(i)
        interaction.response = SlowResponse()
        answers.append(FirstResponse(interaction))  # type: ignore[arg-type]
    return answers


async def test_a_burst_defers_the_requests_that_came_before_it_too() -> None:
    before = FirstResponse.unanswered
    early = [FirstResponse(FakeInteraction(i)) for i in range(BACKLOG_REQUESTS)]  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert not any(a.interaction.response.is_done() for a in early)  # under the backlog: the timer waits
    late = FirstResponse(FakeInteraction(99))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert all(a.deferred for a in [*early, late])  # at once, not 1.5 s later
    assert FirstResponse.unanswered == before
    assert not FirstResponse._timed


async def test_an_answered_request_is_not_deferred_by_a_later_burst() -> None:
    answered = FirstResponse(FakeInteraction(1))  # type: ignore[arg-type]
    answered.stop()  # it answered itself
    others = [FirstResponse(FakeInteraction(i)) for i in range(2, BACKLOG_REQUESTS + 3)]  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert not answered.deferred and not answered.interaction.response.is_done()
    assert all(a.deferred for a in others)
    for answer in others:
        answer.stop()


async def test_in_a_burst_work_starts_once_the_deferrals_are_sent() -> None:
    answers = burst_of_slow_deferrals()
    loop = asyncio.get_running_loop()
    await answers[-1].answers_first()
    started_work = loop.time()
    deferred_at = [a.interaction.response.deferred_at for a in answers]
    assert all(at is not None and at <= started_work for at in deferred_at)
    for answer in answers:
        answer.stop()


async def test_without_a_burst_work_starts_at_once() -> None:
    answer = FirstResponse(FakeInteraction(1))  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    before = loop.time()
    await answer.answers_first()
    assert loop.time() - before < 0.05 and not answer.interaction.response.is_done()
    answer.stop()


async def test_a_new_request_is_deferred_at_once_while_many_are_still_working() -> None:
    """Requests answered early (deferred) may still queue for the database: a new one would wait
    behind all of that before its own answer, so it is deferred at once too."""
    release = asyncio.Event()

    async def request(number: int) -> FirstResponse:
        answer = FirstResponse(FakeInteraction(number))  # type: ignore[arg-type]
        answer.stop()  # answered (say, deferred earlier), but its work goes on
        await release.wait()
        return answer

    async def new_request(number: int) -> FirstResponse:
        answer = FirstResponse(FakeInteraction(number))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        answer.stop()
        return answer

    working = [asyncio.create_task(request(i)) for i in range(BACKLOG_BUSY)]
    await asyncio.sleep(0.01)
    assert (await asyncio.create_task(new_request(99))).deferred
    release.set()
    await asyncio.gather(*working)
    assert not (await asyncio.create_task(new_request(100))).deferred  # the work is done: no backlog


async def test_a_wait_for_deferrals_that_times_out_leaves_nothing_behind() -> None:
    answers = burst_of_slow_deferrals()
    await FirstResponse.answers_first(timeout=0.01)  # the deferrals take 0.1 s
    assert not FirstResponse._waiting_for_deferrals
    await asyncio.sleep(0.2)  # the deferrals are sent
    assert all(a.deferred for a in answers) and FirstResponse._deferring == 0
