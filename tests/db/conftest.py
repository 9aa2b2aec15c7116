"""Fixtures: every store test runs on a real SQLite file and on a real PostgreSQL server.

Speed: the schema is migrated once per session (a SQLite file that each test copies; a
PostgreSQL database whose tables are emptied before each test), so every test starts from the
real migrated schema in milliseconds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from db.migrate import upgrade
from db.models import Base
from db.session import Database
from tests.db import pgserver

SHARED_DB = "atelier_test"


def run_blocking(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine to completion on a private loop in a worker thread; session fixtures
    may be set up from inside a running test loop, where asyncio.run is not allowed."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


BACKENDS = ["sqlite", "postgres"]


@dataclass
class PgTarget:
    """Where PostgreSQL test databases are created."""

    admin_url: str  # asyncpg-dialect URL of the maintenance database

    def url(self, dbname: str) -> str:
        return make_url(self.admin_url).set(database=dbname).render_as_string(hide_password=False)

    def raw(self, dbname: str) -> str:
        """Plain libpq-style URL for asyncpg.connect."""
        return make_url(self.url(dbname)).set(drivername="postgresql").render_as_string(hide_password=False)

    async def execute(self, sql: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.raw(make_url(self.admin_url).database or "postgres"))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def create_database(self, template: str | None = None) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        suffix = f" TEMPLATE {template}" if template else " TEMPLATE template0"
        await self.execute(f'CREATE DATABASE "{name}"{suffix}')
        return name

    async def clear(self, dbname: str) -> None:
        """Delete every row of the application tables (children first)."""
        import asyncpg

        conn = await asyncpg.connect(self.raw(dbname))
        try:
            for table in reversed(Base.metadata.sorted_tables):
                await conn.execute(f'DELETE FROM "{table.name}"')
        finally:
            await conn.close()

    async def drop_database(self, name: str) -> None:
        await self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg() -> Iterator[PgTarget]:
    """A PostgreSQL server for the whole session (skips the PostgreSQL cases if none)."""
    external = os.environ.get("ATELIER_TEST_PG_URL")
    if external:
        yield PgTarget(external)
        return
    server, reason = pgserver.start_server()
    if server is None:
        pytest.skip(reason)
    try:
        yield PgTarget(server.admin_url)
    finally:
        pgserver.remove_server(server)


@pytest.fixture(scope="session")
def pg_database(pg: PgTarget) -> str:
    """The migrated database every PostgreSQL test uses (emptied before each test)."""

    async def build() -> None:
        await pg.execute(f'DROP DATABASE IF EXISTS "{SHARED_DB}" WITH (FORCE)')
        await pg.execute(f'CREATE DATABASE "{SHARED_DB}" TEMPLATE template0')
        await upgrade(pg.url(SHARED_DB))

    run_blocking(build())
    return SHARED_DB


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    run_blocking(upgrade(f"sqlite+aiosqlite:///{path}"))
    return path  # engine disposed: the WAL has been checkpointed into the file


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A migrated, empty database on the requested backend."""
    if backend == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "atelier.db"
        shutil.copyfile(template, path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    pg: PgTarget = request.getfixturevalue("pg")
    name = request.getfixturevalue("pg_database")
    await pg.clear(name)  # emptying the tables is ~10x faster than cloning a database
    yield pg.url(name)


@pytest.fixture
async def empty_database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A database with no tables at all (SQLite file in a directory that does not exist yet)."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'not' / 'yet' / 'atelier.db'}"
        return
    pg: PgTarget = request.getfixturevalue("pg")
    name = await pg.create_database()
    try:
        yield pg.url(name)
    finally:
        await pg.drop_database(name)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    await database.connect()
    try:
        yield database
    finally:
        await database.close()


class FakeClock:
    """A controllable clock: ``clock()`` returns the current fake time."""

    def __init__(self, start: datetime | None = None):
        self.now = start or datetime(2030, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now

    def set(self, when: datetime) -> None:
        self.now = when


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
