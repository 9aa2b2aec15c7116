"""/generate: text to image with the base → refiner ensemble."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.app_commands import Choice, Range
from discord.ext import commands

from bot.commands.common import lora_autocomplete, model_autocomplete, set_choices
from bot.commands.settings import member_defaults
from bot.errors import Refused
from bot.intake import random_seed
from bot.interactions import guarded
from bot.loras import LORA_HELP, draft_settings, styled
from engine import validate
from engine.jobs import JobOrder, Text2Img
from engine.options import CFG, CONTROL_STRENGTH, COUNT, DEFAULT_CONTROL_MODE, PROMPT_CHARS, SAMPLERS, SEED, STEPS

if TYPE_CHECKING:
    from bot.app import AtelierBot

SAMPLER_CHOICES = [Choice(name=name, value=name) for name in SAMPLERS]
CONTROL_OPTIONS = ("control_image", "control", "control_as_is", "control_strength")


class Generate(commands.Cog):
    def __init__(self, bot: AtelierBot) -> None:
        self.bot = bot
        # The sizes are the operator's: fill the aspect choices from the config, first = default.
        set_choices(self.generate, "aspect", list(bot.settings.generation.aspects))
        self.generate._params["prompt"].max_value = bot.settings.generation.max_prompt_chars
        # ControlNet: only the configured modes are offered; with none, no control option at all.
        params = self.generate._params
        modes = bot.settings.control_modes
        if modes:
            params["control"] = copy.copy(params["control"])  # this bot's own, not the class's
            params["control"].choices = [Choice(name=mode, value=mode) for mode in modes]
        else:
            for name in CONTROL_OPTIONS:
                del params[name]
        # Styles: the operator's presets as choices; with none configured, no style option.
        if bot.settings.styles:
            params["style"] = copy.copy(params["style"])  # this bot's own, not the class's
            set_choices(self.generate, "style", list(bot.settings.styles))
        else:
            del params["style"]

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
        control_image="A picture whose outlines, depth or pose the result follows (ControlNet)",
        control=f"What to follow in control_image (default: {DEFAULT_CONTROL_MODE})",
        control_as_is="control_image already is an edge, depth or pose map (default: False)",
        control_strength=(
            f"How closely to follow it, {CONTROL_STRENGTH.low:g}–{CONTROL_STRENGTH.high:g} "
            f"(default {CONTROL_STRENGTH.default:g})"
        ),
        lora=LORA_HELP,
        style="A preset style (your own options win over its settings)",
        draft="Draft: a fast few-step preview with the model's draft adapter (default: False)",
    )
    @app_commands.choices(
        aspect=[Choice(name="1:1", value="1:1")],
        sampler=SAMPLER_CHOICES,
        control=[Choice(name=DEFAULT_CONTROL_MODE, value=DEFAULT_CONTROL_MODE)],
        style=[Choice(name="style", value="style")],
    )
    @app_commands.autocomplete(model=model_autocomplete, lora=lora_autocomplete)
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
        control_image: discord.Attachment | None = None,
        control: str | None = None,
        control_as_is: bool | None = None,
        control_strength: Range[float, CONTROL_STRENGTH.low, CONTROL_STRENGTH.high] | None = None,
        lora: str | None = None,
        style: str | None = None,
        draft: bool | None = None,
    ) -> None:
        intake = self.bot.wiring.intake

        async def work() -> None:
            gen = self.bot.settings.generation
            aspects = gen.aspect_sizes()
            mine = await member_defaults(interaction)  # /settings: the member's own, else the operator's
            aspect_name = aspect if aspect is not None else mine.aspect
            width, height = validate.check_aspect(aspect_name, aspects)
            model_name = await intake.model(interaction, model)
            has_refiner = bool(self.bot.settings.models[model_name].refiner)
            if refiner and not has_refiner:
                raise Refused(f"The model `{model_name}` has no refiner: leave `refiner` out or set it to False.")
            number = validate.check_count(count if count is not None else COUNT.default)
            controlled = control_fields(
                self.bot.settings.control_modes, control_image, control, control_as_is, control_strength
            )
            # The style's texts and LoRAs, the member's LoRAs, trigger words, `<embeddings>`.
            asked = styled(
                self.bot.settings,
                model=model_name,
                prompt=validate.check_prompt(prompt, max_chars=gen.max_prompt_chars),
                negative=validate.check_negative(
                    negative if negative is not None else mine.negative, max_chars=gen.max_prompt_chars
                ),
                lora=lora,
                style=style,
            )
            # The member's own options win; then a draft's adapter settings, or the style's; then
            # the member's /settings defaults and the operator's.
            if draft:
                fast = draft_settings(self.bot.settings, model_name, sampler=sampler, refiner=refiner)
                run_sampler = fast.draft_sampler
                run_steps = steps if steps is not None else fast.draft_steps
                run_cfg = cfg if cfg is not None else fast.draft_cfg
            else:
                run_sampler = validate.check_sampler(sampler or asked.sampler or mine.sampler)
                run_steps = next(value for value in (steps, asked.steps, mine.steps) if value is not None)
                run_cfg = next(value for value in (cfg, asked.cfg, gen.default_cfg) if value is not None)
            job = Text2Img(
                job_id="pending",
                prompt=asked.prompt,
                negative=asked.negative,
                width=width,
                height=height,
                steps=validate.check_steps(run_steps),
                cfg=validate.check_cfg(run_cfg),
                seed=validate.check_seed(seed) if seed is not None else random_seed(),
                sampler=run_sampler,
                count=number,
                model=model_name,
                refiner=False if draft else (has_refiner if refiner is None else refiner),
                loras=asked.loras,
                style=asked.style,
                draft=bool(draft),
                max_image_bytes=intake.image_byte_limit(interaction, number + bool(controlled)),  # + the map
                **controlled,
            )
            await intake.precheck(interaction, job.prompt, job.negative)
            if control_image is not None:
                await intake.with_control(interaction, control_image, job, aspect=aspect_name, typed=asked.typed)
            else:
                await intake.submit(interaction, JobOrder(job, aspect=aspect_name, typed=asked.typed))

        await guarded(interaction, work)


def control_fields(
    modes: list[str],
    image: discord.Attachment | None,
    mode: str | None,
    as_is: bool | None,
    strength: float | None,
) -> dict[str, Any]:
    """The ControlNet fields of a /generate job (none without a control image); refuses control
    options without an image and a mode this bot does not offer."""
    if image is None:
        if mode is not None or as_is is not None or strength is not None:
            raise Refused(
                "`control`, `control_as_is` and `control_strength` go with a `control_image`: "
                "attach the picture the result should follow, or leave them out."
            )
        return {}
    default = DEFAULT_CONTROL_MODE if DEFAULT_CONTROL_MODE in modes else (modes[0] if modes else DEFAULT_CONTROL_MODE)
    return {
        "control": validate.check_control_mode(mode or default, modes),
        "control_as_is": bool(as_is),
        "control_strength": validate.check_control_strength(
            strength if strength is not None else CONTROL_STRENGTH.default
        ),
    }


async def setup(bot: AtelierBot) -> None:
    await bot.add_cog(Generate(bot))
