"""The slash-command tree: every app-command error gets an ephemeral answer, so nothing ends in
Discord's "The application did not respond"; unexpected ones are logged with the interaction id."""

from __future__ import annotations

import logging
from typing import Any

import discord
from discord import app_commands

from bot.errors import error_text
from bot.interactions import say
from bot.permissions import serves

log = logging.getLogger(__name__)

# Option type → the JSON types Discord sends for it (snowflakes arrive as strings).
_OPTION_VALUE_TYPES: dict[int, tuple[type, ...]] = {3: (str,), 4: (int,), 5: (bool,), 10: (int, float)}


def mistyped_option(options: list[Any]) -> str | None:
    """The name of the first option (in sub-commands too) whose value has the wrong JSON type."""
    for option in options:
        if not isinstance(option, dict):
            return "?"
        kind, value = option.get("type"), option.get("value")
        if kind in (1, 2):
            found = mistyped_option(option.get("options") or [])
            if found is not None:
                return found
            continue
        expected = _OPTION_VALUE_TYPES.get(kind) if isinstance(kind, int) else None
        if expected is None or "value" not in option:
            continue
        if isinstance(value, bool) and bool not in expected:  # bool is an int in Python, not in JSON
            return str(option.get("name"))
        if not isinstance(value, expected):
            return str(option.get("name"))
    return None


class AtelierTree(app_commands.CommandTree[Any]):
    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        if not serves(interaction):
            return False  # a server outside [discord] guilds: nothing at all, not even a refusal
        # Discord sends every option value with its declared type; a payload that does not (a
        # modified client, another compatible server) is refused here, not deep inside a command.
        if interaction.type is not discord.InteractionType.application_command:
            return True
        data: dict[str, Any] = dict(interaction.data or {})
        name = mistyped_option(data.get("options") or [])
        if name is None:
            return True
        await say(
            interaction,
            f"The value given for `{name[:40]}` is not of the kind this option takes. Pick it again in Discord.",
        )
        return False

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError, /) -> None:
        text = error_text(error)
        command = interaction.command.qualified_name if interaction.command else "?"
        if text is None:
            cause = error.original if isinstance(error, app_commands.CommandInvokeError) else error
            log.error(
                "command /%s by user %s failed (interaction %s)",
                command,
                interaction.user.id,
                interaction.id,
                exc_info=(type(cause), cause, cause.__traceback__),
            )
            text = (
                f"Something went wrong on my side (reference `{interaction.id}`). Please try again; "
                "if it keeps happening, tell a moderator."
            )
        else:
            log.info("command /%s by user %s refused: %s", command, interaction.user.id, type(error).__name__)
        await say(interaction, text)


__all__ = ["AtelierTree", "mistyped_option"]
