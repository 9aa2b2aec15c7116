"""Refusals: what a member is told when a request cannot go ahead, and what changes it would need.

Every refusal is raised before anything is charged, and is answered ephemerally (bot.interactions).
"""

from __future__ import annotations

from typing import Literal

from discord import app_commands

from engine.validate import ValidationFailed

CapReason = Literal["user_cap", "global_cap"]


class Refused(Exception):
    """A request that is refused with a message for the member; nothing has been charged."""


class QueueFull(Exception):
    """The queue refuses a job. ``reason`` is ``"user_cap"`` or ``"global_cap"``; ``str(exc)``
    tells the user what to do."""

    def __init__(self, reason: CapReason, *, limit: int, message: str | None = None) -> None:
        if message is None:
            if reason == "user_cap":
                message = (
                    f"You already have {limit} job{'s' if limit != 1 else ''} waiting, the most allowed. "
                    "Wait for one to finish, or cancel one with /cancel."
                )
            else:
                message = f"The queue is full ({limit} jobs). Please try again in a few minutes."
        super().__init__(message)
        self.reason: CapReason = reason
        self.limit = limit


def member_text(error: BaseException) -> str | None:
    """The member-facing text of a refusal; None for anything else (a bug: log it)."""
    if isinstance(error, Refused | ValidationFailed | QueueFull):
        return str(error)
    return None


def error_text(error: app_commands.AppCommandError) -> str | None:
    """The member-facing text for an app-command error; None for an unexpected one (a bug)."""
    if isinstance(error, app_commands.CommandInvokeError):
        return member_text(error.original)
    if isinstance(error, app_commands.NoPrivateMessage):
        return "This command works in a server, not in DMs."
    if isinstance(error, app_commands.MissingPermissions):
        needed = ", ".join(p.replace("_", " ").title() for p in error.missing_permissions)
        return f"You need the {needed} permission for that."
    if isinstance(error, app_commands.BotMissingPermissions):
        needed = ", ".join(p.replace("_", " ").title() for p in error.missing_permissions)
        return f"I am missing the {needed} permission in this channel: ask a server admin to grant it."
    if isinstance(error, app_commands.CommandOnCooldown):
        return f"Slow down: try again in {error.retry_after:.0f} s."
    if isinstance(error, app_commands.CheckFailure):
        # NotModerator, NotOperator, GuildOnly (bot.permissions) carry their own text.
        return getattr(error, "message", None) or "You cannot use this command here."
    if isinstance(error, app_commands.TransformerError):
        return (
            f"I could not use `{str(error.value)[:80]}` for that option: pick a value Discord offers "
            "(a member, role or choice from the list) and try again."
        )
    if isinstance(error, app_commands.CommandNotFound | app_commands.CommandSignatureMismatch):
        return "This command changed since your Discord app loaded it: reload Discord (Ctrl+R) and try again."
    return None


__all__ = ["CapReason", "QueueFull", "Refused", "error_text", "member_text"]
