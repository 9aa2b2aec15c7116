"""Remix: a member who turned it on (/settings remix) edits the prompt before a button's job starts.

Every remixable click (Reroll, Variations, V1…Vn, the Vary Region picker, Zoom Out, the Pans)
goes through `start`: without Remix the job starts at once; with it, the click is answered with a
modal holding the job's prompt, and the job starts when the member submits it, with the prompt as
edited (the blocklist and every other refusal then apply to that prompt).

The modal carries its whole state in its custom_id (`atelier:remix:<action>:<job>:<index>:<extra>`)
and its submission is answered by a listener, not by a live object, so a modal left open while
the bot restarts still works when it is sent, like every button.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import discord

from bot.buttons import ResultButton
from bot.commands.common import atelier
from bot.errors import Refused
from bot.interactions import custom_id_of, guarded, say
from bot.permissions import serves
from engine import validate
from engine.jobs import kind_of, label_of

log = logging.getLogger(__name__)

PREFIX = "atelier:remix:"
_CUSTOM_ID = re.compile(
    r"^atelier:remix:(?P<action>[a-z][a-z0-9_-]{0,19}):(?P<job>[0-9A-Z]{4,16}):(?P<index>[0-3]):(?P<extra>[0-9a-z]{0,20})$"
)
PROMPT_INPUT = "prompt"
TEXT_INPUT_MAX = 4000  # Discord: a text input holds at most 4000 characters
TITLE_MAX = 45  # Discord: a modal's title
# The modal must be the click's first response (it cannot follow a deferral): what it needs is
# read within this, else the member is asked to click again.
READ_SECONDS = 2.0


@dataclass(frozen=True)
class Target:
    """What a click asks for: an action on one image of a job, and what the click chose besides
    (`extra`: the Vary Region picker's regions, encoded)."""

    action: str
    job_id: str
    index: int = 0
    extra: str = ""

    @property
    def custom_id(self) -> str:
        return f"{PREFIX}{self.action}:{self.job_id}:{self.index}:{self.extra}"

    @classmethod
    def parse(cls, custom_id: str) -> Target | None:
        match = _CUSTOM_ID.fullmatch(custom_id)
        if match is None:
            return None
        return cls(match["action"], match["job"], int(match["index"]), match["extra"])


# How each action's job starts, given the click and the edited prompt (None: the job's own). It
# runs inside `guarded` (refusals are answered ephemerally), registered by the action's cog.
Start = Callable[[discord.Interaction, Target, str | None], Awaitable[None]]
_starts: dict[str, Start] = {}


def remixable(action: str, start: Start) -> None:
    """Register how the jobs of a remixable action (a result button's) start."""
    _starts[action] = start


class RemixModal(discord.ui.Modal):
    """The prompt, prefilled and editable. Answered by `submitted`, never by this object."""

    def __init__(self, target: Target, prompt: str, *, max_chars: int, required: bool) -> None:
        button = ResultButton.offered.get(target.action)
        title = f"Remix · {button.label if button is not None else label_of(target.action)}"
        super().__init__(title=title[:TITLE_MAX], custom_id=target.custom_id, timeout=15 * 60)
        limit = min(TEXT_INPUT_MAX, max_chars)
        self.prompt: discord.ui.TextInput[RemixModal] = discord.ui.TextInput(
            custom_id=PROMPT_INPUT,
            style=discord.TextStyle.paragraph,
            default=prompt[:limit] or None,
            max_length=limit,
            required=required,
        )
        self.add_item(
            discord.ui.Label(text="Prompt", description="Edit it, then submit to start the job.", component=self.prompt)
        )


async def start(interaction: discord.Interaction, target: Target) -> None:
    """A remixable click: the job now, or the remix modal first when the member has Remix on."""
    try:
        opened = await asyncio.wait_for(_open_modal(interaction, target), READ_SECONDS)
    except TimeoutError:
        await say(interaction, "I am busy right now: click again in a moment. Nothing was charged.")
        return
    if not opened:
        await guarded(interaction, lambda: _starts[target.action](interaction, target, None))


async def _open_modal(interaction: discord.Interaction, target: Target) -> bool:
    """Answer with the remix modal when the member has Remix on (True), else leave the click to
    the job (False: Remix off, or the job is gone, which the job's own path then says)."""
    wiring = atelier(interaction).wiring
    if not (await wiring.moderation.get_member_settings(interaction.user.id)).remix:
        return False
    record = await wiring.jobs.get(target.job_id)
    if record is None:
        return False
    prompt = str(record.params.get("prompt") or "")
    required = bool(prompt) and kind_of(record.kind).spec.prompt_required
    max_chars = atelier(interaction).settings.generation.max_prompt_chars
    modal = RemixModal(target, prompt, max_chars=max_chars, required=required)
    try:
        await interaction.response.send_modal(modal)
    except discord.HTTPException as exc:
        log.warning("remix modal for %s not shown: %s %s", target.custom_id, exc.status, exc.text)
        modal.stop()
    return True


async def submitted(interaction: discord.Interaction) -> None:
    """Listener: a remix modal was sent; start its job with the prompt as the member left it."""
    if interaction.type is not discord.InteractionType.modal_submit:
        return
    target = Target.parse(custom_id_of(interaction))
    if target is None or not serves(interaction):
        return
    start_job = _starts.get(target.action)
    if start_job is None:
        await say(interaction, "That form is no longer valid: click the button again. Nothing was charged.")
        return
    max_chars = atelier(interaction).settings.generation.max_prompt_chars
    raw = _submitted_text(dict(interaction.data or {}), PROMPT_INPUT)

    async def work() -> None:
        if raw is None:
            raise Refused("The form came back without its prompt: click the button again.")
        prompt = validate.check_prompt(raw, max_chars=max_chars, required=False)
        await start_job(interaction, target, prompt)

    await guarded(interaction, work)


def _submitted_text(data: Mapping[str, Any], custom_id: str) -> str | None:
    """The value of a modal's text input, wherever its rows or labels put it."""
    for component in _walk(data.get("components") or []):
        if component.get("custom_id") == custom_id and isinstance(component.get("value"), str):
            return str(component["value"])
    return None


def _walk(components: list[Any]) -> Iterator[Mapping[str, Any]]:
    for component in components:
        if not isinstance(component, Mapping):
            continue
        yield component
        yield from _walk(list(component.get("components") or []))
        if isinstance(component.get("component"), Mapping):
            yield from _walk([component["component"]])


__all__ = ["PREFIX", "RemixModal", "Target", "remixable", "start", "submitted"]
