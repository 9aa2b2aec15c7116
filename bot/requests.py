"""Turning commands and clicks into jobs, and everything a member asks about their jobs.

One path for every way a job starts (slash command or button): the cheap refusals first (the
bot restarting, the member's cooldown, DMs, channel permissions, bans, the blocklist, the queue's
caps, and for an attachment the quota at the size Discord reports), and only then the work:
download and decode an attachment (a few at a time), price, reserve quota and persist in one
transaction, enqueue, answer with the queue card. Each step that can refuse does so before
anything is charged, with an ephemeral message saying what to change, so a banned or over-quota
member can never make the bot download or decode anything. Nothing here waits on the engine, so
the first response always comes within Discord's 3 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import discord
from cachetools import TTLCache
from discord import app_commands

from bot.answer import first_response
from bot.fairqueue import QueueFull
from bot.permissions import is_moderator, is_operator, role_ids
from bot.render import (
    CONTENT_LIMIT,
    KIND_NAMES,
    QueueCard,
    QuotaView,
    duration,
    queue_card,
    quota_text,
    units,
)
from bot.storage import StorageError
from bot.views import progress_view
from db.ids import new_job_id, normalize_job_id
from db.jobs import JobRecord
from db.moderation import EVERYWHERE
from db.quotas import Refusal
from engine import validate
from engine.cost import cost_units
from engine.spec import JOB_KINDS, Job, Refine, Text2Img, Upscale, Variations
from engine.validate import ValidationFailed

if TYPE_CHECKING:
    from bot.app import AtelierBot
    from bot.services import Services

log = logging.getLogger(__name__)

DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024
ATTACHMENT_FETCH_SECONDS = 2.0
MAX_SEED = 2**32 - 1
INTAKE_CONCURRENCY = 4
# Attachments downloaded and decoded at once: each can be tens of megabytes of pixels.
DECODE_CONCURRENCY = 2


class Refused(Exception):
    """A request that is refused with a message for the member; nothing has been charged."""


class MemberCooldown:
    """At most `uses` job requests per member per `seconds` (a token bucket per member, kept only
    while it matters)."""

    def __init__(self, uses: int, seconds: float) -> None:
        self.uses, self.seconds = uses, seconds
        self._buckets: TTLCache[int, app_commands.Cooldown] = TTLCache(maxsize=100_000, ttl=seconds)

    def check(self, user_id: int) -> None:
        if self.uses <= 0:
            return
        bucket = self._buckets.get(user_id)
        if bucket is None:
            bucket = self._buckets[user_id] = app_commands.Cooldown(self.uses, self.seconds)
        retry_after = bucket.update_rate_limit()
        if retry_after:
            raise Refused(
                f"Slow down: you can start {self.uses} jobs every {self.seconds:g} s. "
                f"Try again in {max(1, round(retry_after))} s."
            )


def _random_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


def build_engine_job(record: JobRecord, inputs_dir: Path) -> Job:
    """The engine job for a stored record (the scheduler's job_factory)."""
    input_name = record.params.get("input")
    image = (inputs_dir / input_name).read_bytes() if input_name else None
    return _job_from_params(JOB_KINDS[record.kind], record.params, image, job_id=record.id)


class JobRequests:
    def __init__(self, bot: AtelierBot, services: Services, *, inputs_dir: Path) -> None:
        self.bot = bot
        self.services = services
        self.settings = bot.settings
        self.inputs_dir = inputs_dir
        self._intake = asyncio.Semaphore(INTAKE_CONCURRENCY)
        self._decoding = asyncio.Semaphore(DECODE_CONCURRENCY)
        discord_settings = bot.settings.discord
        self._cooldown = MemberCooldown(discord_settings.cooldown_uses, discord_settings.cooldown_seconds)

    # ------------------------------------------------------------------ answers
    async def _say(self, interaction: discord.Interaction, text: str, **kwargs: Any) -> None:
        """An ephemeral answer, whether or not the interaction was answered already."""
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

    # ------------------------------------------------------------------ slash commands
    async def generate(self, interaction: discord.Interaction, **options: Any) -> None:
        await self._guarded(interaction, self._generate, options)

    async def refine_attachment(self, interaction: discord.Interaction, **options: Any) -> None:
        await self._guarded(interaction, self._image_command, {"kind": "refine", **options})

    async def variations_attachment(self, interaction: discord.Interaction, **options: Any) -> None:
        await self._guarded(interaction, self._image_command, {"kind": "variations", **options})

    async def _guarded(self, interaction: discord.Interaction, handler: Any, options: dict[str, Any]) -> None:
        answer = first_response(interaction)
        try:
            await answer.answers_first()
            await handler(interaction, **options)
        except (Refused, ValidationFailed, QueueFull) as exc:
            await self._say(interaction, str(exc))
        finally:
            answer.stop()

    async def _generate(
        self,
        interaction: discord.Interaction,
        *,
        prompt: str,
        negative: str | None,
        aspect: str | None,
        steps: int | None,
        cfg: float | None,
        seed: int | None,
        sampler: str | None,
        count: int | None,
        model: str | None,
        refiner: bool | None,
    ) -> None:
        gen = self.settings.generation
        aspects = gen.aspect_sizes()
        width, height = validate.check_aspect(aspect if aspect is not None else next(iter(aspects)), aspects)
        model_name = await self._model(interaction, model)
        has_refiner = bool(self.settings.models[model_name].refiner)
        if refiner and not has_refiner:
            raise Refused(f"The model `{model_name}` has no refiner: leave `refiner` out or set it to False.")
        count = validate.check_count(count if count is not None else 1)
        job = Text2Img(
            job_id="pending",
            prompt=validate.check_prompt(prompt, max_chars=gen.max_prompt_chars),
            negative=validate.check_negative(negative, max_chars=gen.max_prompt_chars),
            width=width,
            height=height,
            steps=validate.check_steps(steps if steps is not None else gen.default_steps),
            cfg=validate.check_cfg(cfg if cfg is not None else gen.default_cfg),
            seed=validate.check_seed(seed) if seed is not None else _random_seed(),
            sampler=validate.check_sampler(sampler or gen.default_sampler),
            count=count,
            model=model_name,
            refiner=has_refiner if refiner is None else refiner,
            max_image_bytes=self._image_byte_limit(interaction, count),
        )
        await self._precheck(interaction, job.prompt, job.negative)
        params = _params(job)
        params["aspect"] = aspect or next(iter(aspects))
        await self._submit(interaction, job, params)

    async def _image_command(
        self,
        interaction: discord.Interaction,
        *,
        kind: str,
        attachment: discord.Attachment,
        prompt: str | None,
        strength: float | None,
        model: str | None,
        count: int | None = None,
    ) -> None:
        gen = self.settings.generation
        prompt_text = validate.check_prompt(prompt, max_chars=gen.max_prompt_chars, required=False)
        model_name = await self._model(interaction, model)
        await self._precheck(interaction, prompt_text)
        # By what Discord reports, before downloading anything (the bytes are checked again).
        validate.check_attachment_size(attachment.size, max_bytes=gen.max_attachment_bytes)
        if attachment.width and attachment.height and attachment.width * attachment.height > gen.max_attachment_pixels:
            raise Refused(
                f"The image is {attachment.width}×{attachment.height}; attach one of at most "
                f"{gen.max_attachment_pixels / 1e6:.0f} megapixels."
            )
        common: dict[str, Any] = {
            "job_id": "pending",
            "prompt": prompt_text,
            "steps": gen.default_steps,
            "cfg": gen.default_cfg,
            "seed": _random_seed(),
            "sampler": gen.default_sampler,
            "model": model_name,
            "image": b"",
        }
        job: Job
        if kind == "refine":
            job = Refine(strength=validate.check_strength(strength if strength is not None else 0.3), **common)
        else:
            number = validate.check_count(count if count is not None else 4)
            job = Variations(
                strength=validate.check_strength(strength if strength is not None else 0.6),
                count=number,
                max_image_bytes=self._image_byte_limit(interaction, number),
                **common,
            )
        # Every input is worked at about a megapixel whatever its size (validate.fit_size): when
        # Discord does not report the size, a square prices it within a few percent.
        reported = (attachment.width, attachment.height) if attachment.width and attachment.height else (1, 1)
        expected = validate.input_work_size(*reported)
        await self._check_quota(interaction, cost_units(job, input_size=expected))
        async with self._decoding:
            try:
                data = await asyncio.wait_for(attachment.read(), ATTACHMENT_FETCH_SECONDS)
            except (TimeoutError, discord.HTTPException):
                raise Refused("I could not download your image in time: try again, or attach a smaller file.") from None
            png, size = await self._prepare(data, upscale=False)
        job = replace(job, image=png)
        params = {**_params(job), "input_url": attachment.url}
        await self._submit(interaction, job, params, input_png=png, input_size=size)

    async def _prepare(self, data: bytes, *, upscale: bool) -> tuple[bytes, tuple[int, int]]:
        gen = self.settings.generation
        return await asyncio.to_thread(
            validate.prepare_input_image,
            data,
            max_bytes=gen.max_attachment_bytes,
            max_pixels=gen.max_attachment_pixels,
            upscale_factor=2 if upscale else None,
            upscale_max_side=gen.upscale_max_side,
        )

    async def _model(self, interaction: discord.Interaction, requested: str | None) -> str:
        if requested:
            if requested not in self.settings.models:
                raise Refused(self.services.unknown_model_text(requested))
            return requested
        mine = await self.services.moderation.get_user_default_model(interaction.user.id)
        if mine in self.settings.models:
            return mine
        return await self.services.server_default_model(interaction.guild_id)

    def _image_byte_limit(self, interaction: discord.Interaction, count: int) -> int:
        """Each image's share of the upload limit (all images go in one message), with room for the
        multipart overhead."""
        limit = DEFAULT_UPLOAD_LIMIT
        if interaction.guild is not None:
            limit = interaction.guild.filesize_limit
        limit = min(limit, getattr(interaction, "attachment_size_limit", None) or limit)
        return max(64 * 1024, (limit - 64 * 1024) // max(1, count))

    # ------------------------------------------------------------------ the one path into the queue
    async def _submit(
        self,
        interaction: discord.Interaction,
        job: Job,
        params: dict[str, Any],
        *,
        input_png: bytes | None = None,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        # Bounded: a burst is admitted a few requests at a time, in arrival order, instead of all
        # of them interleaving on SQLite's single writer and finishing together at the end.
        async with self._intake:
            record, text = await self._admit(interaction, job, params, input_png=input_png, input_size=input_size)
        self.services.delivery.track(record)
        try:
            message_id = await first_response(interaction).public_card(text, progress_view(record.id))
        except discord.HTTPException as exc:
            # The job is queued and will post its result in the channel anyway.
            log.warning("job=%s queue card not sent: %s %s", record.id, exc.status, exc.text)
            return
        try:
            await self.services.delivery.set_status_message(record.id, message_id)
        except Exception:
            # The member has their card and the job is queued; only after a restart would the
            # card no longer be edited (the result is posted all the same).
            log.warning("job=%s queue card id not saved", record.id, exc_info=True)
        log.info("job=%s accepted kind=%s user=%s cost=%.2f", record.id, job.kind, interaction.user.id, record.cost)

    async def _admit(
        self,
        interaction: discord.Interaction,
        job: Job,
        params: dict[str, Any],
        *,
        input_png: bytes | None,
        input_size: tuple[int, int] | None,
    ) -> tuple[JobRecord, str]:
        """Every check, the price, the quota reservation and the job row; returns the queued
        record and its queue card text. Raises Refused (nothing charged) instead."""
        services = self.services
        guild_id, user = interaction.guild_id, interaction.user
        moderator = await is_moderator(interaction)
        priority = moderator or bool(set(role_ids(interaction)) & set(self.settings.discord.priority_roles))
        band = 0 if priority else 1
        cost = cost_units(job, input_size=input_size)
        services.scheduler.check_admission(user.id, band)
        job_id = new_job_id()
        exempt = moderator and self.settings.quota.moderators_exempt
        input_path = None
        if input_png is not None:
            # Written before the job exists, so the engine never sees a job without its image.
            try:
                input_path = await asyncio.to_thread(services.outputs.save_input, job_id, input_png)
            except StorageError as exc:
                log.error("job=%s %s", job_id, exc)
                raise Refused("I cannot store your image right now. Try again in a while.") from None
            params = {**params, "input": input_path.name, "input_size": list(input_size or (0, 0))}
        # Quota reservation and the job row are one transaction: no charge without its job.
        admitted = await services.jobs.enqueue(
            services.quotas,
            job_id=job_id,
            kind=job.kind,
            owner_id=user.id,
            guild_id=guild_id,
            channel_id=interaction.channel_id or 0,
            params=params,
            cost=cost,
            band=band,
            role_ids=role_ids(interaction),
            exempt=exempt,
            interaction_id=interaction.id,
        )
        if isinstance(admitted, Refusal):
            if input_path is not None:
                services.outputs.drop_input(job_id)
            services.metrics.quota_refused(admitted.reason, guild_id)
            raise Refused(_quota_refusal(admitted, cost))
        record, reservation = admitted
        try:
            position = await services.scheduler.enqueue(record)
        except QueueFull:
            raise  # the scheduler failed (and refunded) the job
        card = QueueCard(
            job_id=job_id,
            kind=job.kind,
            position=max(1, position),
            eta_seconds=services.scheduler.eta(job_id),
            cost=cost,
            remaining=reservation.remaining,
        )
        text = queue_card(card)
        if services.scheduler.server_paused(guild_id):
            text += "\nThe queue is paused by the moderators: your job will start when they resume it."
        return record, text

    # ------------------------------------------------------------------ the cheap refusals
    async def _precheck(self, interaction: discord.Interaction, *texts: str) -> None:
        """Everything that can refuse a request without reading or decoding anything, in order of
        cost; every way a job starts passes here before any attachment or parent image is read."""
        if not self.bot.accepting:
            raise Refused("The bot is restarting: try again in a minute.")
        self._cooldown.check(interaction.user.id)
        guild_id = interaction.guild_id
        if guild_id is None and not self.settings.discord.allow_dms:
            raise Refused("Image commands work in servers only here.")
        if guild_id is not None:
            _check_can_post(interaction)
        await self._check_not_banned(interaction)
        for text in texts:
            match = await self.services.blocklists.first_match(guild_id, text)
            if match is not None:
                # The words that matched, as the member wrote them, not the moderators' regex.
                raise Refused(f"Your prompt contains a blocked term (“{match.shown}”): remove it and try again.")
        self.services.scheduler.check_admission(interaction.user.id)

    async def _check_not_banned(self, interaction: discord.Interaction) -> None:
        """The operator's bans apply everywhere; a server's ban in that server, and in DMs too
        (a member banned in any server the bot is in cannot get around it in a DM)."""
        moderation, user_id, guild_id = self.services.moderation, interaction.user.id, interaction.guild_id
        ban = await moderation.get_ban(EVERYWHERE, user_id)
        if ban is not None:
            reason = f" Reason: {ban.reason}" if ban.reason else ""
            raise Refused(f"You are banned from using this bot.{reason}")
        if guild_id is not None:
            ban = await moderation.get_ban(guild_id, user_id)
            if ban is not None:
                reason = f" Reason: {ban.reason}" if ban.reason else ""
                raise Refused(f"You are banned from using the bot on this server.{reason}")
        elif any(self.bot.get_guild(g) is not None for g in await moderation.guilds_banning(user_id)):
            raise Refused("You are banned from using the bot in a server it shares with you, so not in DMs either.")

    async def _check_quota(self, interaction: discord.Interaction, cost: float) -> None:
        """Refuse before any download when the member's allowance cannot pay the expected cost
        (the reservation itself still decides, at the decoded size)."""
        exempt = self.settings.quota.moderators_exempt and await is_moderator(interaction)
        refusal = await self.services.quotas.would_refuse(
            interaction.guild_id, interaction.user.id, role_ids(interaction), cost, exempt=exempt
        )
        if refusal is not None:
            self.services.metrics.quota_refused(refusal.reason, interaction.guild_id)
            raise Refused(_quota_refusal(refusal, cost))

    # ------------------------------------------------------------------ buttons
    async def _parent(self, job_id: str) -> JobRecord:
        record = await self.services.jobs.get(job_id)
        if record is None:
            raise Refused(f"Job `{job_id}` no longer exists.")
        return record

    async def _parent_image(self, parent: JobRecord, index: int) -> bytes:
        if parent.status != "done" or index >= len(parent.images):
            raise Refused(f"Job `{parent.id}` has no image {index + 1}.")
        image = parent.images[index]
        data = None
        if image.get("path"):
            data = await asyncio.to_thread(self.services.outputs.read, image["path"])
        if data is None and image.get("url"):
            # The file was pruned: the image is still on Discord.
            try:
                data = await asyncio.wait_for(self.bot.http.get_from_cdn(image["url"]), ATTACHMENT_FETCH_SECONDS)
            except (TimeoutError, discord.HTTPException):
                data = None
        if data is None:
            raise Refused(f"The image of job `{parent.id}` is no longer available.")
        return data

    async def reroll(self, interaction: discord.Interaction, job_id: str) -> None:
        async def run() -> None:
            parent = await self._parent(job_id)
            cls = JOB_KINDS[parent.kind]
            params = {**parent.params, "seed": _random_seed(), "parent": {"job": parent.id, "action": "reroll"}}
            params.pop("input", None)
            input_size = params.pop("input_size", None)
            prompts = [str(params.get("prompt", "")), str(params.get("negative", ""))]
            await self._precheck(interaction, *prompts)
            input_png = None
            if input_size is not None:
                async with self._decoding:
                    data = await self._input_again(parent)
                    input_png, _ = await self._prepare(data, upscale=parent.kind == "upscale")
            job = _job_from_params(cls, params, input_png)
            await self._submit(
                interaction,
                job,
                params,
                input_png=input_png,
                input_size=tuple(input_size) if input_size else None,  # type: ignore[arg-type]
            )

        await self._guarded_click(interaction, run)

    async def _input_again(self, record: JobRecord) -> bytes:
        """The image a finished image job started from, for a Reroll. Inputs are deleted when their
        job ends, so it comes from where it came from: the image of the job it was made from (a
        button), or the member's attachment on Discord (a command)."""
        origin = record.params.get("origin") or {}
        if "job" in origin:
            return await self._parent_image(await self._parent(origin["job"]), int(origin.get("index", 0)))
        url = record.params.get("input_url")
        if url:
            try:
                return await asyncio.wait_for(self.bot.http.get_from_cdn(url), ATTACHMENT_FETCH_SECONDS)
            except (TimeoutError, discord.HTTPException):
                pass
        raise Refused(
            f"The image job `{record.id}` started from is no longer available: run the command again with the image."
        )

    async def upscale(self, interaction: discord.Interaction, job_id: str, index: int) -> None:
        await self._derived(interaction, job_id, index, "upscale")

    async def variations(self, interaction: discord.Interaction, job_id: str, index: int) -> None:
        await self._derived(interaction, job_id, index, "variations")

    async def refine(self, interaction: discord.Interaction, job_id: str, index: int) -> None:
        await self._derived(interaction, job_id, index, "refine")

    async def _derived(self, interaction: discord.Interaction, job_id: str, index: int, kind: str) -> None:
        async def run() -> None:
            parent = await self._parent(job_id)
            await self._precheck(
                interaction, str(parent.params.get("prompt", "")), str(parent.params.get("negative", ""))
            )
            async with self._decoding:
                data = await self._parent_image(parent, index)
                png, size = await self._prepare(data, upscale=kind == "upscale")
            gen = self.settings.generation
            seeds = parent.seeds or [parent.params.get("seed", 0)]
            base = {
                "job_id": "pending",
                "prompt": parent.params.get("prompt", ""),
                "negative": parent.params.get("negative", ""),
                "cfg": parent.params.get("cfg", gen.default_cfg),
                "sampler": parent.params.get("sampler", gen.default_sampler),
                "model": parent.params.get("model", self.settings.default_model),
                "seed": seeds[min(index, len(seeds) - 1)],
                "image": png,
            }
            if base["model"] not in self.settings.models:
                base["model"] = await self._model(interaction, None)
            job: Job
            if kind == "upscale":
                job = Upscale(strength=gen.upscale_strength, steps=gen.upscale_steps, **base)
            elif kind == "variations":
                count = 4
                job = Variations(
                    strength=0.6,
                    count=count,
                    steps=parent.params.get("steps", gen.default_steps),
                    max_image_bytes=self._image_byte_limit(interaction, count),
                    **{**base, "seed": _random_seed()},
                )
            else:
                job = Refine(strength=0.3, steps=parent.params.get("steps", gen.default_steps), **base)
            if kind == "upscale":
                job = replace(job, max_image_bytes=self._image_byte_limit(interaction, 1))
            params = _params(job)
            params["parent"] = params["origin"] = {"job": parent.id, "index": index, "action": kind}
            await self._submit(interaction, job, params, input_png=png, input_size=size)

        await self._guarded_click(interaction, run)

    async def _guarded_click(self, interaction: discord.Interaction, run: Any) -> None:
        answer = first_response(interaction)
        try:
            await answer.answers_first()
            await run()
        except (Refused, ValidationFailed, QueueFull) as exc:
            await self._say(interaction, str(exc))
        finally:
            answer.stop()

    async def delete(self, interaction: discord.Interaction, job_id: str) -> None:
        """The Delete button: the result message (the one clicked, checked with Discord to be a
        result of this job), the original post if that was a re-post, and the stored images go;
        the job is marked deleted, so `/job` says so instead of bringing the images back."""
        record = await self.services.jobs.get(job_id)
        if record is None or not await self._may_manage(interaction, record):
            await self._say(interaction, "Only the person who asked for this image or a moderator can delete it.")
            return
        clicked = await self._result_message(interaction, record)
        if clicked is None:
            await self._say(interaction, "That message is not a result of this job.")
            return
        try:
            await interaction.response.defer(ephemeral=True)
            await clicked.delete()
            if record.result_message_id not in (None, clicked.id):
                original = self.bot.get_partial_messageable(record.channel_id).get_partial_message(
                    record.result_message_id  # type: ignore[arg-type]
                )
                with contextlib.suppress(discord.NotFound):
                    await original.delete()
        except discord.NotFound:
            pass  # already gone: the images still go
        except discord.Forbidden:
            await self._say(interaction, "I am not allowed to delete messages here.")
            return
        await self._forget_images(record)
        await self.services.jobs.mark_deleted(record.id)
        await self._say(interaction, f"Deleted the result of job `{job_id}` and its stored images.")

    async def _may_manage(self, interaction: discord.Interaction, record: JobRecord) -> bool:
        """The job's owner, a moderator of the job's own server, or the operator."""
        if interaction.user.id == record.owner_id:
            return True
        if record.guild_id is not None and record.guild_id == interaction.guild_id and await is_moderator(interaction):
            return True
        return await is_operator(interaction)

    async def _result_message(self, interaction: discord.Interaction, record: JobRecord) -> discord.Message | None:
        """The clicked message as Discord has it, if it is the bot's and carries this job's result
        buttons (a forged click names a job; only Discord's copy says what message it is)."""
        if interaction.message is None or interaction.channel_id is None:
            return None
        channel = self.bot.get_partial_messageable(interaction.channel_id, guild_id=interaction.guild_id)
        try:
            message = await channel.fetch_message(interaction.message.id)
        except discord.HTTPException:
            return None
        if self.bot.user is None or message.author.id != self.bot.user.id:
            return None
        wanted = f"atelier:delete:{record.id}"
        buttons = (child for row in message.components for child in getattr(row, "children", ()))
        return message if any(getattr(b, "custom_id", None) == wanted for b in buttons) else None

    async def _forget_images(self, record: JobRecord) -> None:
        paths = [str(image["path"]) for image in record.images if image.get("path")]
        if paths:
            await asyncio.to_thread(self.services.outputs.delete, paths)

    async def erase_history(self, interaction: discord.Interaction) -> int:
        """`/forget`: erase the member's prompts and images (the ledger's sums stay)."""
        erased = await self.services.jobs.erase_history(interaction.user.id)
        for record in erased:
            await self._forget_images(record)
        return len(erased)

    async def cancel(self, interaction: discord.Interaction, job_id: str) -> None:
        await self.cancel_command(interaction, job_id, as_moderator=False)

    async def cancel_command(
        self, interaction: discord.Interaction, job_text: str, *, as_moderator: bool, as_operator: bool = False
    ) -> None:
        job_id = normalize_job_id(job_text)
        record = await self.services.jobs.get(job_id) if job_id else None
        if record is None:
            await self._say(interaction, f"There is no job `{job_text[:40]}`. Your jobs are listed by `/queue`.")
            return
        allowed = record.owner_id == interaction.user.id or (
            await is_moderator(interaction) and (as_moderator or record.guild_id == interaction.guild_id)
        )
        if as_moderator and record.guild_id != interaction.guild_id:
            allowed = False
        if as_operator:
            allowed = True  # the caller checked is_operator
        if not allowed:
            await self._say(interaction, "You can only cancel your own jobs.")
            return
        if record.is_final:
            await self._say(interaction, f"Job `{record.id}` already ended ({record.status}).")
            return
        if await self.services.scheduler.cancel(record.id):
            by_mod = record.owner_id != interaction.user.id
            self.services.delivery.note_cancel_by_moderator(record.id, by_mod)
            await self._say(interaction, f"Cancelling job `{record.id}`; its {units(record.cost)} units are refunded.")
        else:
            await self._say(interaction, f"Job `{record.id}` is finishing and can no longer be cancelled.")

    async def cancel_all_for(self, guild_id: int | None, user_id: int, *, every_server: bool = False) -> int:
        """Cancel (and refund) a member's queued jobs in one server, or everywhere (an operator ban)."""
        cancelled = 0
        for view in self.services.scheduler.queued_for(user_id):
            if (every_server or view.record.guild_id == guild_id) and view.status == "queued":
                cancelled += int(await self.services.scheduler.cancel(view.job_id))
        return cancelled

    # ------------------------------------------------------------------ reading
    async def repost(self, interaction: discord.Interaction, job_text: str) -> None:
        job_id = normalize_job_id(job_text)
        record = await self.services.jobs.get(job_id) if job_id else None
        if record is None:
            await self._say(interaction, f"There is no job `{job_text[:40]}`.")
            return
        if not await self._may_see(interaction, record):
            await self._say(
                interaction,
                "You can post only your own jobs, or jobs from this channel. Ask its owner to share it.",
            )
            return
        if record.deleted or record.params.get("erased"):
            await self._say(interaction, f"Job `{record.id}` was deleted: its images are gone.")
            return
        if record.status != "done":
            await self._say(interaction, f"Job `{record.id}` is {record.status}; only finished jobs can be posted.")
            return
        await interaction.response.defer()
        try:
            await self.services.delivery.repost(interaction, record)
        except Refused as exc:
            await interaction.followup.send(str(exc), ephemeral=True)

    async def _may_see(self, interaction: discord.Interaction, record: JobRecord) -> bool:
        """`/job` re-posts a job for its owner, for anyone in the channel it was posted in, for a
        moderator of its own server, and for the operator: not for a stranger elsewhere."""
        if interaction.user.id == record.owner_id or interaction.channel_id == record.channel_id:
            return True
        return await self._may_manage(interaction, record)

    async def show_quota(self, interaction: discord.Interaction) -> None:
        exempt = self.settings.quota.moderators_exempt and await is_moderator(interaction)
        status = await self.services.quotas.status(
            interaction.guild_id, interaction.user.id, role_ids(interaction), exempt=exempt
        )
        view = QuotaView(status.limit, status.used, status.remaining, status.resets_at)
        window = duration(self.settings.quota.window_hours * 3600)
        await self._say(interaction, f"{quota_text(view)}\nWindow: {window}, rolling.")

    async def show_own_queue(self, interaction: discord.Interaction) -> None:
        views = self.services.scheduler.queued_for(interaction.user.id)
        if not views:
            await self._say(interaction, "You have no queued or running jobs.")
            return
        await self._say(interaction, "\n".join(_queue_line(v) for v in views))

    async def show_whole_queue(self, interaction: discord.Interaction, *, every_server: bool = False) -> None:
        """`/mod queue`: this server's jobs (a moderator sees nothing of other servers);
        `/operator queue` (`every_server`): all of them."""
        scheduler = self.services.scheduler
        views = scheduler.snapshot()
        if every_server:
            paused = " (paused)" if scheduler.paused else ""
        else:
            views = [v for v in views if v.record.guild_id == interaction.guild_id]
            paused = " (paused)" if scheduler.server_paused(interaction.guild_id) else ""
        if not views:
            await self._say(interaction, f"The queue is empty{paused}.")
            return
        lines = [f"{len(views)} job(s){paused}:"] + [f"{_queue_line(v)} · <@{v.owner_id}>" for v in views[:30]]
        if len(views) > 30:
            lines.append(f"… and {len(views) - 30} more")
        await self._say(interaction, "\n".join(lines), allowed_mentions=discord.AllowedMentions.none())

    async def own_job_choices(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        views = self.services.scheduler.queued_for(interaction.user.id)
        return _job_choices(views, current)

    async def active_job_choices(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        if not await is_moderator(interaction):
            return []
        views = [v for v in self.services.scheduler.snapshot() if v.record.guild_id == interaction.guild_id]
        return _job_choices(views, current)


# ---------------------------------------------------------------------- helpers
def _check_can_post(interaction: discord.Interaction) -> None:
    """Refuse (before anything is charged) a job whose result the bot could not post here: results
    are channel messages sent with the bot's token, which needs these permissions in the channel."""
    granted = interaction.app_permissions
    if granted.value == 0:
        return  # not sent by this server (Discord always sends it): the post itself will tell
    in_thread = isinstance(interaction.channel, discord.Thread)
    needed = {
        "Send Messages in Threads" if in_thread else "Send Messages": (
            granted.send_messages_in_threads if in_thread else granted.send_messages
        ),
        "Attach Files": granted.attach_files,
        "Embed Links": granted.embed_links,
    }
    missing = [name for name, ok in needed.items() if not ok]
    if missing:
        raise Refused(
            f"I cannot post images in this channel: I need the {', '.join(missing)} permission(s) here. "
            "Ask a server admin to allow it, or use another channel."
        )


def _params(job: Job) -> dict[str, Any]:
    """What is stored with a job: every field but the image bytes and the placeholder id."""
    return {f.name: getattr(job, f.name) for f in dataclasses.fields(job) if f.name not in ("image", "job_id")}


def _strip(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in ("input", "input_size")}


def _job_from_params(cls: type, params: dict[str, Any], image: bytes | None, job_id: str = "pending") -> Job:
    """A job spec from stored parameters; bookkeeping keys (input, aspect, parent…) are not fields."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in params.items() if k in fields and k not in ("job_id", "image")}
    if image is not None:
        kwargs["image"] = image
    return cls(job_id=job_id, **kwargs)


def _quota_refusal(refusal: Refusal, cost: float) -> str:
    if refusal.reason == "blocked" or refusal.limit == 0:
        return "Your allowance on this server is 0 units, so you cannot start jobs here. Ask a moderator."
    when = ""
    if refusal.retry_at is not None:
        when = f" Enough room frees up {discord.utils.format_dt(refusal.retry_at, 'R')}."
    elif cost > refusal.limit:
        when = " This job is larger than your whole allowance: use fewer steps, images or a smaller size."
    return (
        f"Not enough quota: this job costs {units(cost)} units and you have {units(refusal.remaining)} "
        f"of {units(refusal.limit)} left.{when} Try fewer images, fewer steps or a smaller size."
    )


def _queue_line(view: Any) -> str:
    kind = KIND_NAMES.get(view.record.kind, view.record.kind)
    if view.status == "running":
        step = f" step {view.progress.step}/{view.progress.total}" if view.progress else ""
        return f"• `{view.job_id}` {kind} · running{step} · ETA ~{duration(view.eta)}"
    return f"• `{view.job_id}` {kind} · position {view.position} · ETA ~{duration(view.eta)}"


def _job_choices(views: list[Any], current: str) -> list[app_commands.Choice[str]]:
    needle = current.strip().upper()
    choices = []
    for view in views:
        if needle and needle not in view.job_id:
            continue
        prompt = str(view.record.params.get("prompt", ""))[:60]
        label = f"{view.job_id} · {KIND_NAMES.get(view.record.kind, view.record.kind)} · {view.status} · {prompt}"
        choices.append(app_commands.Choice(name=label[:100], value=view.job_id))
    return choices[:25]
