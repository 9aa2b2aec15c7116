"""Database/session behaviour shared by all stores."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db.models import Ban, utcnow
from db.session import Database, is_postgres_url, is_sqlite_url, sqlite_path


def test_url_helpers() -> None:
    assert is_sqlite_url("sqlite+aiosqlite:///data/atelier.db")
    assert is_postgres_url("postgresql+asyncpg://u@h/db")
    assert sqlite_path("sqlite+aiosqlite:///data/atelier.db") == Path("data/atelier.db")
    assert sqlite_path("sqlite+aiosqlite://") is None
    assert sqlite_path("postgresql+asyncpg://u@h/db") is None


async def test_session_commits_or_rolls_back(db: Database) -> None:
    async with db.session() as s:
        s.add(Ban(guild_id=1, user_id=1, reason="kept", created_at=utcnow()))
    with pytest.raises(RuntimeError):
        async with db.session() as s:
            s.add(Ban(guild_id=1, user_id=2, reason="dropped", created_at=utcnow()))
            await s.flush()
            raise RuntimeError("boom")
    async with db.session(write=False) as s:
        assert await s.scalar(select(func.count()).select_from(Ban)) == 1


async def test_naive_datetimes_are_refused(db: Database) -> None:
    from datetime import datetime

    with pytest.raises(Exception, match="naive"):
        async with db.session() as s:
            s.add(Ban(guild_id=1, user_id=3, created_at=datetime(2030, 1, 1)))


async def test_many_concurrent_writers_do_not_hit_locks(db: Database) -> None:
    async def write(i: int) -> None:
        async with db.session() as s:
            s.add(Ban(guild_id=2, user_id=i, created_at=utcnow()))

    await asyncio.gather(*(write(i) for i in range(100)))
    async with db.session(write=False) as s:
        assert await s.scalar(select(func.count()).select_from(Ban).where(Ban.guild_id == 2)) == 100


async def test_not_connected_is_a_clear_error() -> None:
    db = Database("sqlite+aiosqlite://")
    with pytest.raises(RuntimeError, match="connect"):
        async with db.session():
            pass
    with pytest.raises(RuntimeError, match="connect"):
        _ = db.engine
