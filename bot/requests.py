"""Turning commands and clicks into jobs, and everything a member asks about their jobs.

One path for every way a job starts (slash command or button): validate → ban and blocklist →
price → queue caps → reserve quota → persist → enqueue → answer with the queue card. Each step
that can refuse does so before anything is charged, with an ephemeral message saying what to
change. Nothing here waits on the engine, so the first response always comes within Discord's 3 s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import secrets
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands

from bot.answer import first_response
from bot.fairqueue import QueueFull
from bot.permissions import is_moderator, role_ids
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
from bot.views import progress_view
from db.ids import new_job_id, normalize_job_id
from db.jobs import JobRecord
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


class Refused(Exception):
    """A request that is refused with a message for the member; nothing has been charged."""


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
        # By the size Discord reports, before downloading anything (the bytes are checked again).
        validate.check_attachment_size(attachment.size, max_bytes=gen.max_attachment_bytes)
        if attachment.width and attachment.height and attachment.width * attachment.height > gen.max_attachment_pixels:
            raise Refused(
                f"The image is {attachment.width}×{attachment.height}; attach one of at most "
                f"{gen.max_attachment_pixels / 1e6:.0f} megapixels."
            )
        prompt_text = validate.check_prompt(prompt, max_chars=gen.max_prompt_chars, required=False)
        model_name = await self._model(interaction, model)
        try:
            data = await asyncio.wait_for(attachment.read(), ATTACHMENT_FETCH_SECONDS)
        except (TimeoutError, discord.HTTPException):
            raise Refused("I could not download your image in time: try again, or attach a smaller file.") from None
        png, size = await self._prepare(data, upscale=False)
        common: dict[str, Any] = {
            "job_id": "pending",
            "prompt": prompt_text,
            "steps": gen.default_steps,
            "cfg": gen.default_cfg,
            "seed": _random_seed(),
            "sampler": gen.default_sampler,
            "model": model_name,
            "image": png,
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
                **{k: v for k, v in common.items()},
            )
        await self._submit(interaction, job, _params(job), input_png=png, input_size=size)

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
        if not self.bot.accepting:
            raise Refused("The bot is restarting: try again in a minute.")
        if guild_id is None and not self.settings.discord.allow_dms:
            raise Refused("Image commands work in servers only here.")
        if guild_id is not None:
            _check_can_post(interaction)
            ban = await services.moderation.get_ban(guild_id, user.id)
            if ban is not None:
                reason = f" Reason: {ban.reason}" if ban.reason else ""
                raise Refused(f"You are banned from using the bot on this server.{reason}")
        for text in (job.prompt, job.negative):
            term = await self._blocked(guild_id, text)
            if term:
                raise Refused(f"Your prompt contains a blocked term (“{term}”): remove it and try again.")
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
            self.inputs_dir.mkdir(parents=True, exist_ok=True)
            input_path = self.inputs_dir / f"{job_id}.png"
            await asyncio.to_thread(input_path.write_bytes, input_png)
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
                input_path.unlink(missing_ok=True)
            services.metrics.quota_refused(admitted.reason)
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
        if services.scheduler.paused:
            text += "\nThe queue is paused by the moderators: your job will start when they resume it."
        return record, text

    async def _blocked(self, guild_id: int | None, text: str) -> str | None:
        if not text:
            return None
        term = self.services.blocked_term(text)
        if term is None and guild_id is not None:
            pattern = await self.services.moderation.matching_pattern(guild_id, text)
            if pattern is not None:
                # Show the member the words that matched, not the moderators' regex.
                match = re.search(pattern, text, re.IGNORECASE)
                term = (match.group(0) if match else "") or pattern
        return term

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
            params = {
                **parent.params,
                "seed": _random_seed(),
                "parent": {"job": parent.id, "action": "reroll"},
            }
            input_png, input_size = None, None
            if "input" in params:
                input_png = await asyncio.to_thread((self.inputs_dir / params.pop("input")).read_bytes)
                input_size = tuple(params.pop("input_size"))
            job = _job_from_params(cls, params, input_png)
            await self._submit(interaction, job, _strip(params), input_png=input_png, input_size=input_size)

        await self._guarded_click(interaction, run)

    async def upscale(self, interaction: discord.Interaction, job_id: str, index: int) -> None:
        await self._derived(interaction, job_id, index, "upscale")

    async def variations(self, interaction: discord.Interaction, job_id: str, index: int) -> None:
        await self._derived(interaction, job_id, index, "variations")

    async def refine(self, interaction: discord.Interaction, job_id: str, index: int) -> None:
        await self._derived(interaction, job_id, index, "refine")

    async def _derived(self, interaction: discord.Interaction, job_id: str, index: int, kind: str) -> None:
        async def run() -> None:
            parent = await self._parent(job_id)
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
            params["parent"] = {"job": parent.id, "index": index, "action": kind}
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
        record = await self.services.jobs.get(job_id)
        owner = record.owner_id if record else None
        if interaction.user.id != owner and not await is_moderator(interaction):
            await self._say(interaction, "Only the person who asked for this image or a moderator can delete it.")
            return
        try:
            await interaction.response.defer(ephemeral=True)
            if interaction.message is not None:
                await interaction.message.delete()
            await interaction.followup.send(f"Deleted the result of job `{job_id}`.", ephemeral=True)
        except discord.NotFound:
            await self._say(interaction, "That message is already gone.")
        except discord.Forbidden:
            await self._say(interaction, "I am not allowed to delete messages here.")

    async def cancel(self, interaction: discord.Interaction, job_id: str) -> None:
        await self.cancel_command(interaction, job_id, as_moderator=False)

    async def cancel_command(self, interaction: discord.Interaction, job_text: str, *, as_moderator: bool) -> None:
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

    async def cancel_all_for(self, guild_id: int | None, user_id: int) -> int:
        cancelled = 0
        for view in self.services.scheduler.queued_for(user_id):
            if view.record.guild_id == guild_id and view.status == "queued":
                cancelled += int(await self.services.scheduler.cancel(view.job_id))
        return cancelled

    # ------------------------------------------------------------------ reading
    async def repost(self, interaction: discord.Interaction, job_text: str) -> None:
        job_id = normalize_job_id(job_text)
        record = await self.services.jobs.get(job_id) if job_id else None
        if record is None:
            await self._say(interaction, f"There is no job `{job_text[:40]}`.")
            return
        if record.guild_id is not None and record.guild_id != interaction.guild_id:
            await self._say(interaction, "That job belongs to another server.")
            return
        if record.status != "done":
            await self._say(interaction, f"Job `{record.id}` is {record.status}; only finished jobs can be posted.")
            return
        await interaction.response.defer()
        try:
            await self.services.delivery.repost(interaction, record)
        except Refused as exc:
            await interaction.followup.send(str(exc), ephemeral=True)

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

    async def show_whole_queue(self, interaction: discord.Interaction) -> None:
        views = self.services.scheduler.snapshot()
        paused = " (paused)" if self.services.scheduler.paused else ""
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
