"""/refine and /variations: img2img on an attached image; and their buttons on results
(Refine, Variations, V1…Vn)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import discord
from discord import app_commands
from discord.app_commands import Range
from discord.ext import commands

from bot import remix
from bot.buttons import BLUE, INDEX, JOB_ID, ResultButton
from bot.commands.common import atelier, lora_autocomplete, model_autocomplete
from bot.intake import random_seed
from bot.interactions import guarded
from bot.loras import LORA_HELP, styled
from engine import validate
from engine.jobs import Job, JobOrder, Refine, Variations
from engine.options import COUNT, STRENGTH

if TYPE_CHECKING:
    from bot.app import AtelierBot

REFINE_STRENGTH = Refine.strength  # the dataclass default: 0.3
VARIATIONS_STRENGTH = Variations.strength  # 0.6
VARIATIONS_COUNT = Variations.count  # 4


class Images(commands.Cog):
    def __init__(self, bot: AtelierBot) -> None:
        self.bot = bot

    @app_commands.command(name="refine", description="Refine an image with the refiner model")
    @app_commands.describe(
        image="The image to refine (PNG, JPEG or WebP)",
        prompt="What the image shows (helps the refiner)",
        strength=f"How much to change, {STRENGTH.low:g}–{STRENGTH.high:g} (default {REFINE_STRENGTH:g})",
        model="Model (default: yours, or the server's)",
        lora=LORA_HELP,
    )
    @app_commands.autocomplete(model=model_autocomplete, lora=lora_autocomplete)
    async def refine(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        prompt: str | None = None,
        strength: Range[float, STRENGTH.low, STRENGTH.high] | None = None,
        model: str | None = None,
        lora: str | None = None,
    ) -> None:
        async def work() -> None:
            common, typed = await self._common(interaction, prompt, model, lora)
            job = Refine(
                strength=validate.check_strength(strength if strength is not None else REFINE_STRENGTH), **common
            )
            await self.bot.wiring.intake.attachment(interaction, image, job, typed=typed)

        await guarded(interaction, work)

    @app_commands.command(name="variations", description="Make variations of an image")
    @app_commands.describe(
        image="The image to vary (PNG, JPEG or WebP)",
        prompt="What the variations should show",
        strength=f"How far from the original, {STRENGTH.low:g}–{STRENGTH.high:g} (default {VARIATIONS_STRENGTH:g})",
        count=f"How many variations, {COUNT.low}–{COUNT.high} (default {VARIATIONS_COUNT})",
        model="Model (default: yours, or the server's)",
        lora=LORA_HELP,
    )
    @app_commands.autocomplete(model=model_autocomplete, lora=lora_autocomplete)
    async def variations(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        prompt: str | None = None,
        strength: Range[float, STRENGTH.low, STRENGTH.high] | None = None,
        count: Range[int, COUNT.low, COUNT.high] | None = None,
        model: str | None = None,
        lora: str | None = None,
    ) -> None:
        async def work() -> None:
            common, typed = await self._common(interaction, prompt, model, lora)
            number = validate.check_count(count if count is not None else VARIATIONS_COUNT)
            job = Variations(
                strength=validate.check_strength(strength if strength is not None else VARIATIONS_STRENGTH),
                count=number,
                max_image_bytes=self.bot.wiring.intake.image_byte_limit(interaction, number),
                **common,
            )
            await self.bot.wiring.intake.attachment(interaction, image, job, typed=typed)

        await guarded(interaction, work)

    async def _common(
        self, interaction: discord.Interaction, prompt: str | None, model: str | None, lora: str | None
    ) -> tuple[dict[str, Any], str | None]:
        """The fields both commands share, and the member's own prompt when the job's differs
        (the LoRAs' trigger words added)."""
        gen = self.bot.settings.generation
        prompt_text = validate.check_prompt(prompt, max_chars=gen.max_prompt_chars, required=False)
        model_name = await self.bot.wiring.intake.model(interaction, model)
        asked = styled(self.bot.settings, model=model_name, prompt=prompt_text, negative="", lora=lora)
        await self.bot.wiring.intake.precheck(interaction, asked.prompt)
        fields = {
            "job_id": "pending",
            "prompt": asked.prompt,
            "loras": asked.loras,
            "steps": gen.default_steps,
            "cfg": gen.default_cfg,
            "seed": random_seed(),
            "sampler": gen.default_sampler,
            "model": model_name,
        }
        return fields, asked.typed


class VariationsButton(ResultButton, template=rf"atelier:variations:{JOB_ID}:{INDEX}$"):
    action: ClassVar[str] = "variations"
    label, emoji, style, single = "Variations", "🎨", BLUE, 2
    per_image, per_image_row = "V", 1

    async def act(self, interaction: discord.Interaction) -> None:
        await remix.start(interaction, remix.Target(self.action, self.job_id, self.index))


async def variations(interaction: discord.Interaction, target: remix.Target, prompt: str | None) -> None:
    """Variations / V1…Vn: four variations of the image, with Remix's prompt when edited; a
    controlled result's go on following its control map (Intake.parent_control)."""
    intake = atelier(interaction).wiring.intake

    def build(parent: JobOrder, fields: dict[str, Any]) -> Job:
        limit = intake.image_byte_limit(interaction, VARIATIONS_COUNT)
        return Variations(**{**fields, "seed": random_seed()}, steps=parent.spec.steps, max_image_bytes=limit)

    parent = await intake.inputs.parent(target.job_id)
    await intake.from_parent(interaction, parent, target.index, target.action, build, prompt=prompt, carry_control=True)


class RefineButton(ResultButton, template=rf"atelier:refine:{JOB_ID}:{INDEX}$"):
    action: ClassVar[str] = "refine"
    label, emoji, style, single = "Refine", "✨", BLUE, 3

    async def act(self, interaction: discord.Interaction) -> None:
        bot = atelier(interaction)

        async def work() -> None:
            parent = await bot.wiring.intake.inputs.parent(self.job_id)
            await bot.wiring.intake.from_parent(
                interaction, parent, self.index, self.action, lambda p, fields: Refine(**fields, steps=p.spec.steps)
            )

        await guarded(interaction, work)


async def setup(bot: AtelierBot) -> None:
    await bot.add_cog(Images(bot))
    bot.add_dynamic_items(VariationsButton, RefineButton)
    remix.remixable(VariationsButton.action, variations)


__all__ = ["Images", "RefineButton", "VariationsButton"]
