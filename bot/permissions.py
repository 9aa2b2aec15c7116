"""Who may do what, decided by the bot itself (Discord's `default_permissions` is only a hint).

Three circles, each scoped:
- a server's moderators (Manage Server, Administrator, or a moderator role) manage their own
  server only: anyone can add a public bot to a server they own and so become its moderator;
- the operator (the application's owner or team, `Bot.is_owner`) manages every server and DMs;
- servers the operator did not list in `[discord] guilds` (when set) get nothing at all.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import discord
from discord import app_commands

from config.settings import Settings
from db.moderation import ModerationStore


class _Bot(Protocol):
    """What these checks read of the bot (bot.app.AtelierBot)."""

    settings: Settings

    @property
    def moderation(self) -> ModerationStore: ...

    async def is_owner(self, user: discord.abc.User, /) -> bool: ...


class NotModerator(app_commands.CheckFailure):
    """Raised by `moderator_only`; the tree's error handler turns it into an ephemeral message."""

    message = "Only moderators can do that (Manage Server or a moderator role)."


class NotOperator(app_commands.CheckFailure):
    message = "Only the bot's operator (the owner of its Discord application) can do that."


class GuildOnly(app_commands.CheckFailure):
    message = "This works in a server, not in DMs."


def serves_guild(settings: Settings, guild_id: int | None) -> bool:
    """Whether the bot works in this server at all (DMs: None, always considered here)."""
    allowed = settings.discord.guilds
    return guild_id is None or not allowed or guild_id in allowed


def serves(interaction: discord.Interaction) -> bool:
    """Whether to answer this interaction: not when it comes from a server outside `guilds`."""
    return serves_guild(cast(_Bot, interaction.client).settings, interaction.guild_id)


async def is_moderator(interaction: discord.Interaction) -> bool:
    member = interaction.user
    if interaction.guild_id is None or not isinstance(member, discord.Member):
        return False
    if member.guild_permissions.manage_guild or member.guild_permissions.administrator:
        return True
    bot = cast(_Bot, interaction.client)
    roles = {role.id for role in member.roles}
    configured = set(bot.settings.discord.moderator_roles)
    stored = set((await bot.moderation.get_settings(interaction.guild_id)).moderator_roles)
    return bool(roles & (configured | stored))


async def is_operator(interaction: discord.Interaction) -> bool:
    """The application's owner (or a member of its team): not any server's owner."""
    return await cast(_Bot, interaction.client).is_owner(interaction.user)


def moderator_only() -> Any:
    async def predicate(interaction: discord.Interaction) -> bool:
        if interaction.guild_id is None:
            raise GuildOnly()
        if not await is_moderator(interaction):
            raise NotModerator()
        return True

    return app_commands.check(predicate)


def operator_only() -> Any:
    async def predicate(interaction: discord.Interaction) -> bool:
        if not await is_operator(interaction):
            raise NotOperator()
        return True

    return app_commands.check(predicate)


def role_ids(interaction: discord.Interaction) -> list[int]:
    member = interaction.user
    return [role.id for role in member.roles] if isinstance(member, discord.Member) else []
