"""Showing a job's life in Discord: the status message while it waits and runs, then the result
(bot.results).

Everything is sent with the bot's own token (channel messages), never an interaction token, so a
job that waited longer than the 15-minute interaction lifetime still posts. Status edits are
throttled to one per `EDIT_INTERVAL` seconds per job (the latest state wins). A bot that dies
between "done" and "posted" posts the result after its restart (`deliver_pending`).
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import discord
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from bot.buttons import progress_view
from bot.interactions import FirstResponse
from bot.render import (
    QueueCard,
    cancelled_text,
    done_text,
    failed_text,
    progress_text,
    queue_card,
    starting_text,
)
from bot.results import ResultPoster
from bot.safety import SafetyChecker
from config.settings import SafetySettings
from db.jobs import JobRecord, JobStore
from engine.api import Result
from engine.jobs.events import Cancelled, Done, Failed, JobEvent, ProgressEvent, Queued, Started

log = logging.getLogger(__name__)

# A result discord.py could not post (its own five tries spent on 5xx/429) is posted again later,
# after 2, 4, 8 s: three posts at most, each of them one discord.py request.
POST_TRIES = 3
POST_LATER = wait_exponential(multiplier=1, min=2, max=30)

EDIT_INTERVAL = 2.0
# A queued card further back changes position on every job that finishes or jumps ahead, and
# Discord allows a bot about 50 requests a second in all: its card is edited at most every
# EDIT_INTERVAL × position seconds (position 1: 2 s, position 10: 20 s), never less often than
# QUEUED_EDIT_MAX. A queue of 500 then costs about 6 edits a second instead of 250.
QUEUED_EDIT_MAX = 120.0
CARD_BATCH_SECONDS = 0.02  # how long a queue card's id waits for others to share its write
TERMINAL = (Done, Failed, Cancelled)


def edit_interval(event: JobEvent) -> float:
    """The least time between two edits of a job's status message for this event."""
    if isinstance(event, Queued):
        return min(QUEUED_EDIT_MAX, EDIT_INTERVAL * max(1, event.position))
    return EDIT_INTERVAL


@dataclass
class Tracked:
    record: JobRecord
    status_message_id: int | None = None
    latest: JobEvent | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # Set by every event but a queue move: a long queued throttle ends early once the job
    # starts, and an ending (the result) never waits at all.
    moved_on: asyncio.Event = field(default_factory=asyncio.Event)
    last_edit: float = 0.0
    started: float | None = None
    cancelled_by_moderator: bool = False
    task: asyncio.Task[None] | None = None


