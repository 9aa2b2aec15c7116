"""Faults around a job, through the real bot: Discord rate limits and server errors on the result
upload, a job outliving its 15-minute interaction token, a channel the bot may not post in, a
dropped gateway connection, and the engine process killed mid-job (retried; failed with a refund
after three crashes). Every interaction is still answered within 3 s."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.queue.scheduler import JobEvent, ProgressEvent, Started
from sandbox import Message, User
from sandbox import permission_bits as perms
from studio.harness import Studio, job_id_of, open_studio, tiny_settings
from tests.e2e.refusals import account, assert_fast, assert_nothing_charged, assert_queued, assert_refused, kinds

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

RESULT_POSTS = r"^/channels/\d+/messages$"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def studio(tiny_model_dir: Path, studio_dir: Path) -> AsyncIterator[Studio]:
    settings = tiny_settings(tiny_model_dir, studio_dir)
    async with open_studio(settings) as running:
        yield running
        running.sb.clear_faults()


def result_messages(studio: Studio, job_id: str, channel: Any = None) -> list[Message]:
    """Every live message carrying the job's result buttons."""

    def is_result(message: Message) -> bool:
        return any(
            (c.get("custom_id") or "").startswith(("atelier:reroll:", "atelier:delete:"))
            and (c.get("custom_id") or "").endswith(job_id)
            for c in message.iter_components()
        )

    return [m for m in studio.sb.channel_messages(channel or studio.channel) if is_result(m)]


async def generate_paused(studio: Studio, user: User, options: dict[str, Any], **kwargs: Any) -> str:
    """Queue a job while the queue is paused (so the test can act before it runs); returns its id.
    The caller resumes the queue."""
    studio.bot.wiring.scheduler.pause()
    inter = await studio.command(user, "generate", options, **kwargs)
    assert_queued(inter)
    return job_id_of(inter)


def resume(studio: Studio) -> None:
    studio.bot.wiring.scheduler.resume()


# ------------------------------------------------------------------------------- Discord faults


async def test_rate_limits_and_server_errors_on_the_upload_still_post_the_result_once(studio: Studio) -> None:
    member = studio.new_member("unlucky")
    job_id = await generate_paused(studio, member, {"prompt": "a stormy sea"})
    limited = studio.sb.inject_fault("POST", RESULT_POSTS, status=429, count=2, retry_after=0.05)
    broken = studio.sb.inject_fault("POST", RESULT_POSTS, status=500, count=1)
    resume(studio)
    result = await studio.result_of(job_id)
    status = await studio.status_text(job_id, "Done")
    assert limited.hits == 2 and broken.hits == 1
    assert len(result.attachments) == 1
    assert result_messages(studio, job_id) == [result]
    assert str(result.id) in status.content  # the Done status links to the one result
    failed = [r for r in studio.sb.requests if r.fault and r.method == "POST"]
    assert len(failed) >= 3


async def test_a_job_outliving_its_interaction_token_still_posts_and_edits(studio: Studio) -> None:
    member = studio.new_member("patient")
    # Long enough (4 images × 60 steps at 448×256) for a progress edit (at most one per 2 s) besides the last.
    job_id = await generate_paused(
        studio, member, {"prompt": "a slow sunrise", "steps": 60, "count": 4, "aspect": "16:9"}
    )
    # As if the job had waited more than 15 minutes: every interaction token is dead now.
    studio.sb.expire_tokens()
    seen = len(studio.sb.requests)
    resume(studio)
    result = await studio.result_of(job_id)
    status = await studio.status_text(job_id, "Done")
    assert result.attachments and str(result.id) in status.content
    assert any(v.content.startswith("Running") for v in status.history), "no progress edit was made"
    webhook_errors = [r for r in studio.sb.requests[seen:] if "/webhooks/" in r.path and r.status >= 400]
    assert not webhook_errors, webhook_errors


async def test_a_channel_the_bot_cannot_post_in_is_refused_before_charging(studio: Studio) -> None:
    mute = studio.sb.add_channel(studio.guild, "read-only", bot_can_send=False)
    member = studio.new_member("in-the-wrong-room")
    before = await account(studio, member)
    inter = await studio.command(member, "generate", {"prompt": "a cat"}, channel=mute)
    assert_refused(inter, "cannot post images in this channel", "Send Messages", "another channel")
    inter = await studio.command(member, "refine", {}, channel=mute, attachments=[("in.png", _png(), "image/png")])
    assert_refused(inter, "cannot post images")
    await assert_nothing_charged(studio, member, before)


async def test_losing_the_permission_while_queued_is_told_in_the_status(studio: Studio) -> None:
    room = studio.sb.add_channel(studio.guild, "soon-read-only")
    member = studio.new_member("unlucky-room")
    job_id = await generate_paused(studio, member, {"prompt": "a cat"}, channel=room)
    room.bot_deny |= perms.SEND_MESSAGES  # an admin changes the channel's permissions meanwhile
    studio.sb.world.changed()
    resume(studio)
    status = await studio.sb.wait_for_message(
        lambda m: m.content.startswith("Done") and f"`{job_id}`" in m.content, timeout=60, channel=room
    )
    assert "could not post the images here" in status.content and f"/job {job_id}" in status.content
    assert result_messages(studio, job_id, room) == []
    # The member gets the images where the bot may answer: in reply to /job.
    inter = await studio.command(member, "job", {"id": job_id}, channel=room)
    assert_fast(inter)
    posted = await inter.wait_original(lambda m: bool(m.attachments))  # the deferred answer, filled in
    assert f":{job_id}" in str(posted.components)


