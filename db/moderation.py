"""Moderation state: bans, prompt blocklists, guild settings and user preferences.

Blocklist patterns are case-insensitive regular expressions checked against prompts. They are
validated when added (they must compile, must not match empty text, which would block every
prompt, and must not nest quantifiers like ``(a+)+``, the classic catastrophic-backtracking
shape) so that a moderator typo cannot take the bot down.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import Ban, BlocklistPattern, GuildSettings, UserPreference, utcnow
from db.session import Database

__all__ = ["BanRecord", "GuildSettingsRecord", "InvalidPattern", "ModerationStore", "validate_pattern"]

MAX_PATTERN_LENGTH = 300
# A group containing a quantifier, itself quantified: (a+)+, (\w*\s?)*, (x{2,})+ ...
_NESTED_QUANTIFIER = re.compile(r"\((?:[^()\\]|\\.)*?(?:[+*]|\{\d*,\d*\})(?:[^()\\]|\\.)*\)(?:[+*]|\{\d*,\d*\})")


class InvalidPattern(ValueError):
    """A blocklist pattern that was refused; the message says why, for the moderator."""


def validate_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a blocklist pattern or raise ``InvalidPattern`` with a human reason."""
    if not pattern or not pattern.strip():
        raise InvalidPattern("the pattern is empty")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise InvalidPattern(f"the pattern is longer than {MAX_PATTERN_LENGTH} characters")
    try:
        compiled = re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise InvalidPattern(f"not a valid regular expression: {exc}") from exc
    if compiled.search("") is not None:
        raise InvalidPattern("the pattern matches empty text, so it would block every prompt")
    if _NESTED_QUANTIFIER.search(pattern):
        raise InvalidPattern("nested repetition like (a+)+ can hang the matcher; simplify the pattern")
    return compiled


@dataclass(frozen=True)
class BanRecord:
    guild_id: int
    user_id: int
    reason: str | None
    moderator_id: int | None
    created_at: datetime


@dataclass(frozen=True)
class GuildSettingsRecord:
    guild_id: int
    default_model: str | None = None
    default_quota_limit: float | None = None
    moderator_role_ids: tuple[int, ...] = ()
    priority_role_ids: tuple[int, ...] = ()
    paused: bool = False

    @property
    def moderator_roles(self) -> tuple[int, ...]:
        """Alias of ``moderator_role_ids``."""
        return self.moderator_role_ids

    @property
    def priority_roles(self) -> tuple[int, ...]:
        """Alias of ``priority_role_ids``."""
        return self.priority_role_ids


