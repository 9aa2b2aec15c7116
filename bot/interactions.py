"""Answering an interaction: the first response, guaranteed within Discord's 3 s, and the one
way every command, button and error handler tells a member something (`say`, `guarded`).

A request answers itself as soon as it knows the outcome (a public queue card or an ephemeral
refusal). Under a burst the request path can take longer than Discord allows, so a timer defers
the interaction (ephemeral "thinking…") 1.5 s after it was created, or at once in a burst (then
the burst's earlier requests too) or while many earlier requests are still working; in a burst,
the deferrals go out before any request's own work and before the bot's status edits and
result posts. The request then finishes in that deferred message: a refusal replaces it, and an
accepted job's public queue card is posted in the channel with the bot token (which also keeps
working after the 15-minute interaction token) while the deferred message points to it. A lock
makes the timer and the request never both answer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import discord

from bot.errors import member_text

log = logging.getLogger(__name__)

CONTENT_LIMIT = 2000

# Half of Discord's 3 s: the deferral itself still arrives in time when the event loop lags by
# up to 1.5 s (seen under the 500-member load test with 2.0 here: one answer past 3 s).
DEFER_AFTER_SECONDS = 1.5
# Under a burst, answering each request in full would make the later ones wait for all the
# earlier ones: when this many requests are already unanswered, or the interaction already
# waited this long to reach us, it is deferred at once and finishes in its deferred message.
BACKLOG_REQUESTS = 4
BACKLOG_AGE_SECONDS = 0.2
# A request answered early (a deferral) may still be doing its database work; when this many are,
# a new request would queue behind all of it before its answer, so it is deferred at once too.
BACKLOG_BUSY = 8


class FirstResponse:
    unanswered = 0  # requests of this process without a first response yet
    # Requests whose deferral timer has not fired yet: when a burst is recognised, the ones that
    # came first and meant to answer in full are deferred too, or they would be the burst's slowest.
    _timed: set[FirstResponse] = set()
    # Deferrals on their way, and the requests waiting for them before starting their own work.
    _deferring = 0
    _waiting_for_deferrals: list[asyncio.Future[None]] = []
    # Requests still working (answered or not), per event loop: each leaves when its task ends.
    _busy: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = weakref.WeakKeyDictionary()

    def __init__(self, interaction: discord.Interaction, *, defer_after: float = DEFER_AFTER_SECONDS) -> None:
        self.interaction = interaction
        self.deferred = False
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        age = (discord.utils.utcnow() - interaction.created_at).total_seconds()
        loop = asyncio.get_running_loop()
        busy = FirstResponse._busy.get(loop, 0)
        if FirstResponse.unanswered >= BACKLOG_REQUESTS or busy >= BACKLOG_BUSY or age >= BACKLOG_AGE_SECONDS:
            defer_after = 0.0
            for earlier in tuple(FirstResponse._timed):
                earlier._defer_now()
        FirstResponse.unanswered += 1
        self._counted = True
        self._timer = loop.call_later(max(0.0, defer_after - age), self._fire)
        FirstResponse._timed.add(self)
        # discord.py runs each interaction's handler in a task of its own: the request is busy
        # until that task ends, however it ends.
        request = asyncio.current_task()
        if request is not None:
            FirstResponse._busy[loop] = busy + 1
            request.add_done_callback(functools.partial(FirstResponse._request_done, loop))

    @staticmethod
    def _request_done(loop: asyncio.AbstractEventLoop, _: asyncio.Task[Any]) -> None:
        FirstResponse._busy[loop] = max(0, FirstResponse._busy.get(loop, 1) - 1)

    def _answered(self) -> None:
        if self._counted:
            self._counted = False
            FirstResponse.unanswered -= 1

    def _defer_now(self) -> None:
        self._timer.cancel()
        self._fire()

    def _fire(self) -> None:
        FirstResponse._timed.discard(self)
        FirstResponse._deferring += 1
        self._task = asyncio.create_task(self._defer(), name=f"defer-{self.interaction.id}")
        self._task.add_done_callback(FirstResponse._deferral_done)

    @staticmethod
    def _deferral_done(_: asyncio.Task[None]) -> None:
        FirstResponse._deferring -= 1
        if FirstResponse._deferring <= 0:
            waiting, FirstResponse._waiting_for_deferrals = FirstResponse._waiting_for_deferrals, []
            for future in waiting:
                if not future.done():
                    future.set_result(None)

    @staticmethod
    async def answers_first(timeout: float = 1.0) -> None:
        """Before a request's own work, and before the bot's background Discord calls (status
        edits, result posts): in a burst, wait (at most `timeout`) until the deferrals on their
        way are sent. Answering every member within Discord's 3 s comes before anyone's database
        work or result, which would otherwise share the event loop with those HTTP calls."""
        if FirstResponse._deferring <= 0:
            return
        future = asyncio.get_running_loop().create_future()
        FirstResponse._waiting_for_deferrals.append(future)
        try:
            await asyncio.wait([future], timeout=timeout)
        finally:
            if not future.done():  # timed out or cancelled: under steady deferrals the list would only grow
                future.cancel()
                FirstResponse._waiting_for_deferrals.remove(future)

    async def _defer(self) -> None:
        # Once the timer fired the request no longer counts as unanswered, whatever happens here:
        # answered another way (a handler that never calls stop), deferred, or the deferral failed.
        try:
            async with self._lock:
                if self.interaction.response.is_done():
                    return
                try:
                    await self.interaction.response.defer(ephemeral=True, thinking=True)
                    self.deferred = True
                    log.info(
                        "interaction %s deferred: the request took over %.1f s",
                        self.interaction.id,
                        DEFER_AFTER_SECONDS,
                    )
                except discord.HTTPException as exc:
                    log.warning("interaction %s: deferral failed: %s %s", self.interaction.id, exc.status, exc.text)
        finally:
            self._answered()

    def stop(self) -> None:
        self._timer.cancel()
        FirstResponse._timed.discard(self)
        self._answered()

    async def ephemeral(self, text: str, **kwargs: Any) -> None:
        """An ephemeral answer (a refusal, a status): replaces the deferral when there was one."""
        self.stop()
        async with self._lock:
            if self.deferred:
                await self.interaction.edit_original_response(content=text, **kwargs)
            elif self.interaction.response.is_done():
                await self.interaction.followup.send(text, ephemeral=True, **kwargs)
            else:
                await self.interaction.response.send_message(text, ephemeral=True, **kwargs)

    async def public_card(self, text: str, view: discord.ui.View) -> int:
        """The public queue card; returns its message id (the job's status message)."""
        self.stop()
        async with self._lock:
            if not self.deferred:
                response = await self.interaction.response.send_message(text, view=view)
                if response.message_id is not None:
                    return response.message_id
                return (await self.interaction.original_response()).id
            channel: Any = self.interaction.channel
            if channel is None or not hasattr(channel, "send"):
                channel = self.interaction.client.get_partial_messageable(self.interaction.channel_id or 0)
            message = await channel.send(text, view=view)
            await self.interaction.edit_original_response(content=f"Your job is queued: {message.jump_url}")
            return message.id


def first_response(interaction: discord.Interaction) -> FirstResponse:
    """The FirstResponse of this interaction, created on first use (kept in `interaction.extras`)."""
    answer = interaction.extras.get("first_response")
    if answer is None:
        answer = interaction.extras["first_response"] = FirstResponse(interaction)
    return answer


def custom_id_of(interaction: discord.Interaction) -> str:
    """The custom_id of a component click or a modal (empty for a command)."""
    data: dict[str, Any] = dict(interaction.data or {})
    return str(data.get("custom_id") or "")


async def say(interaction: discord.Interaction, text: str, **kwargs: Any) -> None:
    """An ephemeral answer, whether or not the interaction was answered (or deferred) already."""
    text = text[:CONTENT_LIMIT]
    try:
        answer = interaction.extras.get("first_response")
        if answer is not None:
            await answer.ephemeral(text, **kwargs)
        elif interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True, **kwargs)
        else:
            await interaction.response.send_message(text, ephemeral=True, **kwargs)
    except discord.HTTPException as exc:
        log.warning("could not answer interaction %s: %s %s", interaction.id, exc.status, exc.text)


async def guarded(interaction: discord.Interaction, work: Callable[[], Awaitable[None]]) -> None:
    """Run a request's work under its first response: in a burst it starts once the deferrals on
    their way are sent; a refusal (bot.errors) becomes an ephemeral answer; nothing is left
    unanswered, and an unexpected error is logged and told as such (nothing was charged: every
    charge is the last step of a request)."""
    answer = first_response(interaction)
    try:
        await answer.answers_first()
        await work()
    except Exception as exc:
        text = member_text(exc)
        if text is None:
            custom_id = custom_id_of(interaction)
            log.exception(
                "request %s by %s failed (interaction %s)", custom_id or "", interaction.user.id, interaction.id
            )
            text = "Something went wrong on my side. Nothing was charged; please try again."
        await say(interaction, text)
    finally:
        answer.stop()
