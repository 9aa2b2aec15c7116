"""Upscale and U1…Un on results: ×2, then a low-strength pass that adds the detail."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import discord
from discord.ext import commands

from bot.buttons import BLUE, INDEX, JOB_ID, ResultButton
from bot.commands.common import atelier
from bot.interactions import guarded
from engine.jobs import Job, JobOrder, Upscale

if TYPE_CHECKING:
    from bot.app import AtelierBot


class UpscaleButton(ResultButton, template=rf"atelier:upscale:{JOB_ID}:{INDEX}$"):
    action: ClassVar[str] = "upscale"
    label, emoji, style, single = "Upscale", "🔍", BLUE, 1
    per_image, per_image_row, per_image_style = "U", 0, BLUE

    async def act(self, interaction: discord.Interaction) -> None:
        bot = atelier(interaction)
        gen = bot.settings.generation

        def build(_: JobOrder, fields: dict[str, Any]) -> Job:
            limit = bot.wiring.intake.image_byte_limit(interaction, 1)
            return Upscale(**fields, strength=gen.upscale_strength, steps=gen.upscale_steps, max_image_bytes=limit)

        async def work() -> None:
            parent = await bot.wiring.intake.inputs.parent(self.job_id)
            await bot.wiring.intake.from_parent(interaction, parent, self.index, self.action, build)

        await guarded(interaction, work)


class Upscaling(commands.Cog):
    """No command of its own: the Upscale buttons on results."""


async def setup(bot: AtelierBot) -> None:
    await bot.add_cog(Upscaling())
    bot.add_dynamic_items(UpscaleButton)
