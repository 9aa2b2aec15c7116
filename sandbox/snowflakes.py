"""Snowflake ids and tokens that look like Discord's, so code that parses them keeps working."""

from __future__ import annotations

import base64
import datetime as dt
import secrets
import time

DISCORD_EPOCH_MS = 1420070400000


class SnowflakeFactory:
    """Strictly increasing snowflakes whose timestamp part is the current time.

    discord.py derives ``created_at`` from ids and uses message-id age to pick rate-limit
    buckets, so ids must encode real time, not just count up.
    """

    def __init__(self, worker: int = 1) -> None:
        self._worker = worker & 0x1F
        self._last = 0

    def next(self) -> int:
        now_ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        candidate = (now_ms << 22) | (self._worker << 17)
        if candidate <= self._last:
            candidate = self._last + 1
        self._last = candidate
        return candidate


def snowflake_time(snowflake: int) -> dt.datetime:
    ms = (snowflake >> 22) + DISCORD_EPOCH_MS
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def iso(ts: dt.datetime | None) -> str | None:
    return ts.isoformat() if ts is not None else None


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_bot_token(user_id: int) -> str:
    """A token with Discord's three-part shape (base64 user id . timestamp . hmac)."""
    head = base64.urlsafe_b64encode(str(user_id).encode()).decode().rstrip("=")
    stamp = base64.urlsafe_b64encode(int(time.time()).to_bytes(4, "big")).decode().rstrip("=")
    return f"{head}.{stamp}.{secrets.token_urlsafe(28)[:38]}"


def make_interaction_token(interaction_id: int) -> str:
    return f"aW50ZXJhY3Rpb246{interaction_id}:{secrets.token_urlsafe(48)}"