class ModerationStore:
    def __init__(self, db: Database, *, clock: Callable[[], datetime] = utcnow):
        self.db = db
        self.clock = clock

    # ------------------------------------------------------------------- bans
    async def ban(
        self, guild_id: int, user_id: int, *, reason: str | None = None, moderator_id: int | None = None
    ) -> BanRecord:
        """Ban a user (banning again updates the reason and moderator)."""
        async with self.db.session() as s:
            row = await s.get(Ban, (guild_id, user_id))
            if row is None:
                row = Ban(
                    guild_id=guild_id,
                    user_id=user_id,
                    reason=reason,
                    moderator_id=moderator_id,
                    created_at=self.clock(),
                )
                s.add(row)
            else:
                row.reason, row.moderator_id = reason, moderator_id
            return _ban(row)

    async def unban(self, guild_id: int, user_id: int) -> bool:
        """Lift a ban; False if the user was not banned."""
        async with self.db.session() as s:
            row = await s.get(Ban, (guild_id, user_id))
            if row is None:
                return False
            await s.delete(row)
            return True

    async def get_ban(self, guild_id: int, user_id: int) -> BanRecord | None:
        async with self.db.session(write=False) as s:
            row = await s.get(Ban, (guild_id, user_id))
            return None if row is None else _ban(row)

    async def is_banned(self, guild_id: int, user_id: int) -> bool:
        return await self.get_ban(guild_id, user_id) is not None

    async def list_bans(self, guild_id: int) -> list[BanRecord]:
        async with self.db.session(write=False) as s:
            rows = await s.execute(select(Ban).where(Ban.guild_id == guild_id).order_by(Ban.created_at))
            return [_ban(b) for b in rows.scalars()]

    # -------------------------------------------------------------- blocklist
    async def add_pattern(self, guild_id: int, pattern: str, *, added_by: int | None = None) -> bool:
        """Add a pattern (validated, see ``validate_pattern``); False if already present."""
        validate_pattern(pattern)
        try:
            async with self.db.session() as s:
                exists = await s.scalar(
                    select(BlocklistPattern.id).where(
                        BlocklistPattern.guild_id == guild_id, BlocklistPattern.pattern == pattern
                    )
                )
                if exists is not None:
                    return False
                s.add(BlocklistPattern(guild_id=guild_id, pattern=pattern, added_by=added_by, created_at=self.clock()))
                return True
        except IntegrityError:  # a concurrent add of the same pattern won
            return False

    async def remove_pattern(self, guild_id: int, pattern: str) -> bool:
        async with self.db.session() as s:
            result = await s.execute(
                delete(BlocklistPattern).where(
                    BlocklistPattern.guild_id == guild_id, BlocklistPattern.pattern == pattern
                )
            )
            return bool(getattr(result, "rowcount", 0))

    async def list_patterns(self, guild_id: int) -> list[str]:
        async with self.db.session(write=False) as s:
            rows = await s.execute(
                select(BlocklistPattern.pattern)
                .where(BlocklistPattern.guild_id == guild_id)
                .order_by(BlocklistPattern.id)
            )
            return list(rows.scalars())

    async def matching_pattern(self, guild_id: int, text: str) -> str | None:
        """The first blocklist pattern found in ``text`` (case-insensitive), or None."""
        for pattern in await self.list_patterns(guild_id):
            try:
                if re.search(pattern, text, re.IGNORECASE):
                    return pattern
            except re.error:  # stored before validation existed: ignore rather than crash
                continue
        return None

    # --------------------------------------------------------- guild settings
    async def get_settings(self, guild_id: int) -> GuildSettingsRecord:
        """The guild's settings; defaults when nothing was ever set."""
        async with self.db.session(write=False) as s:
            row = await s.get(GuildSettings, guild_id)
            return GuildSettingsRecord(guild_id) if row is None else _settings(row)

    async def _settings_row(self, s: AsyncSession, guild_id: int) -> GuildSettings:
        row = await s.get(GuildSettings, guild_id)
        if row is None:
            row = GuildSettings(
                guild_id=guild_id,
                moderator_role_ids=[],
                priority_role_ids=[],
                paused=False,
                updated_at=self.clock(),
            )
            s.add(row)
        return row

    async def set_default_model(self, guild_id: int, name: str | None) -> GuildSettingsRecord:
        async with self.db.session() as s:
            row = await self._settings_row(s, guild_id)
            row.default_model, row.updated_at = name, self.clock()
            return _settings(row)

    async def set_moderator_roles(self, guild_id: int, role_ids: Iterable[int]) -> GuildSettingsRecord:
        async with self.db.session() as s:
            row = await self._settings_row(s, guild_id)
            row.moderator_role_ids, row.updated_at = _unique(role_ids), self.clock()
            return _settings(row)

    async def set_priority_roles(self, guild_id: int, role_ids: Iterable[int]) -> GuildSettingsRecord:
        async with self.db.session() as s:
            row = await self._settings_row(s, guild_id)
            row.priority_role_ids, row.updated_at = _unique(role_ids), self.clock()
            return _settings(row)

    async def set_paused(self, guild_id: int, paused: bool) -> GuildSettingsRecord:
        async with self.db.session() as s:
            row = await self._settings_row(s, guild_id)
            row.paused, row.updated_at = paused, self.clock()
            return _settings(row)

    # ------------------------------------------------------- user preferences
    async def get_user_default_model(self, user_id: int) -> str | None:
        async with self.db.session(write=False) as s:
            row = await s.get(UserPreference, user_id)
            return None if row is None else row.default_model

    async def set_user_default_model(self, user_id: int, name: str | None) -> None:
        async with self.db.session() as s:
            row = await s.get(UserPreference, user_id)
            if row is None:
                s.add(UserPreference(user_id=user_id, default_model=name, updated_at=self.clock()))
            else:
                row.default_model, row.updated_at = name, self.clock()


def _unique(ids: Iterable[int]) -> list[int]:
    return sorted({int(i) for i in ids})


def _ban(row: Ban) -> BanRecord:
    return BanRecord(row.guild_id, row.user_id, row.reason, row.moderator_id, row.created_at)


def _settings(row: GuildSettings) -> GuildSettingsRecord:
    return GuildSettingsRecord(
        guild_id=row.guild_id,
        default_model=row.default_model,
        default_quota_limit=row.default_quota_limit,
        moderator_role_ids=tuple(row.moderator_role_ids or ()),
        priority_role_ids=tuple(row.priority_role_ids or ()),
        paused=bool(row.paused),
    )
