"""Engine and session management for SQLite (default) and PostgreSQL.

Why the SQLite set-up looks the way it does:

* ``journal_mode=WAL`` lets readers proceed while one writer writes (the bot reads queue
  state while jobs are being recorded).
* ``busy_timeout`` makes a writer wait for the lock instead of failing at once.
* The sqlite3 driver's own transaction handling is switched off (``isolation_level=None``)
  and SQLAlchemy's ``begin`` event emits BEGIN itself, so that a *write* session can take
  the write lock up front with ``BEGIN IMMEDIATE``. A read-then-write transaction that starts
  with a plain (deferred) BEGIN can otherwise fail with SQLITE_BUSY when it upgrades, or, worse,
  decide on a stale read. With ``BEGIN IMMEDIATE`` every check-then-insert (quota reserve, job
  transition) is serialized by SQLite itself.

On PostgreSQL write sessions are plain READ COMMITTED transactions; the stores lock the rows
they decide on with ``SELECT ... FOR UPDATE``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.engine.url import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

SQLITE_BEGIN_OPTION = "atelier_sqlite_begin"


def is_sqlite_url(url: str | URL) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def is_postgres_url(url: str | URL) -> bool:
    return make_url(url).get_backend_name() == "postgresql"


def sqlite_path(url: str | URL) -> Path | None:
    """The file behind a SQLite URL, or None for in-memory databases."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return None
    name = u.database or ""
    if not name or name == ":memory:" or name.startswith("file:"):
        return None
    return Path(name)


def create_engine_for(url: str | URL, *, busy_timeout_ms: int = 10_000, **kwargs: Any) -> AsyncEngine:
    """Create an async engine with Atelier's per-backend settings (used by the app and migrations)."""
    path = sqlite_path(url)
    if path is not None:
        path.expanduser().parent.mkdir(parents=True, exist_ok=True)
    if path is not None:
        kwargs.setdefault("pool_size", 20)
        kwargs.setdefault("max_overflow", 20)
        kwargs.setdefault("pool_timeout", 60)
    elif not is_sqlite_url(url):
        kwargs.setdefault("pool_size", 10)
        kwargs.setdefault("max_overflow", 20)
        kwargs.setdefault("pool_pre_ping", True)
    engine = create_async_engine(url, **kwargs)
    if is_sqlite_url(url):
        _install_sqlite_hooks(engine, busy_timeout_ms)
    return engine


def _install_sqlite_hooks(engine: AsyncEngine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the driver (see module docstring).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            cursor.execute("PRAGMA foreign_keys = ON")
            if sqlite_path(engine.url) is not None:
                cursor.execute("PRAGMA journal_mode = WAL")
                # WAL + NORMAL is durable across application crashes and much faster than FULL.
                cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(SQLITE_BEGIN_OPTION, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


class Database:
    """Owns the async engine; hands out transactional sessions.

    ``async with db.session() as s:`` runs one transaction, committed when the block exits
    normally and rolled back on an exception. ``write=True`` (the default) takes SQLite's
    write lock at BEGIN; pass ``write=False`` for read-only work so readers never queue
    behind writers. Do not open a write session inside another one in the same task on
    SQLite: the second would wait for the first forever.
    """

    def __init__(self, url: str, *, busy_timeout_ms: int = 10_000, echo: bool = False, **engine_kwargs: Any):
        self.url = url
        self._busy_timeout_ms = busy_timeout_ms
        self._engine_kwargs = dict(engine_kwargs, echo=echo)
        self._engine: AsyncEngine | None = None
        self._read_maker: async_sessionmaker[AsyncSession] | None = None
        self._write_maker: async_sessionmaker[AsyncSession] | None = None
        # SQLite admits one writer at a time; queueing this process's writers here (FIFO)
        # is far cheaper than letting them poll the file lock through busy_timeout.
        # busy_timeout still covers other processes sharing the file.
        self._sqlite_writer = asyncio.Lock()

    @property
    def is_sqlite(self) -> bool:
        return is_sqlite_url(self.url)

    @property
    def is_postgres(self) -> bool:
        return is_postgres_url(self.url)

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("Database.connect() has not been awaited")
        return self._engine

    async def connect(self) -> None:
        """Create the engine and check the database answers (fails fast on a bad URL)."""
        if self._engine is not None:
            return
        engine = create_engine_for(self.url, busy_timeout_ms=self._busy_timeout_ms, **self._engine_kwargs)
        try:
            async with engine.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")
        except BaseException:
            await engine.dispose()
            raise
        self._engine = engine
        self._sqlite_writer = asyncio.Lock()  # fresh, in case a previous loop used the old one
        write_engine = engine.execution_options(**{SQLITE_BEGIN_OPTION: "IMMEDIATE"}) if self.is_sqlite else engine
        self._read_maker = async_sessionmaker(engine, expire_on_commit=False)
        self._write_maker = async_sessionmaker(write_engine, expire_on_commit=False)

    @asynccontextmanager
    async def session(self, *, write: bool = True) -> AsyncIterator[AsyncSession]:
        """One transaction: commit on success, rollback on error."""
        if self._write_maker is None or self._read_maker is None:
            raise RuntimeError("Database.connect() has not been awaited")
        if write and self.is_sqlite:
            async with self._sqlite_writer, self._write_maker() as session, session.begin():
                yield session
            return
        maker = self._write_maker if write else self._read_maker
        async with maker() as session, session.begin():
            yield session

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
        self._engine = None
        self._read_maker = self._write_maker = None

    async def __aenter__(self) -> Database:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
