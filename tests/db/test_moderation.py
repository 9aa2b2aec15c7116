"""ModerationStore on both backends: bans, blocklist validation, guild settings, preferences."""

from __future__ import annotations

import pytest

from db.moderation import InvalidPattern, ModerationStore, validate_pattern
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
    assert await mod.matching_pattern(G, "Lots of GORE here") == r"\bgore\b"
    assert await mod.matching_pattern(G, "gorey but fine") is None
    assert await mod.matching_pattern(G + 1, "gore") is None
    assert await mod.remove_pattern(G, "nsfw") is True
    assert await mod.remove_pattern(G, "nsfw") is False
    assert await mod.list_patterns(G) == [r"\bgore\b"]
    with pytest.raises(InvalidPattern):
        await mod.add_pattern(G, "(unclosed")


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("(a", "valid"),
        ("a*", "empty text"),
        ("x|", "empty text"),
        ("(a+)+b", "nested"),
        (r"x(\w+\s?)*y", "nested"),
        ("(a|b+){2,}", "nested"),
        ("x" * 301, "longer"),
    ],
)
def test_pattern_validation(pattern: str, why: str) -> None:
    with pytest.raises(InvalidPattern, match=why):
        validate_pattern(pattern)


@pytest.mark.parametrize("pattern", ["cat", r"\bgore\b", "(foo)+", "blood(y|ied)", "a{2,3}", r"(\w+)\s\1", "x(ab){2}"])
def test_reasonable_patterns_pass(pattern: str) -> None:
    assert validate_pattern(pattern).pattern == pattern


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
