"""/settings: a member's own defaults, shown and changed privately (ephemeral).

`remix` (Reroll, Variations, V1…Vn, Vary Region, Zoom Out and the Pans first open a form holding
the prompt, bot/remix.py) and what /generate uses when the member leaves an option out: `aspect`,
`steps`, `sampler`, `negative`. `reset` puts one of them, or all, back to the server's defaults.
The settings follow the member across servers (db.moderation.MemberSettings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.app_commands import Choice, Range
from discord.ext import commands

from bot.commands.common import atelier, set_choices
from bot.errors import Refused
from bot.interactions import guarded, say
from bot.remix import submitted as remix_submitted
from db.moderation import MemberSettings
from engine import validate
from engine.options import SAMPLER_LABELS, SAMPLERS, STEPS

if TYPE_CHECKING:
    from bot.app import AtelierBot

SAMPLER_CHOICES = [Choice(name=name, value=name) for name in SAMPLERS]
RESETTABLE = ("aspect", "steps", "sampler", "negative")
RESET_CHOICES = [Choice(name=name, value=name) for name in (*RESETTABLE, "all")]


@dataclass(frozen=True)
class GenerateDefaults:
    """What /generate uses for an option the member left out."""

    aspect: str
    steps: int
    sampler: str
    negative: str


async def member_defaults(interaction: discord.Interaction) -> GenerateDefaults:
    """The member's own defaults where set and still valid (an operator may have removed an
    aspect since), else the operator's."""
    bot = atelier(interaction)
    gen = bot.settings.generation
    mine = await bot.wiring.moderation.get_member_settings(interaction.user.id)
    return GenerateDefaults(
        aspect=mine.aspect if mine.aspect in gen.aspects else next(iter(gen.aspects)),
        steps=mine.steps if mine.steps is not None and mine.steps in STEPS else gen.default_steps,
        sampler=mine.sampler if mine.sampler in SAMPLERS else gen.default_sampler,
        negative=mine.negative or "",
    )


def settings_text(mine: MemberSettings, defaults: GenerateDefaults) -> str:
    """The member's settings, each saying whether it is their own or the server's default."""

    def shown(value: object, own: object) -> str:
        text = f"`{value}`" if value != "" else "none"
        return text if own is not None else f"{text} (server default)"

    remix_text = (
        "on: Reroll, Variations, Vary Region, Zoom Out and the Pans first let you edit the prompt"
        if mine.remix
        else "off (turn it on to edit the prompt before a button's job starts)"
    )
    return "\n".join(
        [
            "**Your settings** (only you see this; they apply wherever you use me)",
            f"**Remix** {remix_text}",
            "Used by /generate when you leave the option out:",
            f"**Aspect** {shown(defaults.aspect, mine.aspect)}",
            f"**Steps** {shown(defaults.steps, mine.steps)}",
            f"**Sampler** {shown(SAMPLER_LABELS.get(defaults.sampler, defaults.sampler), mine.sampler)}",
            f"**Negative** {shown(defaults.negative, mine.negative)}",
            "Change one with `/settings <option>`; `/settings reset` puts one or all back.",
        ]
    )


class Preferences(commands.Cog):
    def __init__(self, bot: AtelierBot) -> None:
        self.bot = bot
        set_choices(self.settings, "aspect", list(bot.settings.generation.aspects))
        self.settings._params["negative"].max_value = bot.settings.generation.max_prompt_chars

    @app_commands.command(name="settings", description="Your own defaults: Remix, and /generate's aspect, steps…")
    @app_commands.describe(
        remix="Edit the prompt before a button's job starts (Reroll, Variations, Vary Region, Zoom Out, Pan)",
        aspect="Your default image size for /generate",
        steps=f"Your default steps for /generate, {STEPS.low}–{STEPS.high}",
        sampler="Your default sampler for /generate",
        negative="Your default negative prompt for /generate",
        reset="Put one setting (or all) back to the server's default",
    )
    @app_commands.choices(aspect=[Choice(name="1:1", value="1:1")], sampler=SAMPLER_CHOICES, reset=RESET_CHOICES)
    async def settings(
        self,
        interaction: discord.Interaction,
        remix: bool | None = None,
        aspect: str | None = None,
        steps: Range[int, STEPS.low, STEPS.high] | None = None,
        sampler: str | None = None,
        negative: Range[str, 1, 1500] | None = None,
        reset: str | None = None,
    ) -> None:
        async def work() -> None:
            gen = self.bot.settings.generation
            changes: dict[str, Any] = {}
            if reset is not None:
                if reset not in (*RESETTABLE, "all"):
                    raise Refused(f"`reset` takes one of {', '.join((*RESETTABLE, 'all'))}.")
                changes |= dict.fromkeys(RESETTABLE if reset == "all" else (reset,))
            if remix is not None:
                changes["remix"] = remix
            if aspect is not None:
                validate.check_aspect(aspect, gen.aspects)
                changes["aspect"] = aspect
            if steps is not None:
                changes["steps"] = validate.check_steps(steps)
            if sampler is not None:
                changes["sampler"] = validate.check_sampler(sampler)
            if negative is not None:
                text = validate.check_negative(negative, max_chars=gen.max_prompt_chars)
                match = await self.bot.wiring.intake.blocklists.first_match(interaction.guild_id, text)
                if match is not None:
                    raise Refused(f"That negative contains a blocked term (“{match.shown}”): remove it and try again.")
                changes["negative"] = text or None
            store = self.bot.wiring.moderation
            user_id = interaction.user.id
            if changes:
                mine = await store.set_member_settings(user_id, **changes)
            else:
                mine = await store.get_member_settings(user_id)
            text = settings_text(mine, await member_defaults(interaction))
            await say(interaction, ("Saved.\n" if changes else "") + text)

        await guarded(interaction, work)


async def setup(bot: AtelierBot) -> None:
    await bot.add_cog(Preferences(bot))
    bot.add_listener(remix_submitted, "on_interaction")


__all__ = ["GenerateDefaults", "Preferences", "member_defaults", "settings_text"]
