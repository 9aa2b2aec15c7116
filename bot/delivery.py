"""Showing a job's life in Discord: the status message while it waits and runs, then the result.

Everything is sent with the bot's own token (channel messages), never an interaction token, so a
job that waited longer than the 15-minute interaction lifetime still posts. Status edits are
throttled to one per `EDIT_INTERVAL` seconds per job (the latest state wins). Images are saved to
the output folder before the job is marked done, so a bot that dies between "done" and "posted"
posts the result after its restart (`deliver_pending`).
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import discord

from bot.answer import FirstResponse
from bot.render import (
    QueueCard,
    cancelled_text,
    done_text,
    failed_text,
    progress_text,
    queue_card,
    result_embed,
    starting_text,
)
from bot.safety import Decision, decide
from bot.scheduler import Cancelled, Done, Failed, JobEvent, ProgressEvent, Queued, Started
from bot.storage import StorageError
from bot.views import progress_view, result_view
from db.jobs import JobRecord
from engine.spec import ImageOut, Result

if TYPE_CHECKING:
    from bot.app import AtelierBot
    from bot.services import Services

log = logging.getLogger(__name__)

EDIT_INTERVAL = 2.0
# A queued card further back changes position on every job that finishes or jumps ahead, and
# Discord allows a bot about 50 requests a second in all: its card is edited at most every
# EDIT_INTERVAL × position seconds (position 1: 2 s, position 10: 20 s), never less often than
# QUEUED_EDIT_MAX. A queue of 500 then costs about 6 edits a second instead of 250.
QUEUED_EDIT_MAX = 120.0
POST_ATTEMPTS = 4
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
    def __init__(self, bot: AtelierBot, services: Services) -> None:
        self.bot = bot
        self.services = services
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
        await self.services.jobs.set_status_messages(batch)

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
                while not isinstance(event, TERMINAL):
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
        if not self.services.settings.safety.enabled or await self._age_restricted(record.channel_id):
            return True
        verdict = await self.services.safety.check(preview)
        if verdict.explicit:
            log.info("job=%s preview withheld (%s)", record.id, ", ".join(verdict.labels) or verdict.error)
        return not verdict.explicit

    async def _edit(self, record: JobRecord, message_id: int | None, **kwargs: Any) -> bool:
        if message_id is None:
            return False
        await FirstResponse.answers_first()
        message = self.bot.get_partial_messageable(record.channel_id).get_partial_message(message_id)
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

    async def store_images(self, record: JobRecord, result: Result) -> list[dict[str, Any]]:
        """The scheduler's hook before `mark_done`: keep the images on disk for buttons and /job.
        A full disk does not fail the job: the result is still posted from memory."""
        stored = []
        for index, image in enumerate(result.images):
            entry: dict[str, Any] = {
                "seed": image.seed,
                "format": image.format,
                "width": image.width,
                "height": image.height,
                "bytes": len(image.data),
            }
            try:
                entry["path"] = str(await asyncio.to_thread(self.services.outputs.save, record.id, index, image))
            except StorageError as exc:
                log.error("job=%s %s", record.id, exc)
            stored.append(entry)
        return stored

    async def post_result(
        self, record: JobRecord, result: Result | None, *, status_message_id: int | None
    ) -> discord.Message | None:
        if record.id in self._posting:
            return None
        self._posting.add(record.id)
        try:
            return await self._post_result(record, result, status_message_id)
        finally:
            self._posting.discard(record.id)

    async def _post_result(
        self, record: JobRecord, result: Result | None, status_message_id: int | None
    ) -> discord.Message | None:
        await FirstResponse.answers_first()  # a result can wait for a burst's deferrals
        images = result.images if result is not None else await self._stored_images(record)
        seconds = result.seconds if result is not None else (record.seconds or 0.0)
        # guild_id makes message.jump_url a real link (discord.com/channels/<guild>/...), not @me
        channel = self.bot.get_partial_messageable(record.channel_id, guild_id=record.guild_id)
        age_restricted = await self._age_restricted(record.channel_id)
        files, notice = await self._files(record, images, age_restricted)
        embed = self._embed(record, images, seconds, notice)
        reference = None
        if status_message_id is not None:
            reference = discord.MessageReference(
                message_id=status_message_id, channel_id=record.channel_id, fail_if_not_exists=False
            )
        message = None
        for attempt in range(1, POST_ATTEMPTS + 1):
            try:
                for file in files:
                    file.reset()
                message = await channel.send(
                    content=f"<@{record.owner_id}>",
                    embed=embed,
                    files=files,
                    view=result_view(record.id, len(images)),
                    reference=reference,
                    allowed_mentions=discord.AllowedMentions(users=True, replied_user=False),
                )
                break
            except discord.Forbidden:
                log.error("job=%s not allowed to post in channel %s", record.id, record.channel_id)
                break
            except discord.HTTPException as exc:
                log.warning("job=%s posting failed (attempt %d): %s %s", record.id, attempt, exc.status, exc.text)
                if exc.status < 500 and exc.status != 429:
                    break
                await asyncio.sleep(min(8.0, 0.5 * 2**attempt))
        if message is None:
            await self._edit(
                record,
                status_message_id,
                content=f"Done · Job `{record.id}`, but I could not post the images here. Use `/job {record.id}`.",
                view=None,
                attachments=[],
            )
            return None
        log.info("job=%s event=posted message=%s channel=%s", record.id, message.id, record.channel_id)
        await self._remember_post(record, message)
        await self._edit(
            record,
            status_message_id,
            content=done_text(record.id, message.jump_url),
            view=None,
            attachments=[],
        )
        return message

    async def _remember_post(self, record: JobRecord, message: discord.Message) -> None:
        images = [dict(i) for i in record.images]
        by_name = {a.filename: a.url for a in message.attachments}
        for index, entry in enumerate(images):
            url = by_name.get(_filename(record.id, index, entry.get("format", "png")))
            if url:
                entry["url"] = url
        await self.services.jobs.record_post(record.id, message.id, images)

    async def _stored_images(self, record: JobRecord) -> list[ImageOut]:
        images = []
        for entry in record.images:
            data = None
            if entry.get("path"):
                data = await asyncio.to_thread(self.services.outputs.read, entry["path"])
            if data is None and entry.get("url"):
                try:
                    data = await self.bot.http.get_from_cdn(entry["url"])
                except discord.HTTPException:
                    data = None
            if data is not None:
                images.append(
                    ImageOut(
                        data,
                        entry.get("format", "png"),
                        entry.get("seed", 0),
                        entry.get("width", 0),
                        entry.get("height", 0),
                    )
                )
        return images

    async def _age_restricted(self, channel_id: int) -> bool:
        channel = self.bot.get_channel(channel_id)
        if channel is None:
            try:
                channel = await self.bot.fetch_channel(channel_id)
            except discord.HTTPException:
                return False
        return bool(getattr(channel, "is_nsfw", lambda: False)())

    async def _files(
        self, record: JobRecord, images: list[ImageOut], age_restricted: bool
    ) -> tuple[list[discord.File], str]:
        files, withheld, spoilered = [], 0, 0
        for index, image in enumerate(images):
            verdict = await self.services.safety.check(image.data)
            decision = decide(verdict, channel_age_restricted=age_restricted, settings=self.services.settings.safety)
            if decision is Decision.WITHHOLD:
                withheld += 1
                log.info("job=%s image %d withheld (%s)", record.id, index + 1, ", ".join(verdict.labels))
                continue
            spoiler = decision is Decision.SPOILER
            spoilered += spoiler
            files.append(
                discord.File(
                    io.BytesIO(image.data),
                    filename=_filename(record.id, index, image.format),
                    spoiler=spoiler,
                )
            )
        notes = []
        if withheld:
            notes.append(f"{withheld} image(s) withheld: flagged as explicit, and this channel is not age-restricted.")
        if spoilered:
            notes.append(f"{spoilered} image(s) flagged as explicit are hidden behind a spoiler.")
        return files, " ".join(notes)

    def _embed(self, record: JobRecord, images: list[ImageOut], seconds: float, notice: str) -> discord.Embed:
        p = record.params
        size = (images[0].width, images[0].height) if images else tuple(p.get("input_size") or (0, 0))
        return result_embed(
            job_id=record.id,
            kind=record.kind,
            prompt=str(p.get("prompt", "")),
            negative=str(p.get("negative", "")),
            seeds=[image.seed for image in images] or record.seeds,
            model=str(p.get("model", "")),
            sampler=str(p.get("sampler", "")),
            steps=int(p.get("steps", 0)),
            cfg=float(p.get("cfg", 0)),
            size=size,  # type: ignore[arg-type]
            seconds=seconds,
            requested_by=self._display_name(record),
            strength=p.get("strength"),
            notice=notice,
        )

    def _display_name(self, record: JobRecord) -> str | None:
        """The owner's name for the embed footer (footers show no mentions: `<@id>` stays raw)."""
        guild = self.bot.get_guild(record.guild_id) if record.guild_id else None
        user = (guild.get_member(record.owner_id) if guild else None) or self.bot.get_user(record.owner_id)
        return user.display_name if user is not None else None

    # ------------------------------------------------------------------ re-posting and recovery
    async def repost(self, interaction: discord.Interaction, record: JobRecord) -> None:
        from bot.requests import Refused

        images = await self._stored_images(record)
        if not images:
            raise Refused(f"The images of job `{record.id}` are no longer available.")
        # Judged by the channel it is re-posted in, not the one the job was made in.
        age_restricted = await self._age_restricted(interaction.channel_id) if interaction.channel_id else False
        files, notice = await self._files(record, images, age_restricted)
        await interaction.followup.send(
            embed=self._embed(record, images, record.seconds or 0.0, notice),
            files=files,
            view=result_view(record.id, len(images)),
        )

    async def deliver_pending(self) -> None:
        """Post results of jobs that finished but were never posted (the bot died in between)."""
        await self.bot.wait_until_ready()
        for record in await self.services.jobs.list_by_status(["done"]):
            if record.result_message_id is None and record.images:
                # Read it again: this run may have posted it since the list was read.
                current = await self.services.jobs.get(record.id)
                if current is None or current.result_message_id is not None:
                    continue
                log.info("job=%s posting a result left unposted by the previous run", record.id)
                await self.post_result(record, None, status_message_id=record.status_message_id)


def _filename(job_id: str, index: int, fmt: str) -> str:
    return f"{job_id}-{index + 1}.{'jpg' if fmt == 'jpeg' else fmt}"
