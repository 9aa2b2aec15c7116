"""Moderation state: bans, prompt blocklists, guild settings and user preferences.

Blocklist patterns are stored as moderators wrote them; compiling them (RE2, linear time) and
matching prompts is ``engine.blocklist``'s job, done by the bot before a pattern is added.

Bans, patterns and settings stored for guild ``EVERYWHERE`` (0) are the operator's: they apply in
every server and in DMs (a settings row 0 that is paused pauses everything).

Every slash command reads the member's ban, the guild's blocklist and settings and the member's
default model before anything else, so these reads are cached in memory: a burst of commands
then costs one write transaction each instead of six round trips. Writes through this store drop
the entries they change, and a read that overlapped a write never stores what it read, so one
process always sees its own writes at once. When several processes share the database, give
``cache_ttl`` (seconds): another process's change is then seen at the latest that much later.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar, cast

from cachetools import Cache, LRUCache, TTLCache
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import Ban, BlocklistPattern, GuildSettings, UserPreference, utcnow
from db.session import Database

__all__ = ["EVERYWHERE", "BanRecord", "GuildSettingsRecord", "MemberSettings", "ModerationStore"]

EVERYWHERE = 0
"""The guild id of the operator's bans, blocklist and pause, which apply in every server and DM."""
CACHE_ENTRIES = 50_000  # guilds' settings/bans/patterns and members' default models, LRU
_MISSING = object()
T = TypeVar("T")


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


@dataclass(frozen=True)
class MemberSettings:
    """A member's own defaults (/settings); None: the operator's default."""

    remix: bool = False
    aspect: str | None = None
    steps: int | None = None
    sampler: str | None = None
    negative: str | None = None


# MemberSettings field → UserPreference column.
_MEMBER_COLUMNS = {
    "remix": "remix",
    "aspect": "default_aspect",
    "steps": "default_steps",
    "sampler": "default_sampler",
    "negative": "default_negative",
}


class _ReadCache:
    """Bounded LRU of read results (with a time to live when other processes write too), that
    never stores a value read while a write was under way (``version`` moves on every write)."""

    def __init__(self, ttl: float | None, max_entries: int = CACHE_ENTRIES) -> None:
        self.version = 0
        self._entries: Cache[tuple[str, int], Any] = (
            LRUCache(maxsize=max_entries) if ttl is None else TTLCache(maxsize=max_entries, ttl=ttl)
        )

    async def get(self, key: tuple[str, int], read: Callable[[], Awaitable[T]]) -> T:
        hit = self._entries.get(key, _MISSING)
        if hit is not _MISSING:
            return cast(T, hit)
        version = self.version
        value = await read()
        if version == self.version:
            self._entries[key] = value
        return value

    def changed(self, key: tuple[str, int]) -> None:
        """Before and after a write of ``key``: reads overlapping the write are not kept."""
        self.version += 1
        self._entries.pop(key, None)


