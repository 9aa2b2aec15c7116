"""The test-driving side: act as Discord users (slash commands, autocomplete, clicks, modals).

Each action builds the INTERACTION_CREATE payload Discord would send (with everything discord.py
2.7 reads: version, application_id, attachment_size_limit, member.permissions, app_permissions,
entitlements, authorizing_integration_owners, context, channel, resolved data, message) after
checking that a real Discord client would allow the action at all.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from . import permission_bits as perms
from .api_errors import InvocationError, SandboxError
from .command_registry import (
    ATTACHMENT,
    CHANNEL,
    MENTIONABLE,
    ROLE,
    USER,
    RegisteredCommand,
    coerce_primitive,
    nest,
    walk_path,
)
from .interactions import (
    APPLICATION_COMMAND,
    AUTOCOMPLETE,
    MESSAGE_COMPONENT,
    MODAL_SUBMIT,
    InteractionRecord,
)
from .messages import Upload
from .payloads import channel_payload, member_payload, message_payload
from .records import Channel, Guild, Member, Message, Ref, StoredFile, User, ref_id
from .snowflakes import make_interaction_token

if TYPE_CHECKING:
    from .server import Sandbox

log = logging.getLogger(__name__)

CONTEXT_GUILD = 0
CONTEXT_BOT_DM = 1


class Driver:
    """Mixed into :class:`~sandbox.server.Sandbox`; methods act as a Discord user would."""

    # -- slash commands -------------------------------------------------------------------
    async def slash(
        self: Sandbox,
        user: Ref,
        channel: Ref,
        command: str,
        options: dict[str, Any] | None = None,
        *,
        attachments: list[tuple[str, bytes, str] | StoredFile] | None = None,
        locale: str | None = None,
    ) -> InteractionRecord:
        """Invoke ``/command`` ("generate", or "mod quota set" for groups) with named options.

        Option values: str/int/float/bool; a User/Member/Role/Channel (or id) for entity options;
        ``(filename, bytes, content_type)`` for attachment options. ``attachments`` fills the
        attachment options not given in ``options``, in schema order. Raises InvocationError for
        anything the Discord client would refuse (unknown option, missing required, bad choice...).
        """
        who, chan, guild = self._actor(user, channel)
        cmd, parts = self._find_command(command, chan, guild, who)
        leaf, chain = walk_path(cmd, parts)
        values = dict(options or {})
        pending = list(attachments or [])
        for opt in leaf:
            if opt["type"] == ATTACHMENT and opt["name"] not in values and pending:
                values[opt["name"]] = pending.pop(0)
        if pending:
            raise InvocationError(f"/{command}: {len(pending)} attachment(s) left without an attachment option")
        resolved: dict[str, dict[str, Any]] = {}
        leaf_options = self._build_options(command, leaf, values, guild, resolved, focused=None)
        data: dict[str, Any] = {
            "id": str(cmd.id),
            "name": cmd.name,
            "type": cmd.type,
            "options": nest(chain, leaf_options),
        }
        if resolved:
            data["resolved"] = resolved
        if cmd.guild_id is not None:
            data["guild_id"] = str(cmd.guild_id)
        return self._dispatch_interaction(APPLICATION_COMMAND, who, chan, guild, data, locale=locale)

    async def raw_slash(
        self: Sandbox,
        user: Ref,
        channel: Ref,
        command: str,
        options: dict[str, Any] | None = None,
    ) -> InteractionRecord:
        """Send ``/command`` the way a modified client (or a server whose admin changed the
        command's permissions) can: option names and types come from the synced schema, but
        nothing the Discord client would check is checked here: not ``default_member_permissions``,
        not ranges, lengths, choices or required options. For testing the bot's OWN checks.
        Entity options take the same values as in :meth:`slash`."""
        who, chan, guild = self._actor(user, channel)
        name, *parts = command.strip().lstrip("/").split()
        cmd = self.commands.find(name, guild.id if guild else None)
        if cmd is None:
            raise InvocationError(f"/{name} is not registered here; did the bot sync?")
        leaf, chain = walk_path(cmd, parts)
        by_name = {o["name"]: o for o in leaf}
        resolved: dict[str, dict[str, Any]] = {}
        leaf_options: list[dict[str, Any]] = []
        for opt_name, value in (options or {}).items():
            opt = by_name.get(opt_name)
            if opt is None:
                raise InvocationError(f"/{command}: no option {opt_name!r} in the schema ({sorted(by_name)})")
            entry: dict[str, Any] = {"name": opt_name, "type": opt["type"]}
            if opt["type"] in (USER, CHANNEL, ROLE, MENTIONABLE, ATTACHMENT):
                entry["value"] = self._entity_value(opt, value, guild, resolved, f"/{command} {opt_name}")
            else:
                entry["value"] = value
            leaf_options.append(entry)
        data: dict[str, Any] = {
            "id": str(cmd.id),
            "name": cmd.name,
            "type": cmd.type,
            "options": nest(chain, leaf_options),
        }
        if resolved:
            data["resolved"] = resolved
        if cmd.guild_id is not None:
            data["guild_id"] = str(cmd.guild_id)
        return self._dispatch_interaction(APPLICATION_COMMAND, who, chan, guild, data)

    async def raw_click(self: Sandbox, user: Ref, message: Ref, custom_id: str) -> InteractionRecord:
        """A button click with any ``custom_id`` on a bot message (a tampered client, or a button
        naming a job that no longer exists): for testing the bot's own checks. When the message
        does not carry that button, the interaction's copy of the message gets it in an extra row
        (libraries look the clicked button up there); the stored message is left unchanged."""
        msg = self.world.messages.get(ref_id(message))
        if msg is None or msg.deleted:
            raise InvocationError("cannot click on a deleted or unknown message")
        who, chan, guild = self._actor(user, msg.channel_id)
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": 2}
        original = msg.components
        if not any(c.get("custom_id") == custom_id for c in msg.iter_components()):
            button = {"type": 2, "style": 2, "label": "forged", "custom_id": custom_id}
            msg.components = [*original, {"type": 1, "components": [button]}]
        try:
            return self._dispatch_interaction(MESSAGE_COMPONENT, who, chan, guild, data, message=msg)
        finally:
            msg.components = original

    async def autocomplete(
        self: Sandbox,
        user: Ref,
        channel: Ref,
        command: str,
        options: dict[str, Any],
        *,
        focused: str,
        timeout: float = 3.0,
    ) -> list[dict[str, Any]]:
        """Type into option ``focused`` (its value in ``options`` is the text typed so far) and
        return the choices the bot answers with (``[{"name", "value"}]``)."""
        who, chan, guild = self._actor(user, channel)
        cmd, parts = self._find_command(command, chan, guild, who)
        leaf, chain = walk_path(cmd, parts)
        target = next((o for o in leaf if o["name"] == focused), None)
        if target is None or not target.get("autocomplete"):
            raise InvocationError(f"/{command}: option {focused!r} has no autocomplete")
        values = dict(options)
        values.setdefault(focused, "")
        leaf_options = self._build_options(command, leaf, values, guild, None, focused=focused)
        data: dict[str, Any] = {
            "id": str(cmd.id),
            "name": cmd.name,
            "type": cmd.type,
            "options": nest(chain, leaf_options),
        }
        if cmd.guild_id is not None:
            data["guild_id"] = str(cmd.guild_id)
        inter = self._dispatch_interaction(AUTOCOMPLETE, who, chan, guild, data)
        response = await inter.wait_response(timeout)
        return response.choices

    # -- components and modals ------------------------------------------------------------
    async def click(
        self: Sandbox,
        user: Ref,
        message: Ref,
        custom_id: str | None = None,
        *,
        label: str | None = None,
        values: list[str] | None = None,
    ) -> InteractionRecord:
        """Click a button (by ``custom_id`` or ``label``) or pick ``values`` in a select menu."""
        msg = self.world.messages.get(ref_id(message))
        if msg is None or msg.deleted:
            raise InvocationError("cannot click on a deleted or unknown message")
        if msg.author.id != self.bot_user.id:
            raise InvocationError("the message was not sent by the bot")
        who, chan, guild = self._actor(user, msg.channel_id)
        if msg.ephemeral and msg.visible_to not in (None, who.id):
            raise InvocationError("this ephemeral message is only visible to another user")
        component = self._find_component(msg, custom_id, label)
        data: dict[str, Any] = {"custom_id": component["custom_id"], "component_type": component["type"]}
        if component["type"] != 2:
            data["values"] = self._select_values(component, values or [])
            if component["type"] != 3:
                data["resolved"] = {}
        return self._dispatch_interaction(MESSAGE_COMPONENT, who, chan, guild, data, message=msg)

    async def submit_modal(
        self: Sandbox, user: Ref, opened_by: InteractionRecord, values: dict[str, str | list[str]]
    ) -> InteractionRecord:
        """Fill in and submit the modal the bot showed in response to ``opened_by``."""
        modal = opened_by.modal
        if modal is None:
            raise InvocationError("the bot did not answer that interaction with a modal")
        who, chan, guild = self._actor(user, opened_by.channel_id)
        components = [self._modal_row(row, values) for row in modal.get("components") or []]
        data = {"custom_id": modal["custom_id"], "components": [c for c in components if c is not None]}
        source = self.world.messages.get(opened_by.source_message_id or 0)
        return self._dispatch_interaction(MODAL_SUBMIT, who, chan, guild, data, message=source)

    # -- plain messages -------------------------------------------------------------------
    async def send_as_user(
        self: Sandbox,
        user: Ref,
        channel: Ref,
        content: str,
        *,
        attachments: list[tuple[str, bytes, str]] | None = None,
        reply_to: Ref | None = None,
    ) -> Message:
        """A member posts a normal message (dispatched as MESSAGE_CREATE, subject to intents)."""
        who, chan, _guild = self._actor(user, channel)
        uploads = [Upload(i, name, bytes(data), ctype) for i, (name, data, ctype) in enumerate(attachments or [])]
        body: dict[str, Any] = {"content": content}
        if reply_to is not None:
            body["message_reference"] = {"message_id": str(ref_id(reply_to))}
        return self.messages.create(chan, who, body, uploads)

    # -- helpers --------------------------------------------------------------------------
    def _actor(self: Sandbox, user: Ref, channel: Ref) -> tuple[User, Channel, Guild | None]:
        who = self.world.users.get(ref_id(user))
        chan = self.world.channels.get(ref_id(channel))
        if who is None or chan is None:
            raise SandboxError("unknown user or channel; create them with add_user/add_channel first")
        if chan.is_dm:
            if not chan.recipients or chan.recipients[0].id != who.id:
                raise InvocationError("that DM channel belongs to another user")
            return who, chan, None
        guild = self.world.guilds[chan.guild_id or 0]
        if who.id not in guild.members:
            raise InvocationError(f"{who.username} is not a member of {guild.name}")
        return who, chan, guild

    def _find_command(
        self: Sandbox, command: str, chan: Channel, guild: Guild | None, who: User
    ) -> tuple[RegisteredCommand, list[str]]:
        name, *parts = command.strip().lstrip("/").split()
        cmd = self.commands.find(name, guild.id if guild else None)
        if cmd is None:
            known = sorted(c.name for c in self.commands.list(None))
            if guild is not None:
                known += sorted(c.name for c in self.commands.list(guild.id))
            raise InvocationError(f"/{name} is not registered here (registered: {known}); did the bot sync?")
        if guild is None:
            if cmd.contexts is not None and CONTEXT_BOT_DM not in cmd.contexts:
                raise InvocationError(f"/{name} is not available in DMs")
            if cmd.contexts is None and cmd.dm_permission is False:
                raise InvocationError(f"/{name} is not available in DMs")
        else:
            if cmd.contexts is not None and CONTEXT_GUILD not in cmd.contexts:
                raise InvocationError(f"/{name} is not available in servers")
            if cmd.default_member_permissions is not None:
                needed = int(cmd.default_member_permissions)
                granted = guild.member_permissions(who.id)
                if not perms.has(granted, needed or perms.ADMINISTRATOR):
                    raise InvocationError(f"/{name} is hidden from {who.username} (default_member_permissions)")
            if cmd.nsfw and not chan.nsfw:
                raise InvocationError(f"/{name} is age-restricted and only usable in age-restricted channels")
        return cmd, parts

    def _build_options(
        self: Sandbox,
        command: str,
        leaf: list[dict[str, Any]],
        values: dict[str, Any],
        guild: Guild | None,
        resolved: dict[str, dict[str, Any]] | None,
        *,
        focused: str | None,
    ) -> list[dict[str, Any]]:
        by_name = {o["name"]: o for o in leaf}
        unknown = set(values) - set(by_name)
        if unknown:
            raise InvocationError(f"/{command}: unknown option(s) {sorted(unknown)}; schema has {sorted(by_name)}")
        out: list[dict[str, Any]] = []
        for opt in leaf:
            name = opt["name"]
            value = values.get(name)
            if value is None:
                if opt.get("required") and focused is None:
                    raise InvocationError(f"/{command}: required option {name!r} is missing")
                continue
            where = f"/{command} {name}"
            entry: dict[str, Any] = {"name": name, "type": opt["type"]}
            if opt["type"] in (USER, CHANNEL, ROLE, MENTIONABLE, ATTACHMENT):
                entry["value"] = self._entity_value(opt, value, guild, resolved, where)
            else:
                entry["value"] = coerce_primitive(opt, value, where, partial=focused is not None)
            if name == focused:
                entry["focused"] = True
            out.append(entry)
        return out

    def _entity_value(
        self: Sandbox,
        opt: dict[str, Any],
        value: Any,
        guild: Guild | None,
        resolved: dict[str, dict[str, Any]] | None,
        where: str,
    ) -> str:
        kind = opt["type"]
        bucket = resolved if resolved is not None else {}
        if kind == ATTACHMENT:
            stored = self._upload_for_option(value, where)
            bucket.setdefault("attachments", {})[str(stored.id)] = stored.to_payload()
            return str(stored.id)
        vid = ref_id(value)
        is_role = guild is not None and vid in guild.roles and not isinstance(value, User | Member)
        if kind == ROLE or (kind == MENTIONABLE and is_role):
            if not is_role or guild is None:
                raise InvocationError(f"{where}: expected a role of this server, got {value!r}")
            bucket.setdefault("roles", {})[str(vid)] = guild.roles[vid].to_payload()
            return str(vid)
        if kind == CHANNEL:
            chan = self.world.channels.get(vid)
            if chan is None or (guild is not None and chan.guild_id != guild.id):
                raise InvocationError(f"{where}: expected a channel of this server, got {value!r}")
            allowed = opt.get("channel_types")
            if allowed and chan.type not in allowed:
                raise InvocationError(f"{where}: channel type {chan.type} not in {allowed}")
            data = channel_payload(chan)
            data["permissions"] = str(self.bot_channel_permissions(chan))
            bucket.setdefault("channels", {})[str(chan.id)] = data
            return str(chan.id)
        user = self.world.users.get(ref_id(value))
        if user is None:
            raise InvocationError(f"{where}: unknown user {value!r}")
        bucket.setdefault("users", {})[str(user.id)] = user.to_payload()
        if guild is not None and user.id in guild.members:
            member = member_payload(guild, guild.members[user.id], with_user=False)
            member["permissions"] = str(guild.member_permissions(user.id))
            bucket.setdefault("members", {})[str(user.id)] = member
        return str(user.id)

    def _upload_for_option(self: Sandbox, value: Any, where: str) -> StoredFile:
        if isinstance(value, StoredFile):
            return value
        try:
            filename, data, content_type = value
        except (TypeError, ValueError):
            raise InvocationError(f"{where}: give an attachment as (filename, bytes, content_type)") from None
        return self.files.store(filename, bytes(data), content_type, scope=self.application_id, ephemeral=True)

    def _find_component(self, msg: Message, custom_id: str | None, label: str | None) -> dict[str, Any]:
        for comp in msg.iter_components():
            if (custom_id is not None and comp.get("custom_id") == custom_id) or (
                label is not None and custom_id is None and comp.get("label") == label
            ):
                if comp.get("disabled"):
                    raise InvocationError(f"component {comp.get('label') or comp.get('custom_id')!r} is disabled")
                if comp.get("type") == 2 and comp.get("style") in (5, 6):
                    raise InvocationError("link and premium buttons do not send interactions")
                return comp
        present = [(c.get("label"), c.get("custom_id")) for c in msg.iter_components()]
        raise InvocationError(f"no component custom_id={custom_id!r} label={label!r} on message; has {present}")

    @staticmethod
    def _select_values(component: dict[str, Any], values: list[str]) -> list[str]:
        lo = component.get("min_values", 1)
        hi = component.get("max_values", 1)
        if not lo <= len(values) <= hi:
            raise InvocationError(f"select {component['custom_id']!r} needs {lo}..{hi} values, got {len(values)}")
        if component["type"] == 3:
            options = [o["value"] for o in component.get("options") or []]
            bad = [v for v in values if v not in options]
            if bad:
                raise InvocationError(f"select {component['custom_id']!r}: {bad} not among options {options}")
        return [str(v) for v in values]

    @staticmethod
    def _modal_row(row: dict[str, Any], values: dict[str, str | list[str]]) -> dict[str, Any] | None:
        def fill(item: dict[str, Any]) -> dict[str, Any]:
            custom_id = item.get("custom_id")
            if item.get("type") == 4:
                text = str(values.get(custom_id, item.get("value") or ""))
                if item.get("required", True) and not text:
                    raise InvocationError(f"modal text input {custom_id!r} is required")
                lo, hi = item.get("min_length", 0), item.get("max_length", 4000)
                if text and not lo <= len(text) <= hi:
                    raise InvocationError(f"modal text input {custom_id!r}: length outside {lo}..{hi}")
                return {"type": 4, "id": item.get("id", 0), "custom_id": custom_id, "value": text}
            picked = values.get(custom_id, [])
            return {
                "type": item.get("type"),
                "id": item.get("id", 0),
                "custom_id": custom_id,
                "values": [picked] if isinstance(picked, str) else list(picked),
            }

        if row.get("type") == 1:
            return {
                "type": 1,
                "id": row.get("id", 0),
                "components": [fill(c) for c in row.get("components") or []],
            }
        if row.get("type") == 18 and isinstance(row.get("component"), dict):
            return {"type": 18, "id": row.get("id", 0), "component": fill(row["component"])}
        return None

    def _dispatch_interaction(
        self: Sandbox,
        kind: int,
        user: User,
        channel: Channel,
        guild: Guild | None,
        data: dict[str, Any],
        *,
        message: Message | None = None,
        locale: str | None = None,
    ) -> InteractionRecord:
        if not self.gateway.live_sessions():
            raise SandboxError("no bot session on the gateway: start the bot and wait_ready() first")
        interaction_id = self.world.snowflakes.next()
        token = make_interaction_token(interaction_id)
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": kind,
            "data": data,
            "channel_id": str(channel.id),
            "channel": channel_payload(channel),
            "token": token,
            "version": 1,
            "locale": locale or user.locale,
            "app_permissions": str(self.bot_channel_permissions(channel)),
            "entitlements": [],
            "entitlement_sku_ids": [],
            "attachment_size_limit": self.settings.upload_limit,
        }
        if guild is not None:
            member = member_payload(guild, guild.members[user.id])
            member["permissions"] = str(guild.member_permissions(user.id))
            payload["channel"]["permissions"] = member["permissions"]
            payload.update(
                guild_id=str(guild.id),
                guild={"id": str(guild.id), "locale": guild.locale, "features": []},
                guild_locale=guild.locale,
                member=member,
                context=CONTEXT_GUILD,
                authorizing_integration_owners={"0": str(guild.id)},
            )
        else:
            payload.update(user=user.to_payload(), context=CONTEXT_BOT_DM, authorizing_integration_owners={"0": "0"})
        if message is not None:
            payload["message"] = message_payload(self.world, message)
        now = asyncio.get_running_loop().time()
        record = InteractionRecord(
            id=interaction_id,
            token=token,
            type=kind,
            user=user,
            channel_id=channel.id,
            guild_id=guild.id if guild else None,
            payload=payload,
            dispatched_at=now,
            token_expires_at=now + self.settings.token_ttl,
            world=self.world,
            source_message_id=message.id if message is not None and kind in (MESSAGE_COMPONENT, MODAL_SUBMIT) else None,
        )
        self.world.interactions[interaction_id] = record
        self.world.interactions_by_token[token] = record
        self.gateway.dispatch("INTERACTION_CREATE", payload, guild_id=guild.id if guild else None)
        self.world.changed()
        log.debug("dispatched interaction %s (type %s) from %s", interaction_id, kind, user.username)
        return record
