"""Many quota reservations in one transaction: what group commit (db.admission) needs of the
quota ledger, with the same semantics as ``QuotaStore.reserve`` (db.quotas) for each request.

The requests are decided in order, each against its member's remaining allowance: the window's
totals are read once for every member of the group (one grouped query), and each accepted
reservation is added to its member's running total before the next request is decided, so two
requests of one member in one group are checked against each other exactly as two transactions
in a row would be. The locks are those of a single reserve (see db.quotas, "Atomicity"): every
member's user row is created if missing and, on PostgreSQL, locked (in key order, so two groups
never deadlock); SQLite's write session already holds the database's write lock.

Statements per group, whatever its size: create the user rows (one executemany), lock them
(PostgreSQL), read earlier reservations of these job ids, read the limits (one query for a single
request; three for a group: overrides, role limits, guild defaults), read the window totals, and
write the accepted charges (one executemany). A refusal reads its member's entries once more to
say when room frees up.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from sqlalchemy import case, func, insert, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from db.ledger import EPSILON, LedgerStateError, WindowState, WindowTotals, window_state
from db.models import DM_GUILD_ID, GuildSettings, LedgerEntry, QuotaRoleLimit, QuotaUserOverride, User

Key = tuple[int, int]  # (guild, user)
LimitSource = Literal["exempt", "user", "role", "guild", "default"]


class QuotaRules(Protocol):
    """What of db.quotas.QuotaStore the group's decisions use (so this module needs not import it)."""

    default_limit: float | None
    window: timedelta

    def clock(self) -> datetime: ...

    async def _limit_in(
        self, s: AsyncSession, guild_id: int, user_id: int, role_ids: Iterable[int], exempt: bool = False
    ) -> tuple[float | None, LimitSource]: ...

    @staticmethod
    def _reservation(
        job_id: str, g: int, user_id: int, units: float, limit: float | None, totals: Any, created_at: datetime
    ) -> Any: ...

    @staticmethod
    def _refusal_from(limit: float, state: WindowState, units: float) -> Any: ...


@dataclass(frozen=True)
class ReserveRequest:
    """One ``reserve``'s arguments (``guild_id`` None: a DM)."""

    guild_id: int | None
    user_id: int
    role_ids: tuple[int, ...]
    units: float
    job_id: str
    exempt: bool = False

    @property
    def key(self) -> Key:
        return (DM_GUILD_ID if self.guild_id is None else self.guild_id, self.user_id)


def pick_limit(
    user_limit: float | None,
    role_limit: float | None,
    guild_limit: float | None,
    *,
    has_roles: bool,
    default: float | None,
) -> tuple[float | None, LimitSource]:
    """The precedence chain of db.quotas (user override > best role limit > guild default >
    configured default), from the rows that apply."""
    if user_limit is not None:
        return user_limit, "user"
    if has_roles and role_limit is not None:
        return role_limit, "role"
    if guild_limit is not None:
        return guild_limit, "guild"
    return default, "default"


async def lock_users(session: AsyncSession, keys: Sequence[Key], now: datetime) -> None:
    """``db.ledger.lock_user`` for many members: rows created if missing (one executemany), then
    locked in key order on PostgreSQL."""
    if not keys:
        return
    dialect = session.get_bind().dialect.name
    insert_fn = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert_fn(User).on_conflict_do_nothing(index_elements=["guild_id", "user_id"])
    await session.execute(stmt, [{"guild_id": g, "user_id": u, "created_at": now} for g, u in keys])
    if dialect != "sqlite":
        wanted = tuple_(User.guild_id, User.user_id).in_(list(keys))
        locked = select(User.guild_id).where(wanted).order_by(User.guild_id, User.user_id).with_for_update()
        await session.execute(locked)


async def _existing(session: AsyncSession, job_ids: Iterable[str]) -> dict[str, tuple[Key, float, datetime]]:
    stmt = select(
        LedgerEntry.job_id, LedgerEntry.guild_id, LedgerEntry.user_id, LedgerEntry.units, LedgerEntry.created_at
    ).where(LedgerEntry.job_id.in_(list(job_ids)), LedgerEntry.kind == "reserve")
    found: dict[str, tuple[Key, float, datetime]] = {}
    for job_id, g, u, units, created in (await session.execute(stmt.order_by(LedgerEntry.id))).tuples():
        if job_id is not None and job_id not in found:
            found[job_id] = ((g, u), units, created)
    return found