class ModerationStore:
    def __init__(self, db: Database, *, clock: Callable[[], datetime] = utcnow, cache_ttl: float | None = None):
        self.db = db
        self.clock = clock
        self._cache = _ReadCache(cache_ttl)

    def guild_settings_written(self, guild_id: int) -> None:
        """Another store writes the guild's settings row (before and after): drop the cached copy."""
        self._cache.changed(("settings", guild_id))

    @contextlib.asynccontextmanager
    async def _writing(self, key: tuple[str, int]) -> AsyncIterator[AsyncSession]:
        self._cache.changed(key)
        try:
            async with self.db.session() as s:
                yield s
        finally:
            self._cache.changed(key)

    # ------------------------------------------------------------------- bans
    async def ban(
        self, guild_id: int, user_id: int, *, reason: str | None = None, moderator_id: int | None = None
    ) -> BanRecord:
        """Ban a user (banning again updates the reason and moderator)."""
        async with self._writing(("bans", guild_id)) as s:
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
        async with self._writing(("bans", guild_id)) as s:
            row = await s.get(Ban, (guild_id, user_id))
            if row is None:
                return False
            await s.delete(row)
            return True

    async def get_ban(self, guild_id: int, user_id: int) -> BanRecord | None:
        bans = await self._cache.get(("bans", guild_id), lambda: self._read_bans(guild_id))
        return bans.get(user_id)

    async def _read_bans(self, guild_id: int) -> dict[int, BanRecord]:
        return {ban.user_id: ban for ban in await self.list_bans(guild_id)}

    async def is_banned(self, guild_id: int, user_id: int) -> bool:
        return await self.get_ban(guild_id, user_id) is not None

    async def guilds_banning(self, user_id: int) -> list[int]:
        """Every guild that banned this user (for DMs, where a server ban follows the member)."""
        async with self.db.session(write=False) as s:
            rows = await s.execute(select(Ban.guild_id).where(Ban.user_id == user_id))
            return sorted(rows.scalars())

    async def list_bans(self, guild_id: int) -> list[BanRecord]:
        async with self.db.session(write=False) as s:
            rows = await s.execute(select(Ban).where(Ban.guild_id == guild_id).order_by(Ban.created_at))
            return [_ban(b) for b in rows.scalars()]

    # -------------------------------------------------------------- blocklist
    async def add_pattern(self, guild_id: int, pattern: str, *, added_by: int | None = None) -> bool:
        """Add a pattern (the caller has compiled it: ``engine.blocklist.compile_pattern``);
        False if already present."""
        try:
            async with self._writing(("patterns", guild_id)) as s:
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
        async with self._writing(("patterns", guild_id)) as s:
            result = await s.execute(
                delete(BlocklistPattern).where(
                    BlocklistPattern.guild_id == guild_id, BlocklistPattern.pattern == pattern
                )
            )
            return bool(getattr(result, "rowcount", 0))

    async def list_patterns(self, guild_id: int) -> list[str]:
        """The guild's patterns in the order they were added (a new list: callers may keep it)."""
        return list(await self._cache.get(("patterns", guild_id), lambda: self._read_patterns(guild_id)))

    async def _read_patterns(self, guild_id: int) -> tuple[str, ...]:
        async with self.db.session(write=False) as s:
            rows = await s.execute(
                select(BlocklistPattern.pattern)
                .where(BlocklistPattern.guild_id == guild_id)
                .order_by(BlocklistPattern.id)
            )
            return tuple(rows.scalars())

    # --------------------------------------------------------- guild settings
    async def get_settings(self, guild_id: int) -> GuildSettingsRecord:
        """The guild's settings; defaults when nothing was ever set. (``default_quota_limit`` is
        written by the quota store and may lag here: reservations read it themselves.)"""
        return await self._cache.get(("settings", guild_id), lambda: self._read_settings(guild_id))

    async def _read_settings(self, guild_id: int) -> GuildSettingsRecord:
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
        async with self._writing(("settings", guild_id)) as s:
            row = await self._settings_row(s, guild_id)
            row.default_model, row.updated_at = name, self.clock()
            return _settings(row)

    async def set_moderator_roles(self, guild_id: int, role_ids: Iterable[int]) -> GuildSettingsRecord:
        async with self._writing(("settings", guild_id)) as s:
            row = await self._settings_row(s, guild_id)
            row.moderator_role_ids, row.updated_at = _unique(role_ids), self.clock()
            return _settings(row)

    async def set_priority_roles(self, guild_id: int, role_ids: Iterable[int]) -> GuildSettingsRecord:
        async with self._writing(("settings", guild_id)) as s:
            row = await self._settings_row(s, guild_id)
            row.priority_role_ids, row.updated_at = _unique(role_ids), self.clock()
            return _settings(row)

    async def set_paused(self, guild_id: int, paused: bool) -> GuildSettingsRecord:
        async with self._writing(("settings", guild_id)) as s:
            row = await self._settings_row(s, guild_id)
            row.paused, row.updated_at = paused, self.clock()
            return _settings(row)

    async def paused_guilds(self) -> list[int]:
        """Every guild whose moderators paused it (read from the database, never cached: it is
        read at start-up and when another process says a pause changed)."""
        async with self.db.session(write=False) as s:
            rows = await s.execute(select(GuildSettings.guild_id).where(GuildSettings.paused.is_(True)))
            return sorted(rows.scalars())

    # ------------------------------------------------------- user preferences
    async def get_user_default_model(self, user_id: int) -> str | None:
        # The whole (small: only members who chose a model) table in one read, so that the many
        # members without a preference cost no query at all.
        chosen = await self._cache.get(("user_models", 0), self._read_user_default_models)
        return chosen.get(user_id)

    async def _read_user_default_models(self) -> dict[int, str | None]:
        async with self.db.session(write=False) as s:
            rows = await s.execute(select(UserPreference.user_id, UserPreference.default_model))
            return {user_id: model for user_id, model in rows.tuples()}

    async def set_user_default_model(self, user_id: int, name: str | None) -> None:
        async with self._writing(("user_models", 0)) as s:
            row = await s.get(UserPreference, user_id)
            if row is None:
                s.add(UserPreference(user_id=user_id, default_model=name, updated_at=self.clock()))
            else:
                row.default_model, row.updated_at = name, self.clock()

    async def get_member_settings(self, user_id: int) -> MemberSettings:
        """The member's /settings (every button click with Remix reads it: cached)."""
        return await self._cache.get(("member", user_id), lambda: self._read_member_settings(user_id))

    async def _read_member_settings(self, user_id: int) -> MemberSettings:
        async with self.db.session(write=False) as s:
            row = await s.get(UserPreference, user_id)
            return _member(row) if row is not None else MemberSettings()

    async def set_member_settings(self, user_id: int, **changes: Any) -> MemberSettings:
        """Change some of the member's settings (keys of MemberSettings; None resets one to the
        operator's default); returns them all."""
        unknown = set(changes) - set(_MEMBER_COLUMNS)
        if unknown:
            raise ValueError(f"unknown member settings {sorted(unknown)}")
        async with self._writing(("member", user_id)) as s:
            row = await s.get(UserPreference, user_id)
            if row is None:
                row = UserPreference(user_id=user_id, default_model=None, remix=False, updated_at=self.clock())
                s.add(row)
            for name, value in changes.items():
                setattr(row, _MEMBER_COLUMNS[name], bool(value) if name == "remix" else value)
            row.updated_at = self.clock()
            return _member(row)


def _member(row: UserPreference) -> MemberSettings:
    return MemberSettings(
        remix=bool(row.remix),
        aspect=row.default_aspect,
        steps=row.default_steps,
        sampler=row.default_sampler,
        negative=row.default_negative,
    )


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
