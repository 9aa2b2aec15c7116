"""What members and moderators do with jobs that exist: cancel, delete a result, post it again
(`/job`), erase their history (`/forget`), look at the queue and their quota.

Who may: a job's owner; a moderator of the job's own server; the operator (bot.permissions).
`/job` also re-posts for anyone in the channel the result was posted in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import discord
from discord import app_commands

from bot.delivery import Delivery
from bot.errors import Refused
from bot.interactions import say
from bot.permissions import is_moderator, is_operator, role_ids
from bot.queue.ports import JobView
from bot.queue.scheduler import Scheduler
from bot.render import QuotaView, duration, quota_text, units
from bot.results import ResultPoster
from bot.storage import OutputStore
from config.settings import Settings
from db.ids import normalize_job_id
from db.jobs import JobRecord, JobStore
from db.quotas import QuotaStore
from engine.jobs import label_of

log = logging.getLogger(__name__)

MAX_LINES = 30


class JobActions:
    def __init__(
        self,
        *,
        client: discord.Client,
        settings: Settings,
        jobs: JobStore,
        quotas: QuotaStore,
        scheduler: Scheduler[JobRecord],
        delivery: Delivery,
        results: ResultPoster,
        outputs: OutputStore,
    ) -> None:
        self.client = client
        self.settings = settings
        self.jobs = jobs
        self.quotas = quotas
        self.scheduler = scheduler
        self.delivery = delivery
        self.results = results
        self.outputs = outputs

    # ------------------------------------------------------------------ who may
    async def may_manage(self, interaction: discord.Interaction, record: JobRecord) -> bool:
        """The job's owner, a moderator of the job's own server, or the operator."""
        if interaction.user.id == record.owner_id:
            return True
        if record.guild_id is not None and record.guild_id == interaction.guild_id and await is_moderator(interaction):
            return True
        return await is_operator(interaction)

    async def may_see(self, interaction: discord.Interaction, record: JobRecord) -> bool:
        """`/job` re-posts a job for its owner, for anyone in the channel it was posted in, for a
        moderator of its own server, and for the operator: not for a stranger elsewhere."""
        if interaction.user.id == record.owner_id or interaction.channel_id == record.channel_id:
            return True
        return await self.may_manage(interaction, record)

    # ------------------------------------------------------------------ cancelling
    async def cancel(
        self, interaction: discord.Interaction, job_text: str, *, as_moderator: bool, as_operator: bool = False
    ) -> None:
        job_id = normalize_job_id(job_text)
        record = await self.jobs.get(job_id) if job_id else None
        if record is None:
            await say(interaction, f"There is no job `{job_text[:40]}`. Your jobs are listed by `/queue`.")
            return
        allowed = record.owner_id == interaction.user.id or (
            await is_moderator(interaction) and (as_moderator or record.guild_id == interaction.guild_id)
        )
        if as_moderator and record.guild_id != interaction.guild_id:
            allowed = False
        if as_operator:
            allowed = True  # the caller checked is_operator
        if not allowed:
            await say(interaction, "You can only cancel your own jobs.")
            return
        if record.is_final:
            await say(interaction, f"Job `{record.id}` already ended ({record.status}).")
            return
        if await self.scheduler.cancel(record.id):
            self.delivery.note_cancel_by_moderator(record.id, record.owner_id != interaction.user.id)
            await say(interaction, f"Cancelling job `{record.id}`; its {units(record.cost)} units are refunded.")
        else:
            await say(interaction, f"Job `{record.id}` is finishing and can no longer be cancelled.")

    async def cancel_all_for(self, guild_id: int | None, user_id: int, *, every_server: bool = False) -> int:
        """Cancel (and refund) a member's queued jobs in one server, or everywhere (an operator ban)."""
        cancelled = 0
        for view in self.scheduler.queued_for(user_id):
            if (every_server or view.record.guild_id == guild_id) and view.status == "queued":
                cancelled += int(await self.scheduler.cancel(view.job_id))
        return cancelled

    # ------------------------------------------------------------------ deleting
    async def delete(self, interaction: discord.Interaction, job_id: str) -> None:
        """The Delete button: the result message (the one clicked, checked with Discord to be a
        result of this job), the original post if that was a re-post, and the stored images go;
        the job is marked deleted, so `/job` says so instead of bringing the images back."""
        record = await self.jobs.get(job_id)
        if record is None or not await self.may_manage(interaction, record):
            await say(interaction, "Only the person who asked for this image or a moderator can delete it.")
            return
        clicked = await self._result_message(interaction, record)
        if clicked is None:
            await say(interaction, "That message is not a result of this job.")
            return
        try:
            await interaction.response.defer(ephemeral=True)
            await clicked.delete()
            if record.result_message_id is not None and record.result_message_id != clicked.id:
                original = self.client.get_partial_messageable(record.channel_id)
                with contextlib.suppress(discord.NotFound):
                    await original.get_partial_message(record.result_message_id).delete()
        except discord.NotFound:
            pass  # already gone: the images still go
        except discord.Forbidden:
            await say(interaction, "I am not allowed to delete messages here.")
            return
        await self._forget_images(record)
        await self.jobs.mark_deleted(record.id)
        await say(interaction, f"Deleted the result of job `{job_id}` and its stored images.")

    async def _result_message(self, interaction: discord.Interaction, record: JobRecord) -> discord.Message | None:
        """The clicked message as Discord has it, if it is the bot's and carries this job's result
        buttons (a forged click names a job; only Discord's copy says what message it is)."""
        if interaction.message is None or interaction.channel_id is None:
            return None
        channel = self.client.get_partial_messageable(interaction.channel_id, guild_id=interaction.guild_id)
        try:
            message = await channel.fetch_message(interaction.message.id)
        except discord.HTTPException:
            return None
        if self.client.user is None or message.author.id != self.client.user.id:
            return None
        wanted = f"atelier:delete:{record.id}"
        buttons = (child for row in message.components for child in getattr(row, "children", ()))
        return message if any(getattr(b, "custom_id", None) == wanted for b in buttons) else None

    async def _forget_images(self, record: JobRecord) -> None:
        paths = [str(image["path"]) for image in record.images if image.get("path")]
        if paths:
            await asyncio.to_thread(self.outputs.delete, paths)

    async def erase_history(self, interaction: discord.Interaction) -> int:
        """`/forget`: erase the member's prompts and images (the ledger's sums stay)."""
        erased = await self.jobs.erase_history(interaction.user.id)
        for record in erased:
            await self._forget_images(record)
        return len(erased)

    # ------------------------------------------------------------------ reading
    async def repost(self, interaction: discord.Interaction, job_text: str) -> None:
        job_id = normalize_job_id(job_text)
        record = await self.jobs.get(job_id) if job_id else None
        if record is None:
            await say(interaction, f"There is no job `{job_text[:40]}`.")
            return
        if not await self.may_see(interaction, record):
            await say(
                interaction, "You can post only your own jobs, or jobs from this channel. Ask its owner to share it."
            )
            return
        if record.deleted or record.params.get("erased"):
            await say(interaction, f"Job `{record.id}` was deleted: its images are gone.")
            return
        if record.status != "done":
            await say(interaction, f"Job `{record.id}` is {record.status}; only finished jobs can be posted.")
            return
        await interaction.response.defer()
        try:
            await self.results.repost(interaction, record)
        except Refused as exc:
            await interaction.followup.send(str(exc), ephemeral=True)

    async def show_quota(self, interaction: discord.Interaction) -> None:
        exempt = self.settings.quota.moderators_exempt and await is_moderator(interaction)
        status = await self.quotas.status(
            interaction.guild_id, interaction.user.id, role_ids(interaction), exempt=exempt
        )
        view = QuotaView(status.limit, status.used, status.remaining, status.resets_at)
        window = duration(self.settings.quota.window_hours * 3600)
        await say(interaction, f"{quota_text(view)}\nWindow: {window}, rolling.")

    async def show_own_queue(self, interaction: discord.Interaction) -> None:
        views = self.scheduler.queued_for(interaction.user.id)
        if not views:
            await say(interaction, "You have no queued or running jobs.")
            return
        await say(interaction, "\n".join(queue_line(v) for v in views))

    async def show_whole_queue(self, interaction: discord.Interaction, *, every_server: bool = False) -> None:
        """`/mod queue`: this server's jobs (a moderator sees nothing of other servers);
        `/operator queue` (`every_server`): all of them."""
        views = self.scheduler.snapshot()
        if every_server:
            paused = " (paused)" if self.scheduler.paused else ""
        else:
            views = [v for v in views if v.record.guild_id == interaction.guild_id]
            paused = " (paused)" if self.scheduler.server_paused(interaction.guild_id) else ""
        if not views:
            await say(interaction, f"The queue is empty{paused}.")
            return
        lines = [f"{len(views)} job(s){paused}:"] + [f"{queue_line(v)} · <@{v.owner_id}>" for v in views[:MAX_LINES]]
        if len(views) > MAX_LINES:
            lines.append(f"… and {len(views) - MAX_LINES} more")
        await say(interaction, "\n".join(lines), allowed_mentions=discord.AllowedMentions.none())

    async def own_job_choices(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return job_choices(self.scheduler.queued_for(interaction.user.id), current)

    async def server_job_choices(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        if not await is_moderator(interaction):
            return []
        views = [v for v in self.scheduler.snapshot() if v.record.guild_id == interaction.guild_id]
        return job_choices(views, current)


def queue_line(view: JobView) -> str:
    kind = label_of(view.record.kind)
    if view.status == "running":
        step = f" step {view.progress.step}/{view.progress.total}" if view.progress else ""
        return f"• `{view.job_id}` {kind} · running{step} · ETA ~{duration(view.eta)}"
    return f"• `{view.job_id}` {kind} · position {view.position} · ETA ~{duration(view.eta)}"


def job_choices(views: list[Any], current: str) -> list[app_commands.Choice[str]]:
    needle = current.strip().upper()
    choices = []
    for view in views:
        if needle and needle not in view.job_id:
            continue
        prompt = str(view.record.params.get("prompt", ""))[:60]
        label = f"{view.job_id} · {label_of(view.record.kind)} · {view.status} · {prompt}"
        choices.append(app_commands.Choice(name=label[:100], value=view.job_id))
    return choices[:25]


__all__ = ["JobActions", "job_choices", "queue_line"]
