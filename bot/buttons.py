"""Persistent buttons on queue cards and results, and how a result's buttons are laid out.

Each button is a `DynamicItem`: its whole state is in the custom_id (`atelier:<action>:<job>[:<i>]`),
and everything else is read from the database when it is clicked, so buttons keep working on old
messages and after the bot restarts. Each kind's command module defines the buttons that start its
jobs and says where they go on a result (`ResultButton`); this module lays them out. A custom_id
that matches no template (never issued, or tampered with) gets an ephemeral answer from
`answer_unknown_button`; one that matches but names an unknown job gets one from its action.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable
from typing import Any, ClassVar

import discord

from bot.interactions import custom_id_of, say
from bot.permissions import serves

log = logging.getLogger(__name__)

JOB_ID = r"(?P<job>[0-9A-Z]{4,16})"
INDEX = r"(?P<index>[0-3])"
ROW_WIDTH = 5  # Discord: at most 5 buttons a row
# Components answered by a view of their own while it is open (pickers, modals), not by a template.
PRIVATE_PREFIXES: tuple[str, ...] = ("atelier-view:",)

GREY, BLUE, RED = discord.ButtonStyle.secondary, discord.ButtonStyle.primary, discord.ButtonStyle.danger


class JobButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"$^"):
    """Shared parsing for every button; subclasses set `action` and a template, and `act`."""

    action: ClassVar[str] = ""

    def __init__(
        self,
        job_id: str,
        index: int | None = None,
        *,
        label: str,
        emoji: str | None = None,
        style: discord.ButtonStyle = GREY,
        row: int | None = None,
    ) -> None:
        suffix = "" if index is None else f":{index}"
        super().__init__(
            discord.ui.Button(
                label=label, emoji=emoji, style=style, row=row, custom_id=f"atelier:{self.action}:{job_id}{suffix}"
            )
        )
        self.job_id = job_id
        self.index = index or 0

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        return serves(interaction)  # a server outside [discord] guilds gets nothing

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> JobButton:
        index = int(match["index"]) if "index" in match.groupdict() else None
        return cls(match["job"], index, label=getattr(item, "label", None) or "", row=item.row)

    async def callback(self, interaction: discord.Interaction) -> None:
        """A click never ends in Discord's "This interaction failed": unexpected errors are logged
        and the member is told, ephemerally."""
        try:
            await self.act(interaction)
        except Exception:
            log.exception("button %s by %s failed", custom_id_of(interaction), interaction.user.id)
            await say(interaction, "Something went wrong with that button. Nothing was charged; please try again.")

    def act(self, interaction: discord.Interaction) -> Awaitable[None]:
        raise NotImplementedError


class ResultButton(JobButton, template=r"$^"):
    """A button offered on results. On a one-image result it sits at `single` (its place in the
    rows of five); on a result of several images it is either one button per image
    (`per_image` = the label's letter, e.g. "U" → U1…Un, on a row of its own, rows in
    `per_image_row` order) or one button on the last row at `grid` (None: not offered)."""

    label: ClassVar[str] = ""
    emoji: ClassVar[str | None] = None
    style: ClassVar[discord.ButtonStyle] = GREY
    single: ClassVar[int | None] = None
    per_image: ClassVar[str | None] = None
    per_image_row: ClassVar[int] = 0
    per_image_style: ClassVar[discord.ButtonStyle] = GREY
    grid: ClassVar[int | None] = None
    # Whether it names one of the job's images (…:<index>).
    indexed: ClassVar[bool] = True

    # By action: discord.py loads an extension as a new module each time (a second bot in one
    # process, a reload), so the latest definition of each button is the one in use.
    offered: ClassVar[dict[str, type[ResultButton]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.action:
            ResultButton.offered[cls.action] = cls

    @classmethod
    def make(cls, job_id: str, index: int, *, row: int) -> ResultButton:
        """The button as offered on a one-image result or a grid's last row."""
        return cls(job_id, index if cls.indexed else None, label=cls.label, emoji=cls.emoji, style=cls.style, row=row)

    @classmethod
    def make_for_image(cls, job_id: str, index: int, *, row: int) -> ResultButton:
        """U1, V2, …: short labels without an emoji, as members know them from Midjourney."""
        return cls(job_id, index, label=f"{cls.per_image}{index + 1}", style=cls.per_image_style, row=row)


