"""Who is a moderator, decided by the bot itself (Discord's `default_permissions` is only a hint)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands

if TYPE_CHECKING:
    from bot.app import AtelierBot


class NotModerator(app_commands.CheckFailure):
    """Raised by `moderator_only`; the tree's error handler turns it into an ephemeral message."""

    message = "Only moderators can do that (Manage Server or a moderator role)."


class GuildOnly(app_commands.CheckFailure):
    message = "This works in a server, not in DMs."


async def is_moderator(interaction: discord.Interaction) -> bool:
    member = interaction.user
    if interaction.guild_id is None or not isinstance(member, discord.Member):
        return False
    if member.guild_permissions.manage_guild or member.guild_permissions.administrator:
        return True
    bot: AtelierBot = interaction.client  # type: ignore[assignment]
    roles = {role.id for role in member.roles}
    configured = set(bot.settings.discord.moderator_roles)
    stored = set((await bot.services.moderation.get_settings(interaction.guild_id)).moderator_roles)
    return bool(roles & (configured | stored))


def moderator_only() -> Any:
    async def predicate(interaction: discord.Interaction) -> bool:
        if interaction.guild_id is None:
            raise GuildOnly()
        if not await is_moderator(interaction):
            raise NotModerator()
        return True

    return app_commands.check(predicate)


def role_ids(interaction: discord.Interaction) -> list[int]:
    member = interaction.user
    return [role.id for role in member.roles] if isinstance(member, discord.Member) else []
