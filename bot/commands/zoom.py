"""/zoom and Zoom Out: the image shrunk in the centre of a frame of its own size, the frame
generated to fit (SDXL outpainting)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import discord
from discord import app_commands
from discord.app_commands import Choice
from discord.ext import commands

from bot import remix
from bot.buttons import GREY, INDEX, JOB_ID, ResultButton
from bot.commands.common import lora_autocomplete, model_autocomplete
from bot.commands.edit import edit_fields, from_result, result_fields
from bot.interactions import guarded
from bot.loras import LORA_HELP, with_loras
from engine.jobs import Job, JobOrder, Zoom
from engine.jobs.zoom import DEFAULT_FACTOR, check_factor
from engine.masks import ZOOM_FACTORS

if TYPE_CHECKING:
    from bot.app import AtelierBot

FACTOR_CHOICES = [Choice(name=f"{factor:g}", value=factor) for factor in ZOOM_FACTORS]


class Zooming(commands.Cog):
    def __init__(self, bot: AtelierBot) -> None:
        self.bot = bot

    @app_commands.command(name="zoom", description="Zoom out: more of the scene around the image")
    @app_commands.describe(
        image="The image to zoom out of (PNG, JPEG or WebP)",
        factor=f"How far to zoom out (default {DEFAULT_FACTOR:g})",
        prompt="What the wider scene shows",
        model="Model (default: yours, or the server's)",
        lora=LORA_HELP,
    )
    @app_commands.choices(factor=FACTOR_CHOICES)
    @app_commands.autocomplete(model=model_autocomplete, lora=lora_autocomplete)
    async def zoom(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        factor: float | None = None,
        prompt: str | None = None,
        model: str | None = None,
        lora: str | None = None,
    ) -> None:
        async def work() -> None:
            fields = await edit_fields(interaction, prompt, model, required=False)
            fields, typed = with_loras(self.bot.settings, fields, lora)
            job = Zoom(factor=check_factor(DEFAULT_FACTOR if factor is None else factor), **fields)
            await self.bot.wiring.intake.attachment(interaction, image, job, typed=typed)

        await guarded(interaction, work)


class ZoomOutButton(ResultButton, template=rf"atelier:zoom:{JOB_ID}:{INDEX}$"):
    action: ClassVar[str] = "zoom"
    label, emoji, style, single = "Zoom Out", "🔭", GREY, 6

    async def act(self, interaction: discord.Interaction) -> None:
        await remix.start(interaction, remix.Target(self.action, self.job_id, self.index))


async def zoom_out(interaction: discord.Interaction, target: remix.Target, prompt: str | None) -> None:
    def build(parent: JobOrder, fields: dict[str, Any]) -> Job:
        return Zoom(**result_fields(interaction, parent, fields), factor=DEFAULT_FACTOR)

    await from_result(interaction, target, prompt, build)


async def setup(bot: AtelierBot) -> None:
    await bot.add_cog(Zooming(bot))
    bot.add_dynamic_items(ZoomOutButton)
    remix.remixable(ZoomOutButton.action, zoom_out)


__all__ = ["ZoomOutButton", "Zooming"]
