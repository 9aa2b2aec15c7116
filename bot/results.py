"""A finished job's result message: its images (each checked by the safety classifier), the embed
with everything needed to redo it, and the buttons.

Images are saved to the output folder before the job is marked done (`store_images`), so a bot
that dies between "done" and "posted" can still post the result after its restart, and `/job`
can post it again later (from disk, or from Discord's copy once the file is pruned).
"""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Any

import discord

from bot.buttons import result_view
from bot.errors import Refused
from bot.interactions import FirstResponse
from bot.render import result_embed, styling_fields
from bot.safety import Decision, SafetyChecker, decide
from bot.storage import CONTROL, OutputStore, StorageError, control_entry, result_images
from config.settings import Settings
from db.jobs import JobRecord, JobStore
from engine.api import ImageOut, Result
from engine.jobs import ImageJob, load_order

log = logging.getLogger(__name__)


def worth_posting_again(exc: discord.HTTPException) -> bool:
    """A 5xx or 429 that discord.py's own retries (five tries, shared by both) did not get past."""
    return exc.status >= 500 or exc.status == 429


class ResultPoster:
    def __init__(
        self,
        client: discord.Client,
        *,
        settings: Settings,
        jobs: JobStore,
        safety: SafetyChecker,
        outputs: OutputStore,
    ) -> None:
        self.client = client
        self.settings = settings
        self.jobs = jobs
        self.safety = safety
        self.outputs = outputs

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
                entry["path"] = str(await asyncio.to_thread(self.outputs.save, record.id, index, image))
            except StorageError as exc:
                log.error("job=%s %s", record.id, exc)
            stored.append(entry)
        if result.control is not None:  # the map a ControlNet followed, kept for /job too
            control = result.control
            entry = {"role": CONTROL, "format": control.format, "width": control.width, "height": control.height}
            try:
                entry["path"] = str(await asyncio.to_thread(self.outputs.save_control, record.id, control))
            except StorageError as exc:
                log.error("job=%s %s", record.id, exc)
            stored.append(entry)
        return stored

    async def send(
        self, record: JobRecord, result: Result | None, *, status_message_id: int | None
    ) -> discord.Message | None:
        """Post the result in the job's channel with the bot's token (it outlives the 15-minute
        interaction token). None when Discord refuses it for good (no permission, a bad request); a
        5xx or 429 that discord.py's own retries did not get past is raised, for a later try."""
        await FirstResponse.answers_first()  # a result can wait for a burst's deferrals
        images = result.images if result is not None else await self.stored_images(record)
        control = result.control if result is not None else await self.stored_control(record)
        seconds = result.seconds if result is not None else (record.seconds or 0.0)
        # guild_id makes message.jump_url a real link (discord.com/channels/<guild>/...), not @me
        channel = self.client.get_partial_messageable(record.channel_id, guild_id=record.guild_id)
        age_restricted = await self.age_restricted(record.channel_id)
        files, notice = await self._files(record, images, age_restricted)
        map_file = await self._control_file(record, control, age_restricted)
        extra: dict[str, Any] = {}
        if status_message_id is not None:
            extra["reference"] = discord.MessageReference(
                message_id=status_message_id, channel_id=record.channel_id, fail_if_not_exists=False
            )
        try:
            message = await channel.send(
                content=f"<@{record.owner_id}>",
                embed=self.embed(record, images, seconds, notice, map_file),
                files=files + ([map_file] if map_file is not None else []),
                view=result_view(record.id, len(images)),
                allowed_mentions=discord.AllowedMentions(users=True, replied_user=False),
                **extra,
            )
        except discord.Forbidden:
            log.error("job=%s not allowed to post in channel %s", record.id, record.channel_id)
            return None
        except discord.HTTPException as exc:
            if worth_posting_again(exc):
                raise
            log.warning("job=%s posting failed: %s %s", record.id, exc.status, exc.text)
            return None
        log.info("job=%s event=posted message=%s channel=%s", record.id, message.id, record.channel_id)
        await self._remember_post(record, message)
        return message

    async def repost(self, interaction: discord.Interaction, record: JobRecord) -> None:
        """`/job`: the result again, as a follow-up of the (deferred) interaction."""
        images = await self.stored_images(record)
        if not images:
            raise Refused(f"The images of job `{record.id}` are no longer available.")
        # Judged by the channel it is re-posted in, not the one the job was made in.
        age_restricted = await self.age_restricted(interaction.channel_id) if interaction.channel_id else False
        files, notice = await self._files(record, images, age_restricted)
        map_file = await self._control_file(record, await self.stored_control(record), age_restricted)
        await interaction.followup.send(
            embed=self.embed(record, images, record.seconds or 0.0, notice, map_file),
            files=files + ([map_file] if map_file is not None else []),
            view=result_view(record.id, len(images)),
        )

    async def _remember_post(self, record: JobRecord, message: discord.Message) -> None:
        images = [dict(i) for i in record.images]
        by_name = {a.filename: a.url for a in message.attachments}
        for index, entry in enumerate(images):
            fmt = entry.get("format", "png")
            name = control_filename(record.id, fmt) if entry.get("role") == CONTROL else filename(record.id, index, fmt)
            url = by_name.get(name)
            if url:
                entry["url"] = url
        await self.jobs.record_post(record.id, message.id, images)

    async def stored_images(self, record: JobRecord) -> list[ImageOut]:
        images = []
        for entry in result_images(record.images):
            data = await self._stored_bytes(entry)
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

    async def stored_control(self, record: JobRecord) -> ImageOut | None:
        """The control map a finished ControlNet job followed, from disk or from Discord."""
        entry = control_entry(record.images)
        data = await self._stored_bytes(entry) if entry is not None else None
        if entry is None or data is None:
            return None
        return ImageOut(data, entry.get("format", "png"), 0, entry.get("width", 0), entry.get("height", 0))

    async def _stored_bytes(self, entry: dict[str, Any]) -> bytes | None:
        data = None
        if entry.get("path"):
            data = await asyncio.to_thread(self.outputs.read, entry["path"])
        if data is None and entry.get("url"):
            # The file was pruned: the image is still on Discord.
            try:
                data = await self.client.http.get_from_cdn(entry["url"])
            except discord.HTTPException:
                data = None
        return data

    async def age_restricted(self, channel_id: int) -> bool:
        channel = self.client.get_channel(channel_id)
        if channel is None:
            try:
                channel = await self.client.fetch_channel(channel_id)
            except discord.HTTPException:
                return False
        return bool(getattr(channel, "is_nsfw", lambda: False)())

    async def _files(
        self, record: JobRecord, images: list[ImageOut], age_restricted: bool
    ) -> tuple[list[discord.File], str]:
        files, withheld, spoilered = [], 0, 0
        for index, image in enumerate(images):
            verdict = await self.safety.check(image.data)
            decision = decide(verdict, channel_age_restricted=age_restricted, settings=self.settings.safety)
            if decision is Decision.WITHHOLD:
                withheld += 1
                log.info("job=%s image %d withheld (%s)", record.id, index + 1, ", ".join(verdict.labels))
                continue
            spoiler = decision is Decision.SPOILER
            spoilered += spoiler
            files.append(
                discord.File(io.BytesIO(image.data), filename=filename(record.id, index, image.format), spoiler=spoiler)
            )
        notes = []
        if withheld:
            notes.append(f"{withheld} image(s) withheld: flagged as explicit, and this channel is not age-restricted.")
        if spoilered:
            notes.append(f"{spoilered} image(s) flagged as explicit are hidden behind a spoiler.")
        return files, " ".join(notes)

    async def _control_file(
        self, record: JobRecord, control: ImageOut | None, age_restricted: bool
    ) -> discord.File | None:
        """The control map as an attachment (the embed shows it as its thumbnail). It is made from
        the member's upload, which nobody else has seen: it passes the same safety check."""
        if control is None:
            return None
        verdict = await self.safety.check(control.data)
        decision = decide(verdict, channel_age_restricted=age_restricted, settings=self.settings.safety)
        if decision is Decision.WITHHOLD:
            log.info("job=%s control map withheld (%s)", record.id, ", ".join(verdict.labels))
            return None
        name = control_filename(record.id, control.format)
        return discord.File(io.BytesIO(control.data), filename=name, spoiler=decision is Decision.SPOILER)

    def embed(
        self,
        record: JobRecord,
        images: list[ImageOut],
        seconds: float,
        notice: str,
        control: discord.File | None = None,
    ) -> discord.Embed:
        order = load_order(record.kind, record.params, job_id=record.id)
        job = order.spec
        size = (images[0].width, images[0].height) if images else order.input_size or (0, 0)
        return result_embed(
            job_id=record.id,
            kind=record.kind,
            prompt=order.typed if order.typed is not None else job.prompt,  # the member's own words
            negative=job.negative,
            seeds=[image.seed for image in images] or record.seeds,
            model=job.model,
            sampler=job.sampler,
            steps=job.steps,
            cfg=job.cfg,
            size=size,
            seconds=seconds,
            requested_by=self._display_name(record),
            strength=job.strength if isinstance(job, ImageJob) else None,
            details={
                **job.result_fields(),
                **styling_fields(
                    loras=job.loras, prompt=job.prompt, negative=job.negative, style=job.style, draft=job.draft
                ),
            },
            notice=notice,
            # A spoilered map stays a spoiler: a thumbnail would show it uncovered.
            thumbnail=control.filename if control is not None and not control.spoiler else None,
        )

    def _display_name(self, record: JobRecord) -> str | None:
        """The owner's name for the embed footer (footers show no mentions: `<@id>` stays raw)."""
        guild = self.client.get_guild(record.guild_id) if record.guild_id else None
        user = (guild.get_member(record.owner_id) if guild else None) or self.client.get_user(record.owner_id)
        return user.display_name if user is not None else None


def filename(job_id: str, index: int, fmt: str) -> str:
    return f"{job_id}-{index + 1}.{'jpg' if fmt == 'jpeg' else fmt}"


def control_filename(job_id: str, fmt: str) -> str:
    return f"{job_id}-{CONTROL}.{'jpg' if fmt == 'jpeg' else fmt}"


__all__ = ["ResultPoster", "control_filename", "filename"]
