"""/mod: quotas, bans, the queue, the blocklist and the day's figures, for moderators only.

`default_permissions` is only a hint server admins can change, so every command here is also
checked by the bot itself (Manage Server or a configured moderator role), see bot.permissions.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.commands.common import any_jobs_autocomplete, model_autocomplete
from bot.permissions import moderator_only
from bot.render import duration, units
from bot.requests import Refused
from db.stats import ActivityStats, activity_since
from engine.spec import EngineHealth

if TYPE_CHECKING:
    from bot.app import AtelierBot

MANAGE_GUILD = discord.Permissions(manage_guild=True)
MAX_UNITS = 1e6
STATS_WINDOW = timedelta(hours=24)
BAND_NAMES = {0: "priority", 1: "normal"}


def _amount(value: float, name: str, *, minimum: float) -> float:
    """Discord's client enforces the option's range, but a modified client need not: check again
    (the tree's error handler shows the Refused text ephemerally)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not minimum <= value <= MAX_UNITS:
        raise Refused(f"`{name}` must be a number from {minimum:g} to {MAX_UNITS:.0f} (you gave {value}).")
    return float(value)


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


@app_commands.guild_only()
@app_commands.default_permissions(manage_guild=True)
class Mod(commands.GroupCog, group_name="mod", group_description="Moderator tools"):
    quota = app_commands.Group(name="quota", description="Members' allowances")
    blocklist = app_commands.Group(name="blocklist", description="Words and patterns refused in prompts")
    model = app_commands.Group(name="model", description="The server's models")

    def __init__(self, bot: AtelierBot) -> None:
        self.bot = bot
        super().__init__()

    async def _reply(self, interaction: discord.Interaction, text: str) -> None:
        await interaction.response.send_message(text, ephemeral=True)

    # -- quotas ---------------------------------------------------------------------------------

    @quota.command(name="set", description="Set one member's allowance per window (0 blocks)")
    @app_commands.describe(user="The member", limit="Units per window; 0 blocks")
    @moderator_only()
    async def quota_set(
        self, interaction: discord.Interaction, user: discord.User, limit: app_commands.Range[float, 0.0, 1e6]
    ) -> None:
        limit = _amount(limit, "limit", minimum=0.0)
        await self.bot.services.quotas.set_user_limit(interaction.guild_id, user.id, limit)
        await self._reply(interaction, f"{user.mention} may now use {units(limit)} units per window.")

    @quota.command(name="grant", description="Give a member extra units in the current window")
    @app_commands.describe(user="The member", units_="Extra units")
    @app_commands.rename(units_="units")
    @moderator_only()
    async def quota_grant(
        self,
        interaction: discord.Interaction,
        user: discord.User,
        units_: app_commands.Range[float, 0.01, 1e6],
    ) -> None:
        units_ = _amount(units_, "units", minimum=0.01)
        await self.bot.services.quotas.grant(interaction.guild_id, user.id, units_, interaction.user.id)
        await self._reply(interaction, f"Granted {units(units_)} extra units to {user.mention}.")

    @quota.command(name="reset", description="Clear a member's usage in the current window")
    @app_commands.describe(user="The member")
    @moderator_only()
    async def quota_reset(self, interaction: discord.Interaction, user: discord.User) -> None:
        cleared = await self.bot.services.quotas.reset(interaction.guild_id, user.id, interaction.user.id)
        await self._reply(interaction, f"Reset {user.mention}'s usage ({units(cleared)} units cleared).")

    @quota.command(name="default", description="Set the server's default allowance per window (0 blocks)")
    @app_commands.describe(limit="Units per window; 0 blocks")
    @moderator_only()
    async def quota_default(self, interaction: discord.Interaction, limit: app_commands.Range[float, 0.0, 1e6]) -> None:
        limit = _amount(limit, "limit", minimum=0.0)
        await self.bot.services.quotas.set_default_limit(interaction.guild_id, limit)
        await self._reply(interaction, f"The server's default allowance is now {units(limit)} units per window.")

    @quota.command(name="role", description="Set the allowance of a role (the highest of a member's roles applies)")
    @app_commands.describe(role="The role", limit="Units per window; 0 blocks")
    @moderator_only()
    async def quota_role(
        self, interaction: discord.Interaction, role: discord.Role, limit: app_commands.Range[float, 0.0, 1e6]
    ) -> None:
        limit = _amount(limit, "limit", minimum=0.0)
        await self.bot.services.quotas.set_role_limit(interaction.guild_id, role.id, limit)
        await self._reply(interaction, f"Members with {role.mention} may use {units(limit)} units per window.")

    # -- members ----------------------------------------------------------------------------------

    @app_commands.command(name="ban", description="Stop a member from using the bot")
    @app_commands.describe(user="The member", reason="Why (shown to them)")
    @moderator_only()
    async def ban(self, interaction: discord.Interaction, user: discord.User, reason: str | None = None) -> None:
        await self.bot.services.moderation.ban(
            interaction.guild_id, user.id, reason=reason, moderator_id=interaction.user.id
        )
        cancelled = await self.bot.requests.cancel_all_for(interaction.guild_id, user.id)
        extra = f" {cancelled} queued job(s) cancelled and refunded." if cancelled else ""
        await self._reply(interaction, f"{user.mention} can no longer use the bot here.{extra}")

    @app_commands.command(name="unban", description="Let a banned member use the bot again")
    @app_commands.describe(user="The member")
    @moderator_only()
    async def unban(self, interaction: discord.Interaction, user: discord.User) -> None:
        removed = await self.bot.services.moderation.unban(interaction.guild_id, user.id)
        text = f"{user.mention} may use the bot again." if removed else f"{user.mention} was not banned."
        await self._reply(interaction, text)

    # -- queue ------------------------------------------------------------------------------------

    @app_commands.command(name="queue", description="The whole queue")
    @moderator_only()
    async def queue(self, interaction: discord.Interaction) -> None:
        await self.bot.requests.show_whole_queue(interaction)

    @app_commands.command(name="cancel", description="Cancel anyone's job (refunded)")
    @app_commands.describe(job="The job id")
    @app_commands.autocomplete(job=any_jobs_autocomplete)
    @moderator_only()
    async def cancel(self, interaction: discord.Interaction, job: str) -> None:
        await self.bot.requests.cancel_command(interaction, job, as_moderator=True)

    @app_commands.command(name="pause", description="Pause the queue: jobs wait until resumed")
    @moderator_only()
    async def pause(self, interaction: discord.Interaction) -> None:
        await self.bot.services.set_paused(True)
        await self._reply(
            interaction, "The queue is paused. Running jobs finish; new jobs wait. `/mod resume` to go on."
        )

    @app_commands.command(name="resume", description="Resume a paused queue")
    @moderator_only()
    async def resume(self, interaction: discord.Interaction) -> None:
        await self.bot.services.set_paused(False)
        await self._reply(interaction, "The queue is running again.")

    @app_commands.command(name="stats", description="The last 24 hours at a glance: jobs, waits, engine, queue")
    @moderator_only()
    async def stats(self, interaction: discord.Interaction) -> None:
        services = self.bot.services
        now = datetime.now(UTC)
        since = now - STATS_WINDOW
        started = datetime.fromtimestamp(services.metrics.started_at, UTC)
        busy_since = max(since, started)
        activity = await activity_since(services.db, since, busy_since=busy_since)
        text = stats_text(
            activity,
            busy_span_seconds=(now - busy_since).total_seconds(),
            since_start=started > since,
            health=services.engine.health(),
            depths=services.scheduler.depth_by_band(),
            paused=services.scheduler.paused,
            refusals=services.metrics.quota_refusals_total(),
        )
        await self._reply(interaction, text)

    # -- blocklist --------------------------------------------------------------------------------

    @blocklist.command(name="add", description="Refuse prompts matching a pattern (regex, case-insensitive)")
    @app_commands.describe(pattern="A word or regular expression")
    @moderator_only()
    async def blocklist_add(self, interaction: discord.Interaction, pattern: str) -> None:
        from db.moderation import InvalidPattern

        try:
            added = await self.bot.services.moderation.add_pattern(
                interaction.guild_id, pattern, added_by=interaction.user.id
            )
        except InvalidPattern as exc:
            await self._reply(interaction, f"That pattern cannot be used: {exc}")
            return
        await self._reply(interaction, f"Added `{pattern}`." if added else f"`{pattern}` is already on the list.")

    @blocklist.command(name="remove", description="Remove a pattern")
    @app_commands.describe(pattern="The pattern exactly as listed")
    @moderator_only()
    async def blocklist_remove(self, interaction: discord.Interaction, pattern: str) -> None:
        removed = await self.bot.services.moderation.remove_pattern(interaction.guild_id, pattern)
        await self._reply(interaction, f"Removed `{pattern}`." if removed else f"`{pattern}` is not on the list.")

    @blocklist.command(name="list", description="The server's patterns (and the operator's)")
    @moderator_only()
    async def blocklist_list(self, interaction: discord.Interaction) -> None:
        patterns = await self.bot.services.moderation.list_patterns(interaction.guild_id)
        operator = self.bot.services.config_blocklist
        lines = [f"• `{p}`" for p in patterns] + [f"• `{p}` (operator)" for p in operator]
        await self._reply(interaction, "\n".join(lines)[:1900] if lines else "The blocklist is empty.")

    # -- models -----------------------------------------------------------------------------------

    @model.command(name="default", description="Set the server's default model")
    @app_commands.describe(name="Model name")
    @app_commands.autocomplete(name=model_autocomplete)
    @moderator_only()
    async def model_default(self, interaction: discord.Interaction, name: str) -> None:
        if name not in self.bot.settings.models:
            await self._reply(interaction, self.bot.services.unknown_model_text(name))
            return
        await self.bot.services.moderation.set_default_model(interaction.guild_id, name)
        await self._reply(interaction, f"The server's default model is now `{name}`.")


async def setup(bot: AtelierBot) -> None:
    await bot.add_cog(Mod(bot))