class Delivery:
    def __init__(
        self,
        client: discord.Client,
        *,
        jobs: JobStore,
        results: ResultPoster,
        safety: SafetyChecker,
        safety_settings: SafetySettings,
    ) -> None:
        self.client = client
        self.jobs = jobs
        self.results = results
        self.safety = safety
        self.safety_settings = safety_settings
        self._jobs: dict[str, Tracked] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._posting: set[str] = set()
        self._unsaved_cards: dict[str, int] = {}
        self._cards_saved: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ tracking
    def track(self, record: JobRecord) -> Tracked:
        tracked = self._jobs.get(record.id)
        if tracked is None:
            tracked = Tracked(record=record, status_message_id=record.status_message_id)
            self._jobs[record.id] = tracked
            tracked.task = self._spawn(self._follow(tracked), f"follow-{record.id}")
        return tracked

    async def set_status_message(self, job_id: str, message_id: int) -> None:
        tracked = self._jobs.get(job_id)
        if tracked is not None:
            tracked.status_message_id = message_id
            tracked.last_edit = time.monotonic()  # the queue card itself was the last "edit"
            tracked.changed.set()
        await self._save_card(job_id, message_id)

    async def _save_card(self, job_id: str, message_id: int) -> None:
        """Persist a queue card's id. The cards of a burst are written together in one
        transaction (group commit) instead of one write each; every caller still returns only
        once its id is stored."""
        self._unsaved_cards[job_id] = message_id
        if self._cards_saved is None:
            self._cards_saved = asyncio.ensure_future(self._write_cards())
        await asyncio.shield(self._cards_saved)

    async def _write_cards(self) -> None:
        await asyncio.sleep(CARD_BATCH_SECONDS)
        batch, self._unsaved_cards, self._cards_saved = self._unsaved_cards, {}, None
        await self.jobs.set_status_messages(batch)

    def note_cancel_by_moderator(self, job_id: str, by_moderator: bool) -> None:
        tracked = self._jobs.get(job_id)
        if tracked is not None:
            tracked.cancelled_by_moderator = by_moderator

    def on_event(self, event: JobEvent) -> None:
        """The scheduler's listener: must not block, so it only records the latest state."""
        tracked = self._jobs.get(event.job_id)
        if tracked is None:
            record = getattr(event, "record", None)
            if record is None:
                return  # a job of a previous run we have not loaded yet; recovery tracks it
            tracked = self.track(record)
        if isinstance(event, Started):
            tracked.started = time.monotonic()
        if isinstance(event, ProgressEvent) and (event.progress.step == 0 or event.progress.phase == "encode"):
            if event.progress.step == 0:
                tracked.started = time.monotonic()  # a prefetched job waited in the engine until now
            return  # the engine's bookkeeping (started / computed): the card keeps the last step
        if tracked.latest is not None and isinstance(tracked.latest, TERMINAL):
            return
        tracked.latest = event
        tracked.changed.set()
        if not isinstance(event, Queued):
            tracked.moved_on.set()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self, timeout: float) -> None:
        """Let result posts in flight finish (shutdown)."""
        posting = [t for t in self._tasks if t.get_name().startswith("post-")]
        if posting:
            await asyncio.wait(posting, timeout=timeout)
        for task in list(self._tasks):
            task.cancel()

    # ------------------------------------------------------------------ the status message
    async def _follow(self, tracked: Tracked) -> None:
        job_id = tracked.record.id
        try:
            while True:
                await tracked.changed.wait()
                tracked.changed.clear()
                event = tracked.latest
                if isinstance(event, TERMINAL):
                    await self._finish(tracked, event)
                    return
                if tracked.status_message_id is None or event is None:
                    continue
                # Edits wait out the throttle of the latest state; an ending never waits.
                while event is not None and not isinstance(event, TERMINAL):
                    wait = tracked.last_edit + edit_interval(event) - time.monotonic()
                    if wait <= 0:
                        break
                    tracked.moved_on.clear()
                    try:
                        await asyncio.wait_for(tracked.moved_on.wait(), wait)
                    except TimeoutError:
                        pass
                    event = tracked.latest
                if isinstance(event, TERMINAL):
                    await self._finish(tracked, event)
                    return
                tracked.changed.clear()
                await self._edit_status(tracked, event)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job=%s status updates stopped", job_id)
        finally:
            self._jobs.pop(job_id, None)

    async def _edit_status(self, tracked: Tracked, event: JobEvent | None) -> None:
        record = tracked.record
        kwargs: dict[str, Any] = {}
        if isinstance(event, Queued):
            kwargs["content"] = queue_card(
                QueueCard(
                    record.id,
                    record.kind,
                    max(1, event.position),
                    event.eta,
                    record.cost,
                    remaining=None,
                    show_remaining=False,
                )
            )
        elif isinstance(event, Started):
            kwargs["content"] = starting_text(record.id, record.kind)
        elif isinstance(event, ProgressEvent):
            p = event.progress
            elapsed = time.monotonic() - (tracked.started or time.monotonic())
            kwargs["content"] = progress_text(record.id, record.kind, p.step, p.total, p.phase, elapsed)
            if p.preview:
                if await self._preview_is_safe(record, p.preview):
                    kwargs["attachments"] = [discord.File(io.BytesIO(p.preview), filename="preview.jpg")]
                else:
                    kwargs["attachments"] = []  # and drop an earlier preview too
        else:
            return
        tracked.last_edit = time.monotonic()
        await self._edit(record, tracked.status_message_id, view=progress_view(record.id), **kwargs)

    async def _preview_is_safe(self, record: JobRecord, preview: bytes) -> bool:
        """Previews get the same check as results: a 64–128 px preview of an explicit image is
        explicit too (nudenet flags it at that size). A flagged one is left out of the progress
        message outside age-restricted channels, whatever the action (~0.02 s, ≤ 1 per 2 s a job)."""
        if not self.safety_settings.enabled or await self.results.age_restricted(record.channel_id):
            return True
        verdict = await self.safety.check(preview)
        if verdict.explicit:
            log.info("job=%s preview withheld (%s)", record.id, ", ".join(verdict.labels) or verdict.error)
        return not verdict.explicit

    async def _edit(self, record: JobRecord, message_id: int | None, **kwargs: Any) -> bool:
        if message_id is None:
            return False
        await FirstResponse.answers_first()
        message = self.client.get_partial_messageable(record.channel_id).get_partial_message(message_id)
        try:
            await message.edit(**kwargs)
            return True
        except discord.NotFound:
            log.info("job=%s status message %s is gone", record.id, message_id)
        except discord.HTTPException as exc:
            log.warning("job=%s status edit failed: %s %s", record.id, exc.status, exc.text)
        return False

    # ------------------------------------------------------------------ endings
    async def _finish(self, tracked: Tracked, event: JobEvent) -> None:
        record = getattr(event, "record", tracked.record)
        message_id = tracked.status_message_id or record.status_message_id
        if isinstance(event, Done):
            await self.post_result(record, event.result, status_message_id=message_id)
        elif isinstance(event, Failed):
            await self._edit(
                record,
                message_id,
                content=failed_text(record.id, event.error, record.cost),
                view=None,
                attachments=[],
            )
        elif isinstance(event, Cancelled):
            text = cancelled_text(record.id, record.cost, tracked.cancelled_by_moderator)
            await self._edit(record, message_id, content=text, view=None, attachments=[])

    async def post_result(
        self, record: JobRecord, result: Result | None, *, status_message_id: int | None
    ) -> discord.Message | None:
        """Post a finished job's result. discord.py retries a 5xx or 429 itself; when it gives up,
        the post is not retried around it at once but tried again later (POST_LATER waits, as a
        restart's pending posts are), and only then does the status message point to `/job`."""
        if record.id in self._posting:
            return None
        self._posting.add(record.id)
        message = None
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(POST_TRIES),
                wait=POST_LATER,
                retry=retry_if_exception_type(discord.HTTPException),
                reraise=True,
            ):
                with attempt:
                    message = await self.results.send(record, result, status_message_id=status_message_id)
        except discord.HTTPException as exc:
            log.warning("job=%s posting failed %d times: %s %s", record.id, POST_TRIES, exc.status, exc.text)
        finally:
            self._posting.discard(record.id)
        if message is None:
            await self._edit(
                record,
                status_message_id,
                content=f"Done · Job `{record.id}`, but I could not post the images here. Use `/job {record.id}`.",
                view=None,
                attachments=[],
            )
            return None
        await self._edit(
            record, status_message_id, content=done_text(record.id, message.jump_url), view=None, attachments=[]
        )
        return message

    async def deliver_pending(self) -> None:
        """Post results of jobs that finished but were never posted (the bot died in between)."""
        await self.client.wait_until_ready()
        for record in await self.jobs.list_by_status(["done"]):
            if record.result_message_id is None and record.images:
                # Read it again: this run may have posted it since the list was read.
                current = await self.jobs.get(record.id)
                if current is None or current.result_message_id is not None:
                    continue
                log.info("job=%s posting a result left unposted by the previous run", record.id)
                await self.post_result(record, None, status_message_id=record.status_message_id)
