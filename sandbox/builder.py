"""Building the sandbox world: users, servers, roles, members, channels and DMs.

Adding things after the bot connected dispatches the gateway events Discord would send
(GUILD_CREATE, CHANNEL_CREATE, GUILD_ROLE_CREATE, GUILD_MEMBER_ADD ...), so tests may grow the
world while the bot runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import permission_bits as perms
from .payloads import channel_payload, guild_payload, member_payload
from .records import CHANNEL_TEXT, Channel, Guild, Member, Ref, Role, User, ref_id

if TYPE_CHECKING:
    from .server import Sandbox


class WorldBuilder:
    """Mixed into :class:`~sandbox.server.Sandbox`."""

    def add_user(
        self: Sandbox, username: str, *, global_name: str | None = None, bot: bool = False, locale: str = "en-US"
    ) -> User:
        user = User(
            id=self.world.snowflakes.next(),
            username=username,
            global_name=global_name,
            bot=bot,
            locale=locale,
        )
        self.world.users[user.id] = user
        self.world.changed()
        return user

    def add_guild(
        self: Sandbox,
        name: str = "Sandbox",
        *,
        owner: Ref | None = None,
        bot_permissions: int = perms.DEFAULT_BOT,
        everyone_permissions: int = perms.DEFAULT_EVERYONE,
        locale: str = "en-US",
    ) -> Guild:
        """A server with @everyone, the bot (with a managed role) and the owner as members."""
        owner_user = self.world.users[ref_id(owner)] if owner is not None else self.owner
        guild = Guild(id=self.world.snowflakes.next(), name=name, owner_id=owner_user.id, locale=locale)
        guild.roles[guild.id] = Role(id=guild.id, guild_id=guild.id, name="@everyone", permissions=everyone_permissions)
        bot_role = Role(
            id=self.world.snowflakes.next(),
            guild_id=guild.id,
            name=self.bot_user.username,
            permissions=bot_permissions,
            position=1,
            managed=True,
            bot_id=self.bot_user.id,
        )
        guild.roles[bot_role.id] = bot_role
        guild.members[self.bot_user.id] = Member(user=self.bot_user, guild_id=guild.id, role_ids=[bot_role.id])
        guild.members[owner_user.id] = Member(user=owner_user, guild_id=guild.id)
        self.world.guilds[guild.id] = guild
        self.world.changed()
        # A server joined after READY: Discord sends it without `unavailable` (that field, false,
        # marks a server of READY arriving, or one back from an outage).
        payload = guild_payload(guild)
        payload.pop("unavailable", None)
        self.gateway.dispatch("GUILD_CREATE", payload, guild_id=guild.id)
        return guild

    def add_role(self: Sandbox, guild: Ref, name: str, permissions: int = 0, *, color: int = 0) -> Role:
        g = self.world.guilds[ref_id(guild)]
        role = Role(
            id=self.world.snowflakes.next(),
            guild_id=g.id,
            name=name,
            permissions=permissions,
            color=color,
            position=len(g.roles),
        )
        g.roles[role.id] = role
        self.world.changed()
        self.gateway.dispatch("GUILD_ROLE_CREATE", {"guild_id": str(g.id), "role": role.to_payload()}, guild_id=g.id)
        return role

    def add_member(
        self: Sandbox, guild: Ref, user: Ref, *, roles: Sequence[Ref] = (), nick: str | None = None
    ) -> Member:
        g = self.world.guilds[ref_id(guild)]
        u = self.world.users[ref_id(user)]
        member = Member(user=u, guild_id=g.id, role_ids=[ref_id(r) for r in roles], nick=nick)
        g.members[u.id] = member
        self.world.changed()
        self.gateway.dispatch("GUILD_MEMBER_ADD", {**member_payload(g, member), "guild_id": str(g.id)}, guild_id=g.id)
        return member

    def set_member_roles(self: Sandbox, guild: Ref, user: Ref, roles: Sequence[Ref]) -> Member:
        """Replace a member's roles (takes effect on the next interaction they make)."""
        g = self.world.guilds[ref_id(guild)]
        member = g.members[ref_id(user)]
        member.role_ids = [ref_id(r) for r in roles]
        self.world.changed()
        self.gateway.dispatch(
            "GUILD_MEMBER_UPDATE", {**member_payload(g, member), "guild_id": str(g.id)}, guild_id=g.id
        )
        return member

    def add_channel(
        self: Sandbox,
        guild: Ref,
        name: str,
        *,
        nsfw: bool = False,
        type: int = CHANNEL_TEXT,
        topic: str | None = None,
        bot_can_send: bool = True,
        bot_deny: int = 0,
        parent: Ref | None = None,
    ) -> Channel:
        """A guild channel; ``nsfw=True`` is an age-restricted channel. ``bot_can_send=False``
        denies the bot Send Messages there (bot-token posts get 403 / 50013)."""
        g = self.world.guilds[ref_id(guild)]
        deny = bot_deny | (0 if bot_can_send else perms.SEND_MESSAGES)
        chan = Channel(
            id=self.world.snowflakes.next(),
            type=type,
            name=name,
            guild_id=g.id,
            nsfw=nsfw,
            position=len(g.channels),
            topic=topic,
            bot_deny=deny,
            parent_id=ref_id(parent) if parent is not None else None,
        )
        g.channels[chan.id] = chan
        self.world.channels[chan.id] = chan
        self.world.changed()
        self.gateway.dispatch("CHANNEL_CREATE", channel_payload(chan), guild_id=g.id)
        return chan

    def dm_channel(self: Sandbox, user: Ref) -> Channel:
        """The DM channel between ``user`` and the bot (what a user opens to DM the bot)."""
        return self.world.dm_channel_for(self.world.users[ref_id(user)])

    def bot_channel_permissions(self: Sandbox, channel: Channel) -> int:
        if channel.is_dm:
            return (
                perms.VIEW_CHANNEL
                | perms.SEND_MESSAGES
                | perms.EMBED_LINKS
                | perms.ATTACH_FILES
                | perms.READ_MESSAGE_HISTORY
                | perms.ADD_REACTIONS
            )
        guild = self.world.guilds[channel.guild_id or 0]
        granted = guild.member_permissions(self.bot_user.id)
        if granted & perms.ADMINISTRATOR:
            return granted
        return granted & ~channel.bot_deny
