"""Moderation actions with a scope: one server (`/mod`, that server's moderators) or every server
and DM (`/operator`, the application's owner). The scope is decided by the command a member used,
never by what they typed, so a moderator can reach nothing outside their own server."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import discord

from bot.render import duration
from db.moderation import EVERYWHERE
from db.stats import ActivityStats, activity_since
from engine.api import EngineHealth
from engine.blocklist import InvalidPattern

if TYPE_CHECKING:
    from bot.app import AtelierBot

STATS_WINDOW = timedelta(hours=24)
BAND_NAMES = {0: "priority", 1: "normal"}


async def reply(interaction: discord.Interaction, text: str) -> None:
    await interaction.response.send_message(text, ephemeral=True, allowed_mentions=discord.AllowedMentions.none())


def _where(scope: int) -> str:
    return "everywhere" if scope == EVERYWHERE else "here"


async def ban(
    bot: AtelierBot, interaction: discord.Interaction, scope: int, user: discord.User, reason: str | None
) -> None:
    await bot.wiring.moderation.ban(scope, user.id, reason=reason, moderator_id=interaction.user.id)
    cancelled = await bot.wiring.actions.cancel_all_for(scope, user.id, every_server=scope == EVERYWHERE)
    extra = f" {cancelled} queued job(s) cancelled and refunded." if cancelled else ""
    await reply(interaction, f"{user.mention} can no longer use the bot {_where(scope)}.{extra}")


async def unban(bot: AtelierBot, interaction: discord.Interaction, scope: int, user: discord.User) -> None:
    removed = await bot.wiring.moderation.unban(scope, user.id)
    text = f"{user.mention} may use the bot again." if removed else f"{user.mention} was not banned."
    await reply(interaction, text)


async def pause(bot: AtelierBot, interaction: discord.Interaction, scope: int, paused: bool, command: str) -> None:
    await bot.wiring.set_paused(scope, paused)
    queue = "Every server's queue" if scope == EVERYWHERE else "The queue"
    if paused:
        text = f"{queue} is paused. Running jobs finish; new jobs wait. `/{command} resume` to go on."
    else:
        text = f"{queue} is running again."
    await reply(interaction, text)


async def add_pattern(bot: AtelierBot, interaction: discord.Interaction, scope: int, pattern: str) -> None:
    try:
        added = await bot.wiring.blocklists.add(scope, pattern, added_by=interaction.user.id)
    except InvalidPattern as exc:
        await reply(interaction, f"That pattern cannot be used: {exc}")
        return
    await reply(interaction, f"Added `{pattern}`." if added else f"`{pattern}` is already on the list.")


async def remove_pattern(bot: AtelierBot, interaction: discord.Interaction, scope: int, pattern: str) -> None:
    removed = await bot.wiring.moderation.remove_pattern(scope, pattern)
    await reply(interaction, f"Removed `{pattern}`." if removed else f"`{pattern}` is not on the list.")


async def list_patterns(bot: AtelierBot, interaction: discord.Interaction, scope: int) -> None:
    """A server's list shows the operator's patterns too (they apply there), marked as such."""
    blocklists = bot.wiring.blocklists
    operator = await blocklists.patterns(EVERYWHERE)
    own = [] if scope == EVERYWHERE else await blocklists.patterns(scope)
    mark = "" if scope == EVERYWHERE else " (operator)"
    lines = [f"• `{p}`" for p in own] + [f"• `{p}`{mark}" for p in operator]
    await reply(interaction, "\n".join(lines)[:1900] if lines else "The blocklist is empty.")


async def stats(bot: AtelierBot, interaction: discord.Interaction, scope: int) -> None:
    wiring = bot.wiring
    everywhere = scope == EVERYWHERE
    guild_id = None if everywhere else interaction.guild_id
    now = datetime.now(UTC)
    since = now - STATS_WINDOW
    started = datetime.fromtimestamp(wiring.metrics.started_at, UTC)
    busy_since = max(since, started)
    activity = await activity_since(wiring.db, since, busy_since=busy_since, every_server=everywhere, guild_id=guild_id)
    scheduler, metrics, health = wiring.scheduler, wiring.metrics, wiring.engine.health()
    text = stats_text(
        activity,
        busy_span_seconds=(now - busy_since).total_seconds(),
        since_start=started > since,
        # The engine's failure detail names the operator's paths: for the operator's eyes only.
        health=health if everywhere else replace(health, detail=""),
        depths=scheduler.depth_by_band(guild_id, every_server=everywhere),
        paused=scheduler.paused if everywhere else scheduler.server_paused(guild_id),
        refusals=metrics.quota_refusals_total() if everywhere else metrics.quota_refusals_in(guild_id),
    )
    await reply(interaction, text)


def stats_text(
    activity: ActivityStats,
    *,
    busy_span_seconds: float,
    since_start: bool,
    health: EngineHealth,
    depths: Mapping[int, int],
    paused: bool,
    refusals: int,
) -> str:
    """`/mod stats`: the last 24 h of jobs from the database, the queue and engine as they are now.

    The engine's busy share is its run time over the capacity of the span it covers (24 h, or
    the time since the bot started when that is shorter), all slots together."""
    by = activity.by_status
    members = "member" if activity.users == 1 else "members"
    lines = [f"**Last 24 h** {activity.total} job{'' if activity.total == 1 else 's'} from {activity.users} {members}"]
    lines.append(
        f"**Jobs** {by.get('done', 0)} done · {by.get('failed', 0)} failed · {by.get('cancelled', 0)} cancelled"
        f" · {by.get('queued', 0)} queued · {by.get('running', 0)} running"
    )
    if activity.mean_wait_seconds is None:
        lines.append("**Wait** no job has started yet")
    else:
        p90 = activity.p90_wait_seconds or 0.0
        lines.append(f"**Wait** mean {duration(activity.mean_wait_seconds)} · p90 {duration(p90)}")
    if activity.mean_run_seconds is None:
        lines.append("**Run time** no job has finished yet")
    else:
        lines.append(f"**Run time** mean {duration(activity.mean_run_seconds)} per done job")
    capacity = max(1.0, busy_span_seconds) * max(1, health.slots)
    share = min(100.0, 100.0 * activity.engine_seconds / capacity)
    span = f"since the bot started {duration(busy_span_seconds)} ago" if since_start else "of the last 24 h"
    lines.append(f"**Engine busy** {share:.0f}% {span}" if share >= 10 else f"**Engine busy** {share:.1f}% {span}")
    waiting = sum(depths.values())
    bands = ", ".join(f"{n} {BAND_NAMES.get(band, f'band {band}')}" for band, n in sorted(depths.items()) if n)
    queue = f"{waiting} waiting" + (f" ({bands})" if bands else "")
    lines.append(f"**Queue now** {queue}" + (" · paused by the moderators" if paused else ""))
    state = "up" if health.alive else "down" + (f" ({health.detail})" if health.detail else "")
    restarts = "1 restart" if health.restarts == 1 else f"{health.restarts} restarts"
    lines.append(f"**Engine** {state} · {health.busy} of {health.slots} slots busy · {restarts} since the bot started")
    lines.append(f"**Quota refusals** {refusals} since the bot started")
    return "\n".join(lines)


__all__ = ["add_pattern", "ban", "list_patterns", "pause", "remove_pattern", "reply", "stats", "stats_text", "unban"]
