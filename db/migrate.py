"""Schema migrations, callable from the bot at every start.

``upgrade(url)`` brings an empty or older database to the newest revision and does nothing on
an up-to-date one, so ``atelier run`` can call it unconditionally. The Alembic files are found
next to this module (not via the working directory), so this works from an installed wheel.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from db.session import SQLITE_BEGIN_OPTION, create_engine_for

__all__ = [
    "alembic_config",
    "current_revision",
    "get_current_revision",
    "head_revision",
    "upgrade",
    "upgrade_blocking",
]

PACKAGE_DIR = Path(__file__).resolve().parent
ALEMBIC_INI = PACKAGE_DIR / "alembic.ini"
MIGRATIONS_DIR = PACKAGE_DIR / "migrations"

T = TypeVar("T")


def alembic_config(url: str | None = None) -> Config:
    """An Alembic ``Config`` pointing at the packaged migrations; the URL travels in
    ``attributes`` (not the ini) so that '%' in passwords needs no escaping."""
    cfg = Config(str(ALEMBIC_INI)) if ALEMBIC_INI.exists() else Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.attributes["url"] = url
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision`` (default: the newest). Idempotent, and
    safe when several processes start at once (they serialize on a database lock). Alembic
    keeps global state, so do not run two upgrades concurrently inside one process."""
    cfg = alembic_config(url)
    engine = create_engine_for(url)
    try:
        # IMMEDIATE: on SQLite a concurrent upgrade waits for this one instead of racing it.
        async with engine.execution_options(**{SQLITE_BEGIN_OPTION: "IMMEDIATE"}).connect() as conn:
            await conn.run_sync(_upgrade_on, cfg, revision)
            await conn.commit()
    finally:
        await engine.dispose()


def _upgrade_on(connection: Connection, cfg: Config, revision: str) -> None:
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, revision)


async def get_current_revision(url: str) -> str | None:
    """The revision the database is at (None for an empty database)."""
    engine = create_engine_for(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())
    finally:
        await engine.dispose()


def current_revision(url: str) -> str | None:
    """Synchronous ``get_current_revision``; safe to call with or without a running event loop
    (it runs on a private loop in a worker thread)."""
    return _run_blocking(get_current_revision(url))


def _run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def upgrade_blocking(url: str, revision: str = "head") -> None:
    """Synchronous ``upgrade`` for scripts and the CLI."""
    _run_blocking(upgrade(url, revision))
