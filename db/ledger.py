"""Session-level quota ledger primitives shared by ``QuotaStore`` and ``JobStore``.

They take an open session so a job transition and its ledger effect land in one transaction.
Callers must hold the write lock discipline described in ``db.quotas``: every read-decide-write
on a user's ledger first calls ``lock_user`` (``SELECT ... FOR UPDATE`` on PostgreSQL; on SQLite
the write session already holds the database write lock from ``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import case, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import LedgerEntry, User

EPSILON = 1e-9
"""Float slack for comparisons: 0.1 + 0.2 units must fit a 0.3 limit."""

SIGN: dict[str, float] = {"reserve": 1.0, "commit": 0.0, "refund": -1.0, "reset": -1.0, "grant": -1.0}
"""How each entry kind moves net usage (units are always stored non-negative)."""


class LedgerStateError(Exception):
    """A ledger operation that the reservation's state forbids (e.g. commit after refund)."""


class UnknownReservation(LookupError):
    """No reservation was ever made for this job id."""


def _round(x: float) -> float:
    return round(x, 9) + 0.0  # + 0.0 turns -0.0 into 0.0


async def lock_user(session: AsyncSession, guild_id: int, user_id: int, now: datetime) -> None:
    """Make sure the user's row exists, then lock it for the rest of the transaction.

    The row is the per-(guild, user) mutex of the quota: concurrent reservations of one user
    queue on it on PostgreSQL while other users proceed. (SQLite drops FOR UPDATE; there the
    write session's BEGIN IMMEDIATE already serializes writers.)
    """
    dialect = session.get_bind().dialect.name
    insert_fn = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert_fn(User).values(guild_id=guild_id, user_id=user_id, created_at=now)
    await session.execute(stmt.on_conflict_do_nothing(index_elements=["guild_id", "user_id"]))
    if dialect == "sqlite":
        return  # FOR UPDATE does not exist there; the write lock is already held
    await session.execute(
        select(User.user_id).where(User.guild_id == guild_id, User.user_id == user_id).with_for_update()
    )


@dataclass
class JobCharge:
    """Everything the ledger says about one job's reservation."""

    job_id: str
    guild_id: int
    user_id: int
    reserved: float
    effective_at: datetime
    reserved_at: datetime
    refunded: float = 0.0
    reset: float = 0.0
    committed: bool = False
    refund_entries: int = 0

    @property
    def outstanding(self) -> float:
        """Units still counted against the user (before the window expires them)."""
        return max(0.0, _round(self.reserved - self.refunded - self.reset))

    @property
    def is_refunded(self) -> bool:
        return self.refund_entries > 0


async def job_charge(session: AsyncSession, job_id: str) -> JobCharge | None:
    rows = (
        await session.execute(select(LedgerEntry).where(LedgerEntry.job_id == job_id).order_by(LedgerEntry.id))
    ).scalars()
    charge: JobCharge | None = None
    for e in rows:
        if e.kind == "reserve" and charge is None:
            charge = JobCharge(job_id, e.guild_id, e.user_id, e.units, e.effective_at, reserved_at=e.created_at)
        elif charge is None:
            continue
        elif e.kind == "refund":
            charge.refunded += e.units
            charge.refund_entries += 1
        elif e.kind == "reset":
            charge.reset += e.units
        elif e.kind == "commit":
            charge.committed = True
    return charge


def _entry(charge: JobCharge, kind: str, units: float, now: datetime, **extra: object) -> LedgerEntry:
    return LedgerEntry(
        guild_id=charge.guild_id,
        user_id=charge.user_id,
        kind=kind,
        units=units,
        job_id=charge.job_id,
        effective_at=charge.effective_at,
        created_at=now,
        **extra,
    )


async def _locked_charge(session: AsyncSession, job_id: str, now: datetime) -> JobCharge | None:
    charge = await job_charge(session, job_id)
    if charge is None:
        return None
    await lock_user(session, charge.guild_id, charge.user_id, now)
    return await job_charge(session, job_id)  # re-read under the lock


async def commit_job(session: AsyncSession, job_id: str, now: datetime) -> bool:
    """Mark the job's reservation as final. False when already committed or none exists."""
    charge = await _locked_charge(session, job_id, now)
    if charge is None or charge.committed:
        return False
    if charge.is_refunded:
        raise LedgerStateError(f"job {job_id}: cannot commit a refunded reservation")
    session.add(_entry(charge, "commit", charge.outstanding, now))
    return True


