"""Activity figures for moderators and operators (`/mod stats`), computed in the database.

Two queries whatever the size of the jobs table: one aggregate row (counts by status, distinct
members, mean wait, mean run time, engine seconds) over the jobs created in the window, found
through the ``created_at`` index, then one ``ORDER BY ... LIMIT 1 OFFSET k`` for the 90th
percentile of the wait (nearest rank), which SQLite cannot compute as an aggregate.

Definitions (all over jobs *created* since ``since``, so one index range serves every figure):

* wait: ``started_at - created_at`` of jobs that started (``started_at`` is the start of the
  latest attempt, so a retried job's wait includes its earlier attempts);
* run time: the engine seconds stored with a done job (``seconds``);
* engine seconds: run time of done jobs plus ``finished_at - started_at`` of failed or cancelled
  jobs that had started (the GPU was busy with them too), over jobs created since ``busy_since``
  (default ``since``): the caller divides by the time that covers, e.g. 24 h or the uptime.

Timestamps are stored as naive UTC (see db.models); the difference of two of them in seconds is
written per dialect (SQLite has no interval type).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Float, and_, case, func, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ColumnElement, FunctionElement

from db.models import JOB_STATUSES, Job
from db.session import Database

__all__ = ["ActivityStats", "activity_since"]

P90 = 0.9


class _SecondsBetween(FunctionElement[float]):
    """``end - start`` in seconds (float), for two timestamp columns."""

    type = Float()
    name = "seconds_between"
    inherit_cache = True


@compiles(_SecondsBetween)
def _seconds_between_default(element: _SecondsBetween, compiler: SQLCompiler, **kw: Any) -> str:
    end, start = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"EXTRACT(EPOCH FROM ({end} - {start}))"


@compiles(_SecondsBetween, "sqlite")
def _seconds_between_sqlite(element: _SecondsBetween, compiler: SQLCompiler, **kw: Any) -> str:
    end, start = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"((julianday({end}) - julianday({start})) * 86400.0)"


def seconds_between(end: Any, start: Any) -> ColumnElement[float]:
    return _SecondsBetween(end, start)


@dataclass(frozen=True)
class ActivityStats:
    since: datetime
    total: int
    by_status: dict[str, int] = field(default_factory=dict)
    """Every status of db.models.JOB_STATUSES, 0 when none."""
    users: int = 0
    """Distinct members who made jobs."""
    waited: int = 0
    """Jobs that started (those the wait figures are over)."""
    mean_wait_seconds: float | None = None
    p90_wait_seconds: float | None = None
    mean_run_seconds: float | None = None
    """Over done jobs."""
    engine_seconds: float = 0.0
    """Engine time of the jobs created since ``busy_since`` (see the module docstring)."""


async def activity_since(
    db: Database,
    since: datetime,
    *,
    busy_since: datetime | None = None,
    every_server: bool = True,
    guild_id: int | None = None,
) -> ActivityStats:
    """The figures of `/mod stats` for jobs created at or after ``since`` (aware UTC): of every
    server (the operator's view), or else of the one server ``guild_id`` (None: DMs)."""
    busy_since = since if busy_since is None else max(since, busy_since)
    wait = seconds_between(Job.started_at, Job.created_at)
    ran = case(
        (and_(Job.status == "done", Job.seconds.is_not(None)), Job.seconds),
        (
            and_(Job.started_at.is_not(None), Job.finished_at.is_not(None)),
            seconds_between(Job.finished_at, Job.started_at),
        ),
        else_=None,
    )
    in_window = Job.created_at >= since
    if not every_server:
        in_window = and_(in_window, Job.guild_id.is_(None) if guild_id is None else Job.guild_id == guild_id)
    aggregate = select(
        func.count(),
        func.count(func.distinct(Job.owner_id)),
        *(func.sum(case((Job.status == status, 1), else_=0)) for status in JOB_STATUSES),
        func.count(Job.started_at),
        func.avg(case((Job.started_at.is_not(None), wait), else_=None)),
        func.avg(case((Job.status == "done", Job.seconds), else_=None)),
        func.sum(case((Job.created_at >= busy_since, ran), else_=None)),
    ).where(in_window)
    async with db.session(write=False) as s:
        row = (await s.execute(aggregate)).one()
        total, users, *counts = row[: 2 + len(JOB_STATUSES)]
        waited, mean_wait, mean_run, engine = row[2 + len(JOB_STATUSES) :]
        p90 = None
        if waited:
            rank = math.ceil(P90 * waited)  # nearest rank, 1-based
            p90 = await s.scalar(
                select(wait).where(in_window, Job.started_at.is_not(None)).order_by(wait).limit(1).offset(rank - 1)
            )
    return ActivityStats(
        since=since,
        total=int(total or 0),
        by_status={status: int(n or 0) for status, n in zip(JOB_STATUSES, counts, strict=True)},
        users=int(users or 0),
        waited=int(waited or 0),
        mean_wait_seconds=None if mean_wait is None else float(mean_wait),
        p90_wait_seconds=None if p90 is None else float(p90),
        mean_run_seconds=None if mean_run is None else float(mean_run),
        engine_seconds=float(engine or 0.0),
    )
