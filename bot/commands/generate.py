"""/generate: text to image with the base → refiner ensemble."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.app_commands import Choice, Range
from discord.ext import commands

from bot.commands.common import model_autocomplete, set_choices
from engine.spec import SAMPLERS

if TYPE_CHECKING:
    from bot.app import AtelierBot

SAMPLER_CHOICES = [Choice(name=name, value=name) for name in SAMPLERS]


class Generate(commands.Cog):
    def __init__(self, bot: AtelierBot) -> None:
        self.bot = bot
        # The sizes are the operator's: fill the aspect choices from the config, first = default.
        set_choices(self.generate, "aspect", list(bot.settings.generation.aspects))
        self.generate._params["prompt"].max_value = bot.settings.generation.max_prompt_chars

    @app_commands.command(name="generate", description="Generate images from a prompt")
    @app_commands.describe(
        prompt="What to draw (weights: (word)1.3, word++)",
        negative="What to avoid",
        aspect="Image size (default: the first)",
        steps="Denoising steps, 1–60 (default 30)",
        cfg="Prompt guidance, 1–20 (default 7)",
        seed="Seed for a reproducible image (random if empty)",
        sampler="Sampler (default dpmpp_2m_karras)",
        count="How many images, 1–4",
        model="Model (default: yours, or the server's)",
        refiner="Use the refiner (default: on when the model has one)",
    )
    @app_commands.choices(aspect=[Choice(name="1:1", value="1:1")], sampler=SAMPLER_CHOICES)
    @app_commands.autocomplete(model=model_autocomplete)
    async def generate(
        self,
        interaction: discord.Interaction,
        prompt: Range[str, 1, 1500],
        negative: str | None = None,
        aspect: str | None = None,
        steps: Range[int, 1, 60] | None = None,
        cfg: Range[float, 1.0, 20.0] | None = None,
        seed: Range[int, 0, 2**32 - 1] | None = None,
        sampler: str | None = None,
        count: Range[int, 1, 4] | None = None,
        model: str | None = None,
        refiner: bool | None = None,
    ) -> None:
        await self.bot.requests.generate(
            interaction,
            prompt=prompt,
            negative=negative,
            aspect=aspect,
            steps=steps,
            cfg=cfg,
            seed=seed,
            sampler=sampler,
            count=count,
            model=model,
            refiner=refiner,
        )


async def setup(bot: AtelierBot) -> None:
    await bot.add_cog(Generate(bot))
