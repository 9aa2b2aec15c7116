"""/refine and /variations: img2img on an attached image."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.app_commands import Range
from discord.ext import commands

from bot.commands.common import model_autocomplete

if TYPE_CHECKING:
    from bot.app import AtelierBot


class Images(commands.Cog):
    def __init__(self, bot: AtelierBot) -> None:
        self.bot = bot

    @app_commands.command(name="refine", description="Refine an image with the refiner model")
    @app_commands.describe(
        image="The image to refine (PNG, JPEG or WebP)",
        prompt="What the image shows (helps the refiner)",
        strength="How much to change, 0.05–1.0 (default 0.3)",
        model="Model (default: yours, or the server's)",
    )
    @app_commands.autocomplete(model=model_autocomplete)
    async def refine(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        prompt: str | None = None,
        strength: Range[float, 0.05, 1.0] | None = None,
        model: str | None = None,
    ) -> None:
        await self.bot.requests.refine_attachment(
            interaction, attachment=image, prompt=prompt, strength=strength, model=model
        )

    @app_commands.command(name="variations", description="Make variations of an image")
    @app_commands.describe(
        image="The image to vary (PNG, JPEG or WebP)",
        prompt="What the variations should show",
        strength="How far from the original, 0.05–1.0 (default 0.6)",
        count="How many variations, 1–4 (default 4)",
        model="Model (default: yours, or the server's)",
    )
    @app_commands.autocomplete(model=model_autocomplete)
    async def variations(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        prompt: str | None = None,
        strength: Range[float, 0.05, 1.0] | None = None,
        count: Range[int, 1, 4] | None = None,
        model: str | None = None,
    ) -> None:
        await self.bot.requests.variations_attachment(
            interaction, attachment=image, prompt=prompt, strength=strength, count=count, model=model
        )


async def setup(bot: AtelierBot) -> None:
    await bot.add_cog(Images(bot))
