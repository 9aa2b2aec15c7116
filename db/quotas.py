"""Per-user generation quotas over a rolling window, backed by an append-only ledger.

Semantics (the contract the bot and the tests rely on)
-------------------------------------------------------
*Window.* A ledger entry counts at time ``now`` while ``now - window < effective_at``, i.e. it
stops counting exactly ``window_seconds`` after its ``effective_at``. ``now`` comes from the
injectable ``clock`` (aware UTC datetimes).

*Entries* (units are stored non-negative; the sign is given by the kind):

=========  ======  =========================================================================
kind       sign    effective_at
=========  ======  =========================================================================
reserve    +units  when reserved (the charge)
commit     0       the reservation's instant; marks the charge final (job done)
refund     -units  the reservation's instant, so a refund expires with the charge it cancels
reset      -units  the reservation's instant; a moderator reset, one entry per live charge
grant      -units  when granted: extra room that lasts one window from the grant
=========  ======  =========================================================================

*Usage.* ``used`` = reserve - refund - reset over the counting entries (never negative);
``granted`` = sum of counting grants; ``remaining = max(0, limit + granted - used)``.
A reservation of ``u`` units is accepted iff ``used - granted + u <= limit`` (with 1e-9 slack
for float sums). ``resets_at`` = when the oldest charge still counting leaves the window.
A refusal also says ``retry_at``: the first instant at which the request would fit if
nothing else happened (None when it never will).

*Limits.* Effective limit for (guild, user, roles): per-user override > the highest limit
among the user's roles that have one > the guild default > the configured default.
``None`` means unlimited (also what ``exempt=True`` gives, e.g. moderators; their
reservations are still recorded so refunds and the audit trail work). A limit of 0 blocks,
even if the user has grants.

*Idempotency.* ``reserve`` with a job id that already has a reservation of the same user
returns that reservation. ``commit`` and ``refund`` are idempotent (a second call returns
False). ``refund`` after ``commit`` raises unless ``after_commit=True``; ``commit`` after
``refund`` raises.

Atomicity
---------
Every reserve is one write transaction: read the limit, sum the window, insert the charge.
Its read-then-write is serialized per backend:

* PostgreSQL: the user's row in ``users`` is created if missing (``INSERT .. ON CONFLICT DO
  NOTHING``) and locked (``SELECT .. FOR UPDATE``) first, so reservations of one user queue on
  that row (READ COMMITTED: each sees the previous one's committed charge) while other users
  proceed in parallel.
* SQLite: write sessions begin with ``BEGIN IMMEDIATE`` (``db.session``), so the whole
  check-and-insert holds the database write lock; within one process writers also queue on an
  asyncio lock first, so they do not spin on ``busy_timeout``.

Either way two reservations of one user can never both read the same "used" figure, so
concurrent clicks never overspend (tested with 50 concurrent reserves on two engines).
``JobStore.enqueue`` does the reservation and the job row in the same transaction; admissions
that arrive together share one transaction (``reserve_many_in``, db.reservations: each request
still decided against its member's remaining allowance, in order).

DMs: pass ``guild_id=None``; it is stored as guild 0 (``db.models.DM_GUILD_ID``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, cast

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from db.ledger import (
    EPSILON,
    LedgerStateError,
    UnknownReservation,
    WindowState,
    WindowTotals,
    commit_job,
    job_charge,
    lock_user,
    refund_job,
    window_state,
    window_totals,
)
from db.models import DM_GUILD_ID, GuildSettings, LedgerEntry, QuotaRoleLimit, QuotaUserOverride, utcnow
from db.reservations import LimitSource, ReserveRequest, pick_limit, reserve_many_in
from db.session import Database

__all__ = [
    "LedgerRecord",
    "LedgerStateError",
    "QuotaStatus",
    "QuotaStore",
    "Refusal",
    "Reservation",
    "ReserveRequest",
    "UnknownReservation",
]

Clock = Callable[[], datetime]


@dataclass(frozen=True)
class QuotaStatus:
    """What ``/quota`` shows. ``limit``/``remaining`` are None when unlimited."""

    limit: float | None
    used: float
    remaining: float | None
    resets_at: datetime | None
    granted: float = 0.0
    source: LimitSource = "default"


@dataclass(frozen=True)
class Reservation:
    """An accepted reservation; ``used``/``remaining`` are after it."""

    job_id: str
    guild_id: int
    user_id: int
    units: float
    limit: float | None
    used: float
    remaining: float | None
    created_at: datetime
    ok: Literal[True] = True


@dataclass(frozen=True)
class Refusal:
    """A refused reservation: nothing was charged. ``retry_at`` is when enough room frees up
    (None: never, e.g. limit 0 or a request larger than the limit)."""

    units: float
    limit: float
    used: float
    remaining: float
    granted: float
    resets_at: datetime | None
    retry_at: datetime | None
    reason: Literal["blocked", "over_quota"]
    ok: Literal[False] = False


@dataclass(frozen=True)
class LedgerRecord:
    id: int
    kind: str
    units: float
    job_id: str | None
    actor_id: int | None
    note: str | None
    effective_at: datetime
    created_at: datetime


def _guild(guild_id: int | None) -> int:
    return DM_GUILD_ID if guild_id is None else guild_id


def _check_limit(limit: float | None) -> None:
    if limit is not None and (not math.isfinite(limit) or limit < 0):
        raise ValueError(f"a quota limit must be a finite number >= 0, got {limit!r}")


def _check_units(units: float) -> None:
    if not math.isfinite(units) or units < 0:
        raise ValueError(f"units must be a finite number >= 0, got {units!r}")


class QuotaStore:
    """Quota limits, reservations and the ledger. See the module docstring for semantics."""

    def __init__(
        self,
        db: Database,
        *,
        window_seconds: float = 86_400,
        default_limit: float | None = None,
        clock: Clock = utcnow,
        settings_written: Callable[[int], None] | None = None,
    ):
        """``settings_written(guild_id)`` is called before and after this store writes a guild's
        settings row (its default limit), e.g. to drop a cached copy of that row."""
        _check_limit(default_limit)
        self.settings_written = settings_written or (lambda guild_id: None)
        self.db = db
        self.window = timedelta(seconds=window_seconds)
        self.default_limit = default_limit
        self.clock = clock

    # ----------------------------------------------------------------- limits
    async def _limit_in(
        self, s: AsyncSession, guild_id: int, user_id: int, role_ids: Iterable[int], exempt: bool = False
    ) -> tuple[float | None, LimitSource]:
        """Resolve the precedence chain in one round trip (it runs inside every reserve)."""
        if exempt:
            return None, "exempt"
        roles = list(role_ids)
        override = (
            select(QuotaUserOverride.limit_units)
            .where(QuotaUserOverride.guild_id == guild_id, QuotaUserOverride.user_id == user_id)
            .scalar_subquery()
        )
        role_max = (
            select(func.max(QuotaRoleLimit.limit_units))
            .where(QuotaRoleLimit.guild_id == guild_id, QuotaRoleLimit.role_id.in_(roles))
            .scalar_subquery()
        )
        guild_default = (
            select(GuildSettings.default_quota_limit).where(GuildSettings.guild_id == guild_id).scalar_subquery()
        )
        user_limit, role_limit, guild_limit = (await s.execute(select(override, role_max, guild_default))).one()
        return pick_limit(user_limit, role_limit, guild_limit, has_roles=bool(roles), default=self.default_limit)

    async def effective_limit(
        self, guild_id: int | None, user_id: int, role_ids: Iterable[int] = (), *, exempt: bool = False
    ) -> float | None:
        """The limit that applies now (None = unlimited)."""
        async with self.db.session(write=False) as s:
            limit, _ = await self._limit_in(s, _guild(guild_id), user_id, role_ids, exempt)
        return limit

    async def set_user_limit(
        self, guild_id: int | None, user_id: int, limit: float | None, *, actor_id: int | None = None
    ) -> None:
        """Override one user's limit; None removes the override."""
        _check_limit(limit)
        await self._store_limit(QuotaUserOverride, {"guild_id": _guild(guild_id), "user_id": user_id}, limit, actor_id)

    async def set_role_limit(
        self, guild_id: int, role_id: int, limit: float | None, *, actor_id: int | None = None
    ) -> None:
        """Set the limit for members of a role; None removes it."""
        _check_limit(limit)
        await self._store_limit(QuotaRoleLimit, {"guild_id": guild_id, "role_id": role_id}, limit, actor_id)

    async def _store_limit(
        self,
        model: type[QuotaUserOverride] | type[QuotaRoleLimit],
        key: dict[str, int],
        limit: float | None,
        actor_id: int | None,
    ) -> None:
        """Insert, update or (limit None) delete one limit row identified by its primary key."""
        async with self.db.session() as s:
            row = await s.get(model, tuple(key.values()))
            if limit is None:
                if row is not None:
                    await s.delete(row)
            elif row is None:
                s.add(model(**key, limit_units=limit, set_by=actor_id, updated_at=self.clock()))
            else:
                limits = cast(QuotaUserOverride | QuotaRoleLimit, row)
                limits.limit_units, limits.set_by, limits.updated_at = limit, actor_id, self.clock()

    async def set_default_limit(self, guild_id: int, limit: float | None) -> None:
        """The guild's default limit; None falls back to the configured default."""
        _check_limit(limit)
        self.settings_written(guild_id)
        try:
            async with self.db.session() as s:
                row = await s.get(GuildSettings, guild_id)
                if row is None:
                    s.add(
                        GuildSettings(
                            guild_id=guild_id,
                            default_quota_limit=limit,
                            moderator_role_ids=[],
                            priority_role_ids=[],
                            paused=False,
                            updated_at=self.clock(),
                        )
                    )
                else:
                    row.default_quota_limit, row.updated_at = limit, self.clock()
        finally:
            self.settings_written(guild_id)

    async def role_limits(self, guild_id: int) -> dict[int, float]:
        async with self.db.session(write=False) as s:
            rows = await s.execute(
                select(QuotaRoleLimit.role_id, QuotaRoleLimit.limit_units).where(QuotaRoleLimit.guild_id == guild_id)
            )
            return {r: lim for r, lim in rows.tuples()}

    async def user_limit(self, guild_id: int | None, user_id: int) -> float | None:
        """The user's override, if any (not the effective limit)."""
        async with self.db.session(write=False) as s:
            row = await s.get(QuotaUserOverride, (_guild(guild_id), user_id))
            return None if row is None else row.limit_units

    # ----------------------------------------------------------- reservations
    async def reserve(
        self,
        guild_id: int | None,
        user_id: int,
        role_ids: Iterable[int],
        units: float,
        job_id: str,
        exempt: bool = False,
    ) -> Reservation | Refusal:
        """Atomically check the quota and charge ``units`` for ``job_id``.

        Prefer ``JobStore.enqueue`` when a job row follows: it reserves and records the job
        in one transaction, so a crash in between cannot leave a charge without a job."""
        async with self.db.session() as s:
            return await self.reserve_in(s, guild_id, user_id, role_ids, units, job_id, exempt)

    async def reserve_in(
        self,
        s: AsyncSession,
        guild_id: int | None,
        user_id: int,
        role_ids: Iterable[int],
        units: float,
        job_id: str,
        exempt: bool = False,
    ) -> Reservation | Refusal:
        """``reserve`` inside the caller's write session (which must be a ``write=True`` one)."""
        _check_units(units)
        g = _guild(guild_id)
        await lock_user(s, g, user_id, self.clock())
        now = self.clock()
        existing = await job_charge(s, job_id)
        if existing is not None and (existing.guild_id, existing.user_id) != (g, user_id):
            raise LedgerStateError(f"job {job_id} is already reserved by another user")
        limit, _ = await self._limit_in(s, g, user_id, role_ids, exempt)
        totals = await window_totals(s, g, user_id, now, self.window)
        if existing is not None:  # idempotent: the same job asked again
            return self._reservation(job_id, g, user_id, existing.reserved, limit, totals, existing.reserved_at)
        refusal = await self._refusal_in(s, g, user_id, limit, totals, units, now)
        if refusal is not None:
            return refusal
        s.add(
            LedgerEntry(
                guild_id=g,
                user_id=user_id,
                kind="reserve",
                units=units,
                job_id=job_id,
                effective_at=now,
                created_at=now,
            )
        )
        after = WindowTotals(totals.charged + units, totals.granted)
        return self._reservation(job_id, g, user_id, units, limit, after, now)

    async def reserve_many_in(self, s: AsyncSession, requests: Sequence[ReserveRequest]) -> list[Reservation | Refusal]:
        """Every request's ``reserve`` in the caller's write session, decided in order (group
        commit: the admissions that arrived together, db.reservations)."""
        for request in requests:
            _check_units(request.units)
        return await reserve_many_in(self, s, requests)

    @staticmethod
    def _reservation(
        job_id: str,
        g: int,
        user_id: int,
        units: float,
        limit: float | None,
        totals: WindowTotals | WindowState,
        created_at: datetime,
    ) -> Reservation:
        return Reservation(
            job_id=job_id,
            guild_id=g,
            user_id=user_id,
            units=units,
            limit=limit,
            used=round(totals.charged, 9),
            remaining=_remaining(limit, totals),
            created_at=created_at,
        )

    async def commit(self, job_id: str) -> bool:
        """Make the job's charge final (the job produced its result). Idempotent."""
        async with self.db.session() as s:
            if await job_charge(s, job_id) is None:
                raise UnknownReservation(job_id)
            return await commit_job(s, job_id, self.clock())

    async def refund(
        self, job_id: str, *, after_commit: bool = False, actor_id: int | None = None, note: str | None = None
    ) -> bool:
        """Give the job's units back. Idempotent; refuses a committed charge unless asked."""
        async with self.db.session() as s:
            if await job_charge(s, job_id) is None:
                raise UnknownReservation(job_id)
            return await refund_job(s, job_id, self.clock(), after_commit=after_commit, actor_id=actor_id, note=note)

    async def grant(
        self,
        guild_id: int | None,
        user_id: int,
        units: float,
        actor_id: int | None = None,
        note: str | None = None,
    ) -> None:
        """One-off extra room of ``units`` that lasts one window from now."""
        _check_units(units)
        g = _guild(guild_id)
        async with self.db.session() as s:
            await lock_user(s, g, user_id, self.clock())
            now = self.clock()
            s.add(
                LedgerEntry(
                    guild_id=g,
                    user_id=user_id,
                    kind="grant",
                    units=units,
                    actor_id=actor_id,
                    note=note,
                    effective_at=now,
                    created_at=now,
                )
            )

    async def reset(self, guild_id: int | None, user_id: int, actor_id: int | None = None) -> float:
        """Clear the user's usage in the current window (grants stay). Writes one ``reset``
        entry per live charge, so history is kept. Returns the units cleared."""
        g = _guild(guild_id)
        async with self.db.session() as s:
            await lock_user(s, g, user_id, self.clock())
            now = self.clock()
            state = await window_state(s, g, user_id, now, self.window)
            cleared = 0.0
            for job_id, (effective_at, units) in state.outstanding_by_job().items():
                s.add(
                    LedgerEntry(
                        guild_id=g,
                        user_id=user_id,
                        kind="reset",
                        units=units,
                        job_id=job_id,
                        actor_id=actor_id,
                        effective_at=effective_at,
                        created_at=now,
                    )
                )
                cleared += units
            return round(cleared, 9)

    async def _refusal_in(
        self,
        s: AsyncSession,
        g: int,
        user_id: int,
        limit: float | None,
        totals: WindowTotals,
        units: float,
        now: datetime,
    ) -> Refusal | None:
        if limit is None or (limit > 0 and totals.net + units <= limit + EPSILON):
            return None
        state = await window_state(s, g, user_id, now, self.window)  # details for the refusal
        return self._refusal_from(limit, state, units)

    @staticmethod
    def _refusal_from(limit: float, state: WindowState, units: float) -> Refusal:
        """The refusal of `units` under `limit`, with the details `state` (the member's entries
        counting now) gives: what is used and left, when the window resets and room frees up."""
        return Refusal(
            units=units,
            limit=limit,
            used=state.charged,
            remaining=_remaining(limit, state) or 0.0,
            granted=state.granted,
            resets_at=state.resets_at(),
            retry_at=state.room_at(limit, units),
            reason="blocked" if limit <= 0 else "over_quota",
        )

    async def would_refuse(
        self, guild_id: int | None, user_id: int, role_ids: Iterable[int], units: float, *, exempt: bool = False
    ) -> Refusal | None:
        """The refusal ``reserve`` would give now, read without writing anything (so a request
        that would be refused is refused before its attachment is downloaded). ``reserve`` still
        decides: allowances may change in between."""
        _check_units(units)
        g = _guild(guild_id)
        now = self.clock()
        async with self.db.session(write=False) as s:
            limit, _ = await self._limit_in(s, g, user_id, role_ids, exempt)
            totals = await window_totals(s, g, user_id, now, self.window)
            return await self._refusal_in(s, g, user_id, limit, totals, units, now)

    async def status(
        self, guild_id: int | None, user_id: int, role_ids: Iterable[int] = (), *, exempt: bool = False
    ) -> QuotaStatus:
        g = _guild(guild_id)
        async with self.db.session(write=False) as s:
            limit, source = await self._limit_in(s, g, user_id, role_ids, exempt)
            state = await window_state(s, g, user_id, self.clock(), self.window)
        return QuotaStatus(
            limit=limit,
            used=state.charged,
            remaining=_remaining(limit, state),
            resets_at=state.resets_at(),
            granted=state.granted,
            source=source,
        )

    async def ledger(self, guild_id: int | None, user_id: int, *, since: datetime | None = None) -> list[LedgerRecord]:
        """The user's ledger entries (oldest first), for audits and explanations."""
        stmt = select(LedgerEntry).where(LedgerEntry.guild_id == _guild(guild_id), LedgerEntry.user_id == user_id)
        if since is not None:
            stmt = stmt.where(LedgerEntry.created_at >= since)
        async with self.db.session(write=False) as s:
            rows = (await s.execute(stmt.order_by(LedgerEntry.id))).scalars()
            return [
                LedgerRecord(e.id, e.kind, e.units, e.job_id, e.actor_id, e.note, e.effective_at, e.created_at)
                for e in rows
            ]


def _remaining(limit: float | None, state: WindowTotals | WindowState) -> float | None:
    if limit is None:
        return None
    if limit <= 0:
        return 0.0
    return max(0.0, round(limit + state.granted - state.charged, 9))
