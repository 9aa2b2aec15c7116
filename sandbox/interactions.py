"""What tests get back from ``sb.slash`` / ``sb.click``: one record per dispatched interaction.

The record tracks Discord's interaction lifecycle (3 s to the first response, the 15-minute
token, the original response and follow-ups) and offers awaitables so tests wait on events
instead of sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .records import EPHEMERAL, Message, StoredFile, User

if TYPE_CHECKING:
    from .world import World

PING = 1
APPLICATION_COMMAND = 2
MESSAGE_COMPONENT = 3
AUTOCOMPLETE = 4
MODAL_SUBMIT = 5

# Callback (response) types.
PONG = 1
CHANNEL_MESSAGE = 4
DEFERRED_CHANNEL_MESSAGE = 5
DEFERRED_UPDATE_MESSAGE = 6
UPDATE_MESSAGE = 7
AUTOCOMPLETE_RESULT = 8
MODAL = 9


@dataclass
class CallbackRecord:
    """The bot's first (and only accepted) response to an interaction."""

    type: int
    data: dict[str, Any]
    files: list[StoredFile]
    at: float
    message: Message | None = None

    @property
    def content(self) -> str | None:
        return self.data.get("content")

    @property
    def embeds(self) -> list[dict[str, Any]]:
        return self.data.get("embeds") or []

    @property
    def components(self) -> list[dict[str, Any]]:
        return self.data.get("components") or []

    @property
    def flags(self) -> int:
        return int(self.data.get("flags") or 0)

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & EPHEMERAL)

    @property
    def choices(self) -> list[dict[str, Any]]:
        """Autocomplete results (callback type 8)."""
        return self.data.get("choices") or []


@dataclass
class InteractionRecord:
    id: int
    token: str = field(repr=False)
    type: int
    user: User
    channel_id: int
    guild_id: int | None
    payload: dict[str, Any] = field(repr=False)
    dispatched_at: float
    token_expires_at: float
    world: World = field(repr=False)
    # For component clicks: the message the component belongs to.
    source_message_id: int | None = None
    response: CallbackRecord | None = None
    original_message_id: int | None = None
    followup_ids: list[int] = field(default_factory=list)
    # Why a callback was refused, e.g. "unknown_interaction" for a response after 3 s.
    rejected: list[str] = field(default_factory=list)

    @property
    def data(self) -> dict[str, Any]:
        return self.payload.get("data") or {}

    @property
    def acknowledged(self) -> bool:
        return self.response is not None

    @property
    def response_latency(self) -> float | None:
        """Seconds from dispatch to the first accepted callback."""
        return None if self.response is None else self.response.at - self.dispatched_at

    @property
    def late(self) -> bool:
        """True when the bot tried to respond after the response window (Discord: 3 s)."""
        return "unknown_interaction" in self.rejected

    @property
    def original(self) -> Message | None:
        """Current state of the original response message (after all edits), if any."""
        if self.original_message_id is None:
            return None
        msg = self.world.messages.get(self.original_message_id)
        return None if msg is None or msg.deleted else msg

    @property
    def followups(self) -> list[Message]:
        return [self.world.messages[i] for i in self.followup_ids if not self.world.messages[i].deleted]

    @property
    def messages(self) -> list[Message]:
        """Original response (if it is a message) followed by the follow-ups."""
        out = [self.original] if self.original is not None else []
        return out + [m for m in self.followups if m is not self.original]

    @property
    def modal(self) -> dict[str, Any] | None:
        if self.response is not None and self.response.type == MODAL:
            return self.response.data
        return None

    def expire_token(self) -> None:
        """Fault injection: make the 15-minute interaction token dead right now."""
        self.token_expires_at = asyncio.get_running_loop().time()
        self.world.changed()

    async def wait_response(self, timeout: float = 5.0) -> CallbackRecord:
        return await self.world.signal.wait_until(
            lambda: self.response, timeout, f"a response to interaction {self.id}"
        )

    async def wait_rejected(self, timeout: float = 5.0) -> list[str]:
        """Wait until a callback was refused (late response, double acknowledge ...)."""
        return await self.world.signal.wait_until(lambda: self.rejected, timeout, "a refused callback")

    async def wait_followups(self, count: int = 1, timeout: float = 5.0) -> list[Message]:
        def ready() -> list[Message] | None:
            found = self.followups
            return found if len(found) >= count else None

        return await self.world.signal.wait_until(ready, timeout, f"{count} follow-up(s)")

    async def wait_original(
        self, predicate: Callable[[Message], bool] = lambda m: True, timeout: float = 5.0
    ) -> Message:
        """Wait until the original response exists and satisfies ``predicate`` (e.g. an edit)."""

        def ready() -> Message | None:
            msg = self.original
            return msg if msg is not None and predicate(msg) else None

        return await self.world.signal.wait_until(ready, timeout, "the original response")
