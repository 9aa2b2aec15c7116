"""What a job record is: a frozen snapshot of a `jobs` row (callers never get ORM objects, so no
session or lazy load leaks out of db.jobs), the statuses and the transitions between them, and
the store's errors.

Allowed transitions::

    queued  -> running | cancelled | failed
    running -> done | failed | cancelled | queued (requeue after a retryable failure)
    done, failed, cancelled: final
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from db.models import JOB_STATUSES, Job

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


# What an erased job keeps of its parameters: how big it was, nothing of what it showed.
KEPT_WHEN_ERASED = ("kind", "width", "height", "steps", "count", "strength", "model", "sampler")


def erased_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {key: params[key] for key in KEPT_WHEN_ERASED if key in params} | {"erased": True}


def check_statuses(statuses: Iterable[str]) -> list[str]:
    wanted = [statuses] if isinstance(statuses, str) else list(statuses)
    unknown = set(wanted) - set(JOB_STATUSES)
    if unknown:
        raise ValueError(f"unknown job status(es): {sorted(unknown)}")
    return wanted


__all__ = [
    "ACTIVE_STATUSES",
    "FINAL_STATUSES",
    "POSTING",
    "TRANSITIONS",
    "DuplicateJobId",
    "InvalidTransition",
    "JobError",
    "JobNotFound",
    "JobRecord",
    "RecoveryResult",
    "check_statuses",
    "erased_params",
]
