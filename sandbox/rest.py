"""Bot-token REST routes: identity, gateway discovery, application commands, channels, guilds.

Only the routes a bot like Atelier (and discord.py's startup) uses are implemented; anything else
answers Discord's 404 JSON so an unexpected call fails loudly in tests instead of hanging.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import api_errors as errors
from . import permission_bits as perms
from .http_json import json_response, no_content, read_body, read_json
from .payloads import channel_payload, guild_payload, member_payload, message_payload
from .records import Channel, Message

if TYPE_CHECKING:
    from .server import Sandbox

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RestApi:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sb = sandbox
        self.world = sandbox.world

    def routes(self) -> list[tuple[str, str, Handler]]:
        bot = self._bot_auth
        app = "/applications/{app_id}"
        return [
            ("GET", "/gateway", self.gateway),
            ("GET", "/gateway/bot", bot(self.gateway_bot)),
            ("GET", "/users/@me", bot(self.me)),
            ("GET", "/users/@me/guilds", bot(self.my_guilds)),
            ("DELETE", "/users/@me/guilds/{guild_id}", bot(self.leave_guild)),
            ("POST", "/users/@me/channels", bot(self.open_dm)),
            ("GET", "/users/{user_id}", bot(self.get_user)),
            ("GET", "/applications/@me", bot(self.application)),
            ("GET", "/oauth2/applications/@me", bot(self.application)),
            ("GET", f"{app}/commands", bot(self.list_commands)),
            ("PUT", f"{app}/commands", bot(self.overwrite_commands)),
            ("POST", f"{app}/commands", bot(self.upsert_command)),
            ("GET", f"{app}/commands/{{command_id}}", bot(self.get_command)),
            ("PATCH", f"{app}/commands/{{command_id}}", bot(self.edit_command)),
            ("DELETE", f"{app}/commands/{{command_id}}", bot(self.delete_command)),
            ("GET", f"{app}/guilds/{{guild_id}}/commands", bot(self.list_commands)),
            ("PUT", f"{app}/guilds/{{guild_id}}/commands", bot(self.overwrite_commands)),
            ("POST", f"{app}/guilds/{{guild_id}}/commands", bot(self.upsert_command)),
            ("GET", f"{app}/guilds/{{guild_id}}/commands/permissions", bot(self.empty_list)),
            ("GET", f"{app}/guilds/{{guild_id}}/commands/{{command_id}}", bot(self.get_command)),
            ("PATCH", f"{app}/guilds/{{guild_id}}/commands/{{command_id}}", bot(self.edit_command)),
            ("DELETE", f"{app}/guilds/{{guild_id}}/commands/{{command_id}}", bot(self.delete_command)),
            ("GET", f"{app}/entitlements", bot(self.empty_list)),
            ("GET", f"{app}/emojis", bot(self.no_emojis)),
            ("GET", "/channels/{channel_id}", bot(self.get_channel)),
            ("GET", "/channels/{channel_id}/messages", bot(self.list_messages)),
            ("POST", "/channels/{channel_id}/messages", bot(self.create_message)),
            ("POST", "/channels/{channel_id}/typing", bot(self.typing)),
            ("GET", "/channels/{channel_id}/messages/{message_id}", bot(self.get_message)),
            ("PATCH", "/channels/{channel_id}/messages/{message_id}", bot(self.edit_message)),
            ("DELETE", "/channels/{channel_id}/messages/{message_id}", bot(self.delete_message)),
            ("GET", "/guilds/{guild_id}", bot(self.get_guild)),
            ("GET", "/guilds/{guild_id}/channels", bot(self.guild_channels)),
            ("GET", "/guilds/{guild_id}/roles", bot(self.guild_roles)),
            ("GET", "/guilds/{guild_id}/members", bot(self.guild_members)),
            ("GET", "/guilds/{guild_id}/members/{user_id}", bot(self.guild_member)),
        ]

    def _bot_auth(self, handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            if request.headers.get("Authorization") != f"Bot {self.sb.token}":
                log.warning("rejected %s %s: missing or wrong bot token", request.method, request.path)
                raise errors.unauthorized()
            return await handler(request)

        return wrapped

    # -- identity / discovery -----------------------------------------------------------
    async def gateway(self, request: web.Request) -> web.Response:
        return json_response({"url": self.sb.gateway_url})

    async def gateway_bot(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "url": self.sb.gateway_url,
                "shards": 1,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 999,
                    "reset_after": 86_400_000,
                    "max_concurrency": 1,
                },
            }
        )

    async def me(self, request: web.Request) -> web.Response:
        data = self.sb.bot_user.to_payload()
        data.update({"verified": True, "mfa_enabled": False, "email": None, "locale": "en-US", "bio": ""})
        return json_response(data)

    async def my_guilds(self, request: web.Request) -> web.Response:
        bot_id = self.sb.bot_user.id
        out = [
            {
                "id": str(g.id),
                "name": g.name,
                "icon": None,
                "owner": False,
                "features": [],
                "permissions": str(g.member_permissions(bot_id)),
            }
            for g in self.world.guilds_of(bot_id)
        ]
        return json_response(out)

    async def open_dm(self, request: web.Request) -> web.Response:
        body = await read_json(request) or {}
        user = self.world.user(body.get("recipient_id", 0))
        return json_response(channel_payload(self.world.dm_channel_for(user)))

    async def get_user(self, request: web.Request) -> web.Response:
        return json_response(self.world.user(request.match_info["user_id"]).to_payload())

    async def application(self, request: web.Request) -> web.Response:
        return json_response(self.sb.application_payload())

    # -- application commands -------------------------------------------------------------
    def _command_scope(self, request: web.Request) -> int | None:
        if int(request.match_info["app_id"]) != self.sb.application_id:
            raise errors.ApiError(403, 50001, "Missing Access")
        guild_id = request.match_info.get("guild_id")
        if guild_id is None:
            return None
        guild = self.world.guild(guild_id)
        if self.sb.bot_user.id not in guild.members:
            raise errors.missing_access()
        return guild.id

    async def list_commands(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        return json_response([c.to_payload() for c in self.sb.commands.list(scope)])

    async def overwrite_commands(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        stored = self.sb.commands.bulk_overwrite(scope, await read_json(request))
        self.world.changed()
        return json_response([c.to_payload() for c in stored])

    async def upsert_command(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        cmd = self.sb.commands.upsert(scope, await read_json(request) or {})
        self.world.changed()
        return json_response(cmd.to_payload(), status=201)

    async def get_command(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        return json_response(self.sb.commands.get(scope, int(request.match_info["command_id"])).to_payload())

    async def edit_command(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        cmd = self.sb.commands.edit(scope, int(request.match_info["command_id"]), await read_json(request) or {})
        self.world.changed()
        return json_response(cmd.to_payload())

    async def delete_command(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        self.sb.commands.delete(scope, int(request.match_info["command_id"]))
        self.world.changed()
        return no_content()

    async def empty_list(self, request: web.Request) -> web.Response:
        return json_response([])

    async def no_emojis(self, request: web.Request) -> web.Response:
        return json_response({"items": []})

    # -- channels & messages --------------------------------------------------------------
    def _visible_channel(self, request: web.Request) -> tuple[Channel, int]:
        """The channel and the bot's permissions in it; 50001 when the bot cannot see it."""
        channel = self.world.channel(request.match_info["channel_id"])
        granted = self.sb.bot_channel_permissions(channel)
        if not perms.has(granted, perms.VIEW_CHANNEL):
            raise errors.missing_access()
        return channel, granted

    def _bot_message(self, request: web.Request) -> tuple[Channel, int, Message]:
        channel, granted = self._visible_channel(request)
        msg = self.world.message(channel.id, request.match_info["message_id"])
        if msg.ephemeral:  # ephemeral messages exist only for their interaction token
            raise errors.unknown_message()
        return channel, granted, msg

    async def get_channel(self, request: web.Request) -> web.Response:
        channel, _ = self._visible_channel(request)
        return json_response(channel_payload(channel))

    async def list_messages(self, request: web.Request) -> web.Response:
        channel, granted = self._visible_channel(request)
        if not perms.has(granted, perms.READ_MESSAGE_HISTORY):
            return json_response([])
        query = request.query
        limit = max(1, min(100, int(query.get("limit", 50))))
        visible = [m for m in self.world.channel_messages(channel.id) if not m.ephemeral]
        if "before" in query:
            visible = [m for m in visible if m.id < int(query["before"])]
            picked = visible[-limit:]
        elif "after" in query:
            picked = [m for m in visible if m.id > int(query["after"])][:limit]
        elif "around" in query:
            pivot = int(query["around"])
            older = [m for m in visible if m.id <= pivot][-(limit // 2 + limit % 2) :]
            newer = [m for m in visible if m.id > pivot][: limit // 2]
            picked = older + newer
        else:
            picked = visible[-limit:]
        picked = sorted(picked, key=lambda m: m.id, reverse=True)
        return json_response([message_payload(self.world, m) for m in picked])

    async def create_message(self, request: web.Request) -> web.Response:
        channel, granted = self._visible_channel(request)
        body, uploads = await read_body(request)
        if not perms.has(granted, perms.SEND_MESSAGES):
            raise errors.missing_permissions()
        if uploads and not perms.has(granted, perms.ATTACH_FILES):
            raise errors.missing_permissions()
        msg = self.sb.messages.create(channel, self.sb.bot_user, body, uploads)
        return json_response(message_payload(self.world, msg))

    async def typing(self, request: web.Request) -> web.Response:
        self._visible_channel(request)
        return no_content()

    async def get_message(self, request: web.Request) -> web.Response:
        _, granted, msg = self._bot_message(request)
        if not perms.has(granted, perms.READ_MESSAGE_HISTORY):
            raise errors.missing_access()
        return json_response(message_payload(self.world, msg))

    async def edit_message(self, request: web.Request) -> web.Response:
        _, _, msg = self._bot_message(request)
        body, uploads = await read_body(request)
        if msg.author.id != self.sb.bot_user.id:
            raise errors.cannot_edit_others()
        self.sb.messages.edit(msg, body, uploads)
        return json_response(message_payload(self.world, msg))

    async def delete_message(self, request: web.Request) -> web.Response:
        _, granted, msg = self._bot_message(request)
        if msg.author.id != self.sb.bot_user.id and not perms.has(granted, perms.MANAGE_MESSAGES):
            raise errors.missing_permissions()
        self.sb.messages.delete(msg)
        return no_content()

    # -- guilds ---------------------------------------------------------------------------
    def _bot_guild(self, request: web.Request) -> Any:
        guild = self.world.guild(request.match_info["guild_id"])
        if self.sb.bot_user.id not in guild.members:
            raise errors.unknown_guild()
        return guild

    async def leave_guild(self, request: web.Request) -> web.Response:
        """``leave_guild``: the bot is no longer a member; Discord then sends GUILD_DELETE (without
        ``unavailable``, which means the bot was removed, not that the server is down)."""
        guild = self._bot_guild(request)
        del guild.members[self.sb.bot_user.id]
        self.world.changed()
        self.sb.gateway.dispatch("GUILD_DELETE", {"id": str(guild.id)}, guild_id=guild.id)
        return no_content()

    async def get_guild(self, request: web.Request) -> web.Response:
        guild = self._bot_guild(request)
        data = guild_payload(guild, full=False)
        if request.query.get("with_counts") in ("true", "1", "True"):
            data["approximate_member_count"] = len(guild.members)
            data["approximate_presence_count"] = 0
        return json_response(data)

    async def guild_channels(self, request: web.Request) -> web.Response:
        guild = self._bot_guild(request)
        return json_response([channel_payload(c) for c in guild.channels.values()])

    async def guild_roles(self, request: web.Request) -> web.Response:
        guild = self._bot_guild(request)
        return json_response([r.to_payload() for r in guild.roles.values()])

    async def guild_members(self, request: web.Request) -> web.Response:
        guild = self._bot_guild(request)
        limit = max(1, min(1000, int(request.query.get("limit", 1))))
        after = int(request.query.get("after", 0))
        members = sorted((m for m in guild.members.values() if m.user.id > after), key=lambda m: m.user.id)
        return json_response([member_payload(guild, m) for m in members[:limit]])

    async def guild_member(self, request: web.Request) -> web.Response:
        guild = self._bot_guild(request)
        member = self.world.member(guild.id, request.match_info["user_id"])
        return json_response(member_payload(guild, member))
