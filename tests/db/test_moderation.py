"""ModerationStore on both backends: bans, blocklist validation, guild settings, preferences."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from db.moderation import ModerationStore
from db.quotas import QuotaStore
from db.session import Database
from tests.db.conftest import FakeClock

G, U = 1000, 42


@pytest.fixture
def mod(db: Database, clock: FakeClock) -> ModerationStore:
    return ModerationStore(db, clock=clock)


async def test_bans(mod: ModerationStore, clock: FakeClock) -> None:
    assert not await mod.is_banned(G, U)
    ban = await mod.ban(G, U, reason="spam", moderator_id=7)
    assert (ban.reason, ban.moderator_id, ban.created_at) == ("spam", 7, clock.now)
    assert await mod.is_banned(G, U)
    assert not await mod.is_banned(G + 1, U)  # per guild
    again = await mod.ban(G, U, reason="still spam", moderator_id=8)
    assert (again.reason, again.created_at) == ("still spam", ban.created_at)
    assert [b.user_id for b in await mod.list_bans(G)] == [U]
    got = await mod.get_ban(G, U)
    assert got is not None and got.reason == "still spam"
    assert await mod.unban(G, U) is True
    assert await mod.unban(G, U) is False
    assert not await mod.is_banned(G, U)


async def test_blocklist(mod: ModerationStore) -> None:
    assert await mod.add_pattern(G, r"\bgore\b", added_by=7) is True
    assert await mod.add_pattern(G, r"\bgore\b") is False  # already there
    assert await mod.add_pattern(G, "nsfw") is True
    assert await mod.list_patterns(G) == [r"\bgore\b", "nsfw"]
    assert await mod.list_patterns(G + 1) == []
    assert await mod.remove_pattern(G, "nsfw") is True
    assert await mod.remove_pattern(G, "nsfw") is False
    assert await mod.list_patterns(G) == [r"\bgore\b"]
    # Patterns are stored as given; compiling and matching them (in linear time) is
    # engine.blocklist's job, tested in tests/engine/test_blocklist.py and tests/bot/test_blocklists.py.


async def test_guild_settings(mod: ModerationStore) -> None:
    s = await mod.get_settings(G)
    assert (s.default_model, s.default_quota_limit, s.moderator_role_ids, s.paused) == (None, None, (), False)
    await mod.set_default_model(G, "sdxl-base")
    await mod.set_moderator_roles(G, [30, 10, 30])
    await mod.set_priority_roles(G, [99])
    s = await mod.set_paused(G, True)
    assert (s.default_model, s.moderator_role_ids, s.priority_role_ids, s.paused) == (
        "sdxl-base",
        (10, 30),
        (99,),
        True,
    )
    assert await mod.get_settings(G) == s
    assert (s.moderator_roles, s.priority_roles) == ((10, 30), (99,))
    assert (await mod.set_paused(G, False)).paused is False
    assert (await mod.get_settings(G + 1)).default_model is None


async def test_user_default_model(mod: ModerationStore) -> None:
    assert await mod.get_user_default_model(U) is None
    await mod.set_user_default_model(U, "juggernaut")
    assert await mod.get_user_default_model(U) == "juggernaut"
    await mod.set_user_default_model(U, None)
    assert await mod.get_user_default_model(U) is None


async def test_reads_are_cached_and_own_writes_seen_at_once(db: Database, clock: FakeClock) -> None:
    mod, other = ModerationStore(db, clock=clock), ModerationStore(db, clock=clock)
    assert await mod.get_ban(G, U) is None
    assert (await mod.get_settings(G)).default_model is None
    assert await mod.list_patterns(G) == []
    assert await mod.get_user_default_model(U) is None
    # Another process's writes (here: another store) are not seen: the reads above were cached.
    await other.ban(G, U, reason="x")
    await other.set_default_model(G, "other")
    await other.add_pattern(G, "gore")
    await other.set_user_default_model(U, "other")
    assert await mod.get_ban(G, U) is None
    assert (await mod.get_settings(G)).default_model is None
    assert await mod.list_patterns(G) == []
    assert await mod.get_user_default_model(U) is None
    # Its own writes are seen at once (and bring the other process's rows with them).
    await mod.ban(G, U + 1)
    await mod.set_priority_roles(G, [5])
    await mod.add_pattern(G, "blood")
    await mod.set_user_default_model(U, "mine")
    assert {b.user_id for b in await mod.list_bans(G)} == {U, U + 1}
    assert await mod.get_ban(G, U) is not None and await mod.get_ban(G, U + 1) is not None
    assert (await mod.get_settings(G)).default_model == "other"
    assert await mod.list_patterns(G) == ["gore", "blood"]
    assert await mod.get_user_default_model(U) == "mine"
    await mod.unban(G, U)
    assert await mod.get_ban(G, U) is None


async def test_a_cache_ttl_sees_other_processes_writes(db: Database, clock: FakeClock) -> None:
    mod, other = ModerationStore(db, clock=clock, cache_ttl=0.05), ModerationStore(db, clock=clock)
    assert await mod.get_ban(G, U) is None
    await other.ban(G, U, reason="x")
    await asyncio.sleep(0.06)
    ban = await mod.get_ban(G, U)
    assert ban is not None and ban.reason == "x"


async def test_a_read_overlapping_a_write_is_not_cached(db: Database, clock: FakeClock) -> None:
    mod = ModerationStore(db, clock=clock)
    release = asyncio.Event()
    real_read = mod._read_bans

    async def slow_read(guild_id: int) -> dict[int, Any]:
        bans = await real_read(guild_id)  # reads "no bans"
        await release.wait()
        return bans

    mod._read_bans = slow_read  # type: ignore[method-assign]
    reading = asyncio.create_task(mod.get_ban(G, U))
    await asyncio.sleep(0.05)
    mod._read_bans = real_read  # type: ignore[method-assign]
    await mod.ban(G, U)
    release.set()
    assert await reading is None  # what it read before the ban
    assert await mod.get_ban(G, U) is not None  # but that stale read was not kept


async def test_the_quota_stores_default_limit_write_drops_the_cached_settings(db: Database, clock: FakeClock) -> None:
    mod = ModerationStore(db, clock=clock)
    quotas = QuotaStore(db, clock=clock, settings_written=mod.guild_settings_written)
    assert (await mod.get_settings(G)).default_quota_limit is None
    await quotas.set_default_limit(G, 40)
    assert (await mod.get_settings(G)).default_quota_limit == 40
