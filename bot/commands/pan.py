"""/pan and Pan Left/Right/Up/Down: the image extended by half its width or height, the new strip
generated to fit (SDXL outpainting), the image unchanged on the other side."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, ClassVar

import discord
from discord import app_commands
from discord.app_commands import Choice
from discord.ext import commands
from PIL import Image

from bot import remix
from bot.buttons import GREY, INDEX, JOB_ID, ResultButton
from bot.commands.common import atelier, lora_autocomplete, model_autocomplete
from bot.commands.edit import edit_fields, from_result, result_fields
from bot.interactions import guarded
from bot.loras import LORA_HELP, with_loras
from engine.jobs import ImageJob, Job, JobOrder, Pan
from engine.jobs.pan import DIRECTIONS, check_direction

if TYPE_CHECKING:
    from bot.app import AtelierBot

DIRECTION_CHOICES = [Choice(name=direction, value=direction) for direction in DIRECTIONS]


class Panning(commands.Cog):
    def __init__(self, bot: AtelierBot) -> None:
        self.bot = bot

    @app_commands.command(name="pan", description="Extend the image to one side")
    @app_commands.describe(
        image="The image to extend (PNG, JPEG or WebP)",
        direction="Which side to extend",
        prompt="What the new part shows",
        model="Model (default: yours, or the server's)",
        lora=LORA_HELP,
    )
    @app_commands.choices(direction=DIRECTION_CHOICES)
    @app_commands.autocomplete(model=model_autocomplete, lora=lora_autocomplete)
    async def pan(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        direction: str,
        prompt: str | None = None,
        model: str | None = None,
        lora: str | None = None,
    ) -> None:
        max_pixels = self.bot.settings.generation.max_attachment_pixels

        async def work() -> None:
            fields = await edit_fields(interaction, prompt, model, required=False)
            fields, typed = with_loras(self.bot.settings, fields, lora)
            job = Pan(direction=check_direction(direction), **fields)

            async def fits(with_image: ImageJob, size: tuple[int, int]) -> ImageJob:
                """Refused before anything is charged when the canvas would be too large."""
                job.check_canvas(size, max_pixels=max_pixels)
                return with_image

            await self.bot.wiring.intake.attachment(interaction, image, job, then=fits, typed=typed)

        await guarded(interaction, work)


class PanButton(ResultButton, template=r"$^"):
    """One of the four Pan buttons; `direction` says which."""

    direction: ClassVar[str] = ""

    async def act(self, interaction: discord.Interaction) -> None:
        await remix.start(interaction, remix.Target(self.action, self.job_id, self.index))


class PanLeftButton(PanButton, template=rf"atelier:pan-left:{JOB_ID}:{INDEX}$"):
    action, direction = "pan-left", "left"
    label, emoji, style, single = "Pan Left", "⬅️", GREY, 10


class PanRightButton(PanButton, template=rf"atelier:pan-right:{JOB_ID}:{INDEX}$"):
    action, direction = "pan-right", "right"
    label, emoji, style, single = "Pan Right", "➡️", GREY, 11


class PanUpButton(PanButton, template=rf"atelier:pan-up:{JOB_ID}:{INDEX}$"):
    action, direction = "pan-up", "up"
    label, emoji, style, single = "Pan Up", "⬆️", GREY, 12


class PanDownButton(PanButton, template=rf"atelier:pan-down:{JOB_ID}:{INDEX}$"):
    action, direction = "pan-down", "down"
    label, emoji, style, single = "Pan Down", "⬇️", GREY, 13


PAN_BUTTONS: dict[str, type[PanButton]] = {
    button.action: button for button in (PanLeftButton, PanRightButton, PanUpButton, PanDownButton)
}


async def pan(interaction: discord.Interaction, target: remix.Target, prompt: str | None) -> None:
    direction = PAN_BUTTONS[target.action].direction
    max_pixels = atelier(interaction).settings.generation.max_attachment_pixels

    def build(parent: JobOrder, fields: dict[str, Any]) -> Job:
        job = Pan(**result_fields(interaction, parent, fields), direction=direction)
        with Image.open(io.BytesIO(job.image)) as image:  # the header only
            job.check_canvas(image.size, max_pixels=max_pixels)
        return job

    await from_result(interaction, target, prompt, build)


async def setup(bot: AtelierBot) -> None:
    await bot.add_cog(Panning(bot))
    bot.add_dynamic_items(*PAN_BUTTONS.values())
    for button in PAN_BUTTONS.values():
        remix.remixable(button.action, pan)


__all__ = ["PAN_BUTTONS", "PanButton", "Panning"]
