"""bot.delivery: the bot's background Discord calls give way to a burst's first responses."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from bot.delivery import Delivery
from tests.bot.test_interactions import burst_of_slow_deferrals

RECORD = SimpleNamespace(id="JOB00001", channel_id=1)


def delivery_noting_edits(edited_at: list[float]) -> Delivery:
    """A Delivery whose bot's messages note when they are edited."""
    loop = asyncio.get_running_loop()

    class Message:
        async def edit(self, **kwargs: Any) -> None:
            edited_at.append(loop.time())

    channel = SimpleNamespace(get_partial_message=lambda message_id: Message())
    bot = SimpleNamespace(get_partial_messageable=lambda channel_id: channel)
    return Delivery(bot, jobs=None, results=None, safety=None, safety_settings=None)  # type: ignore[arg-type]


async def test_a_status_edit_waits_until_a_bursts_deferrals_are_sent() -> None:
    edited_at: list[float] = []
    delivery = delivery_noting_edits(edited_at)
    answers = burst_of_slow_deferrals()
    assert await delivery._edit(RECORD, 42, content="Running")  # type: ignore[arg-type]
    deferred_at = [a.interaction.response.deferred_at for a in answers]
    assert all(at is not None for at in deferred_at)
    assert edited_at and edited_at[0] >= max(deferred_at)  # type: ignore[type-var]
    for answer in answers:
        answer.stop()


async def test_without_a_burst_a_status_edit_goes_at_once() -> None:
    edited_at: list[float] = []
    delivery = delivery_noting_edits(edited_at)
    before = asyncio.get_running_loop().time()
    assert await delivery._edit(RECORD, 7, content="Running")  # type: ignore[arg-type]
    assert edited_at[0] - before < 0.05
