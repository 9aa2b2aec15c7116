"""Declarative models for Atelier's database.

Design notes (why, not what):

* Discord snowflakes exceed 32 bits, so every Discord id is a ``BigInteger``.
* Timestamps are stored as naive UTC (``UtcDateTime``) and handed back timezone-aware:
  SQLite has no time zone type and asyncpg refuses to mix aware and naive values, so one
  storage convention keeps both backends identical and comparisons exact.
* The quota ledger is append-only: balances are always recomputed from it, so every number
  a user or moderator sees can be explained entry by entry (see ``db.quotas``).
* Direct messages have no guild; quota and user rows use ``DM_GUILD_ID`` (0) for them,
  while ``jobs.guild_id`` keeps the truth (NULL).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

DM_GUILD_ID = 0
"""Guild id used in quota/user tables for direct messages (jobs keep NULL)."""

JOB_STATUSES = ("queued", "running", "done", "failed", "cancelled")
LEDGER_KINDS = ("reserve", "commit", "refund", "grant", "reset")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Current time, timezone-aware UTC (the default clock of every store)."""
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC; refuses naive input to avoid silent shifts."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use an aware UTC datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # defensive: raw SQLite text
            value = datetime.fromisoformat(value)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# SQLite only autoincrements an INTEGER PRIMARY KEY, PostgreSQL wants BIGINT for a ledger.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    """A member of a guild as far as Atelier knows; also the per-user lock row for quotas."""

    __tablename__ = "users"

    guild_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)


class GuildSettings(Base):
    """Per-guild configuration set by moderators; absent row = all defaults."""

    __tablename__ = "guild_settings"

    guild_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    default_model: Mapped[str | None] = mapped_column(String(100), nullable=True)
    # NULL = fall back to the configured default limit.
    default_quota_limit: Mapped[float | None] = mapped_column(Float, nullable=True)
    moderator_role_ids: Mapped[list[int]] = mapped_column(JSON, nullable=False, default=list)
    priority_role_ids: Mapped[list[int]] = mapped_column(JSON, nullable=False, default=list)
    paused: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)


class QuotaUserOverride(Base):
    """A moderator-set limit for one user; beats role limits and the guild default."""

    __tablename__ = "quota_user_overrides"

    guild_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    limit_units: Mapped[float] = mapped_column(Float, nullable=False)
    set_by: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)


class QuotaRoleLimit(Base):
    """A limit for members of a role; the highest applicable role limit wins."""

    __tablename__ = "quota_role_limits"

    guild_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    role_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    limit_units: Mapped[float] = mapped_column(Float, nullable=False)
    set_by: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)


class LedgerEntry(Base):
    """Append-only quota ledger. ``effective_at`` is the instant the entry counts at in the
    rolling window (a refund counts at its reservation's instant, so it expires with it);
    ``created_at`` is when it was written, for the audit trail."""

    __tablename__ = "usage_ledger"
    __table_args__ = (
        ForeignKeyConstraint(["guild_id", "user_id"], ["users.guild_id", "users.user_id"]),
        Index(None, "guild_id", "user_id", "effective_at"),
        Index(None, "job_id", "kind"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    guild_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    user_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    units: Mapped[float] = mapped_column(Float, nullable=False)
    job_id: Mapped[str | None] = mapped_column(String(16), nullable=True)
    actor_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    effective_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)


class Job(Base):
    """One unit of GPU work with its full parameters, so it can be resumed after a restart."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index(None, "status", "created_at"),
        Index(None, "owner_id", "status"),
        Index(None, "created_at"),
    )

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    owner_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    guild_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    channel_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    interaction_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    request_message_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    status_message_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    result_message_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    cost: Mapped[float] = mapped_column(Float, nullable=False)
    band: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    images: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    seeds: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Set when the owner or a moderator deleted the result (its images are gone too).
    deleted_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class Ban(Base):
    """A user banned from using the bot in one guild."""

    __tablename__ = "bans"

    guild_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    moderator_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)


class BlocklistPattern(Base):
    """A case-insensitive regular expression refused in prompts of one guild."""

    __tablename__ = "blocklist_patterns"
    __table_args__ = (UniqueConstraint("guild_id", "pattern"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    guild_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    pattern: Mapped[str] = mapped_column(String(300), nullable=False)
    added_by: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)


class UserPreference(Base):
    """Per-user preferences, global across guilds (a user's taste follows them)."""

    __tablename__ = "user_preferences"

    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    default_model: Mapped[str | None] = mapped_column(String(100), nullable=True)
    # /settings: Remix (edit the prompt before a button's job starts) and /generate's defaults
    # when the member leaves an option out (NULL: the operator's default).
    remix: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=false())
    default_aspect: Mapped[str | None] = mapped_column(String(32), nullable=True)
    default_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    default_sampler: Mapped[str | None] = mapped_column(String(32), nullable=True)
    default_negative: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)
