"""In-memory store of everything the sandbox knows, plus a change signal tests can wait on.

Every mutation calls :meth:`World.changed`, which wakes every ``wait_until`` waiter; tests then
re-check their predicate. This gives deterministic waits without sleeps or polling.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from . import api_errors as errors
from .records import CHANNEL_DM, Channel, Guild, Member, Message, StoredFile, User
from .snowflakes import SnowflakeFactory

if TYPE_CHECKING:
    from .command_registry import CommandRegistry
    from .interactions import InteractionRecord

T = TypeVar("T")


class ChangeSignal:
    """A broadcast "something changed" edge; waiters re-evaluate their own predicate."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], T], timeout: float, what: str = "condition") -> T:
        """Return the first truthy value of ``predicate()``; raise TimeoutError after ``timeout`` s."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = self._event  # grab before checking so no notification is missed
                    result = predicate()
                    if result:
                        return result
                    await event.wait()
        except TimeoutError:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}") from None


class World:
    """All entities by id. Lookups raise the ApiError Discord would return for unknown ids."""

    def __init__(self, snowflakes: SnowflakeFactory) -> None:
        self.snowflakes = snowflakes
        self.users: dict[int, User] = {}
        self.guilds: dict[int, Guild] = {}
        self.channels: dict[int, Channel] = {}
        self.messages: dict[int, Message] = {}
        self.channel_message_ids: dict[int, list[int]] = {}
        self.files: dict[int, StoredFile] = {}
        self.interactions: dict[int, InteractionRecord] = {}
        self.interactions_by_token: dict[str, InteractionRecord] = {}
        self.commands: CommandRegistry | None = None
        self.signal = ChangeSignal()
        self.bot_user: User | None = None

    def changed(self) -> None:
        self.signal.notify()

    # -- lookups -------------------------------------------------------------------------
    def user(self, user_id: int | str) -> User:
        try:
            return self.users[int(user_id)]
        except (KeyError, ValueError):
            raise errors.unknown_user() from None

    def guild(self, guild_id: int | str) -> Guild:
        try:
            return self.guilds[int(guild_id)]
        except (KeyError, ValueError):
            raise errors.unknown_guild() from None

    def channel(self, channel_id: int | str) -> Channel:
        try:
            return self.channels[int(channel_id)]
        except (KeyError, ValueError):
            raise errors.unknown_channel() from None

    def message(self, channel_id: int | str, message_id: int | str) -> Message:
        try:
            msg = self.messages[int(message_id)]
        except (KeyError, ValueError):
            raise errors.unknown_message() from None
        if msg.channel_id != int(channel_id) or msg.deleted:
            raise errors.unknown_message()
        return msg

    def member(self, guild_id: int, user_id: int | str) -> Member:
        guild = self.guild(guild_id)
        try:
            return guild.members[int(user_id)]
        except (KeyError, ValueError):
            raise errors.unknown_member() from None

    # -- mutation helpers ----------------------------------------------------------------
    def add_message(self, msg: Message) -> None:
        self.messages[msg.id] = msg
        self.channel_message_ids.setdefault(msg.channel_id, []).append(msg.id)
        channel = self.channels.get(msg.channel_id)
        if channel is not None and not msg.ephemeral:
            channel.last_message_id = msg.id
        self.changed()

    def channel_messages(self, channel_id: int, *, include_deleted: bool = False) -> list[Message]:
        ids = self.channel_message_ids.get(channel_id, [])
        return [self.messages[i] for i in ids if include_deleted or not self.messages[i].deleted]

    def dm_channel_for(self, user: User) -> Channel:
        """The bot's DM channel with ``user``, created on first use (ids are stable)."""
        for ch in self.channels.values():
            if ch.type == CHANNEL_DM and ch.recipients and ch.recipients[0].id == user.id:
                return ch
        ch = Channel(id=self.snowflakes.next(), type=CHANNEL_DM, name=None, recipients=[user])
        self.channels[ch.id] = ch
        self.changed()
        return ch

    def guilds_of(self, user_id: int) -> list[Guild]:
        return [g for g in self.guilds.values() if user_id in g.members]