async def test_a_dropped_gateway_mid_job_resumes_and_the_job_completes(studio: Studio) -> None:
    member = studio.new_member("cut-off")
    job_id = await generate_paused(studio, member, {"prompt": "a long bridge", "steps": 20})
    resumes = studio.sb.gateway.resume_count
    started = _wait_for_event(studio, job_id, ProgressEvent)
    resume(studio)
    await started
    await studio.sb.drop_gateway(abrupt=True)
    await studio.sb.wait_resumed(resumes + 1, timeout=30)
    result = await studio.result_of(job_id)
    assert result.attachments
    await studio.status_text(job_id, "Done")
    after = await studio.command(member, "quota")
    assert_fast(after)


async def test_an_unexpected_error_in_a_command_is_answered_and_logged(
    studio: Studio, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    member = studio.new_member("unlucky-db")

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the database went away")

    monkeypatch.setattr(studio.bot.wiring.quotas, "status", broken)
    caplog.set_level(logging.ERROR, logger="bot.tree")
    inter = await studio.command(member, "quota")
    text = assert_refused(inter, "Something went wrong on my side", str(inter.id))
    assert "RuntimeError" not in text  # no internals shown to the member
    logged = [r for r in caplog.records if r.name == "bot.tree" and str(inter.id) in r.getMessage()]
    assert logged and logged[0].exc_info is not None and "database went away" in str(logged[0].exc_info[1])


# ------------------------------------------------------------------------------ engine crashes


def _wait_for_event(studio: Studio, job_id: str, kind: type) -> Any:
    """A future set at the job's next event of `kind` (no polling)."""
    import asyncio

    future: asyncio.Future[JobEvent] = asyncio.get_running_loop().create_future()
    remove: Callable[[], None]

    def listener(event: JobEvent) -> None:
        if event.job_id == job_id and isinstance(event, kind) and not future.done():
            future.set_result(event)
            remove()

    remove = studio.bot.wiring.scheduler.on_event(listener)
    return asyncio.wait_for(future, 60)


def _kill_engine_mid_job(studio: Studio, job_id: str, times: int) -> list[int]:
    """Kill the engine process (SIGKILL) at the first progress step of each of the job's first
    `times` attempts; returns the pids killed."""
    engine = studio.bot.wiring.engine.inner  # type: ignore[attr-defined]
    killed: list[int] = []
    armed = [False]

    def listener(event: JobEvent) -> None:
        if event.job_id != job_id:
            return
        if isinstance(event, Started):
            armed[0] = len(killed) < times
        elif isinstance(event, ProgressEvent) and armed[0]:
            armed[0] = False
            pid = engine.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    studio.bot.wiring.scheduler.on_event(listener)
    return killed


async def test_an_engine_killed_mid_job_is_retried_and_the_job_finishes(studio: Studio) -> None:
    services = studio.bot.wiring
    member, bystander = studio.new_member("crash-once"), studio.new_member("bystander")
    job_id = await generate_paused(studio, member, {"prompt": "a phoenix", "steps": 30})
    killed = _kill_engine_mid_job(studio, job_id, times=1)
    restarted = _wait_for_event(studio, job_id, Started)
    resume(studio)
    await restarted
    await studio.sb.wait_until(lambda: killed, timeout=30, what="the engine kill")
    # Whatever the engine is doing (here: restarting), commands are answered within 3 s.
    assert_fast(await studio.command(bystander, "quota"))
    assert_queued(await studio.command(bystander, "generate", {"prompt": "meanwhile"}))
    result = await studio.result_of(job_id, timeout=90)
    assert result.attachments
    record = await services.jobs.get(job_id)
    assert record is not None and record.status == "done" and record.attempts == 2
    assert services.engine.inner.pid not in (None, *killed)  # type: ignore[attr-defined]
    assert kinds(await services.quotas.ledger(studio.guild.id, member.id)) == ["reserve", "commit"]


async def test_an_engine_crashing_three_times_fails_the_job_with_a_refund(studio: Studio) -> None:
    services = studio.bot.wiring
    member = studio.new_member("crash-thrice")
    job_id = await generate_paused(studio, member, {"prompt": "a cursed vase", "steps": 30})
    killed = _kill_engine_mid_job(studio, job_id, times=3)
    resume(studio)
    status = await studio.status_text(job_id, "Failed:", timeout=120)
    assert len(killed) == 3
    assert "3 times" in status.content and "refunded" in status.content and status.components == []
    record = await services.jobs.get(job_id)
    assert record is not None and record.status == "failed" and record.attempts == 3
    assert kinds(await services.quotas.ledger(studio.guild.id, member.id)) == ["reserve", "refund"]
    assert (await services.quotas.status(studio.guild.id, member.id)).used == 0
    assert result_messages(studio, job_id) == []
    # The engine is back: the next job runs.
    after = await studio.command(member, "generate", {"prompt": "a sturdy vase"})
    assert (await studio.result_of(job_id_of(after), timeout=90)).attachments


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 100, 50)).save(buffer, "PNG")
    return buffer.getvalue()
