"""The buttons every result has, whatever its kind: Reroll (the same job, a new seed) and Delete."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import discord
from discord.ext import commands

from bot import remix
from bot.buttons import JOB_ID, RED, ResultButton
from bot.commands.common import atelier

if TYPE_CHECKING:
    from bot.app import AtelierBot


class RerollButton(ResultButton, template=rf"atelier:reroll:{JOB_ID}$"):
    action: ClassVar[str] = "reroll"
    label, emoji, single, grid, indexed = "Reroll", "🎲", 0, 0, False

    async def act(self, interaction: discord.Interaction) -> None:
        await remix.start(interaction, remix.Target(self.action, self.job_id))


async def reroll(interaction: discord.Interaction, target: remix.Target, prompt: str | None) -> None:
    intake = atelier(interaction).wiring.intake
    await intake.reroll(interaction, await intake.inputs.parent(target.job_id), prompt=prompt)


class DeleteButton(ResultButton, template=rf"atelier:delete:{JOB_ID}$"):
    action: ClassVar[str] = "delete"
    label, emoji, style, single, grid, indexed = "Delete", "🗑️", RED, 4, 1, False

    async def act(self, interaction: discord.Interaction) -> None:
        await atelier(interaction).wiring.actions.delete(interaction, self.job_id)


class Results(commands.Cog):
    """No command of its own: the buttons on every result."""


async def setup(bot: AtelierBot) -> None:
    await bot.add_cog(Results())
    bot.add_dynamic_items(RerollButton, DeleteButton)
    remix.remixable(RerollButton.action, reroll)
