"""/generate: text to image with the base → refiner ensemble."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.app_commands import Choice, Range
from discord.ext import commands

from bot.commands.common import model_autocomplete, set_choices
from bot.errors import Refused
from bot.intake import random_seed
from bot.interactions import guarded
from engine import validate
from engine.jobs import JobOrder, Text2Img
from engine.options import CFG, COUNT, PROMPT_CHARS, SAMPLERS, SEED, STEPS

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
        steps=f"Denoising steps, {STEPS.low}–{STEPS.high} (default {STEPS.default})",
        cfg=f"Prompt guidance, {CFG.low:g}–{CFG.high:g} (default {CFG.default:g})",
        seed="Seed for a reproducible image (random if empty)",
        sampler=f"Sampler (default {SAMPLERS[0]})",
        count=f"How many images, {COUNT.low}–{COUNT.high}",
        model="Model (default: yours, or the server's)",
        refiner="Use the refiner (default: on when the model has one)",
    )
    @app_commands.choices(aspect=[Choice(name="1:1", value="1:1")], sampler=SAMPLER_CHOICES)
    @app_commands.autocomplete(model=model_autocomplete)
    async def generate(
        self,
        interaction: discord.Interaction,
        prompt: Range[str, PROMPT_CHARS.low, PROMPT_CHARS.high],
        negative: str | None = None,
        aspect: str | None = None,
        steps: Range[int, STEPS.low, STEPS.high] | None = None,
        cfg: Range[float, CFG.low, CFG.high] | None = None,
        seed: Range[int, SEED.low, SEED.high] | None = None,
        sampler: str | None = None,
        count: Range[int, COUNT.low, COUNT.high] | None = None,
        model: str | None = None,
        refiner: bool | None = None,
    ) -> None:
        intake = self.bot.wiring.intake

        async def work() -> None:
            gen = self.bot.settings.generation
            aspects = gen.aspect_sizes()
            aspect_name = aspect if aspect is not None else next(iter(aspects))
            width, height = validate.check_aspect(aspect_name, aspects)
            model_name = await intake.model(interaction, model)
            has_refiner = bool(self.bot.settings.models[model_name].refiner)
            if refiner and not has_refiner:
                raise Refused(f"The model `{model_name}` has no refiner: leave `refiner` out or set it to False.")
            number = validate.check_count(count if count is not None else COUNT.default)
            job = Text2Img(
                job_id="pending",
                prompt=validate.check_prompt(prompt, max_chars=gen.max_prompt_chars),
                negative=validate.check_negative(negative, max_chars=gen.max_prompt_chars),
                width=width,
                height=height,
                steps=validate.check_steps(steps if steps is not None else gen.default_steps),
                cfg=validate.check_cfg(cfg if cfg is not None else gen.default_cfg),
                seed=validate.check_seed(seed) if seed is not None else random_seed(),
                sampler=validate.check_sampler(sampler or gen.default_sampler),
                count=number,
                model=model_name,
                refiner=has_refiner if refiner is None else refiner,
                max_image_bytes=intake.image_byte_limit(interaction, number),
            )
            await intake.precheck(interaction, job.prompt, job.negative)
            await intake.submit(interaction, JobOrder(job, aspect=aspect_name))

        await guarded(interaction, work)


async def setup(bot: AtelierBot) -> None:
    await bot.add_cog(Generate(bot))
