"""The sandbox's world: users, guilds, channels, messages and files, as plain mutable records.

Tests hold on to these objects (``inter.original.content``), so messages are live records that
the server updates in place, keeping every previous state in ``history``.
"""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from . import permission_bits as perms
from .snowflakes import iso

EPHEMERAL = 1 << 6
LOADING = 1 << 7
SUPPRESS_EMBEDS = 1 << 2
IS_COMPONENTS_V2 = 1 << 15

CHANNEL_TEXT = 0
CHANNEL_DM = 1
CHANNEL_VOICE = 2
CHANNEL_CATEGORY = 4
CHANNEL_NEWS = 5
CHANNEL_FORUM = 15

Ref = Any  # what the public API accepts for an entity: the object itself or its id


def ref_id(obj: Ref) -> int:
    """The id of a User/Member/Channel/Role/Message/Guild, or of an int/str id."""
    if isinstance(obj, Member):
        return obj.user.id
    if hasattr(obj, "id"):
        return int(obj.id)
    return int(obj)


@dataclass
class User:
    id: int
    username: str
    global_name: str | None = None
    bot: bool = False
    locale: str = "en-US"

    @property
    def display_name(self) -> str:
        return self.global_name or self.username

    def to_payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": str(self.id),
            "username": self.username,
            "global_name": self.global_name,
            "discriminator": "0",
            "avatar": None,
            "avatar_decoration_data": None,
            "public_flags": 0,
            "flags": 0,
            "banner": None,
            "accent_color": None,
            "primary_guild": None,
            "collectibles": None,
        }
        if self.bot:
            out["bot"] = True
        return out


@dataclass
class Role:
    id: int
    guild_id: int
    name: str
    permissions: int = 0
    color: int = 0
    position: int = 0
    hoist: bool = False
    mentionable: bool = False
    managed: bool = False
    bot_id: int | None = None

    def to_payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": str(self.id),
            "name": self.name,
            "permissions": str(self.permissions),
            "color": self.color,
            "colors": {"primary_color": self.color, "secondary_color": None, "tertiary_color": None},
            "position": self.position,
            "hoist": self.hoist,
            "mentionable": self.mentionable,
            "managed": self.managed,
            "icon": None,
            "unicode_emoji": None,
            "flags": 0,
        }
        if self.bot_id is not None:
            out["tags"] = {"bot_id": str(self.bot_id)}
        return out


@dataclass
class Member:
    user: User
    guild_id: int
    role_ids: list[int] = field(default_factory=list)
    nick: str | None = None
    joined_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


@dataclass
class Channel:
    id: int
    type: int
    name: str | None
    guild_id: int | None = None
    nsfw: bool = False
    position: int = 0
    parent_id: int | None = None
    topic: str | None = None
    # Permission bits denied to the bot in this channel (a simplified permission overwrite).
    bot_deny: int = 0
    recipients: list[User] = field(default_factory=list)
    last_message_id: int | None = None

    @property
    def is_dm(self) -> bool:
        return self.type == CHANNEL_DM


@dataclass
class Guild:
    id: int
    name: str
    owner_id: int
    locale: str = "en-US"
    roles: dict[int, Role] = field(default_factory=dict)
    channels: dict[int, Channel] = field(default_factory=dict)
    members: dict[int, Member] = field(default_factory=dict)
    joined_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

    @property
    def everyone(self) -> Role:
        return self.roles[self.id]

    def member_permissions(self, user_id: int) -> int:
        """Guild-level permissions of a member, computed the way Discord does."""
        member = self.members.get(user_id)
        values = [self.everyone.permissions]
        if member is not None:
            values += [self.roles[r].permissions for r in member.role_ids if r in self.roles]
        return perms.compute(values, is_owner=user_id == self.owner_id)


@dataclass
class StoredFile:
    """An uploaded file served by the sandbox CDN; ``data`` is the exact bytes received."""

    id: int
    filename: str
    content_type: str | None
    data: bytes
    url: str
    proxy_url: str
    width: int | None = None
    height: int | None = None
    description: str | None = None
    ephemeral: bool = False

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def is_image(self) -> bool:
        return self.width is not None and self.height is not None

    def to_payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": str(self.id),
            "filename": self.filename,
            "size": self.size,
            "url": self.url,
            "proxy_url": self.proxy_url,
        }
        if self.content_type:
            out["content_type"] = self.content_type
        if self.width is not None and self.height is not None:
            out["width"] = self.width
            out["height"] = self.height
        if self.description is not None:
            out["description"] = self.description
        if self.ephemeral:
            out["ephemeral"] = True
        return out


@dataclass
class MessageSnapshot:
    """One earlier state of a message (kept on every edit)."""

    content: str
    embeds: list[dict[str, Any]]
    components: list[dict[str, Any]]
    attachments: list[StoredFile]
    flags: int
    at: dt.datetime


@dataclass
class Message:
    id: int
    channel_id: int
    guild_id: int | None
    author: User
    content: str = ""
    embeds: list[dict[str, Any]] = field(default_factory=list)
    components: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[StoredFile] = field(default_factory=list)
    flags: int = 0
    type: int = 0
    created_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    edited_at: dt.datetime | None = None
    tts: bool = False
    nonce: str | None = None
    mention_ids: list[int] = field(default_factory=list)
    mention_role_ids: list[int] = field(default_factory=list)
    reference: dict[str, Any] | None = None
    webhook_id: int | None = None
    application_id: int | None = None
    interaction_id: int | None = None
    interaction_meta: dict[str, Any] | None = None
    # For ephemeral messages: the only user who can see it.
    visible_to: int | None = None
    deleted: bool = False
    history: list[MessageSnapshot] = field(default_factory=list)

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & EPHEMERAL)

    @property
    def loading(self) -> bool:
        return bool(self.flags & LOADING)

    def snapshot(self) -> MessageSnapshot:
        return MessageSnapshot(
            content=self.content,
            embeds=copy.deepcopy(self.embeds),
            components=copy.deepcopy(self.components),
            attachments=list(self.attachments),
            flags=self.flags,
            at=self.edited_at or self.created_at,
        )

    def iter_components(self) -> list[dict[str, Any]]:
        """Every interactive component (buttons, selects), flattened out of rows/containers."""
        found: list[dict[str, Any]] = []

        def walk(items: list[dict[str, Any]]) -> None:
            for item in items:
                if item.get("type") in (2, 3, 5, 6, 7, 8):
                    found.append(item)
                for key in ("components",):
                    if isinstance(item.get(key), list):
                        walk(item[key])
                for key in ("accessory", "component"):
                    if isinstance(item.get(key), dict):
                        walk([item[key]])

        walk(self.components)
        return found

    @property
    def buttons(self) -> list[dict[str, Any]]:
        return [c for c in self.iter_components() if c.get("type") == 2]

    def button(self, label: str) -> dict[str, Any]:
        """The button with exactly this label (raises KeyError listing the labels present)."""
        for b in self.buttons:
            if b.get("label") == label:
                return b
        raise KeyError(f"no button labelled {label!r}; labels: {[b.get('label') for b in self.buttons]}")

    def timestamp(self) -> str:
        return iso(self.created_at) or ""
