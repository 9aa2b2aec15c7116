"""What the scheduler needs of a job store and its records (db.jobs satisfies it; the tests' fakes
too), and what it shows of a job (`JobView`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeVar

from engine.api import Result
from engine.jobs.events import Cancelled, Done, Failed, JobEvent, Progress

FINAL_STATUSES = frozenset({"done", "failed", "cancelled"})


class JobRecordLike(Protocol):
    """The fields of ``db.jobs.JobRecord`` the scheduler reads."""

    @property
    def id(self) -> str: ...
    @property
    def owner_id(self) -> int: ...
    @property
    def guild_id(self) -> int | None: ...
    @property
    def cost(self) -> float: ...
    @property
    def band(self) -> int: ...
    @property
    def status(self) -> str: ...
    @property
    def attempts(self) -> int: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def error(self) -> str | None: ...


R = TypeVar("R", bound=JobRecordLike)
R_co = TypeVar("R_co", bound=JobRecordLike, covariant=True)


class RecoveryLike(Protocol[R_co]):
    """The fields of ``db.jobs.RecoveryResult`` the scheduler reads."""

    @property
    def failed(self) -> Sequence[R_co]: ...
    @property
    def queued(self) -> Sequence[R_co]: ...


class JobStorePort(Protocol[R_co]):
    """Exactly the job store methods the scheduler calls (``db.jobs.JobStore`` and, in shared
    mode, ``bot.coordination.SharedStore`` satisfy it: mypy checks both). Each must be durable
    when it returns and raise on a transition its state forbids."""

    async def get(self, job_id: str) -> R_co | None: ...
    async def mark_running(self, job_id: str) -> R_co: ...
    async def mark_done(
        self, job_id: str, *, images: list[dict[str, Any]], seeds: list[int], seconds: float
    ) -> R_co: ...
    async def mark_failed(self, job_id: str, error: str) -> R_co: ...
    async def mark_cancelled(self, job_id: str) -> R_co: ...
    async def requeue(self, job_id: str, error: str, *, attempt_used: bool = True) -> R_co: ...
    async def recover_detailed(self, max_attempts: int = 3) -> RecoveryLike[R_co]: ...


@dataclass(frozen=True)
class JobView:
    """One line of ``/queue`` or ``/mod queue``. ``position`` is 0 for a running job."""

    job_id: str
    owner_id: int
    status: Literal["queued", "running"]
    position: int
    band: int
    cost: float
    eta: float
    attempts: int
    record: Any
    progress: Progress | None = None


class UnknownJob(LookupError):
    """``subscribe`` was given a job id the store does not know."""


def terminal_event(record: JobRecordLike) -> JobEvent:
    """The final event of a job that ended, from its record."""
    if record.status == "done":
        return Done(None, record=record)
    if record.status == "cancelled":
        return Cancelled(record)
    return Failed(record.id, record.error or "failed", record=record)


def age_seconds(created_at: datetime, now: datetime) -> float:
    if created_at.tzinfo is None:
        created_at = created_at.replace(tzinfo=UTC)
    return max(0.0, (now - created_at).total_seconds())


def describe_images(record: JobRecordLike, result: Result) -> list[dict[str, Any]]:
    """Default image metadata written with ``mark_done`` when no ``store_images`` hook is given."""
    return [
        {"seed": im.seed, "format": im.format, "width": im.width, "height": im.height, "bytes": len(im.data)}
        for im in result.images
    ]


__all__ = [
    "FINAL_STATUSES",
    "JobRecordLike",
    "JobStorePort",
    "JobView",
    "R",
    "RecoveryLike",
    "UnknownJob",
    "age_seconds",
    "describe_images",
    "terminal_event",
]
