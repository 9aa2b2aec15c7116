"""/model list · /model use · /model info: each member's default model, and the LoRAs, embeddings
and styles the operator configured (list shows them, info describes any of them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.commands.common import MAX_CHOICES, atelier, model_autocomplete
from bot.loras import catalog_of
from bot.render import CONTENT_LIMIT, cut
from engine.options import DRAFT_SAMPLER_LABELS, SAMPLER_LABELS
from engine.styles import Catalog

if TYPE_CHECKING:
    from bot.app import AtelierBot


def addon_lines(catalog: Catalog) -> list[str]:
    """/model list's lines for the LoRAs, embeddings and styles (none when none are configured)."""
    lines = []
    if catalog.loras:
        lines.append("**LoRAs** (the `lora` option: `name` or `name:weight`)")
        for name, lora in catalog.loras.items():
            parts = [f"weight {lora.weight:g}"]
            if lora.trigger:
                parts.append(f"adds “{lora.trigger}”")
            if lora.models:
                parts.append("for " + ", ".join(f"`{model}`" for model in lora.models))
            desc = f": {lora.description}" if lora.description else ""
            lines.append(f"• `{name}` ({', '.join(parts)}){desc}")
    if catalog.embeddings:
        lines.append("**Embeddings** (write `<name>` in a prompt or negative)")
        for name, embedding in catalog.embeddings.items():
            desc = f": {embedding.description}" if embedding.description else ""
            lines.append(f"• `<{name}>`{desc}")
    if catalog.styles:
        lines.append("**Styles** (the `style` option of /generate)")
        for name, style in catalog.styles.items():
            lines.append(f"• `{name}`: {style.description or style.prompt}")
    return lines


def addon_embed(catalog: Catalog, name: str) -> discord.Embed | None:
    """/model info for a LoRA, an embedding (`name` or `<name>`) or a style; None for none."""
    if name in catalog.loras:
        lora = catalog.loras[name]
        embed = discord.Embed(title=f"LoRA {name}", description=lora.description or None)
        embed.add_field(name="Weight", value=f"{lora.weight:g} (default; 0–2)")
        embed.add_field(name="Trigger words", value=lora.trigger or "none")
        embed.add_field(name="Models", value=", ".join(f"`{m}`" for m in lora.models) or "all")
        embed.add_field(name="Use", value=f"`lora: {name}:{lora.weight:g}`", inline=False)
        return embed
    bare = name.strip().removeprefix("<").removesuffix(">")
    if bare in catalog.embeddings:
        embedding = catalog.embeddings[bare]
        embed = discord.Embed(title=f"Embedding <{bare}>", description=embedding.description or None)
        embed.add_field(name="Use", value=f"write `<{bare}>` in a prompt or negative", inline=False)
        return embed
    if name in catalog.styles:
        style = catalog.styles[name]
        embed = discord.Embed(title=f"Style {name}", description=style.description or None)
        embed.add_field(name="Prompt", value=cut(style.prompt, 1024), inline=False)
        if style.negative:
            embed.add_field(name="Negative", value=cut(style.negative, 1024), inline=False)
        if style.loras:
            embed.add_field(name="LoRAs", value=", ".join(style.loras))
        if style.sampler:
            embed.add_field(name="Sampler", value=SAMPLER_LABELS.get(style.sampler, style.sampler))
        if style.steps is not None:
            embed.add_field(name="Steps", value=str(style.steps))
        if style.cfg is not None:
            embed.add_field(name="CFG", value=f"{style.cfg:g}")
        return embed
    return None


async def anything_autocomplete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
    """Models first, then LoRAs, embeddings and styles, whose names contain what is typed."""
    settings = atelier(interaction).settings
    catalog = catalog_of(settings)
    needle = current.lower().strip("<>")
    named = [(name, name) for name in settings.models]
    named += [(f"LoRA {name}", name) for name in catalog.loras]
    named += [(f"embedding <{name}>", f"<{name}>") for name in catalog.embeddings]
    named += [(f"style {name}", name) for name in catalog.styles]
    found = [app_commands.Choice(name=shown, value=value) for shown, value in named if needle in value.lower()]
    return found[:MAX_CHOICES]


class Models(commands.GroupCog, group_name="model", group_description="Pick your default model"):
    def __init__(self, bot: AtelierBot) -> None:
        self.bot = bot
        super().__init__()

    @app_commands.command(name="list", description="The models you can use")
    async def list_models(self, interaction: discord.Interaction) -> None:
        wiring = self.bot.wiring
        mine = await wiring.moderation.get_user_default_model(interaction.user.id)
        server = await wiring.intake.server_default_model(interaction.guild_id)
        lines = []
        for name, model in self.bot.settings.models.items():
            marks = []
            if name == mine:
                marks.append("your default")
            if name == server:
                marks.append("server default")
            extra = " + refiner" if model.refiner else ""
            mark = f" — **{', '.join(marks)}**" if marks else ""
            desc = f": {model.description}" if model.description else ""
            lines.append(f"• `{name}`{extra}{desc}{mark}")
        lines += addon_lines(catalog_of(self.bot.settings))
        await interaction.response.send_message(cut("\n".join(lines), CONTENT_LIMIT), ephemeral=True)

    @app_commands.command(name="use", description="Set your default model")
    @app_commands.describe(name="Model name")
    @app_commands.autocomplete(name=model_autocomplete)
    async def use(self, interaction: discord.Interaction, name: str) -> None:
        if name not in self.bot.settings.models:
            await interaction.response.send_message(self.bot.wiring.intake.unknown_model_text(name), ephemeral=True)
            return
        await self.bot.wiring.moderation.set_user_default_model(interaction.user.id, name)
        await interaction.response.send_message(f"Your default model is now `{name}`.", ephemeral=True)

    @app_commands.command(name="info", description="About one model, LoRA, embedding or style")
    @app_commands.describe(name="A model, LoRA, embedding or style")
    @app_commands.autocomplete(name=anything_autocomplete)
    async def info(self, interaction: discord.Interaction, name: str) -> None:
        model = self.bot.settings.models.get(name)
        if model is None:
            described = addon_embed(catalog_of(self.bot.settings), name)
            if described is None:
                await interaction.response.send_message(self.bot.wiring.intake.unknown_model_text(name), ephemeral=True)
            else:
                await interaction.response.send_message(embed=described, ephemeral=True)
            return
        embed = discord.Embed(title=name, description=model.description or None)
        embed.add_field(name="Base", value=f"`{_source_name(model.base)}`", inline=False)
        embed.add_field(name="Refiner", value=f"`{_source_name(model.refiner)}`" if model.refiner else "none")
        embed.add_field(name="Default", value="yes" if model.default else "no")
        if model.has_draft:
            sampler = DRAFT_SAMPLER_LABELS.get(model.draft_sampler, model.draft_sampler)
            embed.add_field(name="Draft", value=f"{model.draft_steps} steps · {sampler} · cfg {model.draft_cfg:g}")
        fitting = catalog_of(self.bot.settings).loras_for(name)
        if fitting:
            embed.add_field(name="LoRAs", value=cut(", ".join(f"`{lora}`" for lora in fitting), 1024), inline=False)
        await interaction.response.send_message(embed=embed, ephemeral=True)


def _source_name(source: str) -> str:
    """Show hub ids whole but only the last part of a local path (operators' paths stay private)."""
    if source.startswith(("/", ".", "~")) or "\\" in source:
        return source.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return source


async def setup(bot: AtelierBot) -> None:
    await bot.add_cog(Models(bot))
