"""Durable job records: the source of truth for the queue, so no job is lost on a crash.

Every method is one transaction that is committed before it returns, so the caller only acts
(posts a message, dispatches to the engine) on a state that is already on disk. A status
change and its quota effect (commit on done, refund on failed/cancelled) are written in the
same transaction: a job can never end up failed-but-charged or done-but-refunded.

Callers get ``JobRecord`` snapshots (db.job_records). A job's parameters are JSON written by the
job vocabulary (engine.jobs), which this layer does not import: the kinds it accepts are given
(``kinds``).

With a ``NoticeSender`` (several bot processes sharing one PostgreSQL, see ``db.coordination``)
every state change also sends a notice inside its own transaction, so other processes hear of
it exactly when it commits.

Admissions (``enqueue``) that arrive together share one transaction (group commit,
db.admission): a burst of members costs a few transactions, not one each.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from db.admission import GroupCommit
from db.coordination import NoticeSender
from db.job_records import (
    ACTIVE_STATUSES,
    FINAL_STATUSES,
    POSTING,
    TRANSITIONS,
    DuplicateJobId,
    InvalidTransition,
    JobError,
    JobNotFound,
    JobRecord,
    RecoveryResult,
    check_statuses,
    erased_params,
)
from db.ledger import LedgerStateError, commit_job, refund_job
from db.models import Job, LedgerEntry, utcnow
from db.quotas import QuotaStore, Refusal, Reservation, ReserveRequest
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
    "JobStore",
    "RecoveryResult",
]

Reserve = aliased(LedgerEntry)
JOB_COLUMNS = tuple(column.key for column in Job.__table__.columns)


@dataclass(frozen=True, eq=False)
class _Admission:
    quotas: QuotaStore
    row: Job  # transient: its values are inserted, and it makes the JobRecord
    request: ReserveRequest


class JobStore:
    """CRUD and validated state transitions for jobs. ``clock`` is injectable for tests;
    ``notices`` (PostgreSQL only) makes every state change send a ``JobNotice``; ``kinds``, when
    given, are the only job kinds accepted."""

    def __init__(
        self,
        db: Database,
        *,
        clock: Callable[[], datetime] = utcnow,
        notices: NoticeSender | None = None,
        kinds: Collection[str] | None = None,
    ):
        if notices is not None and not db.is_postgres:
            raise ValueError("job notices need PostgreSQL (LISTEN/NOTIFY)")
        self.db = db
        self.clock = clock
        self.notices = notices
        self.kinds = kinds
        self._admissions: GroupCommit[_Admission, tuple[JobRecord, Reservation] | Refusal] = GroupCommit(
            self._admit_group
        )

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
        if self.kinds is not None and kind not in self.kinds:
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
        without its job (which ``reserve`` followed by ``create`` could). Admissions that arrive
        together share the transaction (db.admission); it has committed when this returns."""
        row = self._new_row(
            job_id=job_id, kind=kind, owner_id=owner_id, guild_id=guild_id, channel_id=channel_id,
            params=params, cost=cost, band=band, interaction_id=interaction_id,
            request_message_id=request_message_id,
        )  # fmt: skip
        request = ReserveRequest(guild_id, owner_id, tuple(role_ids), cost, job_id, exempt)
        try:
            return await self._admissions.submit(_Admission(quotas, row, request))
        except IntegrityError as exc:
            raise DuplicateJobId(job_id) from exc

    async def _admit_group(self, group: Sequence[_Admission]) -> list[tuple[JobRecord, Reservation] | Refusal]:
        """One transaction: every admission's reservation, decided in order, and the rows of the
        accepted ones (an existing job id raises IntegrityError: all of it rolls back)."""
        quotas = group[0].quotas
        if any(a.quotas is not quotas for a in group):  # never in the bot: one quota store
            return [outcome for a in group for outcome in await self._admit_group([a])]
        out: list[tuple[JobRecord, Reservation] | Refusal] = []
        async with self.db.session() as s:
            decided = await quotas.reserve_many_in(s, [a.request for a in group])
            accepted = [a.row for a, d in zip(group, decided, strict=True) if isinstance(d, Reservation)]
            if accepted:
                await s.execute(insert(Job), [{key: getattr(row, key) for key in JOB_COLUMNS} for row in accepted])
            for a, decision in zip(group, decided, strict=True):
                if isinstance(decision, Refusal):
                    out.append(decision)
                    continue
                await self._notify(s, "queued", a.row.id)
                out.append((JobRecord.from_row(a.row), decision))
        return out

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
            return bool(cast(CursorResult[Any], await s.execute(stmt)).rowcount)

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
            return int(cast(CursorResult[Any], await s.execute(stmt)).rowcount or 0)

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
        stmt = select(Job).where(Job.owner_id == user_id, Job.status.in_(check_statuses(statuses)))
        stmt = stmt.where(Job.guild_id.is_(None) if guild_id is None else Job.guild_id == guild_id)
        async with self.db.session(write=False) as s:
            rows = (await s.execute(stmt.order_by(Job.created_at, Job.id))).scalars().all()
            return [JobRecord.from_row(j) for j in rows]

    async def list_by_status(self, statuses: Iterable[str]) -> list[JobRecord]:
        """All jobs with the given statuses, oldest first."""
        stmt = select(Job).where(Job.status.in_(check_statuses(statuses))).order_by(Job.created_at, Job.id)
        async with self.db.session(write=False) as s:
            return [JobRecord.from_row(j) for j in (await s.execute(stmt)).scalars().all()]

    async def count_by_status(self, statuses: Iterable[str] = ACTIVE_STATUSES) -> int:
        async with self.db.session(write=False) as s:
            n = await s.scalar(select(func.count()).select_from(Job).where(Job.status.in_(check_statuses(statuses))))
            return int(n or 0)
