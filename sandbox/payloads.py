"""JSON shapes of guilds, channels, members and messages, as the real API and gateway send them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .records import Channel, Guild, Member, Message, User
from .snowflakes import iso
from .world import World

if TYPE_CHECKING:
    from .gateway import GatewaySession

# GATEWAY_GUILD_MEMBERS_LIMITED | GATEWAY_MESSAGE_CONTENT_LIMITED | APPLICATION_COMMAND_BADGE
APPLICATION_FLAGS = (1 << 15) | (1 << 19) | (1 << 23)


def member_payload(guild: Guild, member: Member, *, with_user: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "roles": [str(r) for r in member.role_ids if r != guild.id],
        "nick": member.nick,
        "avatar": None,
        "banner": None,
        "joined_at": iso(member.joined_at),
        "premium_since": None,
        "deaf": False,
        "mute": False,
        "pending": False,
        "flags": 0,
        "communication_disabled_until": None,
    }
    if with_user:
        out["user"] = member.user.to_payload()
    return out


def channel_payload(channel: Channel) -> dict[str, Any]:
    if channel.is_dm:
        return {
            "id": str(channel.id),
            "type": channel.type,
            "last_message_id": str(channel.last_message_id) if channel.last_message_id else None,
            "recipients": [u.to_payload() for u in channel.recipients],
            "flags": 0,
        }
    out: dict[str, Any] = {
        "id": str(channel.id),
        "type": channel.type,
        "guild_id": str(channel.guild_id),
        "name": channel.name,
        "position": channel.position,
        "permission_overwrites": [],
        "nsfw": channel.nsfw,
        "parent_id": str(channel.parent_id) if channel.parent_id else None,
        "flags": 0,
    }
    if channel.type in (0, 5):
        out["topic"] = channel.topic
        out["last_message_id"] = str(channel.last_message_id) if channel.last_message_id else None
        out["rate_limit_per_user"] = 0
    return out


def guild_payload(guild: Guild, *, full: bool = True) -> dict[str, Any]:
    """The GUILD_CREATE shape (``full``) or the REST ``GET /guilds/{id}`` shape."""
    out: dict[str, Any] = {
        "id": str(guild.id),
        "name": guild.name,
        "icon": None,
        "splash": None,
        "discovery_splash": None,
        "banner": None,
        "description": None,
        "owner_id": str(guild.owner_id),
        "afk_channel_id": None,
        "afk_timeout": 300,
        "verification_level": 0,
        "default_message_notifications": 0,
        "explicit_content_filter": 0,
        "roles": [r.to_payload() for r in sorted(guild.roles.values(), key=lambda r: r.position)],
        "emojis": [],
        "stickers": [],
        "features": [],
        "mfa_level": 0,
        "system_channel_id": None,
        "system_channel_flags": 0,
        "rules_channel_id": None,
        "public_updates_channel_id": None,
        "safety_alerts_channel_id": None,
        "max_members": 500000,
        "vanity_url_code": None,
        "premium_tier": 0,
        "premium_subscription_count": 0,
        "preferred_locale": guild.locale,
        "nsfw_level": 0,
        "premium_progress_bar_enabled": False,
        "application_id": None,
        "incidents_data": None,
    }
    if full:
        out.update(
            {
                "joined_at": iso(guild.joined_at),
                "large": len(guild.members) >= 250,
                "unavailable": False,
                "member_count": len(guild.members),
                "voice_states": [],
                "members": [member_payload(guild, m) for m in guild.members.values()],
                "channels": [channel_payload(c) for c in guild.channels.values()],
                "threads": [],
                "presences": [],
                "stage_instances": [],
                "guild_scheduled_events": [],
                "soundboard_sounds": [],
                "lazy": True,
            }
        )
    return out


def message_payload(world: World, msg: Message, *, gateway: bool = False, depth: int = 0) -> dict[str, Any]:
    """A message object; gateway events additionally carry ``guild_id`` and a partial ``member``."""
    out: dict[str, Any] = {
        "id": str(msg.id),
        "channel_id": str(msg.channel_id),
        "type": msg.type,
        "author": msg.author.to_payload(),
        "content": msg.content,
        "timestamp": iso(msg.created_at),
        "edited_timestamp": iso(msg.edited_at),
        "tts": msg.tts,
        "mention_everyone": False,
        "mentions": [world.users[u].to_payload() for u in msg.mention_ids if u in world.users],
        "mention_roles": [str(r) for r in msg.mention_role_ids],
        "attachments": [a.to_payload() for a in msg.attachments],
        "embeds": msg.embeds,
        "pinned": False,
        "flags": msg.flags,
        "components": msg.components,
    }
    if msg.nonce is not None:
        out["nonce"] = msg.nonce
    if msg.webhook_id is not None:
        out["webhook_id"] = str(msg.webhook_id)
    if msg.application_id is not None:
        out["application_id"] = str(msg.application_id)
    if msg.interaction_meta is not None:
        out["interaction_metadata"] = msg.interaction_meta
        out["interaction"] = {
            "id": msg.interaction_meta["id"],
            "type": msg.interaction_meta["type"],
            "name": msg.interaction_meta.get("name", ""),
            "user": msg.interaction_meta["user"],
        }
    if msg.reference is not None:
        out["message_reference"] = msg.reference
        if depth == 0:
            ref = world.messages.get(int(msg.reference["message_id"]))
            out["referenced_message"] = None if ref is None or ref.deleted else message_payload(world, ref, depth=1)
    if gateway and msg.guild_id is not None:
        out["guild_id"] = str(msg.guild_id)
        guild = world.guilds.get(msg.guild_id)
        member = guild.members.get(msg.author.id) if guild else None
        if guild is not None and member is not None:
            out["member"] = member_payload(guild, member, with_user=False)
    return out


def application_payload(world: World, application_id: int, bot: User, owner: User) -> dict[str, Any]:
    """``GET /oauth2/applications/@me``: discord.py reads it at login for the application id."""
    return {
        "id": str(application_id),
        "name": bot.username,
        "icon": None,
        "description": "",
        "summary": "",
        "type": None,
        "bot_public": True,
        "bot_require_code_grant": False,
        "verify_key": "0" * 64,
        "owner": owner.to_payload(),
        "team": None,
        "flags": APPLICATION_FLAGS,
        "bot": bot.to_payload(),
        "rpc_origins": [],
        "tags": [],
        "install_params": None,
        "integration_types_config": {"0": {}},
        "approximate_guild_count": len(world.guilds_of(bot.id)),
    }


def ready_payload(
    session: GatewaySession, bot: User, application: dict[str, Any], guilds: list[Guild], resume_url: str
) -> dict[str, Any]:
    """READY: guilds start unavailable and arrive as GUILD_CREATE right after."""
    user = bot.to_payload()
    user.update({"verified": True, "mfa_enabled": False, "email": None})
    return {
        "v": 10,
        "user": user,
        "guilds": [{"id": str(g.id), "unavailable": True} for g in guilds],
        "session_id": session.id,
        "session_type": "normal",
        "resume_gateway_url": resume_url,
        "shard": list(session.shard),
        "application": {"id": application["id"], "flags": application["flags"]},
        "private_channels": [],
        "relationships": [],
        "presences": [],
        "guild_join_requests": [],
        "geo_ordered_rtc_regions": ["sandbox"],
        "user_settings": {},
        "auth": {},
        "_trace": ["sandbox"],
    }


def members_chunk(world: World, request: dict[str, Any]) -> dict[str, Any]:
    """GUILD_MEMBERS_CHUNK answering op 8 (sent by bots with the members intent at startup)."""
    guild = world.guilds.get(int(request.get("guild_id") or 0))
    members = list(guild.members.values()) if guild else []
    wanted = request.get("user_ids")
    if wanted:
        wanted_ids = {int(u) for u in (wanted if isinstance(wanted, list) else [wanted])}
        members = [m for m in members if m.user.id in wanted_ids]
    query = str(request.get("query") or "").lower()
    if query:
        members = [m for m in members if m.user.username.lower().startswith(query)]
    limit = int(request.get("limit") or 0)
    if limit:
        members = members[:limit]
    out: dict[str, Any] = {
        "guild_id": str(request.get("guild_id")),
        "members": [member_payload(guild, m) for m in members] if guild else [],
        "chunk_index": 0,
        "chunk_count": 1,
        "not_found": [],
    }
    if request.get("nonce") is not None:
        out["nonce"] = request["nonce"]
    return out
