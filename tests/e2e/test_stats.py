"""/mod stats through the real bot: a moderator sees the day's jobs, waits, engine and queue
(checked against the database and the scheduler), ephemerally; anyone else is refused with the
usual moderator-only message."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio

from bot.permissions import NotModerator
from bot.render import duration
from db.stats import activity_since
from sandbox import permission_bits as perms
from studio.harness import Studio, job_id_of, open_studio, tiny_settings
from tests.e2e.refusals import assert_fast, assert_queued, assert_refused

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def studio(tiny_model_dir: Path, studio_dir: Path) -> AsyncIterator[Studio]:
    settings = tiny_settings(tiny_model_dir, studio_dir)
    async with open_studio(settings) as running:
        yield running


async def test_moderators_see_the_last_24_hours(studio: Studio) -> None:
    services = studio.bot.wiring
    alice, bob = studio.new_member("stats-alice"), studio.new_member("stats-bob")
    done = []
    for prompt in ("a harbour", "a mill"):
        inter = await studio.command(alice, "generate", {"prompt": prompt})
        assert_queued(inter)
        done.append(job_id_of(inter))
    for job_id in done:
        await studio.result_of(job_id)

    blocked = studio.new_member("stats-blocked")
    await services.quotas.set_user_limit(studio.guild.id, blocked.id, 0)
    assert_refused(await studio.command(blocked, "generate", {"prompt": "a kite"}), "allowance")

    services.scheduler.pause()
    try:
        cancelled = job_id_of(await studio.command(bob, "generate", {"prompt": "never drawn"}))
        assert await services.scheduler.cancel(cancelled)
        waiting = job_id_of(await studio.command(bob, "generate", {"prompt": "drawn later"}))
        inter = await studio.command(studio.mod, "mod stats")
    finally:
        services.scheduler.resume()
    assert_fast(inter)
    assert inter.response is not None and inter.response.ephemeral
    text = inter.response.content or ""

    assert "**Last 24 h** 4 jobs from 2 members" in text
    assert "**Jobs** 2 done · 0 failed · 1 cancelled · 1 queued · 0 running" in text
    assert "**Queue now** 1 waiting (1 normal) · paused by the moderators" in text
    assert "**Engine** up · 0 of 1 slots busy · 0 restarts since the bot started" in text
    assert "**Quota refusals** 1 since the bot started" in text
    # Waits and run times as the database has them (the two done jobs started; the others not).
    activity = await activity_since(services.db, datetime.now(UTC) - timedelta(hours=24))
    assert activity.waited == 2 and activity.mean_wait_seconds is not None and activity.p90_wait_seconds is not None
    assert activity.mean_run_seconds is not None
    assert f"**Wait** mean {duration(activity.mean_wait_seconds)} · p90 {duration(activity.p90_wait_seconds)}" in text
    assert f"**Run time** mean {duration(activity.mean_run_seconds)} per done job" in text
    # The engine's run time over the time since the bot started (less than 24 h here).
    busy = re.search(r"\*\*Engine busy\*\* ([\d.]+)% since the bot started (.+) ago", text)
    assert busy is not None, text
    uptime = datetime.now(UTC).timestamp() - services.metrics.started_at
    expected = 100 * activity.engine_seconds / uptime
    assert activity.engine_seconds > 0 and abs(float(busy[1]) - expected) <= 2, (busy[1], expected)

    await studio.result_of(waiting)


async def test_members_are_refused(studio: Studio) -> None:
    # Discord hides /mod from members (default_permissions), but a client may send it anyway.
    helpers = studio.sb.add_role(studio.guild, "Stats helpers", perms.MANAGE_MESSAGES)
    member = studio.new_member("curious", roles=[helpers])
    inter = await studio.sb.raw_slash(member, studio.channel, "mod stats", {})
    await inter.wait_response()
    text = assert_refused(inter, NotModerator.message)
    assert "Last 24 h" not in text
