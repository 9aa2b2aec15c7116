"""/mod: quotas, bans, the queue, the blocklist and the day's figures, for moderators only.

`default_permissions` is only a hint server admins can change, so every command here is also
checked by the bot itself (Manage Server or a configured moderator role), see bot.permissions.
Everything here acts on and shows the moderator's own server only (bot.commands.scoped).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.commands import scoped
from bot.commands.common import any_jobs_autocomplete, model_autocomplete
from bot.errors import Refused
from bot.permissions import moderator_only
from bot.render import units

if TYPE_CHECKING:
    from bot.app import AtelierBot

MAX_UNITS = 1e6


def _amount(value: float, name: str, *, minimum: float) -> float:
    """Discord's client enforces the option's range, but a modified client need not: check again
    (the tree's error handler shows the Refused text ephemerally)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not minimum <= value <= MAX_UNITS:
        raise Refused(f"`{name}` must be a number from {minimum:g} to {MAX_UNITS:.0f} (you gave {value}).")
    return float(value)


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

    @staticmethod
    def _scope(interaction: discord.Interaction) -> int:
        assert interaction.guild_id is not None  # moderator_only refuses DMs
        return interaction.guild_id

    # -- quotas ---------------------------------------------------------------------------------

    @quota.command(name="set", description="Set one member's allowance per window (0 blocks)")
    @app_commands.describe(user="The member", limit="Units per window; 0 blocks")
    @moderator_only()
    async def quota_set(
        self, interaction: discord.Interaction, user: discord.User, limit: app_commands.Range[float, 0.0, 1e6]
    ) -> None:
        limit = _amount(limit, "limit", minimum=0.0)
        await self.bot.wiring.quotas.set_user_limit(self._scope(interaction), user.id, limit)
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
        await self.bot.wiring.quotas.grant(self._scope(interaction), user.id, units_, interaction.user.id)
        await self._reply(interaction, f"Granted {units(units_)} extra units to {user.mention}.")

    @quota.command(name="reset", description="Clear a member's usage in the current window")
    @app_commands.describe(user="The member")
    @moderator_only()
    async def quota_reset(self, interaction: discord.Interaction, user: discord.User) -> None:
        cleared = await self.bot.wiring.quotas.reset(self._scope(interaction), user.id, interaction.user.id)
        await self._reply(interaction, f"Reset {user.mention}'s usage ({units(cleared)} units cleared).")

    @quota.command(name="default", description="Set the server's default allowance per window (0 blocks)")
    @app_commands.describe(limit="Units per window; 0 blocks")
    @moderator_only()
    async def quota_default(self, interaction: discord.Interaction, limit: app_commands.Range[float, 0.0, 1e6]) -> None:
        limit = _amount(limit, "limit", minimum=0.0)
        await self.bot.wiring.quotas.set_default_limit(self._scope(interaction), limit)
        await self._reply(interaction, f"The server's default allowance is now {units(limit)} units per window.")

    @quota.command(name="role", description="Set the allowance of a role (the highest of a member's roles applies)")
    @app_commands.describe(role="The role", limit="Units per window; 0 blocks")
    @moderator_only()
    async def quota_role(
        self, interaction: discord.Interaction, role: discord.Role, limit: app_commands.Range[float, 0.0, 1e6]
    ) -> None:
        limit = _amount(limit, "limit", minimum=0.0)
        await self.bot.wiring.quotas.set_role_limit(self._scope(interaction), role.id, limit)
        await self._reply(interaction, f"Members with {role.mention} may use {units(limit)} units per window.")

    # -- members ----------------------------------------------------------------------------------

    @app_commands.command(name="ban", description="Stop a member from using the bot")
    @app_commands.describe(user="The member", reason="Why (shown to them)")
    @moderator_only()
    async def ban(self, interaction: discord.Interaction, user: discord.User, reason: str | None = None) -> None:
        await scoped.ban(self.bot, interaction, self._scope(interaction), user, reason)

    @app_commands.command(name="unban", description="Let a banned member use the bot again")
    @app_commands.describe(user="The member")
    @moderator_only()
    async def unban(self, interaction: discord.Interaction, user: discord.User) -> None:
        await scoped.unban(self.bot, interaction, self._scope(interaction), user)

    # -- queue ------------------------------------------------------------------------------------

    @app_commands.command(name="queue", description="This server's queue")
    @moderator_only()
    async def queue(self, interaction: discord.Interaction) -> None:
        await self.bot.wiring.actions.show_whole_queue(interaction)

    @app_commands.command(name="cancel", description="Cancel any job of this server (refunded)")
    @app_commands.describe(job="The job id")
    @app_commands.autocomplete(job=any_jobs_autocomplete)
    @moderator_only()
    async def cancel(self, interaction: discord.Interaction, job: str) -> None:
        await self.bot.wiring.actions.cancel(interaction, job, as_moderator=True)

    @app_commands.command(name="pause", description="Pause this server's queue: its jobs wait until resumed")
    @moderator_only()
    async def pause(self, interaction: discord.Interaction) -> None:
        await scoped.pause(self.bot, interaction, self._scope(interaction), True, "mod")

    @app_commands.command(name="resume", description="Resume this server's paused queue")
    @moderator_only()
    async def resume(self, interaction: discord.Interaction) -> None:
        await scoped.pause(self.bot, interaction, self._scope(interaction), False, "mod")

    @app_commands.command(name="stats", description="The last 24 hours at a glance: jobs, waits, engine, queue")
    @moderator_only()
    async def stats(self, interaction: discord.Interaction) -> None:
        await scoped.stats(self.bot, interaction, self._scope(interaction))

    # -- blocklist --------------------------------------------------------------------------------

    @blocklist.command(name="add", description="Refuse prompts matching a pattern (regex, case-insensitive)")
    @app_commands.describe(pattern="A word or regular expression")
    @moderator_only()
    async def blocklist_add(self, interaction: discord.Interaction, pattern: str) -> None:
        await scoped.add_pattern(self.bot, interaction, self._scope(interaction), pattern)

    @blocklist.command(name="remove", description="Remove a pattern")
    @app_commands.describe(pattern="The pattern exactly as listed")
    @moderator_only()
    async def blocklist_remove(self, interaction: discord.Interaction, pattern: str) -> None:
        await scoped.remove_pattern(self.bot, interaction, self._scope(interaction), pattern)

    @blocklist.command(name="list", description="The server's patterns (and the operator's)")
    @moderator_only()
    async def blocklist_list(self, interaction: discord.Interaction) -> None:
        await scoped.list_patterns(self.bot, interaction, self._scope(interaction))

    # -- models -----------------------------------------------------------------------------------

    @model.command(name="default", description="Set the server's default model")
    @app_commands.describe(name="Model name")
    @app_commands.autocomplete(name=model_autocomplete)
    @moderator_only()
    async def model_default(self, interaction: discord.Interaction, name: str) -> None:
        if name not in self.bot.settings.models:
            await self._reply(interaction, self.bot.wiring.intake.unknown_model_text(name))
            return
        await self.bot.wiring.moderation.set_default_model(self._scope(interaction), name)
        await self._reply(interaction, f"The server's default model is now `{name}`.")


async def setup(bot: AtelierBot) -> None:
    await bot.add_cog(Mod(bot))
