"""Alembic environment for Atelier (async engines, URL passed in, never hard-coded).

Two ways in:

* ``db.migrate`` hands over an open synchronous connection in ``config.attributes["connection"]``
  (obtained from an async engine via ``run_sync``), so migrations run inside the caller's event loop.
* The ``alembic`` CLI: the URL comes from ``config.attributes["url"]``, the ini's
  ``sqlalchemy.url`` or the ``ATELIER_DATABASE_URL`` environment variable, and this file runs
  its own event loop.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig
from typing import Any, Literal

from alembic import context
from sqlalchemy.engine import Connection

from db.models import Base, UtcDateTime
from db.session import SQLITE_BEGIN_OPTION, create_engine_for

config = context.config
target_metadata = Base.metadata


def _render_item(type_: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    # Migrations must not import application types: UtcDateTime is a plain DateTime on disk.
    if type_ == "type" and isinstance(obj, UtcDateTime):
        return "sa.DateTime()"
    return False


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things
        render_item=_render_item,
        compare_type=True,
        # db.session takes BEGIN away from the sqlite3 driver, so DDL really is transactional
        # there too: a failing migration leaves the database untouched.
        transactional_ddl=True,
    )


MIGRATION_LOCK_KEY = 0x41_74_65_6C  # "Atel": any constant shared by all Atelier processes


def _run(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        # Two bot processes starting together must not both create the schema: the second
        # waits here, then finds the database already at head. (On SQLite the transaction was
        # opened with BEGIN IMMEDIATE by db.migrate, which serializes the same way.)
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
        context.run_migrations()


def _url() -> str:
    url = (
        config.attributes.get("url")
        or config.get_main_option("sqlalchemy.url")
        or os.environ.get("ATELIER_DATABASE_URL")
    )
    if not url:
        raise RuntimeError("no database URL: pass one via db.migrate or set ATELIER_DATABASE_URL")
    return url


async def _run_async() -> None:
    engine = create_engine_for(_url()).execution_options(**{SQLITE_BEGIN_OPTION: "IMMEDIATE"})
    try:
        async with engine.connect() as conn:
            await conn.run_sync(_run)
            await conn.commit()
    finally:
        await engine.dispose()


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_item=_render_item)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
elif (conn := config.attributes.get("connection")) is not None:
    _run(conn)  # called by db.migrate: the application owns logging
else:
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    asyncio.run(_run_async())
