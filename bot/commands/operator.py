"""/operator: the controls over every server and DM, for the application's owner (or team) only.

A server owner is a moderator of their own server, nothing more: anyone can add a public bot to
a server they own. What reaches every server (pause everything, see every queue, bans and blocked
patterns that apply everywhere, DMs included) belongs to whoever owns the bot: `Bot.is_owner`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.commands import scoped
from bot.permissions import operator_only
from db.moderation import EVERYWHERE

if TYPE_CHECKING:
    from bot.app import AtelierBot


@app_commands.default_permissions(administrator=True)
class Operator(commands.GroupCog, group_name="operator", group_description="The bot owner's controls"):
    blocklist = app_commands.Group(name="blocklist", description="Patterns refused in every server and DM")

    def __init__(self, bot: AtelierBot) -> None:
        self.bot = bot
        super().__init__()

    @app_commands.command(name="pause", description="Pause every server's queue")
    @operator_only()
    async def pause(self, interaction: discord.Interaction) -> None:
        await scoped.pause(self.bot, interaction, EVERYWHERE, True, "operator")

    @app_commands.command(name="resume", description="Resume every server's queue")
    @operator_only()
    async def resume(self, interaction: discord.Interaction) -> None:
        await scoped.pause(self.bot, interaction, EVERYWHERE, False, "operator")

    @app_commands.command(name="queue", description="Every server's queue")
    @operator_only()
    async def queue(self, interaction: discord.Interaction) -> None:
        await self.bot.wiring.actions.show_whole_queue(interaction, every_server=True)

    @app_commands.command(name="cancel", description="Cancel any job (refunded)")
    @app_commands.describe(job="The job id")
    @operator_only()
    async def cancel(self, interaction: discord.Interaction, job: str) -> None:
        await self.bot.wiring.actions.cancel(interaction, job, as_moderator=False, as_operator=True)

    @app_commands.command(name="stats", description="The last 24 hours of every server")
    @operator_only()
    async def stats(self, interaction: discord.Interaction) -> None:
        await scoped.stats(self.bot, interaction, EVERYWHERE)

    @app_commands.command(name="ban", description="Stop someone from using the bot anywhere, DMs included")
    @app_commands.describe(user="The user", reason="Why (shown to them)")
    @operator_only()
    async def ban(self, interaction: discord.Interaction, user: discord.User, reason: str | None = None) -> None:
        await scoped.ban(self.bot, interaction, EVERYWHERE, user, reason)

    @app_commands.command(name="unban", description="Lift a ban that applies everywhere")
    @app_commands.describe(user="The user")
    @operator_only()
    async def unban(self, interaction: discord.Interaction, user: discord.User) -> None:
        await scoped.unban(self.bot, interaction, EVERYWHERE, user)

    @blocklist.command(name="add", description="Refuse prompts matching a pattern everywhere")
    @app_commands.describe(pattern="A word or regular expression")
    @operator_only()
    async def blocklist_add(self, interaction: discord.Interaction, pattern: str) -> None:
        await scoped.add_pattern(self.bot, interaction, EVERYWHERE, pattern)

    @blocklist.command(name="remove", description="Remove a pattern that applies everywhere")
    @app_commands.describe(pattern="The pattern exactly as listed")
    @operator_only()
    async def blocklist_remove(self, interaction: discord.Interaction, pattern: str) -> None:
        await scoped.remove_pattern(self.bot, interaction, EVERYWHERE, pattern)

    @blocklist.command(name="list", description="The patterns that apply everywhere")
    @operator_only()
    async def blocklist_list(self, interaction: discord.Interaction) -> None:
        await scoped.list_patterns(self.bot, interaction, EVERYWHERE)


async def setup(bot: AtelierBot) -> None:
    await bot.add_cog(Operator(bot))