def result_view(job_id: str, image_count: int) -> discord.ui.View:
    """One image: every offered button in `single` order (the contract's Reroll, Upscale, …,
    Delete, then the editing buttons); several: the per-image rows (U1…Un, V1…Vn), then the
    `grid` row (Reroll, Delete). Rows of at most five."""
    view = discord.ui.View(timeout=None)
    offered = ResultButton.offered.values()
    if image_count <= 1:
        singles = sorted((b for b in offered if b.single is not None), key=lambda b: b.single or 0)
        for button in singles:  # a place's row is place // 5: gaps in the places start new rows
            view.add_item(button.make(job_id, 0, row=(button.single or 0) // ROW_WIDTH))
        return view
    rows = sorted((b for b in offered if b.per_image), key=lambda b: b.per_image_row)
    for row, button in enumerate(rows):
        for i in range(image_count):
            view.add_item(button.make_for_image(job_id, i, row=row))
    last = sorted((b for b in offered if b.grid is not None), key=lambda b: b.grid or 0)
    for button in last:
        view.add_item(button.make(job_id, 0, row=len(rows)))
    return view


# The queue card's and progress message's own button; the cog that answers it registers it.
ProgressButton: dict[str, type[JobButton]] = {}


def progress_view(job_id: str) -> discord.ui.View:
    """The queue card / progress message carries a Cancel button for the job's owner."""
    view = discord.ui.View(timeout=None)
    for button in ProgressButton.values():
        view.add_item(button(job_id, label="Cancel", emoji="✖️", style=GREY))
    return view


# Other persistent components (the Vary Region picker's select menu), by name; the cog that
# answers each registers it here and with discord.py.
OtherItems: dict[str, type[discord.ui.DynamicItem[Any]]] = {}


def issued_buttons() -> list[type[JobButton]]:
    return [*ResultButton.offered.values(), *ProgressButton.values()]


def is_issued_custom_id(custom_id: str) -> bool:
    """True when one of the buttons above (or OtherItems) could have this custom_id (discord.py's
    own test)."""
    items: list[type[discord.ui.DynamicItem[Any]]] = [*issued_buttons(), *OtherItems.values()]
    return any(item.__discord_ui_compiled_template__.fullmatch(custom_id) for item in items)


async def answer_unknown_button(interaction: discord.Interaction) -> None:
    """Listener: discord.py ignores a click whose custom_id matches no button, which Discord shows
    as "This interaction failed"; answer it instead (nothing runs, nothing is charged)."""
    if interaction.type is not discord.InteractionType.component:
        return
    custom_id = custom_id_of(interaction)
    if is_issued_custom_id(custom_id) or not serves(interaction) or custom_id.startswith(PRIVATE_PREFIXES):
        return
    log.info("unknown button %r from %s", custom_id[:120], interaction.user.id)
    try:
        await interaction.response.send_message(
            "That button is not one of mine, or no longer valid. Nothing was done or charged.", ephemeral=True
        )
    except discord.HTTPException as exc:
        log.warning("could not answer interaction %s: %s %s", interaction.id, exc.status, exc.text)


__all__ = [
    "BLUE",
    "GREY",
    "INDEX",
    "JOB_ID",
    "RED",
    "JobButton",
    "OtherItems",
    "ProgressButton",
    "ResultButton",
    "answer_unknown_button",
    "is_issued_custom_id",
    "issued_buttons",
    "progress_view",
    "result_view",
]