async def refund_job(
    session: AsyncSession,
    job_id: str,
    now: datetime,
    *,
    after_commit: bool = False,
    actor_id: int | None = None,
    note: str | None = None,
) -> bool:
    """Give the job's outstanding units back. False when already refunded or none exists.

    The refund counts at the reservation's instant (``effective_at``), so it leaves the
    window together with the charge it cancels and usage can never go negative.
    """
    charge = await _locked_charge(session, job_id, now)
    if charge is None or charge.is_refunded:
        return False
    if charge.committed and not after_commit:
        raise LedgerStateError(f"job {job_id}: reservation already committed (pass after_commit=True)")
    session.add(_entry(charge, "refund", charge.outstanding, now, actor_id=actor_id, note=note))
    return True


@dataclass(frozen=True)
class WindowTotals:
    """Just the sums of a user's counting entries (what a reservation needs)."""

    charged: float
    granted: float

    @property
    def net(self) -> float:
        return _round(self.charged - self.granted)


async def window_totals(
    session: AsyncSession, guild_id: int, user_id: int, now: datetime, window: timedelta
) -> WindowTotals:
    """``WindowState``'s totals computed by the database, without fetching the entries: an
    unlimited or busy user may have thousands of entries in the window."""
    signed = case(
        (LedgerEntry.kind == "reserve", LedgerEntry.units),
        (LedgerEntry.kind.in_(("refund", "reset")), -LedgerEntry.units),
        else_=0.0,
    )
    granted = case((LedgerEntry.kind == "grant", LedgerEntry.units), else_=0.0)
    charged_sum, granted_sum = (
        await session.execute(
            select(func.coalesce(func.sum(signed), 0.0), func.coalesce(func.sum(granted), 0.0)).where(
                LedgerEntry.guild_id == guild_id,
                LedgerEntry.user_id == user_id,
                LedgerEntry.effective_at > now - window,
            )
        )
    ).one()
    return WindowTotals(max(0.0, _round(float(charged_sum))), _round(float(granted_sum)))


@dataclass
class WindowState:
    """A user's ledger entries that still count at ``now``, with derived totals."""

    now: datetime
    window: timedelta
    entries: list[LedgerEntry] = field(default_factory=list)

    @property
    def charged(self) -> float:
        """Reserved units net of refunds and resets (never negative)."""
        total = sum(SIGN[e.kind] * e.units for e in self.entries if e.kind != "grant")
        return max(0.0, _round(total))

    @property
    def granted(self) -> float:
        return _round(sum(e.units for e in self.entries if e.kind == "grant"))

    @property
    def net(self) -> float:
        """What is compared with the limit: charged minus granted."""
        return _round(self.charged - self.granted)

    def outstanding_by_job(self) -> dict[str, tuple[datetime, float]]:
        per_job: dict[str, float] = defaultdict(float)
        first: dict[str, datetime] = {}
        for e in self.entries:
            if e.job_id is None or e.kind == "grant":
                continue
            per_job[e.job_id] += SIGN[e.kind] * e.units
            if e.kind == "reserve":
                first[e.job_id] = e.effective_at
        return {j: (first[j], _round(u)) for j, u in per_job.items() if j in first and u > EPSILON}

    def resets_at(self) -> datetime | None:
        """When the oldest charge still counting leaves the window."""
        charges = self.outstanding_by_job()
        if not charges:
            return None
        return min(at for at, _ in charges.values()) + self.window

    def room_at(self, limit: float, units: float) -> datetime | None:
        """The first instant at which ``units`` fit under ``limit`` if nothing else happens,
        or None if they never will (limit 0, or more units than the limit)."""
        if limit <= 0 or units > limit + EPSILON:
            return None
        net = self.net
        if net + units <= limit + EPSILON:
            return self.now
        expiring: dict[datetime, float] = defaultdict(float)
        for e in self.entries:
            expiring[e.effective_at + self.window] += SIGN[e.kind] * e.units
        for at in sorted(expiring):
            net -= expiring[at]
            if at > self.now and net + units <= limit + EPSILON:
                return at
        return None


async def window_state(
    session: AsyncSession, guild_id: int, user_id: int, now: datetime, window: timedelta
) -> WindowState:
    """Entries with ``effective_at > now - window``: the ones counting at ``now``."""
    rows = (
        await session.execute(
            select(LedgerEntry)
            .where(
                LedgerEntry.guild_id == guild_id,
                LedgerEntry.user_id == user_id,
                LedgerEntry.effective_at > now - window,
            )
            .order_by(LedgerEntry.effective_at, LedgerEntry.id)
        )
    ).scalars()
    return WindowState(now=now, window=window, entries=list(rows))
