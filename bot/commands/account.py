"""A member's own view: /quota, /queue, /cancel (and the Cancel button on queue cards), /job, /forget."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import discord
from discord import app_commands
from discord.ext import commands

from bot.buttons import JOB_ID, JobButton, ProgressButton
from bot.commands.common import atelier, own_jobs_autocomplete
from bot.interactions import first_response

if TYPE_CHECKING:
    from bot.app import AtelierBot


class Account(commands.Cog):
    def __init__(self, bot: AtelierBot) -> None:
        self.bot = bot

    @app_commands.command(name="quota", description="Your allowance, what you used and when it resets")
    async def quota(self, interaction: discord.Interaction) -> None:
        # A database read, which may queue behind a burst's writes: keep the 3 s guarantee.
        await first_response(interaction).answers_first()
        await self.bot.wiring.actions.show_quota(interaction)

    @app_commands.command(name="queue", description="Your queued and running jobs")
    async def queue(self, interaction: discord.Interaction) -> None:
        await self.bot.wiring.actions.show_own_queue(interaction)

    @app_commands.command(name="cancel", description="Cancel one of your jobs (its cost is refunded)")
    @app_commands.describe(job="The job id (shown as Job <id>)")
    @app_commands.autocomplete(job=own_jobs_autocomplete)
    async def cancel(self, interaction: discord.Interaction, job: str) -> None:
        # Cancelling writes to the database, which may queue behind a burst: keep the 3 s guarantee.
        await first_response(interaction).answers_first()
        await self.bot.wiring.actions.cancel(interaction, job, as_moderator=False)

    @app_commands.command(name="forget", description="Erase your prompts and images from the bot")
    @app_commands.describe(confirm="True to erase them for good (your usage totals stay, for quotas)")
    async def forget(self, interaction: discord.Interaction, confirm: bool) -> None:
        if not confirm:
            await interaction.response.send_message("Nothing was erased.", ephemeral=True)
            return
        answer = first_response(interaction)  # deferred by itself if erasing takes long
        erased = await self.bot.wiring.actions.erase_history(interaction)
        # A default negative prompt (/settings) is text the member wrote, too.
        await self.bot.moderation.set_member_settings(interaction.user.id, negative=None)
        await answer.ephemeral(
            f"Erased the prompts and images of {erased} job{'' if erased == 1 else 's'} of yours, "
            "and your default negative prompt. "
            "Results already posted stay in their channels: delete them with their Delete button. "
            "Jobs still queued or running were left alone."
        )

    @app_commands.command(name="job", description="Post a finished job's result again, with its buttons")
    @app_commands.describe(id="The job id (shown as Job <id>)")
    async def job(self, interaction: discord.Interaction, id: str) -> None:
        await self.bot.wiring.actions.repost(interaction, id)


class CancelButton(JobButton, template=rf"atelier:cancel:{JOB_ID}$"):
    """On the queue card and the progress message: the owner (or a moderator) cancels the job."""

    action: ClassVar[str] = "cancel"

    async def act(self, interaction: discord.Interaction) -> None:
        await atelier(interaction).wiring.actions.cancel(interaction, self.job_id, as_moderator=False)


ProgressButton["cancel"] = CancelButton


async def setup(bot: AtelierBot) -> None:
    bot.add_dynamic_items(CancelButton)
    await bot.add_cog(Account(bot))
