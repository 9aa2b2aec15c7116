"""/model list · /model use · /model info: each member's default model."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.commands.common import model_autocomplete

if TYPE_CHECKING:
    from bot.app import AtelierBot


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
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    @app_commands.command(name="use", description="Set your default model")
    @app_commands.describe(name="Model name")
    @app_commands.autocomplete(name=model_autocomplete)
    async def use(self, interaction: discord.Interaction, name: str) -> None:
        if name not in self.bot.settings.models:
            await interaction.response.send_message(self.bot.wiring.intake.unknown_model_text(name), ephemeral=True)
            return
        await self.bot.wiring.moderation.set_user_default_model(interaction.user.id, name)
        await interaction.response.send_message(f"Your default model is now `{name}`.", ephemeral=True)

    @app_commands.command(name="info", description="About one model")
    @app_commands.describe(name="Model name")
    @app_commands.autocomplete(name=model_autocomplete)
    async def info(self, interaction: discord.Interaction, name: str) -> None:
        model = self.bot.settings.models.get(name)
        if model is None:
            await interaction.response.send_message(self.bot.wiring.intake.unknown_model_text(name), ephemeral=True)
            return
        embed = discord.Embed(title=name, description=model.description or None)
        embed.add_field(name="Base", value=f"`{_source_name(model.base)}`", inline=False)
        embed.add_field(name="Refiner", value=f"`{_source_name(model.refiner)}`" if model.refiner else "none")
        embed.add_field(name="Default", value="yes" if model.default else "no")
        await interaction.response.send_message(embed=embed, ephemeral=True)


def _source_name(source: str) -> str:
    """Show hub ids whole but only the last part of a local path (operators' paths stay private)."""
    if source.startswith(("/", ".", "~")) or "\\" in source:
        return source.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return source


async def setup(bot: AtelierBot) -> None:
    await bot.add_cog(Models(bot))
