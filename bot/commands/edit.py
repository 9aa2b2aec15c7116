"""/edit and Vary Region: redo part of an image (SDXL inpainting), the rest kept pixel for pixel.

`/edit` takes the part to redo as a grid `region` or the member's own `mask`. The Vary Region
button on a result answers with an ephemeral picker (a select menu of the nine regions, several
allowed) whose choice starts the job; the picker is a persistent component (its job in its
custom_id), so it keeps working after a restart. Zoom Out and Pan (bot/commands/zoom.py, pan.py)
share `edit_fields` and `from_result` below.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import discord
from discord import app_commands
from discord.app_commands import Choice, Range
from discord.ext import commands

from bot import remix
from bot.buttons import GREY, INDEX, JOB_ID, OtherItems, ResultButton
from bot.commands.common import atelier, lora_autocomplete, model_autocomplete
from bot.errors import Refused
from bot.inputs import FETCH_SECONDS
from bot.intake import random_seed
from bot.interactions import guarded, say
from bot.loras import LORA_HELP, with_loras
from bot.permissions import serves
from engine import validate
from engine.jobs import Edit, ImageJob, Job, JobOrder
from engine.jobs.edit import EDIT_STRENGTH, NO_AREA, check_regions
from engine.masks import REGIONS, decode_mask, encode_mask
from engine.options import PROMPT_CHARS, STRENGTH

if TYPE_CHECKING:
    from bot.app import AtelierBot

REGION_CHOICES = [Choice(name=name, value=name) for name in REGIONS]
REGION_LABELS = {
    "center": "Center",
    "top": "Top row",
    "bottom": "Bottom row",
    "left": "Left column",
    "right": "Right column",
    "top-left": "Top-left corner",
    "top-right": "Top-right corner",
    "bottom-left": "Bottom-left corner",
    "bottom-right": "Bottom-right corner",
}


async def edit_fields(
    interaction: discord.Interaction, prompt: str | None, model: str | None, *, required: bool
) -> dict[str, Any]:
    """The fields an editing command's job takes from its options and the operator's defaults,
    after the cheap refusals (the prompt, the model, bans, the blocklist, the queue)."""
    bot = atelier(interaction)
    gen = bot.settings.generation
    prompt_text = validate.check_prompt(prompt, max_chars=gen.max_prompt_chars, required=required)
    model_name = await bot.wiring.intake.model(interaction, model)
    await bot.wiring.intake.precheck(interaction, prompt_text)
    return {
        "job_id": "pending",
        "prompt": prompt_text,
        "steps": gen.default_steps,
        "cfg": gen.default_cfg,
        "seed": random_seed(),
        "sampler": gen.default_sampler,
        "model": model_name,
        "max_image_bytes": bot.wiring.intake.image_byte_limit(interaction, 1),
    }


async def from_result(
    interaction: discord.Interaction,
    target: remix.Target,
    prompt: str | None,
    build: Callable[[JobOrder, dict[str, Any]], Job],
    *,
    carry_control: bool = False,
) -> None:
    """An editing job made from a result's image by a button (the image at its own resolution).
    `carry_control`: Vary Region keeps a controlled result's ControlNet (Intake.parent_control);
    Zoom Out and Pan change the canvas, which the map no longer fits."""
    intake = atelier(interaction).wiring.intake
    parent = await intake.inputs.parent(target.job_id)
    await intake.from_parent(
        interaction,
        parent,
        target.index,
        target.action,
        build,
        prompt=prompt,
        keep_resolution=True,
        carry_control=carry_control,
    )


def result_fields(interaction: discord.Interaction, parent: JobOrder, fields: dict[str, Any]) -> dict[str, Any]:
    """What an editing button's job takes from the result it was clicked on: what
    `Intake.from_parent` gives, the parent's steps, a new seed, one image's share of the upload."""
    limit = atelier(interaction).wiring.intake.image_byte_limit(interaction, 1)
    return {**fields, "seed": random_seed(), "steps": parent.spec.steps, "max_image_bytes": limit}


def encode_regions(regions: tuple[str, ...]) -> str:
    """Regions as a short code for a custom_id (a bit per region, in hex)."""
    return format(sum(1 << REGIONS.index(name) for name in regions), "x")


def decode_regions(code: str) -> tuple[str, ...]:
    bits = int(code or "0", 16)
    return tuple(name for i, name in enumerate(REGIONS) if bits >> i & 1)


class Editing(commands.Cog):
    def __init__(self, bot: AtelierBot) -> None:
        self.bot = bot
        self.edit._params["prompt"].max_value = bot.settings.generation.max_prompt_chars

    @app_commands.command(name="edit", description="Redo part of an image (Vary Region), keeping the rest")
    @app_commands.describe(
        image="The image to edit (PNG, JPEG or WebP)",
        prompt="What the region should become",
        mask="A mask: white where to redo, black where to keep (scaled to the image)",
        region="Or a part of the image: a cell or a side of a 3×3 grid",
        strength=f"How much to change it, {STRENGTH.low:g}–{STRENGTH.high:g} (default {EDIT_STRENGTH:g})",
        model="Model (default: yours, or the server's)",
        lora=LORA_HELP,
    )
    @app_commands.choices(region=REGION_CHOICES)
    @app_commands.autocomplete(model=model_autocomplete, lora=lora_autocomplete)
    async def edit(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        prompt: Range[str, PROMPT_CHARS.low, PROMPT_CHARS.high],
        mask: discord.Attachment | None = None,
        region: str | None = None,
        strength: Range[float, STRENGTH.low, STRENGTH.high] | None = None,
        model: str | None = None,
        lora: str | None = None,
    ) -> None:
        async def work() -> None:
            if mask is None and region is None:
                raise Refused(NO_AREA)
            if mask is not None and region is not None:
                raise Refused("Give a `mask` or a `region` to redo, not both.")
            regions = check_regions((region,)) if region is not None else ()
            if mask is not None:
                self._check_mask_size(mask)
            fields = await edit_fields(interaction, prompt, model, required=True)
            fields, typed = with_loras(self.bot.settings, fields, lora)
            job = Edit(
                strength=validate.check_strength(strength if strength is not None else EDIT_STRENGTH),
                regions=regions,
                **fields,
            )
            then = None if mask is None else self._mask_reader(mask)
            await self.bot.wiring.intake.attachment(interaction, image, job, then=then, typed=typed)

        await guarded(interaction, work)

    def _check_mask_size(self, mask: discord.Attachment) -> None:
        """What Discord reports of the mask, refused before anything is downloaded."""
        gen = self.bot.settings.generation
        if mask.size <= 0:
            raise Refused("The mask is empty: attach a PNG, JPEG or WebP mask.")
        if mask.size > gen.max_attachment_bytes:
            raise Refused(
                f"The mask is {mask.size / 1e6:.1f} MB; the limit is {gen.max_attachment_bytes / 1e6:.1f} MB. "
                "Attach a smaller mask (black and white PNGs are small)."
            )
        if mask.width and mask.height and mask.width * mask.height > gen.max_attachment_pixels:
            raise Refused(
                f"The mask is {mask.width}×{mask.height}; attach one of at most "
                f"{gen.max_attachment_pixels / 1e6:.0f} megapixels (it is scaled to the image anyway)."
            )

    def _mask_reader(self, mask: discord.Attachment) -> Callable[[ImageJob, tuple[int, int]], Awaitable[ImageJob]]:
        gen = self.bot.settings.generation

        async def read(job: ImageJob, size: tuple[int, int]) -> ImageJob:
            """The mask, downloaded once the image is in and decoded at the image's fitted size
            (same caps as images), kept in the job as a PNG."""
            try:
                data = await asyncio.wait_for(mask.read(), FETCH_SECONDS)
            except (TimeoutError, discord.HTTPException):
                raise Refused("I could not download your mask in time: try again, or attach a smaller file.") from None
            decoded = await asyncio.to_thread(
                decode_mask, data, size, max_bytes=gen.max_attachment_bytes, max_pixels=gen.max_attachment_pixels
            )
            return replace(job, mask=encode_mask(decoded))  # type: ignore[call-arg]

        return read


class VaryRegionButton(ResultButton, template=rf"atelier:edit:{JOB_ID}:{INDEX}$"):
    """Vary Region: answers with the region picker, only for whoever clicked."""

    action: ClassVar[str] = "edit"
    label, emoji, style, single = "Vary Region", "🖌️", GREY, 5

    async def act(self, interaction: discord.Interaction) -> None:
        view = discord.ui.View(timeout=None)
        view.add_item(RegionPicker(self.job_id, self.index))
        await interaction.response.send_message(
            "Which parts should be redone? Pick one or more; the rest of the image stays as it is.",
            view=view,
            ephemeral=True,
        )


class RegionPicker(discord.ui.DynamicItem[discord.ui.Select[Any]], template=rf"atelier:regions:{JOB_ID}:{INDEX}$"):
    """The nine regions (several may be chosen); choosing starts the Vary Region job."""

    def __init__(self, job_id: str, index: int) -> None:
        options = [discord.SelectOption(label=REGION_LABELS[name], value=name) for name in REGIONS]
        super().__init__(
            discord.ui.Select(
                custom_id=f"atelier:regions:{job_id}:{index}",
                placeholder="Regions to redo",
                min_values=1,
                max_values=len(REGIONS),
                options=options,
            )
        )
        self.job_id = job_id
        self.index = index

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> RegionPicker:
        return cls(match["job"], int(match["index"]))

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        return serves(interaction)

    async def callback(self, interaction: discord.Interaction) -> None:
        try:
            regions = check_regions(tuple(self.item.values))
        except validate.ValidationFailed as exc:
            await say(interaction, exc.message)
            return
        await remix.start(interaction, remix.Target("edit", self.job_id, self.index, encode_regions(regions)))


OtherItems["regions"] = RegionPicker  # issued, like the result buttons: answered after a restart too


async def vary_region(interaction: discord.Interaction, target: remix.Target, prompt: str | None) -> None:
    regions = check_regions(decode_regions(target.extra))

    def build(parent: JobOrder, fields: dict[str, Any]) -> Job:
        return Edit(**result_fields(interaction, parent, fields), regions=regions)

    await from_result(interaction, target, prompt, build, carry_control=True)


async def setup(bot: AtelierBot) -> None:
    await bot.add_cog(Editing(bot))
    bot.add_dynamic_items(VaryRegionButton, RegionPicker)
    remix.remixable(VaryRegionButton.action, vary_region)


__all__ = ["Editing", "RegionPicker", "VaryRegionButton", "edit_fields", "from_result", "result_fields"]
