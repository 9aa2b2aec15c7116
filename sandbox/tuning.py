"""Tunable behaviour of the sandbox. Fields are read at request time, so tests may change them
on a running sandbox (e.g. shorten ``response_window`` to test late responses quickly)."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024
# GUILD_MEMBERS | GUILD_PRESENCES | MESSAGE_CONTENT: the intents a bot must enable in the portal.
PRIVILEGED_INTENTS = (1 << 1) | (1 << 8) | (1 << 15)


@dataclass
class SandboxSettings:
    # Discord gives a bot 3 s to send the first response to an interaction.
    response_window: float = 3.0
    # Interaction tokens (follow-ups, original-response edits) live 15 minutes.
    token_ttl: float = 15 * 60.0
    # Per-request upload limit for bots in a server without boosts.
    upload_limit: int = 10 * MIB
    heartbeat_interval: float = 41.25
    # Privileged intents the "developer portal" has enabled for this bot.
    allowed_intents: int = PRIVILEGED_INTENTS
