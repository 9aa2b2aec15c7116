"""Safe on real Discord (issue 12), through the sandbox with a second server and DM channels.

A stranger who adds the bot to a server they own is that server's moderator, nothing more; the
operator (the application's owner) alone reaches every server. DMs are off unless the operator
turns them on, and then the operator's bans and a ban in any shared server follow a member there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from db.moderation import EVERYWHERE
from sandbox import Sandbox
from studio.harness import Studio, job_id_of, open_bot, open_studio, tiny_settings
from tests.e2e.refusals import assert_fast, assert_queued, assert_refused
from tests.e2e.test_bad_input import png

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def studio(tiny_model_dir: Path, studio_dir: Path) -> AsyncIterator[Studio]:
    settings = tiny_settings(tiny_model_dir, studio_dir, discord={"cooldown_uses": 0})
    async with open_studio(settings) as running:
        yield running


class Elsewhere:
    """A second server, owned by a stranger (Eve) who added the bot to it."""

    def __init__(self, studio: Studio) -> None:
        sb = studio.sb
        self.eve = sb.add_user(f"eve-{time.monotonic_ns()}")
        self.guild = sb.add_guild("Elsewhere", owner=self.eve)
        self.channel = sb.add_channel(self.guild, "general")


async def polled(predicate, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Until the bot's own state says so (the sandbox's waits only wake on its own changes)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def say(studio: Studio, user, name: str, options=None, *, channel=None) -> str:  # type: ignore[no-untyped-def]
    inter = await studio.command(user, name, options or {}, channel=channel)
    assert_fast(inter)
    assert inter.response is not None
    return inter.response.content or ""


async def test_another_servers_owner_cannot_pause_see_or_cancel_this_servers_jobs(studio: Studio) -> None:
    other = Elsewhere(studio)
    await polled(lambda: studio.bot.get_guild(other.guild.id), "the new server")
    services = studio.bot.wiring
    member = studio.new_member("home-member")
    # Eve pauses *her* server: the home server's jobs go on running.
    assert "paused" in await say(studio, other.eve, "mod pause", channel=other.channel)
    try:
        assert services.scheduler.server_paused(other.guild.id)
        assert not services.scheduler.server_paused(studio.guild.id) and not services.scheduler.paused
        inter = await studio.command(member, "generate", {"prompt": "a home job", "steps": 1})
        job_id = assert_queued(inter) and job_id_of(inter)
        # She sees none of it, and cannot cancel it.
        queue = await say(studio, other.eve, "mod queue", channel=other.channel)
        assert job_id not in queue and "empty" in queue
        refused = await say(studio, other.eve, "mod cancel", {"job": job_id}, channel=other.channel)
        assert "only cancel your own" in refused
        stats = await say(studio, other.eve, "mod stats", channel=other.channel)
        assert "**Last 24 h** 0 jobs" in stats
        result = await studio.result_of(job_id)  # ran while Elsewhere was paused
        assert result.attachments
        assert (await services.jobs.get(job_id)).status == "done"  # type: ignore[union-attr]
        # The operator's controls are not hers.
        assert_refused(await studio.command(other.eve, "operator pause", channel=other.channel), "operator")
        assert_refused(await studio.command(other.eve, "operator queue", channel=other.channel), "operator")
        assert not services.scheduler.paused
    finally:
        await say(studio, other.eve, "mod resume", channel=other.channel)


async def test_a_paused_server_waits_while_the_others_run(studio: Studio) -> None:
    other = Elsewhere(studio)
    await polled(lambda: studio.bot.get_guild(other.guild.id), "the new server")
    waiting = studio.sb.add_user("elsewhere-member")
    studio.sb.add_member(other.guild, waiting)
    await say(studio, other.eve, "mod pause", channel=other.channel)
    try:
        parked = await studio.command(waiting, "generate", {"prompt": "parked", "steps": 1}, channel=other.channel)
        assert "paused by the moderators" in assert_queued(parked)
        home = await studio.command(studio.new_member("runner"), "generate", {"prompt": "runs", "steps": 1})
        await studio.result_of(job_id_of(assert_queued(home) and home))
        record = await studio.bot.wiring.jobs.get(job_id_of(parked))
        assert record is not None and record.status == "queued"
    finally:
        await say(studio, other.eve, "mod resume", channel=other.channel)
    await studio.result_of(job_id_of(parked))


async def test_the_operator_sees_and_pauses_everything(studio: Studio) -> None:
    operator = studio.sb.owner  # the application's owner
    studio.sb.add_member(studio.guild, operator)
    services = studio.bot.wiring
    assert "Every server's queue is paused" in await say(studio, operator, "operator pause")
    try:
        assert services.scheduler.paused and (await services.moderation.get_settings(EVERYWHERE)).paused
        inter = await studio.command(studio.new_member("held"), "generate", {"prompt": "held", "steps": 1})
        job_id = job_id_of(inter)
        assert job_id in await say(studio, operator, "operator queue")
        assert "**Last 24 h**" in await say(studio, operator, "operator stats")
    finally:
        assert "running again" in await say(studio, operator, "operator resume")
    await studio.result_of(job_id)


async def test_dms_are_refused_by_default(studio: Studio) -> None:
    member = studio.new_member("dm-er")
    inter = await studio.command(member, "generate", {"prompt": "a lantern"}, channel=studio.sb.dm_channel(member))
    assert_refused(inter, "servers only")


async def test_in_dms_the_operators_bans_and_any_shared_servers_ban_apply(
    studio: Studio, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(studio.bot.settings.discord, "allow_dms", True)
    operator = studio.sb.owner
    free, banned_here, banned_everywhere = (studio.new_member(n) for n in ("dm-free", "dm-banned", "dm-outlaw"))
    await say(studio, studio.mod, "mod ban", {"user": banned_here, "reason": "spam"})
    assert "everywhere" in await say(studio, operator, "operator ban", {"user": banned_everywhere})

    def dm(user):  # type: ignore[no-untyped-def]
        return studio.command(user, "generate", {"prompt": "a dm job", "steps": 1}, channel=studio.sb.dm_channel(user))

    assert_refused(await dm(banned_here), "banned", "DMs")
    assert_refused(await dm(banned_everywhere), "banned from using this bot")
    assert_refused(await studio.command(banned_everywhere, "generate", {"prompt": "x"}), "banned from using this bot")
    await studio.result_of(job_id_of(assert_queued(await dm(free)) and await dm(free)))
    await say(studio, operator, "operator unban", {"user": banned_everywhere})


@pytest.mark.parametrize(
    "prompt",
    [
        "a nu\u200bde statue",  # zero-width space
        "a nu\u00adde statue",  # soft hyphen
        "a ｎｕｄｅ statue",  # fullwidth letters
        "a nud\u0435 statue",  # Cyrillic е
        "a nu(de)1.1 statue",  # compel weighting
        "a (nude:1.2) statue",  # A1111 weighting
        "a NU+DE statue",
    ],
)
async def test_blocklist_bypasses_are_refused(studio: Studio, prompt: str) -> None:
    await say(studio, studio.mod, "mod blocklist add", {"pattern": r"\bnude\b"})
    inter = await studio.command(studio.new_member("walker"), "generate", {"prompt": prompt})
    assert_refused(inter, "blocked term")


async def test_a_catastrophic_pattern_cannot_stall_the_bot(studio: Studio) -> None:
    assert "Added" in await say(studio, studio.mod, "mod blocklist add", {"pattern": "(a|a)+b"})
    try:
        started = time.monotonic()
        inter = await studio.command(studio.new_member("aaaa"), "generate", {"prompt": "a" * 40 + "!"})
        assert_queued(inter)  # no b: not blocked, and answered within Discord's 3 s
        assert time.monotonic() - started < 3.0
        blocked = await studio.command(studio.new_member("aaab"), "generate", {"prompt": "a" * 1400 + "b"})
        assert_refused(blocked, "blocked term")
    finally:
        await say(studio, studio.mod, "mod blocklist remove", {"pattern": "(a|a)+b"})


async def test_a_pattern_re2_cannot_run_is_refused_with_the_reason(studio: Studio) -> None:
    text = await say(studio, studio.mod, "mod blocklist add", {"pattern": r"(\w+)\s\1"})
    assert "cannot be used" in text and "backreference" in text


async def test_a_banned_members_attachment_is_never_downloaded(studio: Studio) -> None:
    member = studio.new_member("banned-uploader")
    await say(studio, studio.mod, "mod ban", {"user": member})
    before = len(studio.sb.requests)
    inter = await studio.command(member, "refine", {}, attachments=[("in.png", png(), "image/png")])
    assert_refused(inter, "banned")
    downloads = [r for r in studio.sb.requests[before:] if r.method == "GET" and "/attachments/" in r.path]
    assert downloads == []


async def test_a_deleted_jobs_images_are_gone_and_job_says_so(studio: Studio) -> None:
    member = studio.new_member("deleter")
    inter = await studio.command(member, "generate", {"prompt": "delete me", "steps": 1})
    job_id = job_id_of(inter)
    result = await studio.result_of(job_id)
    record = await studio.bot.wiring.jobs.get(job_id)
    assert record is not None
    paths = [studio.bot.wiring.outputs.root / image["path"] for image in record.images]
    assert paths and all(path.exists() for path in paths)
    # A stranger cannot delete it; the owner can.
    assert_refused(await studio.click(studio.new_member("stranger"), result, "Delete"), "Only the person")
    assert_fast(await studio.click(member, result, "Delete"))
    await studio.sb.wait_until(lambda: studio.sb.world.messages[result.id].deleted, timeout=5, what="deletion")
    await polled(lambda: not any(path.exists() for path in paths), "the images deleted")
    record = await studio.bot.wiring.jobs.get(job_id)
    assert record is not None and record.deleted and record.images == []
    assert_refused(await studio.command(member, "job", {"id": job_id}), "was deleted")


async def test_a_forged_delete_cannot_remove_someone_elses_result(studio: Studio) -> None:
    """The custom_id names a job; only Discord's copy of the clicked message says which message
    it is: a tampered client's Delete of its own job, clicked on another member's result, fails."""
    mallory, alice = studio.new_member("mallory"), studio.new_member("alice-victim")
    own_id = job_id_of(await studio.command(mallory, "generate", {"prompt": "mine", "steps": 1}))
    victim_id = job_id_of(await studio.command(alice, "generate", {"prompt": "hers", "steps": 1}))
    await studio.result_of(own_id)
    victim = await studio.result_of(victim_id)
    inter = await studio.sb.raw_click(mallory, victim, f"atelier:delete:{own_id}")
    await inter.wait_response(5)
    assert_refused(inter, "not a result of this job")
    assert not studio.sb.world.messages[victim.id].deleted
    own = await studio.bot.wiring.jobs.get(own_id)
    assert own is not None and not own.deleted


async def test_job_reposts_only_for_owner_channel_or_moderator(studio: Studio) -> None:
    owner = studio.new_member("reposted")
    job_id = job_id_of(await studio.command(owner, "generate", {"prompt": "share me", "steps": 1}))
    await studio.result_of(job_id)
    other = Elsewhere(studio)
    await polled(lambda: studio.bot.get_guild(other.guild.id), "the new server")
    # A stranger in another server's channel: refused; Eve's moderator rights are for her server.
    assert_refused(await studio.command(other.eve, "job", {"id": job_id}, channel=other.channel), "only your own")
    # From a different channel of the same server, a member who is not the owner: refused.
    lounge = studio.sb.add_channel(studio.guild, f"lounge-{job_id.lower()}")
    stranger = studio.new_member("onlooker")
    assert_refused(await studio.command(stranger, "job", {"id": job_id}, channel=lounge), "only your own")
    # In the channel it was posted in: anyone there may bring it back; the owner anywhere.
    for who, where in ((stranger, studio.channel), (owner, lounge)):
        inter = await studio.command(who, "job", {"id": job_id}, channel=where)
        assert inter.response is not None and not inter.response.ephemeral
        await inter.wait_original(lambda m: bool(m.attachments) and not m.loading, timeout=10)


async def test_an_unlisted_server_gets_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    async with Sandbox() as sb:
        home = sb.add_guild("Home")
        home_channel = sb.add_channel(home, "studio")
        stranger_guild = sb.add_guild("Stranger's server")  # the bot is in it before it starts
        stranger_channel = sb.add_channel(stranger_guild, "general")
        member = sb.add_user("member")
        sb.add_member(home, member)
        sb.add_member(stranger_guild, member)
        settings = tiny_settings(tiny_model_dir, tmp_path, discord={"guilds": [home.id]})
        async with open_bot(sb, settings) as bot:
            await sb.wait_until(
                lambda: sb.bot_user.id not in stranger_guild.members, timeout=10, what="leaving at start"
            )
            late = sb.add_guild("Added later")  # anyone may add a public bot
            late_channel = sb.add_channel(late, "general")
            sb.add_member(late, member)
            await sb.wait_until(lambda: sb.bot_user.id not in late.members, timeout=10, what="leaving on join")
            await sb.wait_for_commands("generate")
            ignored = [
                await sb.raw_slash(member, channel, "generate", {"prompt": "hello"})
                for channel in (stranger_channel, late_channel)
            ]
            served = await sb.slash(member, home_channel, "generate", {"prompt": "hello", "steps": 1})
            assert (await served.wait_response(5)).content.startswith("Queued")  # type: ignore[union-attr]
            for inter in ignored:
                assert inter.response is None  # not even a refusal
            assert bot.get_guild(home.id) is not None and bot.get_guild(stranger_guild.id) is None


async def test_a_members_cooldown(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = tiny_settings(tiny_model_dir, tmp_path, discord={"cooldown_uses": 2, "cooldown_seconds": 60})
    async with open_studio(settings) as studio:
        studio.bot.wiring.scheduler.pause()
        member = studio.new_member("hasty")
        for _ in range(2):
            assert_queued(await studio.command(member, "generate", {"prompt": "one", "steps": 1}))
        assert_refused(await studio.command(member, "generate", {"prompt": "three"}), "Slow down")


async def test_forget_erases_a_members_prompts_and_images(studio: Studio) -> None:
    member = studio.new_member("forgetful")
    await studio.command(member, "settings", {"negative": "my secret fog"})
    job_id = job_id_of(await studio.command(member, "generate", {"prompt": "my secret garden", "steps": 1}))
    await studio.result_of(job_id)
    record = await studio.bot.wiring.jobs.get(job_id)
    assert record is not None
    paths = [studio.bot.wiring.outputs.root / image["path"] for image in record.images]
    ledger = await studio.bot.wiring.quotas.ledger(studio.guild.id, member.id)
    assert "Nothing" in await say(studio, member, "forget", {"confirm": False})
    text = await say(studio, member, "forget", {"confirm": True})
    assert "1 job" in text
    record = await studio.bot.wiring.jobs.get(job_id)
    assert record is not None and "my secret garden" not in repr(record.params) and record.images == []
    assert not any(path.exists() for path in paths)
    assert await studio.bot.wiring.quotas.ledger(studio.guild.id, member.id) == ledger  # sums stay
    assert (await studio.bot.moderation.get_member_settings(member.id)).negative is None