async def _limits(quotas: QuotaRules, session: AsyncSession, requests: Sequence[ReserveRequest]) -> list[float | None]:
    if len(requests) == 1:
        r = requests[0]
        limit, _ = await quotas._limit_in(session, r.key[0], r.user_id, r.role_ids, r.exempt)
        return [limit]
    asking = [r for r in requests if not r.exempt]
    keys = sorted({r.key for r in asking})
    guilds = sorted({g for g, _ in keys})
    roles = sorted({role for r in asking for role in r.role_ids})
    overrides: dict[Key, float] = {}
    role_limits: dict[tuple[int, int], float] = {}
    guild_limits: dict[int, float | None] = {}
    if keys:
        stmt = select(QuotaUserOverride.guild_id, QuotaUserOverride.user_id, QuotaUserOverride.limit_units).where(
            tuple_(QuotaUserOverride.guild_id, QuotaUserOverride.user_id).in_(keys)
        )
        overrides = {(g, u): limit for g, u, limit in (await session.execute(stmt)).tuples()}
        stmt2 = select(GuildSettings.guild_id, GuildSettings.default_quota_limit).where(
            GuildSettings.guild_id.in_(guilds)
        )
        guild_limits = dict((await session.execute(stmt2)).tuples().all())
    if roles:
        stmt3 = select(QuotaRoleLimit.guild_id, QuotaRoleLimit.role_id, QuotaRoleLimit.limit_units).where(
            QuotaRoleLimit.guild_id.in_(guilds), QuotaRoleLimit.role_id.in_(roles)
        )
        role_limits = {(g, role): limit for g, role, limit in (await session.execute(stmt3)).tuples()}
    out: list[float | None] = []
    for r in requests:
        if r.exempt:
            out.append(None)
            continue
        g = r.key[0]
        mine = [role_limits[(g, role)] for role in r.role_ids if (g, role) in role_limits]
        limit, _ = pick_limit(
            overrides.get(r.key),
            max(mine) if mine else None,
            guild_limits.get(g),
            has_roles=bool(r.role_ids),
            default=quotas.default_limit,
        )
        out.append(limit)
    return out


async def _totals(
    session: AsyncSession, keys: Sequence[Key], now: datetime, quotas: QuotaRules
) -> dict[Key, WindowTotals]:
    """``db.ledger.window_totals`` of every member, in one grouped query."""
    signed = case(
        (LedgerEntry.kind == "reserve", LedgerEntry.units),
        (LedgerEntry.kind.in_(("refund", "reset")), -LedgerEntry.units),
        else_=0.0,
    )
    granted = case((LedgerEntry.kind == "grant", LedgerEntry.units), else_=0.0)
    stmt = (
        select(LedgerEntry.guild_id, LedgerEntry.user_id, func.sum(signed), func.sum(granted))
        .where(
            tuple_(LedgerEntry.guild_id, LedgerEntry.user_id).in_(list(keys)),
            LedgerEntry.effective_at > now - quotas.window,
        )
        .group_by(LedgerEntry.guild_id, LedgerEntry.user_id)
    )
    totals: dict[Key, WindowTotals] = {}
    for g, u, charged, grant in (await session.execute(stmt)).tuples():
        totals[(g, u)] = WindowTotals(max(0.0, round(float(charged or 0.0), 9) + 0.0), round(float(grant or 0.0), 9))
    return totals


async def reserve_many_in(quotas: QuotaRules, session: AsyncSession, requests: Sequence[ReserveRequest]) -> list[Any]:
    """Each request's ``reserve`` (a Reservation or a Refusal), decided in order, inside the
    caller's write session; the units were checked by the caller."""
    now = quotas.clock()
    keys = sorted({r.key for r in requests})
    await lock_users(session, keys, now)
    existing = await _existing(session, [r.job_id for r in requests])
    limits = await _limits(quotas, session, requests)
    totals = await _totals(session, keys, now, quotas)
    out: list[Any] = []
    refused: list[tuple[int, ReserveRequest, float, int]] = []
    entries: list[dict[str, Any]] = []
    in_group: dict[Key, list[dict[str, Any]]] = {}  # each member's entries accepted in this group
    for index, (r, limit) in enumerate(zip(requests, limits, strict=True)):
        g, user = r.key
        mine = totals.get(r.key, WindowTotals(0.0, 0.0))
        prior = existing.get(r.job_id)
        if prior is not None:  # idempotent: the same job asked again (earlier, or in this group)
            (owner, units, created) = prior
            if owner != r.key:
                raise LedgerStateError(f"job {r.job_id} is already reserved by another user")
            out.append(quotas._reservation(r.job_id, g, user, units, limit, mine, created))
            continue
        if limit is None or (limit > 0 and mine.net + r.units <= limit + EPSILON):
            entry = {"guild_id": g, "user_id": user, "kind": "reserve", "units": r.units, "job_id": r.job_id,
                     "effective_at": now, "created_at": now}  # fmt: skip
            entries.append(entry)
            in_group.setdefault(r.key, []).append(entry)
            totals[r.key] = mine = WindowTotals(mine.charged + r.units, mine.granted)
            existing[r.job_id] = (r.key, r.units, now)
            out.append(quotas._reservation(r.job_id, g, user, r.units, limit, mine, now))
        else:
            assert limit is not None
            out.append(None)
            # What the member had when refused: its entries so far in this group count too.
            refused.append((index, r, limit, len(in_group.get(r.key, ()))))
    # Refusal details: each refused member's stored entries read once, and one refusal per
    # (member, entries so far, request): a flood of one member's clicks is refused alike.
    stored: dict[Key, list[LedgerEntry]] = {}
    made: dict[tuple[Key, int, float, float], Any] = {}
    for index, r, limit, earlier in refused:
        same = (r.key, earlier, r.units, limit)
        if same not in made:
            if r.key not in stored:
                stored[r.key] = (await window_state(session, r.key[0], r.user_id, now, quotas.window)).entries
            mine_now = [LedgerEntry(**entry) for entry in in_group.get(r.key, [])[:earlier]]
            state = WindowState(now, quotas.window, [*stored[r.key], *mine_now])
            made[same] = quotas._refusal_from(limit, state, r.units)
        out[index] = made[same]
    if entries:
        await session.execute(insert(LedgerEntry), entries)
    return out


__all__ = ["ReserveRequest", "lock_users", "pick_limit", "reserve_many_in"]
