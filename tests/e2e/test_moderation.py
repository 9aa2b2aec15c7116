"""Every /mod command through the real bot: allowed for moderators (effect checked in the database
and in what members then experience), refused for everyone else with a clear ephemeral message
and no effect, even when the member's Discord client sends the command anyway (Discord's
`default_permissions` is only a hint an admin can change)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.permissions import NotModerator
from db.moderation import EVERYWHERE
from sandbox import InvocationError, User
from sandbox import permission_bits as perms
from studio.harness import Studio, job_id_of, open_studio, tiny_settings
from tests.e2e.refusals import (
    account,
    assert_fast,
    assert_nothing_charged,
    assert_queued,
    assert_refused,
    kinds,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

OPERATOR_PATTERN = r"forbidden\w*"
# One 256² × 4-step image costs 0.0083 units (shown as 0.01): a limit of 0.012 fits one job.
ONE_JOB = 0.012
NOT_A_MODERATOR = NotModerator.message


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def studio(tiny_model_dir: Path, studio_dir: Path) -> AsyncIterator[Studio]:
    settings = tiny_settings(tiny_model_dir, studio_dir, moderation={"blocklist": [OPERATOR_PATTERN]})
    async with open_studio(settings) as running:
        yield running


async def mod(studio: Studio, command: str, options: dict[str, Any] | None = None, *, user: User | None = None) -> str:
    """A /mod command by the moderator; returns its ephemeral answer."""
    inter = await studio.command(user or studio.mod, f"mod {command}", options or {})
    assert_fast(inter)
    assert inter.response is not None and inter.response.ephemeral, inter.response
    return inter.response.content or ""


async def generate(studio: Studio, user: User, prompt: str = "a lighthouse", **options: Any) -> Any:
    return await studio.command(user, "generate", {"prompt": prompt, **options})


# ---------------------------------------------------------------------------------------- quotas


async def test_quota_set_zero_blocks_and_a_limit_lets_one_job_in(studio: Studio) -> None:
    services, guild = studio.bot.wiring, studio.guild.id
    member = studio.new_member("quota-set")
    text = await mod(studio, "quota set", {"user": member, "limit": 0})
    assert f"<@{member.id}>" in text and "0.00 units" in text
    assert await services.quotas.user_limit(guild, member.id) == 0

    before = await account(studio, member)
    refused = await generate(studio, member)
    assert_refused(refused, "allowance", "0 units", "moderator")
    await assert_nothing_charged(studio, member, before)

    await mod(studio, "quota set", {"user": member, "limit": ONE_JOB})
    assert await services.quotas.user_limit(guild, member.id) == pytest.approx(ONE_JOB)
    assert_queued(await generate(studio, member))
    second = await generate(studio, member)
    assert_refused(second, "Not enough quota", "costs 0.01 units", "of 0.01 left", "frees up")


async def test_quota_role_highest_role_limit_applies(studio: Studio) -> None:
    services, guild = studio.bot.wiring, studio.guild
    low = studio.sb.add_role(guild, "Tier low")
    high = studio.sb.add_role(guild, "Tier high")
    await mod(studio, "quota role", {"role": low, "limit": ONE_JOB})
    text = await mod(studio, "quota role", {"role": high, "limit": 3 * ONE_JOB})
    assert f"<@&{high.id}>" in text
    limits = await services.quotas.role_limits(guild.id)
    assert limits[low.id] == pytest.approx(ONE_JOB) and limits[high.id] == pytest.approx(3 * ONE_JOB)

    only_low = studio.new_member("tier-low", roles=[low])
    both = studio.new_member("tier-both", roles=[low, high])
    quota = await studio.command(both, "quota")
    assert "**Limit** 0.04 units" in assert_refused(quota)  # (ephemeral) 3 × 0.012 shown rounded

    assert_queued(await generate(studio, only_low))
    assert_refused(await generate(studio, only_low), "Not enough quota")
    assert_queued(await generate(studio, both))
    assert_queued(await generate(studio, both))  # the higher role's room, not the lower's


async def test_quota_default_applies_to_members_without_their_own_limit(studio: Studio) -> None:
    services, guild = studio.bot.wiring, studio.guild.id
    own = studio.new_member("has-own-limit")
    await mod(studio, "quota set", {"user": own, "limit": 5})
    try:
        text = await mod(studio, "quota default", {"limit": 0})
        assert "0.00 units" in text
        assert (await services.moderation.get_settings(guild)).default_quota_limit == 0
        plain = studio.new_member("plain")
        before = await account(studio, plain)
        assert_refused(await generate(studio, plain), "allowance", "0 units")
        await assert_nothing_charged(studio, plain, before)
        assert_queued(await generate(studio, own))  # a member's own limit wins over the default
    finally:
        await mod(studio, "quota default", {"limit": 40})
    assert (await services.moderation.get_settings(guild)).default_quota_limit == 40


async def test_quota_grant_gives_room_and_reset_clears_usage(studio: Studio) -> None:
    services, guild = studio.bot.wiring, studio.guild.id
    member = studio.new_member("grant-reset")
    await mod(studio, "quota set", {"user": member, "limit": ONE_JOB})
    assert_queued(await generate(studio, member))
    assert_refused(await generate(studio, member), "Not enough quota")

    text = await mod(studio, "quota grant", {"user": member, "units": ONE_JOB})
    assert "Granted 0.01 extra units" in text
    grants = [e for e in await services.quotas.ledger(guild, member.id) if e.kind == "grant"]
    assert len(grants) == 1 and grants[0].actor_id == studio.mod.id and grants[0].units == pytest.approx(ONE_JOB)
    assert_queued(await generate(studio, member))
    assert_refused(await generate(studio, member), "Not enough quota")

    text = await mod(studio, "quota reset", {"user": member})
    assert "0.02 units cleared" in text
    status = await services.quotas.status(guild, member.id)
    assert status.used == 0
    assert kinds(await services.quotas.ledger(guild, member.id)).count("reset") == 2
    assert_queued(await generate(studio, member))


async def test_out_of_range_amounts_sent_anyway_are_refused_with_no_effect(studio: Studio) -> None:
    services, guild = studio.bot.wiring, studio.guild
    member = studio.new_member("amounts")
    role = studio.sb.add_role(guild, "Amounts")
    cases = [
        ("quota set", {"user": member, "limit": -5}),
        ("quota set", {"user": member, "limit": 1e12}),
        ("quota grant", {"user": member, "units": 0}),
        ("quota default", {"limit": -1}),
        ("quota role", {"role": role, "limit": -0.5}),
    ]
    default_before = (await services.moderation.get_settings(guild.id)).default_quota_limit
    for command, options in cases:
        inter = await studio.sb.raw_slash(studio.mod, studio.channel, f"mod {command}", options)
        await inter.wait_response()
        assert_refused(inter, "must be a number from")
    assert await services.quotas.user_limit(guild.id, member.id) is None
    assert role.id not in await services.quotas.role_limits(guild.id)
    assert kinds(await services.quotas.ledger(guild.id, member.id)) == []
    assert (await services.moderation.get_settings(guild.id)).default_quota_limit == default_before


# ---------------------------------------------------------------------------- pause, queue, cancel


async def test_pause_holds_jobs_and_resume_runs_them(studio: Studio) -> None:
    services = studio.bot.wiring
    member = studio.new_member("paused")
    text = await mod(studio, "pause")
    try:
        assert "paused" in text
        # This server only: the operator's everywhere-pause is untouched (issue 12).
        assert (await services.moderation.get_settings(studio.guild.id)).paused
        assert not (await services.moderation.get_settings(EVERYWHERE)).paused
        inter = await generate(studio, member, "waiting room")
        card = assert_queued(inter)
        assert "paused" in card
        job_id = job_id_of(inter)
        whole = await mod(studio, "queue")
        assert "(paused)" in whole and job_id in whole and f"<@{member.id}>" in whole
        record = await services.jobs.get(job_id)
        assert record is not None and record.status == "queued"
    finally:
        text = await mod(studio, "resume")
    assert "running again" in text
    assert not (await services.moderation.get_settings(studio.guild.id)).paused
    result = await studio.result_of(job_id)
    assert result.attachments


async def test_mod_cancel_of_another_members_job_refunds_it(studio: Studio) -> None:
    services, guild = studio.bot.wiring, studio.guild.id
    member = studio.new_member("cancelled-by-mod")
    await mod(studio, "pause")
    try:
        inter = await generate(studio, member, "never drawn")
        job_id = job_id_of(inter)
        text = await mod(studio, "cancel", {"job": job_id.lower()})
        assert f"Cancelling job `{job_id}`" in text and "refunded" in text
    finally:
        await mod(studio, "resume")
    record = await services.jobs.get(job_id)
    assert record is not None and record.status == "cancelled"
    assert kinds(await services.quotas.ledger(guild, member.id)) == ["reserve", "refund"]
    assert (await services.quotas.status(guild, member.id)).used == 0
    status = await studio.status_text(job_id, "Cancelled by a moderator")
    assert "refunded" in status.content and status.components == []
    unknown = await mod(studio, "cancel", {"job": "ZZZZZZZZ"})
    assert "There is no job" in unknown


# ------------------------------------------------------------------------------------ ban, unban


async def test_ban_refuses_with_the_reason_cancels_and_refunds_then_unban(studio: Studio) -> None:
    services, guild = studio.bot.wiring, studio.guild.id
    member = studio.new_member("banned")
    await mod(studio, "pause")
    try:
        first = job_id_of(await generate(studio, member, "one"))
        second = job_id_of(await generate(studio, member, "two"))
        text = await mod(studio, "ban", {"user": member, "reason": "spamming the queue"})
    finally:
        await mod(studio, "resume")
    assert "can no longer use the bot" in text and "2 queued job(s) cancelled and refunded" in text
    ban = await services.moderation.get_ban(guild, member.id)
    assert ban is not None and ban.reason == "spamming the queue" and ban.moderator_id == studio.mod.id
    for job_id in (first, second):
        record = await services.jobs.get(job_id)
        assert record is not None and record.status == "cancelled"
        await studio.status_text(job_id, "Cancelled")
    assert (await services.quotas.status(guild, member.id)).used == 0

    before = await account(studio, member)
    refused = await generate(studio, member)
    assert_refused(refused, "banned", "spamming the queue")
    await assert_nothing_charged(studio, member, before)

    assert "may use the bot again" in await mod(studio, "unban", {"user": member})
    assert await services.moderation.get_ban(guild, member.id) is None
    assert_queued(await generate(studio, member))
    assert "was not banned" in await mod(studio, "unban", {"user": member})


async def test_ban_without_reason(studio: Studio) -> None:
    member = studio.new_member("banned-quietly")
    await mod(studio, "ban", {"user": member})
    text = assert_refused(await generate(studio, member), "banned")
    assert "Reason" not in text
    await mod(studio, "unban", {"user": member})


# ------------------------------------------------------------------------------------- blocklist


async def test_blocklist_refuses_prompts_and_negatives_case_insensitively(studio: Studio) -> None:
    services, guild = studio.bot.wiring, studio.guild.id
    member = studio.new_member("blocked-words")
    assert "Added `drag(on|ons)`" in await mod(studio, "blocklist add", {"pattern": "drag(on|ons)"})
    assert "already on the list" in await mod(studio, "blocklist add", {"pattern": "drag(on|ons)"})
    assert "drag(on|ons)" in await services.moderation.list_patterns(guild)
    listed = await mod(studio, "blocklist list")
    assert "`drag(on|ons)`" in listed and f"`{OPERATOR_PATTERN}` (operator)" in listed

    before = await account(studio, member)
    assert_refused(await generate(studio, member, "A red DRAGON over hills"), "blocked term", "DRAGON", "remove it")
    assert_refused(await generate(studio, member, "hills", negative="no Dragons please"), "blocked term")
    assert_refused(await generate(studio, member, "the ForbiddenCity at dawn"), "blocked term", "ForbiddenCity")
    await assert_nothing_charged(studio, member, before)

    assert "Removed" in await mod(studio, "blocklist remove", {"pattern": "drag(on|ons)"})
    assert "is not on the list" in await mod(studio, "blocklist remove", {"pattern": "drag(on|ons)"})
    assert "drag(on|ons)" not in await services.moderation.list_patterns(guild)
    assert_queued(await generate(studio, member, "A red DRAGON over hills"))
    # The operator's list stays whatever the moderators do.
    assert_refused(await generate(studio, member, "FORBIDDEN fruit"), "blocked term")


async def test_blocklist_rejects_a_broken_pattern(studio: Studio) -> None:
    text = await mod(studio, "blocklist add", {"pattern": "(unclosed"})
    assert "cannot be used" in text
    assert "(unclosed" not in await studio.bot.wiring.moderation.list_patterns(studio.guild.id)


# ---------------------------------------------------------------------------------------- models


async def test_model_default_changes_members_without_their_own_default(studio: Studio) -> None:
    services, guild = studio.bot.wiring, studio.guild.id
    plain = studio.new_member("server-default")
    picky = studio.new_member("own-default")
    assert_fast(await studio.command(picky, "model use", {"name": "tiny"}))
    text = await mod(studio, "model default", {"name": "tiny-base"})
    try:
        assert "`tiny-base`" in text
        assert (await services.moderation.get_settings(guild)).default_model == "tiny-base"
        plain_job = job_id_of(await generate(studio, plain))
        picky_job = job_id_of(await generate(studio, picky))
        plain_record = await services.jobs.get(plain_job)
        picky_record = await services.jobs.get(picky_job)
        assert plain_record is not None and plain_record.params["model"] == "tiny-base"
        assert picky_record is not None and picky_record.params["model"] == "tiny"
        fields = {f["name"]: f["value"] for f in (await studio.result_of(plain_job)).embeds[0]["fields"]}
        assert fields["Model"] == "tiny-base"
        unknown = await mod(studio, "model default", {"name": "sdxl-nope"})
        assert "There is no model `sdxl-nope`" in unknown and "`tiny`" in unknown
        assert (await services.moderation.get_settings(guild)).default_model == "tiny-base"
    finally:
        await mod(studio, "model default", {"name": "tiny"})


# -------------------------------------------------------------------------- who is a moderator


async def test_a_configured_moderator_role_is_a_moderator(studio: Studio) -> None:
    services, guild = studio.bot.wiring, studio.guild
    helpers = studio.sb.add_role(guild, "Helpers")  # no Discord permissions at all
    helper = studio.new_member("helper", roles=[helpers])
    target = studio.new_member("helped")
    refused = await studio.sb.raw_slash(helper, studio.channel, "mod quota set", {"user": target, "limit": 7})
    await refused.wait_response()
    assert_refused(refused, NOT_A_MODERATOR)
    assert await services.quotas.user_limit(guild.id, target.id) is None

    studio.bot.settings.discord.moderator_roles.append(helpers.id)  # as `discord.moderator_roles`
    try:
        # The command is hidden from the role in the client until an admin allows it; the bot
        # itself goes by its own configuration.
        inter = await studio.sb.raw_slash(helper, studio.channel, "mod quota set", {"user": target, "limit": 7})
        await inter.wait_response()
        assert_fast(inter)
        assert inter.response is not None and "7.00 units" in (inter.response.content or "")
        assert await services.quotas.user_limit(guild.id, target.id) == 7
    finally:
        studio.bot.settings.discord.moderator_roles.remove(helpers.id)


async def test_administrator_is_a_moderator(studio: Studio) -> None:
    admins = studio.sb.add_role(studio.guild, "Admins", perms.ADMINISTRATOR)
    admin = studio.new_member("admin", roles=[admins])
    member = studio.new_member("admin-target")
    text = await mod(studio, "quota set", {"user": member, "limit": 3}, user=admin)
    assert "3.00 units" in text
    assert await studio.bot.wiring.quotas.user_limit(studio.guild.id, member.id) == 3


def _mod_commands(member: User, role: Any) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("quota set", {"user": member, "limit": 99}),
        ("quota grant", {"user": member, "units": 5}),
        ("quota reset", {"user": member}),
        ("quota default", {"limit": 0}),
        ("quota role", {"role": role, "limit": 0}),
        ("ban", {"user": member, "reason": "nope"}),
        ("unban", {"user": member}),
        ("queue", {}),
        ("cancel", {"job": "PLACEHOLDER"}),
        ("pause", {}),
        ("resume", {}),
        ("blocklist add", {"pattern": "kittens"}),
        ("blocklist remove", {"pattern": "drag(on|ons)"}),
        ("blocklist list", {}),
        ("model default", {"name": "tiny-base"}),
    ]


async def _state(studio: Studio, member: User, victim: User, role_id: int) -> tuple[Any, ...]:
    services, guild = studio.bot.wiring, studio.guild.id
    return (
        await services.quotas.user_limit(guild, member.id),
        await services.quotas.user_limit(guild, victim.id),
        (await services.quotas.role_limits(guild)).get(role_id),
        await services.moderation.get_settings(guild),
        await services.moderation.get_settings(EVERYWHERE),
        await services.moderation.get_ban(guild, victim.id),
        await services.moderation.get_ban(guild, member.id),
        tuple(await services.moderation.list_patterns(guild)),
        services.scheduler.paused,
        services.scheduler.server_paused(guild),
        await account(studio, victim),
    )


async def test_the_discord_client_hides_mod_commands_from_members(studio: Studio) -> None:
    member = studio.new_member("curious")
    with pytest.raises(InvocationError, match="default_member_permissions"):
        await studio.sb.slash(member, studio.channel, "mod queue", {})


async def test_every_mod_command_is_refused_for_a_member_who_sends_it_anyway(studio: Studio) -> None:
    """A member (even one with other permissions, e.g. Manage Messages) whose client sends /mod
    anyway gets the bot's own refusal, and nothing changes."""
    sb, services = studio.sb, studio.bot.wiring
    helpful = sb.add_role(studio.guild, "Message helpers", perms.MANAGE_MESSAGES)
    member = studio.new_member("not-a-mod", roles=[helpful])
    victim = studio.new_member("victim")
    # The victim has a queued job the member will try to cancel.
    await mod(studio, "pause")
    try:
        job_id = job_id_of(await generate(studio, victim, "keep me"))
        await mod(studio, "blocklist add", {"pattern": "drag(on|ons)"})
        for _ in range(100):  # the queue card's id is stored just after the card is sent
            if (record := await services.jobs.get(job_id)) is not None and record.status_message_id:
                break
            await asyncio.sleep(0.02)
        before = await _state(studio, member, victim, helpful.id)
        for command, options in _mod_commands(victim, helpful):
            if command == "cancel":
                options = {"job": job_id}
            inter = await sb.raw_slash(member, studio.channel, f"mod {command}", options)
            await inter.wait_response()
            assert_refused(inter, NOT_A_MODERATOR)
        assert await _state(studio, member, victim, helpful.id) == before
        record = await services.jobs.get(job_id)
        assert record is not None and record.status == "queued"
    finally:
        await mod(studio, "blocklist remove", {"pattern": "drag(on|ons)"})
        await mod(studio, "resume")
    await studio.result_of(job_id)


async def test_mod_commands_in_dms_are_refused(studio: Studio) -> None:
    dm = studio.sb.dm_channel(studio.mod)
    inter = await studio.sb.raw_slash(studio.mod, dm, "mod pause", {})
    await inter.wait_response()
    assert_refused(inter, "server")
    assert not studio.bot.wiring.scheduler.paused
