"""Creating, editing and deleting messages: one code path for bot-token REST calls, interaction
responses and webhook follow-ups, so limits and attachment rules are the same everywhere.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from typing import Any

from . import api_errors as errors
from . import message_limits as validation
from .cdn import FileStore
from .gateway import Gateway
from .payloads import message_payload
from .records import EPHEMERAL, IS_COMPONENTS_V2, LOADING, SUPPRESS_EMBEDS, Channel, Message, StoredFile, User
from .snowflakes import utcnow
from .tuning import SandboxSettings
from .world import World

log = logging.getLogger(__name__)

SUPPRESS_NOTIFICATIONS = 1 << 12
CREATE_FLAGS = SUPPRESS_EMBEDS | SUPPRESS_NOTIFICATIONS | IS_COMPONENTS_V2
REPLY = 19
USER_MENTION = re.compile(r"<@!?(\d+)>")
ROLE_MENTION = re.compile(r"<@&(\d+)>")


@dataclass
class Upload:
    """A file part of a multipart request (``files[N]``)."""

    index: int
    filename: str
    data: bytes
    content_type: str | None


class MessageService:
    def __init__(self, world: World, files: FileStore, gateway: Gateway, settings: SandboxSettings) -> None:
        self._world = world
        self._files = files
        self._gateway = gateway
        self._settings = settings
        self._nonces: dict[tuple[int, int, str], int] = {}

    # -- create ---------------------------------------------------------------------------
    def create(
        self,
        channel: Channel,
        author: User,
        body: dict[str, Any],
        uploads: list[Upload],
        *,
        allow_ephemeral: bool = False,
        visible_to: int | None = None,
        loading: bool = False,
        msg_type: int = 0,
        webhook_id: int | None = None,
        interaction_meta: dict[str, Any] | None = None,
        interaction_id: int | None = None,
    ) -> Message:
        validation.check_message(body, upload_count=len(uploads))
        self._check_upload_size(uploads)
        nonce = body.get("nonce")
        if nonce is not None and body.get("enforce_nonce"):
            key = (channel.id, author.id, str(nonce))
            existing = self._world.messages.get(self._nonces.get(key, 0))
            if existing is not None and not existing.deleted:
                return existing
        flags = int(body.get("flags") or 0)
        allowed = CREATE_FLAGS | (EPHEMERAL if allow_ephemeral else 0)
        flags &= allowed
        if loading:
            flags |= LOADING
        msg = Message(
            id=self._world.snowflakes.next(),
            channel_id=channel.id,
            guild_id=channel.guild_id,
            author=author,
            content=body.get("content") or "",
            components=copy.deepcopy(body.get("components") or []),
            flags=flags,
            type=msg_type,
            tts=bool(body.get("tts", False)),
            nonce=None if nonce is None else str(nonce),
            webhook_id=webhook_id,
            application_id=webhook_id,
            interaction_meta=interaction_meta,
            interaction_id=interaction_id,
        )
        msg.attachments = self._new_attachments(msg, body, uploads)
        msg.embeds = self._embeds(body.get("embeds") or [], msg.attachments)
        if not loading and self._is_empty(msg, body):
            raise errors.empty_message()
        self._apply_mentions(msg, body)
        ref = body.get("message_reference")
        if ref:
            self._apply_reference(msg, channel, ref)
        if msg.ephemeral:
            msg.visible_to = visible_to
        if nonce is not None:
            self._nonces[(channel.id, author.id, str(nonce))] = msg.id
        self._world.add_message(msg)
        if not msg.ephemeral:
            self._dispatch("MESSAGE_CREATE", msg)
        log.debug("message %s created in channel %s", msg.id, channel.id)
        return msg

    # -- edit -----------------------------------------------------------------------------
    def edit(self, msg: Message, body: dict[str, Any], uploads: list[Upload]) -> Message:
        merged_flags = int(body["flags"]) if body.get("flags") is not None else msg.flags
        validation.check_message({**body, "flags": merged_flags | msg.flags}, upload_count=len(uploads))
        self._check_upload_size(uploads)
        before = msg.snapshot()
        was_loading = msg.loading
        if "attachments" in body and body["attachments"] is not None:
            attachments = self._edited_attachments(msg, body["attachments"], uploads)
        else:
            attachments = msg.attachments + self._new_attachments(msg, {}, uploads)
        if len(attachments) > validation.MAX_ATTACHMENTS:
            raise errors.too_long("attachments", validation.MAX_ATTACHMENTS)
        content = msg.content
        if "content" in body:
            content = body["content"] or ""
        embeds = msg.embeds
        if "embeds" in body:
            embeds = self._embeds(body["embeds"] or [], attachments)
        components = msg.components
        if "components" in body:
            components = copy.deepcopy(body["components"] or [])
        flags = msg.flags & ~LOADING
        if body.get("flags") is not None:
            requested = int(body["flags"])
            flags = (flags & ~SUPPRESS_EMBEDS) | (requested & SUPPRESS_EMBEDS) | (requested & IS_COMPONENTS_V2)
        candidate = Message(
            id=msg.id,
            channel_id=msg.channel_id,
            guild_id=msg.guild_id,
            author=msg.author,
            content=content,
            embeds=embeds,
            components=components,
            attachments=attachments,
            flags=flags,
        )
        if self._is_empty(candidate, {}):
            raise errors.empty_message()
        msg.content, msg.embeds, msg.components = content, embeds, components
        msg.attachments, msg.flags = attachments, flags
        if "content" in body or "allowed_mentions" in body:
            self._apply_mentions(msg, body)
        if not was_loading:
            msg.history.append(before)
            msg.edited_at = utcnow()
        self._world.changed()
        if not msg.ephemeral:
            self._dispatch("MESSAGE_UPDATE", msg)
        return msg

    # -- delete ---------------------------------------------------------------------------
    def delete(self, msg: Message) -> None:
        msg.deleted = True
        self._world.changed()
        if not msg.ephemeral:
            data: dict[str, Any] = {"id": str(msg.id), "channel_id": str(msg.channel_id)}
            if msg.guild_id is not None:
                data["guild_id"] = str(msg.guild_id)
            self._gateway.dispatch("MESSAGE_DELETE", data, guild_id=msg.guild_id)

    # -- helpers --------------------------------------------------------------------------
    def _dispatch(self, event: str, msg: Message) -> None:
        self._gateway.dispatch(event, message_payload(self._world, msg, gateway=True), guild_id=msg.guild_id)

    def _check_upload_size(self, uploads: list[Upload]) -> None:
        if sum(len(u.data) for u in uploads) > self._settings.upload_limit:
            raise errors.entity_too_large()

    def _store(self, msg: Message, upload: Upload, description: str | None) -> StoredFile:
        return self._files.store(
            upload.filename,
            upload.data,
            upload.content_type,
            scope=msg.channel_id,
            description=description,
            ephemeral=bool(msg.flags & EPHEMERAL),
        )

    def _new_attachments(self, msg: Message, body: dict[str, Any], uploads: list[Upload]) -> list[StoredFile]:
        """All uploaded files in upload order, with descriptions from the ``attachments`` list."""
        described = {}
        for entry in body.get("attachments") or []:
            try:
                described[int(entry.get("id"))] = entry.get("description")
            except (TypeError, ValueError):
                continue
        return [self._store(msg, u, described.get(u.index)) for u in sorted(uploads, key=lambda u: u.index)]

    def _edited_attachments(
        self, msg: Message, entries: list[dict[str, Any]], uploads: list[Upload]
    ) -> list[StoredFile]:
        """Discord's edit rule: listed existing ids are kept, others removed; small ids name new files."""
        existing = {a.id: a for a in msg.attachments}
        by_index = {u.index: u for u in uploads}
        result: list[StoredFile] = []
        used: set[int] = set()
        for i, entry in enumerate(entries):
            try:
                ident = int(entry.get("id"))
            except (TypeError, ValueError):
                raise errors.invalid_form(
                    f"attachments.{i}.id", "BASE_TYPE_REQUIRED", "This field is required"
                ) from None
            if ident in existing:
                result.append(existing[ident])
            elif ident in by_index:
                result.append(self._store(msg, by_index[ident], entry.get("description")))
                used.add(ident)
            else:
                raise errors.invalid_form(
                    f"attachments.{i}.id", "ATTACHMENT_NOT_FOUND", f"Attachment with id {ident} not found"
                )
        for upload in uploads:  # files sent without an attachments entry are still added
            if upload.index not in used:
                result.append(self._store(msg, upload, None))
        return result

    def _embeds(self, embeds: list[dict[str, Any]], attachments: list[StoredFile]) -> list[dict[str, Any]]:
        """Normalise like Discord: ``type: rich`` and ``attachment://name`` resolved to the CDN url."""
        by_name = {a.filename: a for a in attachments}
        out = []
        for embed in embeds:
            embed = copy.deepcopy(embed)
            embed.setdefault("type", "rich")
            for key in ("image", "thumbnail"):
                media = embed.get(key)
                if not isinstance(media, dict):
                    continue
                url = str(media.get("url", ""))
                if url.startswith("attachment://"):
                    found = by_name.get(url.removeprefix("attachment://"))
                    if found is None:
                        embed.pop(key)
                        continue
                    media.update(url=found.url, proxy_url=found.proxy_url)
                    if found.width is not None:
                        media.update(width=found.width, height=found.height)
                    if found.content_type:
                        media["content_type"] = found.content_type
            out.append(embed)
        return out

    @staticmethod
    def _is_empty(msg: Message, body: dict[str, Any]) -> bool:
        return not (
            msg.content.strip()
            or msg.embeds
            or msg.attachments
            or msg.components
            or body.get("sticker_ids")
            or body.get("poll")
        )

    def _apply_mentions(self, msg: Message, body: dict[str, Any]) -> None:
        allowed = body.get("allowed_mentions")
        users = [int(u) for u in USER_MENTION.findall(msg.content) if int(u) in self._world.users]
        roles = [int(r) for r in ROLE_MENTION.findall(msg.content)]
        if isinstance(allowed, dict):
            parse = allowed.get("parse") or []
            explicit_users = {int(u) for u in allowed.get("users") or []}
            explicit_roles = {int(r) for r in allowed.get("roles") or []}
            users = [u for u in users if "users" in parse or u in explicit_users]
            roles = [r for r in roles if "roles" in parse or r in explicit_roles]
        msg.mention_ids = list(dict.fromkeys(users))
        msg.mention_role_ids = list(dict.fromkeys(roles))

    def _apply_reference(self, msg: Message, channel: Channel, ref: dict[str, Any]) -> None:
        target_id = ref.get("message_id")
        target = self._world.messages.get(int(target_id)) if target_id else None
        if target is None or target.deleted or target.channel_id != int(ref.get("channel_id") or channel.id):
            if ref.get("fail_if_not_exists", True):
                raise errors.invalid_form("message_reference", "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message")
            return
        msg.reference = {
            "type": 0,
            "message_id": str(target.id),
            "channel_id": str(target.channel_id),
        }
        if target.guild_id is not None:
            msg.reference["guild_id"] = str(target.guild_id)
        if msg.type == 0:
            msg.type = REPLY
