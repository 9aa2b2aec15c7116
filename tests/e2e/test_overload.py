"""The 3 s guarantee when the request path itself is slow (a burst, a slow disk): the interaction
is deferred in time, and the request then finishes in that deferred message."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.interactions import DEFER_AFTER_SECONDS, FirstResponse
from studio.harness import JOB_IN_TEXT, Studio, open_studio, tiny_settings

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

DEFERRED_CHANNEL_MESSAGE = 5
REST_CONNECTIONS = 2


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def studio(tiny_model_dir: Path, studio_dir: Path) -> AsyncIterator[Studio]:
    """The usual studio, with only 2 connections to Discord for REST calls: bursts queue on them."""
    settings = tiny_settings(tiny_model_dir, studio_dir, discord={"http_connections": REST_CONNECTIONS})
    async with open_studio(settings) as running:
        yield running


@pytest.fixture
def slow_enqueue(studio: Studio) -> Iterator[None]:
    """Every job admission takes 2.6 s, longer than the bot may wait before answering."""
    jobs = studio.bot.wiring.jobs
    real = jobs.enqueue

    async def slow(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(2.6)
        return await real(*args, **kwargs)

    jobs.enqueue = slow  # type: ignore[method-assign]
    try:
        yield
    finally:
        jobs.enqueue = real  # type: ignore[method-assign]


async def test_a_slow_accepted_request_is_deferred_in_time_then_posts_its_public_card(
    studio: Studio, slow_enqueue: None
) -> None:
    member = studio.new_member("late")
    inter = await studio.sb.slash(member, studio.channel, "generate", {"prompt": "a lighthouse"})
    first = await inter.wait_response(3.0)
    assert first.type == DEFERRED_CHANNEL_MESSAGE and first.ephemeral
    assert inter.response_latency is not None and inter.response_latency < 3.0

    await inter.wait_original(lambda m: "Your job is queued" in m.content, timeout=10)
    link = inter.original.content
    public = [
        m
        for m in studio.sb.channel_messages(studio.channel, include_ephemeral=False)
        if m.content.startswith("Queued") and str(m.id) in link
    ]
    assert len(public) == 1, link
    job_id = JOB_IN_TEXT.search(public[0].content)[1]
    result = await studio.result_of(job_id)
    assert result.attachments
    record = await studio.bot.wiring.jobs.get(job_id)
    assert record is not None and record.status == "done" and record.owner_id == member.id


async def test_a_slow_refusal_replaces_the_deferral_and_stays_ephemeral(studio: Studio, slow_enqueue: None) -> None:
    member = studio.new_member("broke")
    await studio.bot.wiring.quotas.set_user_limit(studio.guild.id, member.id, 0.001)
    inter = await studio.sb.slash(member, studio.channel, "generate", {"prompt": "too big", "count": 4})
    first = await inter.wait_response(3.0)
    assert first.type == DEFERRED_CHANNEL_MESSAGE and first.ephemeral
    await inter.wait_original(lambda m: m.content.startswith("Not enough quota"), timeout=10)
    assert inter.original.ephemeral
    status = await studio.bot.wiring.quotas.status(studio.guild.id, member.id)
    assert status.used == 0
    assert await studio.bot.wiring.jobs.list_for_user(studio.guild.id, member.id) == []


async def test_a_burst_is_deferred_at_once_and_every_job_gets_one_public_card(studio: Studio) -> None:
    """With several requests unanswered, the next ones are deferred at once instead of waiting
    for the earlier ones' database work; each then finishes in its deferred message."""
    members = [studio.new_member(f"burst{i}") for i in range(12)]
    before = len(studio.sb.requests)
    inters = await asyncio.gather(
        *(studio.sb.slash(m, studio.channel, "generate", {"prompt": f"burst {i}"}) for i, m in enumerate(members))
    )
    firsts = await asyncio.gather(*(inter.wait_response(3.0) for inter in inters))
    deferred = [inter for inter, first in zip(inters, firsts, strict=True) if first.type == DEFERRED_CHANNEL_MESSAGE]
    assert deferred and all(first.ephemeral for first in firsts if first.type == DEFERRED_CHANNEL_MESSAGE)
    for inter in deferred:
        await inter.wait_original(lambda m: "Your job is queued" in m.content, timeout=20)
    records = [await studio.bot.wiring.jobs.list_for_user(studio.guild.id, m.id) for m in members]
    assert all(len(jobs) == 1 for jobs in records)
    public = studio.sb.channel_messages(studio.channel, include_ephemeral=False)
    for jobs in records:  # the queue card (Queued, then Running, Done): the only message naming the job
        assert sum(f"Job `{jobs[0].id}`" in m.content for m in public) == 1
    # The burst's requests took turns on the bot's few connections instead of opening one each.
    callbacks = [r for r in studio.sb.requests[before:] if r.path.endswith("/callback")]
    assert len(callbacks) == 12
    assert 1 <= len({r.client_port for r in callbacks}) <= REST_CONNECTIONS


async def test_a_request_answered_without_its_first_response_stops_counting_as_unanswered(studio: Studio) -> None:
    """The burst rule counts unanswered requests; one answered another way (here: a crash the
    error handler answers) must leave that count when its timer fires, or every later request
    would be deferred at once."""
    actions = studio.bot.wiring.actions
    real = actions.cancel

    async def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected")

    before = FirstResponse.unanswered
    actions.cancel = crash  # type: ignore[method-assign]
    try:
        inter = await studio.command(studio.new_member("crasher"), "cancel", {"job": "ABCDEFGH"})
    finally:
        actions.cancel = real  # type: ignore[method-assign]
    assert inter.response is not None and inter.response.ephemeral
    await asyncio.sleep(DEFER_AFTER_SECONDS + 0.5)
    assert FirstResponse.unanswered == before
