"""bot.blocklists: which patterns apply where (the operator's everywhere, a server's in that
server only), compiled once per list, on a real SQLite moderation store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from bot.blocklists import MAX_PATTERNS_PER_SERVER, Blocklists
from config.settings import ConfigError
from db.migrate import upgrade
from db.moderation import EVERYWHERE, ModerationStore
from db.session import Database
from engine.blocklist import InvalidPattern

HOME, OTHER = 11, 22


@pytest_asyncio.fixture
async def moderation(tmp_path: Path) -> AsyncIterator[ModerationStore]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'mod.db'}"
    await upgrade(url)
    async with Database(url) as db:
        yield ModerationStore(db)


async def test_scopes(moderation: ModerationStore) -> None:
    lists = Blocklists(moderation, ["configured"])
    await lists.add(HOME, "dragons?", added_by=1)
    await lists.add(EVERYWHERE, "gore", added_by=2)
    for guild in (HOME, OTHER, None):  # None: a DM
        assert (await lists.first_match(guild, "so much GORE")).pattern == "gore"  # type: ignore[union-attr]
        assert (await lists.first_match(guild, "a configured word")).pattern == "configured"  # type: ignore[union-attr]
    assert (await lists.first_match(HOME, "two dragons")).shown == "dragons"  # type: ignore[union-attr]
    assert await lists.first_match(OTHER, "two dragons") is None
    assert await lists.first_match(None, "two dragons") is None
    assert await lists.first_match(HOME, "") is None
    assert await lists.patterns(EVERYWHERE) == ("configured", "gore")
    assert await lists.patterns(HOME) == ("dragons?",)


async def test_refusals(moderation: ModerationStore) -> None:
    lists = Blocklists(moderation, [])
    with pytest.raises(InvalidPattern, match="backreference"):
        await lists.add(HOME, r"(\w+)\s\1", added_by=1)
    for i in range(MAX_PATTERNS_PER_SERVER):
        await moderation.add_pattern(HOME, f"word{i}")
    with pytest.raises(InvalidPattern, match="most allowed"):
        await lists.add(HOME, "one more", added_by=1)
    with pytest.raises(ConfigError, match=r"moderation\.blocklist"):
        Blocklists(moderation, ["(unclosed"])


async def test_a_changed_list_is_compiled_again_an_unchanged_one_is_not(moderation: ModerationStore) -> None:
    lists = Blocklists(moderation, [])
    await lists.add(HOME, "alpha", added_by=1)
    await lists.first_match(HOME, "x")
    first = lists._compiled.get(("alpha",))
    await lists.first_match(HOME, "y")
    assert lists._compiled.get(("alpha",)) is first is not None
    await lists.add(HOME, "beta", added_by=1)
    assert (await lists.first_match(HOME, "beta")).pattern == "beta"  # type: ignore[union-attr]
