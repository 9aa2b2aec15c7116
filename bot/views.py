"""Persistent buttons on queue cards and results.

Each button is a `DynamicItem`: its whole state is in the custom_id (`atelier:<action>:<job>[:<i>]`),
and everything else is read from the database when it is clicked, so buttons keep working on old
messages and after the bot restarts. A custom_id that matches no template (never issued, or
tampered with) gets an ephemeral answer from `answer_unknown_button`; one that matches but names
an unknown job gets a clear ephemeral answer from its action.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

import discord

from bot.permissions import serves

if TYPE_CHECKING:
    from bot.app import AtelierBot

log = logging.getLogger(__name__)

JOB_ID = r"(?P<job>[0-9A-Z]{4,16})"
INDEX = r"(?P<index>[0-3])"


class ButtonActions(Protocol):
    """What a click asks the bot to do (implemented by bot.requests.JobRequests)."""

    async def reroll(self, interaction: discord.Interaction, job_id: str) -> None: ...
    async def upscale(self, interaction: discord.Interaction, job_id: str, index: int) -> None: ...
    async def variations(self, interaction: discord.Interaction, job_id: str, index: int) -> None: ...
    async def refine(self, interaction: discord.Interaction, job_id: str, index: int) -> None: ...
    async def delete(self, interaction: discord.Interaction, job_id: str) -> None: ...
    async def cancel(self, interaction: discord.Interaction, job_id: str) -> None: ...


def _actions(interaction: discord.Interaction) -> ButtonActions:
    bot: AtelierBot = interaction.client  # type: ignore[assignment]
    return bot.requests


async def _safely(interaction: discord.Interaction, action: Awaitable[None]) -> None:
    """A click never ends in Discord's "This interaction failed": unexpected errors are logged
    and the member is told, ephemerally."""
    try:
        await action
    except Exception:
        custom_id = (interaction.data or {}).get("custom_id")
        log.exception("button %s by %s failed", custom_id, interaction.user.id)
        text = "Something went wrong with that button. Nothing was charged; please try again."
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException:
            pass


class JobButton(discord.ui.DynamicItem[discord.ui.Button], template=r"$^"):
    """Shared parsing for the buttons below; subclasses set `action` and a template."""

    action: str = ""

    def __init__(
        self,
        job_id: str,
        index: int | None = None,
        *,
        label: str,
        emoji: str | None = None,
        style: discord.ButtonStyle = discord.ButtonStyle.secondary,
        row: int | None = None,
    ) -> None:
        suffix = "" if index is None else f":{index}"
        super().__init__(
            discord.ui.Button(
                label=label,
                emoji=emoji,
                style=style,
                row=row,
                custom_id=f"atelier:{self.action}:{job_id}{suffix}",
            )
        )
        self.job_id = job_id
        self.index = index or 0

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        return serves(interaction)  # a server outside [discord] guilds gets nothing

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /
    ) -> JobButton:
        index = int(match["index"]) if "index" in match.groupdict() else None
        return cls(match["job"], index, label=item.label or "", row=item.row)


class RerollButton(JobButton, template=rf"atelier:reroll:{JOB_ID}$"):
    action = "reroll"

    async def callback(self, interaction: discord.Interaction) -> Any:
        await _safely(interaction, _actions(interaction).reroll(interaction, self.job_id))


class UpscaleButton(JobButton, template=rf"atelier:upscale:{JOB_ID}:{INDEX}$"):
    action = "upscale"

    async def callback(self, interaction: discord.Interaction) -> Any:
        await _safely(interaction, _actions(interaction).upscale(interaction, self.job_id, self.index))


class VariationsButton(JobButton, template=rf"atelier:variations:{JOB_ID}:{INDEX}$"):
    action = "variations"

    async def callback(self, interaction: discord.Interaction) -> Any:
        await _safely(interaction, _actions(interaction).variations(interaction, self.job_id, self.index))


class RefineButton(JobButton, template=rf"atelier:refine:{JOB_ID}:{INDEX}$"):
    action = "refine"

    async def callback(self, interaction: discord.Interaction) -> Any:
        await _safely(interaction, _actions(interaction).refine(interaction, self.job_id, self.index))


class DeleteButton(JobButton, template=rf"atelier:delete:{JOB_ID}$"):
    action = "delete"

    async def callback(self, interaction: discord.Interaction) -> Any:
        await _safely(interaction, _actions(interaction).delete(interaction, self.job_id))


class CancelButton(JobButton, template=rf"atelier:cancel:{JOB_ID}$"):
    action = "cancel"

    async def callback(self, interaction: discord.Interaction) -> Any:
        await _safely(interaction, _actions(interaction).cancel(interaction, self.job_id))


DYNAMIC_ITEMS: tuple[type[JobButton], ...] = (
    RerollButton,
    UpscaleButton,
    VariationsButton,
    RefineButton,
    DeleteButton,
    CancelButton,
)


def result_view(job_id: str, image_count: int) -> discord.ui.View:
    """Contract labels: one image → Reroll, Upscale, Variations, Refine, Delete;
    several → U1…Un, V1…Vn, Reroll, Delete."""
    view = discord.ui.View(timeout=None)
    grey, blue, red = discord.ButtonStyle.secondary, discord.ButtonStyle.primary, discord.ButtonStyle.danger
    if image_count <= 1:
        view.add_item(RerollButton(job_id, label="Reroll", emoji="🎲", style=grey, row=0))
        view.add_item(UpscaleButton(job_id, 0, label="Upscale", emoji="🔍", style=blue, row=0))
        view.add_item(VariationsButton(job_id, 0, label="Variations", emoji="🎨", style=blue, row=0))
        view.add_item(RefineButton(job_id, 0, label="Refine", emoji="✨", style=blue, row=0))
        view.add_item(DeleteButton(job_id, label="Delete", emoji="🗑️", style=red, row=0))
        return view
    for i in range(image_count):
        view.add_item(UpscaleButton(job_id, i, label=f"U{i + 1}", style=blue, row=0))
    for i in range(image_count):
        view.add_item(VariationsButton(job_id, i, label=f"V{i + 1}", style=grey, row=1))
    view.add_item(RerollButton(job_id, label="Reroll", emoji="🎲", style=grey, row=2))
    view.add_item(DeleteButton(job_id, label="Delete", emoji="🗑️", style=red, row=2))
    return view


def progress_view(job_id: str) -> discord.ui.View:
    """The queue card / progress message carries a Cancel button for the job's owner."""
    view = discord.ui.View(timeout=None)
    view.add_item(CancelButton(job_id, label="Cancel", emoji="✖️", style=discord.ButtonStyle.secondary))
    return view


def is_issued_custom_id(custom_id: str) -> bool:
    """True when one of the buttons above could have this custom_id (discord.py's own test)."""
    return any(item.__discord_ui_compiled_template__.fullmatch(custom_id) for item in DYNAMIC_ITEMS)


async def answer_unknown_button(interaction: discord.Interaction) -> None:
    """Listener: discord.py ignores a click whose custom_id matches no button, which Discord shows
    as "This interaction failed"; answer it instead (nothing runs, nothing is charged)."""
    if interaction.type is not discord.InteractionType.component:
        return
    custom_id = str((interaction.data or {}).get("custom_id") or "")
    if is_issued_custom_id(custom_id) or not serves(interaction):
        return
    log.info("unknown button %r from %s", custom_id[:120], interaction.user.id)
    try:
        await interaction.response.send_message(
            "That button is not one of mine, or no longer valid. Nothing was done or charged.", ephemeral=True
        )
    except discord.HTTPException as exc:
        log.warning("could not answer interaction %s: %s %s", interaction.id, exc.status, exc.text)
