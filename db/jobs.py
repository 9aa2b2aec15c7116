"""Durable job records: the source of truth for the queue, so no job is lost on a crash.

Every method is one transaction that is committed before it returns, so the caller only acts
(posts a message, dispatches to the engine) on a state that is already on disk. A status
change and its quota effect (commit on done, refund on failed/cancelled) are written in the
same transaction: a job can never end up failed-but-charged or done-but-refunded.

Callers get ``JobRecord`` snapshots (frozen dataclasses), never ORM objects, so no session or
lazy load leaks out of this module.

With a ``NoticeSender`` (several bot processes sharing one PostgreSQL, see ``db.coordination``)
every state change also sends a notice inside its own transaction, so other processes hear of
it exactly when it commits.

Allowed transitions::

    queued  -> running | cancelled | failed
    running -> done | failed | cancelled | queued (requeue after a retryable failure)
    done, failed, cancelled: final
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from db.coordination import NoticeSender
from db.ledger import LedgerStateError, commit_job, refund_job
from db.models import JOB_KINDS, JOB_STATUSES, Job, LedgerEntry, utcnow
from db.quotas import QuotaStore, Refusal, Reservation
from db.session import Database

__all__ = [
    "ACTIVE_STATUSES",
    "FINAL_STATUSES",
    "POSTING",
    "DuplicateJobId",
    "InvalidTransition",
    "JobError",
    "JobNotFound",
    "JobRecord",
    "JobStats",
    "JobStore",
    "RecoveryResult",
]

Reserve = aliased(LedgerEntry)

POSTING = 0
"""``result_message_id`` while a process is posting the result (``claim_post``); no real message id is 0."""

ACTIVE_STATUSES = ("queued", "running")
FINAL_STATUSES = ("done", "failed", "cancelled")
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled", "failed"}),
    "running": frozenset({"done", "failed", "cancelled", "queued"}),
    "done": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}


class JobError(Exception):
    """Base class of job store errors."""


class JobNotFound(JobError, LookupError):
    def __init__(self, job_id: str):
        super().__init__(f"no job {job_id}")
        self.job_id = job_id


class DuplicateJobId(JobError):
    """The id is taken: draw a new one with ``db.ids.new_job_id`` and try again."""


class InvalidTransition(JobError):
    def __init__(self, job_id: str, current: str, target: str):
        super().__init__(f"job {job_id}: cannot go from {current} to {target}")
        self.job_id, self.current, self.target = job_id, current, target


@dataclass(frozen=True)
class JobRecord:
    id: str
    kind: str
    owner_id: int
    guild_id: int | None
    channel_id: int
    interaction_id: int | None
    request_message_id: int | None
    status_message_id: int | None
    result_message_id: int | None
    params: dict[str, Any]
    cost: float
    band: int
    status: str
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    images: list[dict[str, Any]]
    seeds: list[int]
    seconds: float | None
    deleted_at: datetime | None = None

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def deleted(self) -> bool:
        return self.deleted_at is not None

    @classmethod
    def from_row(cls, j: Job) -> JobRecord:
        return cls(
            id=j.id,
            kind=j.kind,
            owner_id=j.owner_id,
            guild_id=j.guild_id,
            channel_id=j.channel_id,
            interaction_id=j.interaction_id,
            request_message_id=j.request_message_id,
            status_message_id=j.status_message_id,
            result_message_id=j.result_message_id,
            params=dict(j.params or {}),
            cost=j.cost,
            band=j.band,
            status=j.status,
            attempts=j.attempts,
            created_at=j.created_at,
            started_at=j.started_at,
            finished_at=j.finished_at,
            error=j.error,
            images=[dict(i) for i in (j.images or [])],
            seeds=list(j.seeds or []),
            seconds=j.seconds,
            deleted_at=j.deleted_at,
        )


@dataclass(frozen=True)
class RecoveryResult:
    requeued: list[JobRecord]
    """Jobs that were running at shutdown and went back to the queue."""
    failed: list[JobRecord]
    """Jobs that were running at shutdown and had used all attempts: failed and refunded."""
    queued: list[JobRecord]
    """Every queued job after recovery, oldest first (what the scheduler should load)."""
    orphans_refunded: list[str] = field(default_factory=list)
    """Job ids that had a quota reservation but no job row (a crash between ``reserve`` and
    ``create``): their units were given back."""


@dataclass(frozen=True)
class JobStats:
    since: datetime
    total: int
    by_status: dict[str, int] = field(default_factory=dict)
    users: int = 0
    mean_wait_seconds: float | None = None
    """Mean of started_at - created_at over jobs that started."""
    run_seconds: float = 0.0
    """Sum of generation seconds of jobs that finished."""


class JobStore:
    """CRUD and validated state transitions for jobs. ``clock`` is injectable for tests;
    ``notices`` (PostgreSQL only) makes every state change send a ``JobNotice``."""

    def __init__(self, db: Database, *, clock: Callable[[], datetime] = utcnow, notices: NoticeSender | None = None):
        if notices is not None and not db.is_postgres:
            raise ValueError("job notices need PostgreSQL (LISTEN/NOTIFY)")
        self.db = db
        self.clock = clock
        self.notices = notices

    async def _notify(self, s: AsyncSession, event: str, job_id: str, *, message_id: int | None = None) -> None:
        if self.notices is not None:
            await self.notices.in_session(s, event, job_id, message_id=message_id)

    def _new_row(
        self,
        *,
        job_id: str,
        kind: str,
        owner_id: int,
        guild_id: int | None,
        channel_id: int,
        params: dict[str, Any],
        cost: float,
        band: int,
        interaction_id: int | None,
        request_message_id: int | None,
    ) -> Job:
        if kind not in JOB_KINDS:
            raise ValueError(f"unknown job kind {kind!r}")
        if cost < 0:
            raise ValueError("cost must be >= 0")
        return Job(
            id=job_id,
            kind=kind,
            owner_id=owner_id,
            guild_id=guild_id,
            channel_id=channel_id,
            interaction_id=interaction_id,
            request_message_id=request_message_id,
            params=dict(params),
            cost=cost,
            band=band,
            status="queued",
            attempts=0,
            created_at=self.clock(),
            images=[],
            seeds=[],
        )

    async def create(
        self,
        *,
        job_id: str,
        kind: str,
        owner_id: int,
        guild_id: int | None,
        channel_id: int,
        params: dict[str, Any],
        cost: float,
        band: int,
        interaction_id: int | None = None,
        request_message_id: int | None = None,
    ) -> JobRecord:
        """Record a new queued job (attempts 0). Raises ``DuplicateJobId`` if the id exists."""
        row = self._new_row(
            job_id=job_id, kind=kind, owner_id=owner_id, guild_id=guild_id, channel_id=channel_id,
            params=params, cost=cost, band=band, interaction_id=interaction_id,
            request_message_id=request_message_id,
        )  # fmt: skip
        try:
            async with self.db.session() as s:
                s.add(row)
                await s.flush()
                await self._notify(s, "queued", job_id)
                return JobRecord.from_row(row)
        except IntegrityError as exc:
            raise DuplicateJobId(job_id) from exc

    async def enqueue(
        self,
        quotas: QuotaStore,
        *,
        job_id: str,
        kind: str,
        owner_id: int,
        guild_id: int | None,
        channel_id: int,
        params: dict[str, Any],
        cost: float,
        band: int,
        role_ids: Iterable[int] = (),
        exempt: bool = False,
        interaction_id: int | None = None,
        request_message_id: int | None = None,
    ) -> tuple[JobRecord, Reservation] | Refusal:
        """Reserve ``cost`` on the owner's quota and record the queued job in ONE transaction;
        returns the job and its reservation (what is left of the quota after it).

        Either both happen or neither: a refusal writes nothing, a duplicate id
        (``DuplicateJobId``) rolls the reservation back, and a crash cannot leave a charge
        without its job (which ``reserve`` followed by ``create`` could)."""
        row = self._new_row(
            job_id=job_id, kind=kind, owner_id=owner_id, guild_id=guild_id, channel_id=channel_id,
            params=params, cost=cost, band=band, interaction_id=interaction_id,
            request_message_id=request_message_id,
        )  # fmt: skip
        try:
            async with self.db.session() as s:
                # An existing job id surfaces as IntegrityError at the flush, which rolls back
                # the reservation made just before it.
                result = await quotas.reserve_in(s, guild_id, owner_id, role_ids, cost, job_id, exempt)
                if isinstance(result, Refusal):
                    return result
                s.add(row)
                await s.flush()
                await self._notify(s, "queued", job_id)
                return JobRecord.from_row(row), result
        except IntegrityError as exc:
            raise DuplicateJobId(job_id) from exc

    async def get(self, job_id: str) -> JobRecord | None:
        async with self.db.session(write=False) as s:
            row = await s.get(Job, job_id)
            return None if row is None else JobRecord.from_row(row)

    # ------------------------------------------------------------ transitions
    async def _locked(self, s: AsyncSession, job_id: str) -> Job:
        row = (await s.execute(select(Job).where(Job.id == job_id).with_for_update())).scalar_one_or_none()
        if row is None:
            raise JobNotFound(job_id)
        return row

    @staticmethod
    def _check(row: Job, target: str) -> None:
        if target not in TRANSITIONS[row.status]:
            raise InvalidTransition(row.id, row.status, target)

    async def mark_running(self, job_id: str) -> JobRecord:
        """queued -> running; counts an attempt."""
        async with self.db.session() as s:
            row = await self._locked(s, job_id)
            self._check(row, "running")
            row.status, row.attempts, row.started_at = "running", row.attempts + 1, self.clock()
            await self._notify(s, "running", job_id)
            return JobRecord.from_row(row)

    async def claim(self, job_id: str) -> JobRecord | None:
        """queued -> running unless someone else has the job: None when it is not queued any more
        or another transaction holds its row right now (``FOR UPDATE SKIP LOCKED``, so a claim
        never waits behind another dispatcher's claim or a cancel in flight). Counts an attempt."""
        stmt = select(Job).where(Job.id == job_id, Job.status == "queued").with_for_update(skip_locked=True)
        async with self.db.session() as s:
            row = (await s.execute(stmt)).scalar_one_or_none()
            if row is None:
                return None
            row.status, row.attempts, row.started_at = "running", row.attempts + 1, self.clock()
            await self._notify(s, "running", job_id)
            return JobRecord.from_row(row)

    async def mark_done(
        self, job_id: str, *, images: list[dict[str, Any]], seeds: list[int], seconds: float
    ) -> JobRecord:
        """running -> done, committing the quota charge in the same transaction."""
        async with self.db.session() as s:
            row = await self._locked(s, job_id)
            self._check(row, "done")
            now = self.clock()
            row.status, row.finished_at, row.error = "done", now, None
            row.images, row.seeds, row.seconds = [dict(i) for i in images], list(seeds), seconds
            try:
                await commit_job(s, job_id, now)
            except LedgerStateError:
                pass  # refunded by hand while running (e.g. a moderator): the job stays free
            await self._notify(s, "done", job_id)
            return JobRecord.from_row(row)

    async def _finish_refunded(self, s: AsyncSession, row: Job, status: str, error: str | None) -> None:
        self._check(row, status)
        now = self.clock()
        row.status, row.finished_at = status, now
        if error is not None:
            row.error = error
        # after_commit: a failed or cancelled job is always owed its units back, even if some
        # caller committed its charge early.
        await refund_job(s, row.id, now, after_commit=True, note=status)
        await self._notify(s, status, row.id)

    async def mark_failed(self, job_id: str, error: str) -> JobRecord:
        """queued/running -> failed for good, refunding the charge in the same transaction."""
        async with self.db.session() as s:
            row = await self._locked(s, job_id)
            await self._finish_refunded(s, row, "failed", error)
            return JobRecord.from_row(row)

    async def mark_cancelled(self, job_id: str, *, only_queued: bool = False) -> JobRecord:
        """queued/running -> cancelled, refunding the charge in the same transaction. With
        ``only_queued`` a running job raises ``InvalidTransition`` (a process that is not running
        the job must not end it under the dispatcher's feet)."""
        async with self.db.session() as s:
            row = await self._locked(s, job_id)
            if only_queued and row.status != "queued":
                raise InvalidTransition(job_id, row.status, "cancelled")
            await self._finish_refunded(s, row, "cancelled", None)
            return JobRecord.from_row(row)

    async def requeue(self, job_id: str, error: str, *, attempt_used: bool = True) -> JobRecord:
        """running -> queued after a retryable failure; attempts are kept (given back with
        ``attempt_used=False``: the job never reached the engine), the error noted."""
        async with self.db.session() as s:
            row = await self._locked(s, job_id)
            self._check(row, "queued")
            row.status, row.error, row.started_at = "queued", error, None
            if not attempt_used:
                row.attempts = max(0, row.attempts - 1)
            await self._notify(s, "queued", job_id)
            return JobRecord.from_row(row)

    async def recover(self, max_attempts: int = 3) -> list[JobRecord]:
        """Start-up recovery; returns every queued job, oldest first. See ``recover_detailed``."""
        return (await self.recover_detailed(max_attempts)).queued

    async def recover_detailed(
        self, max_attempts: int = 3, *, orphan_grace_seconds: float = 300, orphan_horizon_days: float = 30
    ) -> RecoveryResult:
        """Jobs left ``running`` by a crash go back to ``queued`` (the interrupted attempt stays
        counted); those that already used ``max_attempts`` become ``failed`` and are refunded.
        Reservations without a job row, older than ``orphan_grace_seconds`` (so an enqueue in
        flight in another process is left alone) and younger than ``orphan_horizon_days``, are
        refunded."""
        requeued: list[JobRecord] = []
        failed: list[JobRecord] = []
        async with self.db.session() as s:
            rows = (
                (
                    await s.execute(
                        select(Job).where(Job.status == "running").order_by(Job.created_at, Job.id).with_for_update()
                    )
                )
                .scalars()
                .all()
            )
            for row in rows:
                if row.attempts >= max_attempts:
                    msg = f"gave up after {row.attempts} attempts (interrupted by a restart)"
                    await self._finish_refunded(s, row, "failed", msg)
                    failed.append(JobRecord.from_row(row))
                else:
                    row.status, row.started_at = "queued", None
                    row.error = "interrupted by a restart"
                    await self._notify(s, "queued", row.id)
                    requeued.append(JobRecord.from_row(row))
            await s.flush()
            orphans = await self._refund_orphans(s, orphan_grace_seconds, orphan_horizon_days)
            queued = (
                (await s.execute(select(Job).where(Job.status == "queued").order_by(Job.created_at, Job.id)))
                .scalars()
                .all()
            )
            return RecoveryResult(requeued, failed, [JobRecord.from_row(j) for j in queued], orphans)

    async def _refund_orphans(self, s: AsyncSession, grace_seconds: float, horizon_days: float) -> list[str]:
        now = self.clock()
        settled = select(LedgerEntry.id).where(
            LedgerEntry.job_id == Reserve.job_id, LedgerEntry.kind.in_(("refund", "commit"))
        )
        stmt = (
            select(Reserve.job_id)
            .where(
                Reserve.kind == "reserve",
                Reserve.job_id.is_not(None),
                Reserve.created_at < now - timedelta(seconds=grace_seconds),
                Reserve.created_at > now - timedelta(days=horizon_days),
                ~select(Job.id).where(Job.id == Reserve.job_id).exists(),
                ~settled.exists(),
            )
            .order_by(Reserve.id)
        )
        orphans = [j for j in (await s.execute(stmt)).scalars() if j is not None]
        for job_id in orphans:
            await refund_job(s, job_id, now, note="orphan reservation (no job recorded)")
        return orphans

    # ---------------------------------------------------------- other updates
    async def set_messages(
        self, job_id: str, *, status_message_id: int | None = None, result_message_id: int | None = None
    ) -> JobRecord:
        """Remember the Discord messages of a job (only the ids given are changed)."""
        values: dict[str, int] = {}
        if status_message_id is not None:
            values["status_message_id"] = status_message_id
        if result_message_id is not None:
            values["result_message_id"] = result_message_id
        async with self.db.session() as s:
            if values:
                await s.execute(update(Job).where(Job.id == job_id).values(**values))
            row = await s.get(Job, job_id, populate_existing=True)
            if row is None:
                raise JobNotFound(job_id)
            if status_message_id is not None:
                await self._notify(s, "card", job_id, message_id=status_message_id)
            return JobRecord.from_row(row)

    async def claim_post(self, job_id: str) -> bool:
        """Take the right to post a done job's result (``result_message_id`` NULL -> ``POSTING``);
        False when it is posted or being posted already. A conditional update: of several
        processes asking at once exactly one gets True."""
        stmt = (
            update(Job)
            .where(Job.id == job_id, Job.status == "done", Job.result_message_id.is_(None))
            .values(result_message_id=POSTING)
        )
        async with self.db.session() as s:
            return bool((await s.execute(stmt)).rowcount)

    async def release_post(self, job_id: str) -> None:
        """Give a ``claim_post`` back (the post failed): a later ``deliver_pending`` may try again."""
        stmt = update(Job).where(Job.id == job_id, Job.result_message_id == POSTING).values(result_message_id=None)
        async with self.db.session() as s:
            await s.execute(stmt)

    async def release_stale_posts(self) -> int:
        """Give back every ``POSTING`` claim (called by a new dispatcher: the process that held
        them is gone). Returns how many."""
        stmt = update(Job).where(Job.status == "done", Job.result_message_id == POSTING).values(result_message_id=None)
        async with self.db.session() as s:
            return int((await s.execute(stmt)).rowcount or 0)

    async def set_status_messages(self, message_ids: Mapping[str, int]) -> None:
        """Remember the queue-card message of many jobs in one transaction (a burst's cards)."""
        if not message_ids:
            return
        async with self.db.session() as s:
            # ORM bulk UPDATE by primary key: one executemany statement.
            await s.execute(
                update(Job), [{"id": job_id, "status_message_id": mid} for job_id, mid in message_ids.items()]
            )
            for job_id, mid in message_ids.items():  # shared mode: tell the dispatcher (no-op otherwise)
                await self._notify(s, "card", job_id, message_id=mid)

    async def record_post(self, job_id: str, message_id: int, images: list[dict[str, Any]]) -> JobRecord:
        """A result was posted: its message id and the image list (with the attachment URLs), in
        one transaction."""
        async with self.db.session() as s:
            row = await self._locked(s, job_id)
            row.result_message_id, row.images = message_id, [dict(i) for i in images]
            return JobRecord.from_row(row)

    async def mark_deleted(self, job_id: str) -> JobRecord:
        """The result was deleted: no images any more (the files are the caller's to remove)."""
        async with self.db.session() as s:
            row = await self._locked(s, job_id)
            row.deleted_at, row.images = self.clock(), []
            return JobRecord.from_row(row)

    async def erase_history(self, owner_id: int) -> list[JobRecord]:
        """A member's "forget me": the prompts and images of every job of theirs that ended are
        erased (the ledger's sums stay: quotas must still add up). Returns the records as they
        were, so the caller can remove the image files."""
        stmt = select(Job).where(Job.owner_id == owner_id, Job.status.in_(FINAL_STATUSES)).with_for_update()
        async with self.db.session() as s:
            rows = (await s.execute(stmt)).scalars().all()
            before = [JobRecord.from_row(row) for row in rows]
            for row in rows:
                row.params = erased_params(row.params or {})
                row.images, row.error = [], None
                if row.status == "done" and row.deleted_at is None:
                    row.deleted_at = self.clock()
            return before

    # ----------------------------------------------------------------- queries
    async def list_for_user(
        self, guild_id: int | None, user_id: int, statuses: Iterable[str] = ACTIVE_STATUSES
    ) -> list[JobRecord]:
        """A user's jobs in a guild (None = DMs) with the given statuses, oldest first."""
        stmt = select(Job).where(Job.owner_id == user_id, Job.status.in_(_statuses(statuses)))
        stmt = stmt.where(Job.guild_id.is_(None) if guild_id is None else Job.guild_id == guild_id)
        async with self.db.session(write=False) as s:
            rows = (await s.execute(stmt.order_by(Job.created_at, Job.id))).scalars().all()
            return [JobRecord.from_row(j) for j in rows]

    async def list_by_status(self, statuses: Iterable[str]) -> list[JobRecord]:
        """All jobs with the given statuses, oldest first."""
        stmt = select(Job).where(Job.status.in_(_statuses(statuses))).order_by(Job.created_at, Job.id)
        async with self.db.session(write=False) as s:
            return [JobRecord.from_row(j) for j in (await s.execute(stmt)).scalars().all()]

    async def count_by_status(self, statuses: Iterable[str] = ACTIVE_STATUSES) -> int:
        async with self.db.session(write=False) as s:
            n = await s.scalar(select(func.count()).select_from(Job).where(Job.status.in_(_statuses(statuses))))
            return int(n or 0)

    async def stats_since(self, ts: datetime) -> JobStats:
        """Counts by status, distinct users, mean wait and total run time of jobs created since ts."""
        stmt = select(Job.status, Job.owner_id, Job.created_at, Job.started_at, Job.seconds).where(Job.created_at >= ts)
        async with self.db.session(write=False) as s:
            rows = (await s.execute(stmt)).all()
        by_status = Counter(r.status for r in rows)
        waits = [(r.started_at - r.created_at).total_seconds() for r in rows if r.started_at is not None]
        return JobStats(
            since=ts,
            total=len(rows),
            by_status={st: by_status.get(st, 0) for st in JOB_STATUSES},
            users=len({r.owner_id for r in rows}),
            mean_wait_seconds=sum(waits) / len(waits) if waits else None,
            run_seconds=float(sum(r.seconds or 0.0 for r in rows if r.status == "done")),
        )


# What an erased job keeps of its parameters: how big it was, nothing of what it showed.
KEPT_WHEN_ERASED = ("kind", "width", "height", "steps", "count", "strength", "model", "sampler")


def erased_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {key: params[key] for key in KEPT_WHEN_ERASED if key in params} | {"erased": True}


def _statuses(statuses: Iterable[str]) -> list[str]:
    wanted = [statuses] if isinstance(statuses, str) else list(statuses)
    unknown = set(wanted) - set(JOB_STATUSES)
    if unknown:
        raise ValueError(f"unknown job status(es): {sorted(unknown)}")
    return wanted
