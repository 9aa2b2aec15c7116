"""The one path every job takes into the queue, whatever started it (a slash command or a button).

The cheap refusals come first (the bot restarting, the member's cooldown, DMs, channel
permissions, bans, the blocklist, the queue's caps, and for an attachment the quota at the size
Discord reports); only then the work: download and decode an attachment (a few at a time), price,
reserve quota and persist in one transaction, enqueue, answer with the queue card. Each step that
can refuse does so before anything is charged, with an ephemeral message saying what to change,
so a banned or over-quota member never makes the bot download or decode anything. Nothing here
waits on the engine, so the first response always comes within Discord's 3 s.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import discord
from cachetools import TTLCache
from discord import app_commands

from bot.blocklists import Blocklists
from bot.buttons import progress_view
from bot.delivery import Delivery
from bot.errors import Refused
from bot.inputs import FETCH_SECONDS, StoredInputs
from bot.interactions import first_response
from bot.loras import check_styling
from bot.metrics import Metrics
from bot.permissions import is_moderator, role_ids
from bot.queue.scheduler import Scheduler
from bot.render import QueueCard, queue_card, units
from bot.storage import CONTROL, OutputStore, StorageError
from config.settings import Settings
from db.ids import new_job_id
from db.jobs import JobRecord, JobStore
from db.moderation import EVERYWHERE, ModerationStore
from db.quotas import QuotaStore, Refusal
from engine import validate
from engine.jobs import ImageJob, Job, JobOrder, Parent, Text2Img, load_order
from engine.options import MAX_SEED

log = logging.getLogger(__name__)

DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024
# Admissions in flight at once. The ones that arrive together share one transaction (group
# commit, db.admission), so a burst is a few transactions whatever its size; the bound only keeps
# a flood from holding hundreds of requests' state at once.
INTAKE_CONCURRENCY = 256
# Attachments downloaded and decoded at once: each can be tens of megabytes of pixels.
DECODE_CONCURRENCY = 2


def random_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


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


class Intake:
    def __init__(
        self,
        *,
        settings: Settings,
        jobs: JobStore,
        quotas: QuotaStore,
        moderation: ModerationStore,
        blocklists: Blocklists,
        scheduler: Scheduler[JobRecord],
        delivery: Delivery,
        outputs: OutputStore,
        metrics: Metrics,
        accepting: Callable[[], bool],
        shares_guild: Callable[[int], bool],
        fetch: Callable[[str], Any],
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.quotas = quotas
        self.moderation = moderation
        self.blocklists = blocklists
        self.scheduler = scheduler
        self.delivery = delivery
        self.outputs = outputs
        self.metrics = metrics
        self._accepting = accepting
        self._shares_guild = shares_guild
        self._intake = asyncio.Semaphore(INTAKE_CONCURRENCY)
        self._decoding = asyncio.Semaphore(DECODE_CONCURRENCY)
        self._cooldown = MemberCooldown(settings.discord.cooldown_uses, settings.discord.cooldown_seconds)
        self.inputs = StoredInputs(settings, jobs, outputs, fetch, self._decoding)

    # ------------------------------------------------------------------ the cheap refusals
    async def precheck(self, interaction: discord.Interaction, *texts: str) -> None:
        """Everything that can refuse a request without reading or decoding anything, in order of
        cost; every way a job starts passes here before any attachment or parent image is read."""
        if not self._accepting():
            raise Refused("The bot is restarting: try again in a minute.")
        self._cooldown.check(interaction.user.id)
        guild_id = interaction.guild_id
        if guild_id is None and not self.settings.discord.allow_dms:
            raise Refused("Image commands work in servers only here.")
        if guild_id is not None:
            check_can_post(interaction)
        await self._check_not_banned(interaction)
        for text in texts:
            match = await self.blocklists.first_match(guild_id, text)
            if match is not None:
                # The words that matched, as the member wrote them, not the moderators' regex.
                raise Refused(f"Your prompt contains a blocked term (“{match.shown}”): remove it and try again.")
        self.scheduler.check_admission(interaction.user.id)

    async def _check_not_banned(self, interaction: discord.Interaction) -> None:
        """The operator's bans apply everywhere; a server's ban in that server, and in DMs too
        (a member banned in any server the bot is in cannot get around it in a DM)."""
        moderation, user_id, guild_id = self.moderation, interaction.user.id, interaction.guild_id
        ban = await moderation.get_ban(EVERYWHERE, user_id)
        if ban is not None:
            reason = f" Reason: {ban.reason}" if ban.reason else ""
            raise Refused(f"You are banned from using this bot.{reason}")
        if guild_id is not None:
            ban = await moderation.get_ban(guild_id, user_id)
            if ban is not None:
                reason = f" Reason: {ban.reason}" if ban.reason else ""
                raise Refused(f"You are banned from using the bot on this server.{reason}")
        elif any(self._shares_guild(g) for g in await moderation.guilds_banning(user_id)):
            raise Refused("You are banned from using the bot in a server it shares with you, so not in DMs either.")

    async def check_quota(self, interaction: discord.Interaction, cost: float) -> None:
        """Refuse before any download when the member's allowance cannot pay the expected cost
        (the reservation itself still decides, at the decoded size)."""
        exempt = self.settings.quota.moderators_exempt and await is_moderator(interaction)
        refusal = await self.quotas.would_refuse(
            interaction.guild_id, interaction.user.id, role_ids(interaction), cost, exempt=exempt
        )
        if refusal is not None:
            self.metrics.quota_refused(refusal.reason, interaction.guild_id)
            raise Refused(quota_refusal(refusal, cost))

    # ------------------------------------------------------------------ choices
    async def model(self, interaction: discord.Interaction, requested: str | None) -> str:
        """The model asked for, else the member's own default, else the server's."""
        if requested:
            if requested not in self.settings.models:
                raise Refused(self.unknown_model_text(requested))
            return requested
        mine = await self.moderation.get_user_default_model(interaction.user.id)
        if mine in self.settings.models:
            return mine
        return await self.server_default_model(interaction.guild_id)

    async def server_default_model(self, guild_id: int | None) -> str:
        if guild_id is not None:
            stored = (await self.moderation.get_settings(guild_id)).default_model
            if stored in self.settings.models:
                return stored
        return self.settings.default_model

    def unknown_model_text(self, name: str) -> str:
        known = ", ".join(f"`{n}`" for n in self.settings.models)
        return f"There is no model `{name}`. Pick one of: {known} (see `/model list`)."

    @staticmethod
    def image_byte_limit(interaction: discord.Interaction, count: int) -> int:
        """Each image's share of the upload limit (all images go in one message), with room for the
        multipart overhead."""
        limit = DEFAULT_UPLOAD_LIMIT
        if interaction.guild is not None:
            limit = interaction.guild.filesize_limit
        limit = min(limit, getattr(interaction, "attachment_size_limit", None) or limit)
        return max(64 * 1024, (limit - 64 * 1024) // max(1, count))

    # ------------------------------------------------------------------ input images
    async def attachment(
        self,
        interaction: discord.Interaction,
        attachment: discord.Attachment,
        job: ImageJob,
        *,
        then: Callable[[ImageJob, tuple[int, int]], Awaitable[ImageJob]] | None = None,
        **order: Any,
    ) -> None:
        """A job that starts from the member's attachment: refused by what Discord reports (bytes,
        pixels, the quota at the size it will be worked at) before anything is downloaded.
        `then(job with its image, fitted size)` finishes the spec once the image is in (an edit's
        mask is read at the image's size), and may refuse."""
        gen = self.settings.generation
        validate.check_attachment_size(attachment.size, max_bytes=gen.max_attachment_bytes)
        if attachment.width and attachment.height and attachment.width * attachment.height > gen.max_attachment_pixels:
            raise Refused(
                f"The image is {attachment.width}×{attachment.height}; attach one of at most "
                f"{gen.max_attachment_pixels / 1e6:.0f} megapixels."
            )
        # Every input is worked at about a megapixel whatever its size (validate.fit_size): when
        # Discord does not report the size, a square prices it within a few percent.
        reported = (attachment.width, attachment.height) if attachment.width and attachment.height else (1, 1)
        keep = job.keep_resolution
        await self.check_quota(interaction, job.cost(validate.input_work_size(*reported, keep_resolution=keep)))
        async with self._decoding:
            try:
                data = await asyncio.wait_for(attachment.read(), FETCH_SECONDS)
            except (TimeoutError, discord.HTTPException):
                raise Refused("I could not download your image in time: try again, or attach a smaller file.") from None
            png, size = await self.inputs.prepare(data, upscale=False, keep_resolution=keep)
            job = replace(job, image=png)
            if then is not None:
                job = await then(job, size)
        order_ = JobOrder(job, input_size=size, input_url=attachment.url, **order)
        await self.submit(interaction, order_)

    async def from_parent(
        self,
        interaction: discord.Interaction,
        parent: JobRecord,
        index: int,
        action: str,
        build: Callable[[JobOrder, dict[str, Any]], Job],
        *,
        prompt: str | None = None,
        keep_resolution: bool = False,
        carry_control: bool = False,
    ) -> None:
        """A job made from one of a finished job's images by a button. `build(parent's order,
        fields)` makes its spec; `fields` carries what it takes from the parent: the prompt (or
        `prompt`, a Remix's edited one), negative, cfg, sampler, model (the member's or the
        server's when the parent's is gone), the image's seed, and the image itself as the new job
        will see it (`keep_resolution`: an edit's, see validate.input_work_size). With
        `carry_control` (Variations, V1…Vn, Vary Region), also the parent's ControlNet
        (`parent_control`)."""
        parent_order = load_order(parent.kind, parent.params, job_id=parent.id)
        spec = parent_order.spec
        prompt = spec.prompt if prompt is None else prompt
        await self.precheck(interaction, prompt, spec.negative)
        async with self._decoding:
            data = await self.inputs.parent_image(parent, index)
            png, size = await self.inputs.prepare(data, upscale=action == "upscale", keep_resolution=keep_resolution)
        seeds = parent.seeds or [spec.seed]
        fields: dict[str, Any] = {
            "job_id": "pending",
            "prompt": prompt,
            "negative": spec.negative,
            "cfg": spec.cfg,
            "sampler": spec.sampler,
            "model": spec.model if spec.model in self.settings.models else await self.model(interaction, None),
            # The parent's LoRAs go on (the look stays), unless its model is gone.
            "loras": spec.loras if spec.model in self.settings.models else (),
            "seed": seeds[min(index, len(seeds) - 1)],
            "image": png,
        }
        if carry_control:
            fields.update(await self.inputs.parent_control(parent, spec, keep_resolution=keep_resolution))
        job = build(parent_order, fields)
        await self.submit(interaction, JobOrder(job, parent=Parent(parent.id, action, index), input_size=size))

    async def reroll(self, interaction: discord.Interaction, parent: JobRecord, *, prompt: str | None = None) -> None:
        """The same job again with a new seed (and `prompt`, a Remix's edited one), for whoever
        clicked; an image job starts from the same image, fetched again from where it came from
        (inputs are not kept)."""
        order = load_order(parent.kind, parent.params, job_id=parent.id)
        if prompt is not None:
            gen = self.settings.generation
            prompt = validate.check_prompt(prompt, max_chars=gen.max_prompt_chars, required=order.spec.prompt_required)
            order = replace(order, spec=replace(order.spec, prompt=prompt), typed=None)
        await self.precheck(interaction, order.spec.prompt, order.spec.negative)
        spec = replace(order.spec, seed=random_seed())
        if order.input_size is not None:
            keep = isinstance(spec, ImageJob) and spec.keep_resolution
            async with self._decoding:
                data = await self.inputs.input_again(parent)
                png, _ = await self.inputs.prepare(data, upscale=parent.kind == "upscale", keep_resolution=keep)
            spec = replace(spec, image=png)  # type: ignore[call-arg]
        if getattr(spec, "control", ""):
            async with self._decoding:
                data = await self.inputs.control_again(order, parent)
                png, _ = await self.inputs.prepare(data, upscale=False)
            spec = replace(spec, control_image=png)  # type: ignore[call-arg]
        again = replace(order, spec=spec, parent=Parent(parent.id, "reroll"))
        await self.submit(interaction, again)

    async def with_control(
        self, interaction: discord.Interaction, attachment: discord.Attachment, job: Text2Img, **order: Any
    ) -> None:
        """A /generate with a control image: refused by what Discord reports (bytes, pixels), the
        same caps as any input image, and by the quota, before anything is downloaded; the upload
        is then checked and fitted like an img2img input. The price is the text2img job's."""
        gen = self.settings.generation
        try:
            validate.check_attachment_size(attachment.size, max_bytes=gen.max_attachment_bytes)
        except validate.ValidationFailed as exc:
            raise Refused(f"control_image: {exc.message}") from None
        if attachment.width and attachment.height and attachment.width * attachment.height > gen.max_attachment_pixels:
            raise Refused(
                f"control_image: the image is {attachment.width}×{attachment.height}; attach one of at most "
                f"{gen.max_attachment_pixels / 1e6:.0f} megapixels."
            )
        await self.check_quota(interaction, job.cost())
        async with self._decoding:
            try:
                data = await asyncio.wait_for(attachment.read(), FETCH_SECONDS)
            except (TimeoutError, discord.HTTPException):
                raise Refused(
                    "I could not download your control image in time: try again, or attach a smaller file."
                ) from None
            try:
                png, _ = await self.inputs.prepare(data, upscale=False)
            except validate.ValidationFailed as exc:
                raise Refused(f"control_image: {exc.message}") from None
        await self.submit(interaction, JobOrder(replace(job, control_image=png), control_url=attachment.url, **order))

    # ------------------------------------------------------------------ into the queue
    async def submit(self, interaction: discord.Interaction, order: JobOrder) -> None:
        """Price, reserve, persist, enqueue, answer with the public queue card."""
        # LoRAs, embeddings and draft mode as configured now (a button's job inherits its parent's).
        check_styling(self.settings, order.spec)
        async with self._intake:
            record, text = await self._admit(interaction, order)
        self.delivery.track(record)
        try:
            message_id = await first_response(interaction).public_card(text, progress_view(record.id))
        except discord.HTTPException as exc:
            # The job is queued and will post its result in the channel anyway.
            log.warning("job=%s queue card not sent: %s %s", record.id, exc.status, exc.text)
            return
        try:
            await self.delivery.set_status_message(record.id, message_id)
        except Exception:
            # The member has their card and the job is queued; only after a restart would the
            # card no longer be edited (the result is posted all the same).
            log.warning("job=%s queue card id not saved", record.id, exc_info=True)
        log.info("job=%s accepted kind=%s user=%s cost=%.2f", record.id, record.kind, interaction.user.id, record.cost)

    async def _admit(self, interaction: discord.Interaction, order: JobOrder) -> tuple[JobRecord, str]:
        """The price, the quota reservation and the job row; returns the queued record and its
        queue card text. Raises Refused (nothing charged) instead."""
        guild_id, user, job = interaction.guild_id, interaction.user, order.spec
        moderator = await is_moderator(interaction)
        priority = moderator or bool(set(role_ids(interaction)) & set(self.settings.discord.priority_roles))
        band = 0 if priority else 1
        cost = job.cost(order.input_size)
        self.scheduler.check_admission(user.id, band)
        job_id = new_job_id()
        image = getattr(job, "image", b"")
        control = getattr(job, "control_image", b"")
        if image or control:
            # Written before the job exists, so the engine never sees a job without its images.
            try:
                if image:
                    await asyncio.to_thread(self.outputs.save_input, job_id, image)
                if control:
                    await asyncio.to_thread(self.outputs.save_input, job_id, control, CONTROL)
            except StorageError as exc:
                log.error("job=%s %s", job_id, exc)
                self.outputs.drop_input(job_id)
                raise Refused("I cannot store your image right now. Try again in a while.") from None
        # Quota reservation and the job row are one transaction: no charge without its job.
        admitted = await self.jobs.enqueue(
            self.quotas,
            job_id=job_id,
            kind=job.kind,
            owner_id=user.id,
            guild_id=guild_id,
            channel_id=interaction.channel_id or 0,
            params=order.to_json(),
            cost=cost,
            band=band,
            role_ids=role_ids(interaction),
            exempt=moderator and self.settings.quota.moderators_exempt,
            interaction_id=interaction.id,
        )
        if isinstance(admitted, Refusal):
            if image or control:
                self.outputs.drop_input(job_id)
            self.metrics.quota_refused(admitted.reason, guild_id)
            raise Refused(quota_refusal(admitted, cost))
        record, reservation = admitted
        position = await self.scheduler.enqueue(record)  # QueueFull: the scheduler failed (refunded) it
        card = QueueCard(
            job_id=job_id,
            kind=job.kind,
            position=max(1, position),
            eta_seconds=self.scheduler.eta(job_id),
            cost=cost,
            remaining=reservation.remaining,
        )
        text = queue_card(card)
        if self.scheduler.server_paused(guild_id):
            text += "\nThe queue is paused by the moderators: your job will start when they resume it."
        return record, text


def engine_job(record: JobRecord, outputs: OutputStore) -> Job:
    """The engine job for a stored record (the scheduler's job_factory); its input image, if it
    has one, is read from the inputs folder."""
    order = load_order(record.kind, record.params, job_id=record.id)
    image = outputs.input_path(record.id).read_bytes() if order.input_size is not None else None
    spec = order.spec if image is None else replace(order.spec, image=image)  # type: ignore[call-arg]
    if getattr(spec, "control", ""):  # a ControlNet job: its control image is an input too
        spec = replace(spec, control_image=outputs.input_path(record.id, CONTROL).read_bytes())  # type: ignore[call-arg]
    return spec  # type: ignore[return-value]


def check_can_post(interaction: discord.Interaction) -> None:
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


def quota_refusal(refusal: Refusal, cost: float) -> str:
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


__all__ = ["Intake", "MemberCooldown", "engine_job", "quota_refusal", "random_seed"]
