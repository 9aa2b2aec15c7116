"""Small helpers the command cogs share."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import discord
from discord import app_commands

from bot.errors import Refused
from bot.loras import catalog_of, lora_choices

if TYPE_CHECKING:
    from bot.app import AtelierBot

MAX_CHOICES = 25


def atelier(interaction: discord.Interaction) -> AtelierBot:
    """The bot an interaction came to (every interaction here comes to Atelier's)."""
    return cast("AtelierBot", interaction.client)


def set_choices(command: app_commands.Command[Any, Any, Any], parameter: str, names: list[str]) -> None:
    """Replace a parameter's choices at start-up (they come from the operator's config)."""
    command._params[parameter].choices = [app_commands.Choice(name=name, value=name) for name in names[:MAX_CHOICES]]


async def model_autocomplete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    needle = current.lower()
    names = [name for name in atelier(interaction).settings.models if needle in name.lower()]
    return [app_commands.Choice(name=name, value=name) for name in names[:MAX_CHOICES]]


async def lora_autocomplete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    """The `lora` option of every command that has one: the LoRAs fitting the chosen model (or
    the member's default) with their weights and trigger words (bot.loras)."""
    bot = atelier(interaction)
    requested = getattr(interaction.namespace, "model", None)
    try:
        model = await bot.wiring.intake.model(interaction, requested if isinstance(requested, str) else None)
    except Refused:
        model = bot.settings.default_model  # an unknown model typed: the command itself will say so
    return lora_choices(current, catalog_of(bot.settings), model)[:MAX_CHOICES]


async def own_jobs_autocomplete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    return await atelier(interaction).wiring.actions.own_job_choices(interaction, current)


async def any_jobs_autocomplete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    return await atelier(interaction).wiring.actions.server_job_choices(interaction, current)
