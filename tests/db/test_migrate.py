"""Migrations: empty DB -> head, idempotent re-run, models and migrations agree, SQLite pragmas."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from db.migrate import (
    ALEMBIC_INI,
    MIGRATIONS_DIR,
    current_revision,
    get_current_revision,
    head_revision,
    upgrade,
)
from db.models import Base
from db.session import Database

EXPECTED_TABLES = {
    "users",
    "guild_settings",
    "quota_user_overrides",
    "quota_role_limits",
    "usage_ledger",
    "jobs",
    "bans",
    "blocklist_patterns",
    "user_preferences",
}


def test_migration_files_are_located_next_to_the_module() -> None:
    assert ALEMBIC_INI.is_file()
    assert (MIGRATIONS_DIR / "env.py").is_file()
    assert Path(MIGRATIONS_DIR).parent == ALEMBIC_INI.parent
    assert head_revision() is not None


async def test_upgrade_empty_then_again(empty_database_url: str) -> None:
    assert await get_current_revision(empty_database_url) is None
    await upgrade(empty_database_url)
    head = head_revision()
    assert await get_current_revision(empty_database_url) == head
    await upgrade(empty_database_url)  # safe at every start
    assert current_revision(empty_database_url) == head  # sync variant, even inside a running loop
    async with Database(empty_database_url) as db, db.engine.connect() as conn:
        tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    assert tables >= EXPECTED_TABLES


async def test_models_and_migrations_agree(db: Database) -> None:
    """Autogenerate against the migrated schema finds nothing to do."""

    def diff(sync_conn: object) -> list[object]:
        ctx = MigrationContext.configure(sync_conn, opts={"compare_type": True})  # type: ignore[arg-type]
        return list(compare_metadata(ctx, Base.metadata))

    async with db.engine.connect() as conn:
        differences = await conn.run_sync(diff)
    assert differences == []


async def test_sqlite_pragmas(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'deep' / 'dir' / 'a.db'}"
    await upgrade(url)
    async with Database(url) as db:
        assert db.is_sqlite and not db.is_postgres
        async with db.session(write=False) as s:
            assert (await s.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await s.execute(text("PRAGMA foreign_keys"))).scalar() == 1
            assert (await s.execute(text("PRAGMA busy_timeout"))).scalar() == 10_000
    assert (tmp_path / "deep" / "dir" / "a.db").exists()


async def test_schema_check_is_not_vacuous(db: Database) -> None:
    """The comparison above does notice a model that drifts from the migrations."""
    from sqlalchemy import Column, Integer, MetaData

    drifted = MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(drifted)
    drifted.tables["jobs"].append_column(Column("surprise", Integer, nullable=True))

    def diff(sync_conn: object) -> list[object]:
        ctx = MigrationContext.configure(sync_conn, opts={"compare_type": True})  # type: ignore[arg-type]
        return list(compare_metadata(ctx, drifted))

    async with db.engine.connect() as conn:
        differences = await conn.run_sync(diff)
    assert [d[0] for d in differences] == ["add_column"]  # type: ignore[index]


async def test_concurrent_upgrades_do_not_collide(empty_database_url: str) -> None:
    """Three bot processes starting at once on an empty database: one creates the schema, the
    others wait for it and find the database at head."""
    import asyncio
    import sys

    code = "import sys; from db.migrate import upgrade_blocking; upgrade_blocking(sys.argv[1])"
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, empty_database_url, stderr=asyncio.subprocess.PIPE
        )
        for _ in range(3)
    ]
    results = await asyncio.gather(*(p.communicate() for p in procs))
    assert [p.returncode for p in procs] == [0, 0, 0], [err.decode()[-500:] for _, err in results]
    assert await get_current_revision(empty_database_url) == head_revision()
