"""The bot process (`python -m bot`) SIGKILLed, then SIGTERMed, each time with 20 jobs queued and
one running, and restarted over the same database, output folder and Discord server. Afterwards
every accepted job finished exactly once or failed with a message and a refund, the ledger
balances, no result was posted twice, the engine child of the killed bot did not outlive it, and
the token is in none of the bot's logs."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import psutil
import pytest

from sandbox import Channel, Message, Sandbox, User
from studio.harness import build_world, job_id_of
from tests.reliability.answers import final_text, job_of, settle_answer
from tests.reliability.bot_process import (
    database,
    engine_children,
    start_bot,
    stop_bot,
    wait_bot_ready,
    write_config,
)
from tests.reliability.invariants import assert_invariants

pytestmark = [pytest.mark.asyncio, pytest.mark.slow, pytest.mark.timeout(600)]

LONG = {"prompt": "a long night", "aspect": "big", "steps": 40}


def running_after(sb: Sandbox, channel: Channel, job_id: str, since: float) -> Message | None:
    """The job's status message once it shows progress edited after `since` (epoch seconds)."""
    for message in sb.channel_messages(channel):
        if (
            message.content.startswith("Running")
            and job_id in message.content
            and message.edited_at is not None
            and message.edited_at.timestamp() > since
        ):
            return message
    return None


async def queue_jobs(sb: Sandbox, channel: Channel, members: list[User], count: int) -> list[str]:
    """`count` two-step jobs, three per member (the per-member cap), sent at once."""
    sends = [
        sb.slash(members[i // 3], channel, "generate", {"prompt": f"queued {i}", "steps": 2}) for i in range(count)
    ]
    inters = await asyncio.gather(*sends)
    ids = []
    for inter in inters:
        await settle_answer(inter)
        assert inter.response_latency is not None and inter.response_latency < 3
        job = job_of(inter)
        assert job is not None, final_text(inter)
        ids.append(job)
    return ids


async def test_sigkill_then_sigterm_with_20_queued_and_1_running(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, tiny_model_dir, queue={"per_user_cap": 3, "global_cap": 100})
    logs = [tmp_path / f"bot-{n}.log" for n in (1, 2, 3)]
    async with Sandbox() as sb:
        world = build_world(sb)
        guild, channel, alice = world["guild"], world["channel"], world["alice"]
        crowd = []
        for i in range(14):
            crowd.append(sb.add_user(f"queuer-{i}"))
            sb.add_member(guild, crowd[-1])
        accepted: list[str] = []

        # ------------------------------------------------ bot 1: SIGKILL mid-job, 20 queued
        bot = await start_bot(sb, config, logs[0])
        try:
            await wait_bot_ready(sb, 1)
            long_card = await sb.slash(alice, channel, "generate", LONG)
            await long_card.wait_response(3)
            long_id = job_id_of(long_card)
            await sb.wait_until(lambda: running_after(sb, channel, long_id, 0), timeout=120, what="the long job")
            accepted += [long_id, *await queue_jobs(sb, channel, crowd[:7], 20)]
            children = engine_children(bot.pid)
            assert children, "the bot has no engine child process"
            bot.send_signal(signal.SIGKILL)
            assert await bot.wait() == -signal.SIGKILL
        finally:
            if bot.returncode is None:
                bot.kill()
                await bot.wait()
        # The engine notices its parent is gone and exits (nobody would read its results).
        _, alive = await asyncio.to_thread(psutil.wait_procs, children, 15)
        for orphan in alive:
            orphan.kill()
        assert not alive, f"engine processes outlived the SIGKILLed bot: {[p.pid for p in alive]}"

        # ------------------------------------------------ bot 2: resumes; SIGTERM with 20 queued
        restarted = time.time()
        bot = await start_bot(sb, config, logs[1])
        try:
            await wait_bot_ready(sb, 2)
            await sb.wait_until(
                lambda: running_after(sb, channel, long_id, restarted), timeout=120, what="the long job resumed"
            )
            accepted += await queue_jobs(sb, channel, crowd[7:], 20)
            started = time.monotonic()
            code = await stop_bot(bot, sig=signal.SIGTERM, timeout=25)
            stopped_in = time.monotonic() - started
        finally:
            if bot.returncode is None:
                bot.kill()
                await bot.wait()
        assert code == 0 and stopped_in < 20, (code, stopped_in)

        # ------------------------------------------------ bot 3: everything finishes
        bot = await start_bot(sb, config, logs[2])
        try:
            await wait_bot_ready(sb, 3)
            async with database(tmp_path) as db:
                audit = await assert_invariants(sb, db, accepted=accepted, guild_id=guild.id, settle_timeout=300)
            assert await stop_bot(bot, sig=signal.SIGTERM, timeout=25) == 0
        finally:
            if bot.returncode is None:
                bot.kill()
                await bot.wait()

    assert len(accepted) == len(audit.jobs) == 41, audit.statuses
    assert audit.jobs[long_id].attempts >= 2  # interrupted by the SIGKILL and run again
    assert audit.statuses["done"] >= 40, audit.statuses  # only the long job may have run out of attempts
    for path in logs:
        text = await asyncio.to_thread(path.read_text, errors="replace")
        assert sb.token not in text, path


async def test_the_engine_process_never_gets_the_token(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`atelier run` reads DISCORD_TOKEN once and drops it from its environment before it starts
    the engine: a child process (or a model's code running in it) cannot read the bot's token."""
    config = write_config(tmp_path, tiny_model_dir)
    async with Sandbox() as sb:
        build_world(sb)
        bot = await start_bot(sb, config, tmp_path / "bot.log")
        try:
            await wait_bot_ready(sb, 1)
            children = await sb.wait_until(lambda: engine_children(bot.pid), timeout=60, what="the engine process")
            for child in children:
                environ = await asyncio.to_thread(child.environ)
                assert "DISCORD_TOKEN" not in environ, f"engine process {child.pid} inherited the token"
                assert sb.token not in "\0".join(f"{k}={v}" for k, v in environ.items())
        finally:
            await stop_bot(bot)
