"""db.stats on both backends: exact figures from crafted job rows (the SQL for time differences
differs per dialect, so each case runs on SQLite and on PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from db.models import Job
from db.session import Database
from db.stats import activity_since

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)  # the window starts here


def job(
    job_id: str,
    owner: int,
    status: str,
    created_h: float,
    *,
    wait: float | None = None,
    ran: float | None = None,
    seconds: float | None = None,
    finished_after: float | None = None,
) -> Job:
    """A job row created `created_h` hours after T0 that started after `wait` s and ran `ran` s."""
    created = T0 + timedelta(hours=created_h)
    started = created + timedelta(seconds=wait) if wait is not None else None
    finished = None
    if started is not None and ran is not None:
        finished = started + timedelta(seconds=ran)
    elif finished_after is not None:
        finished = created + timedelta(seconds=finished_after)
    return Job(
        id=job_id,
        kind="text2img",
        owner_id=owner,
        guild_id=1,
        channel_id=2,
        params={"prompt": "x"},
        cost=1.0,
        band=1,
        status=status,
        attempts=1 if started else 0,
        created_at=created,
        started_at=started,
        finished_at=finished,
        seconds=seconds,
        images=[],
        seeds=[],
    )


def rows() -> list[Job]:
    """Fresh ORM objects for each test (an object once added belongs to that database)."""
    return [
        job("A", 1, "done", 1, wait=10, ran=21, seconds=20),
        job("B", 1, "done", 2, wait=20, ran=31, seconds=30),
        job("C", 2, "failed", 3, wait=40, ran=5),
        job("D", 3, "cancelled", 4, finished_after=60),  # cancelled while queued: no wait, no engine time
        job("E", 2, "cancelled", 5, wait=100, ran=8),
        job("F", 4, "queued", 6),
        job("G", 5, "running", 7, wait=30),
        job("OLD", 9, "done", -1, wait=5, ran=1000, seconds=1000),  # before the window
    ]


async def insert(db: Database, rows: list[Job]) -> None:
    async with db.session() as s:
        s.add_all(rows)


async def test_figures_over_the_window(db: Database) -> None:
    await insert(db, rows())
    stats = await activity_since(db, T0)
    assert stats.since == T0
    assert stats.total == 7
    assert stats.by_status == {"queued": 1, "running": 1, "done": 2, "failed": 1, "cancelled": 2}
    assert stats.users == 5
    assert stats.waited == 5  # A B C E G
    assert stats.mean_wait_seconds == pytest.approx(40.0, abs=0.01)  # (10+20+40+100+30)/5
    assert stats.p90_wait_seconds == pytest.approx(100.0, abs=0.01)  # nearest rank: 5th of 5
    assert stats.mean_run_seconds == pytest.approx(25.0)  # done jobs' stored seconds
    # done: stored seconds (20 + 30); failed/cancelled that ran: finished - started (5 + 8)
    assert stats.engine_seconds == pytest.approx(63.0, abs=0.01)


async def test_engine_seconds_can_cover_a_shorter_span(db: Database) -> None:
    await insert(db, rows())
    stats = await activity_since(db, T0, busy_since=T0 + timedelta(hours=2, minutes=30))
    assert stats.total == 7  # the other figures keep the whole window
    assert stats.engine_seconds == pytest.approx(13.0, abs=0.01)  # C and E only
    assert (await activity_since(db, T0, busy_since=T0 - timedelta(days=1))).engine_seconds == pytest.approx(
        63.0, abs=0.01
    )  # never wider than the window


async def test_p90_is_the_nearest_rank(db: Database) -> None:
    waits = [job(f"W{i:02d}", i, "done", 1 + i / 60, wait=float(i), ran=1, seconds=1) for i in range(1, 21)]
    await insert(db, waits)
    stats = await activity_since(db, T0)
    assert stats.waited == 20
    assert stats.p90_wait_seconds == pytest.approx(18.0, abs=0.01)  # ceil(0.9 × 20) = 18th
    assert stats.mean_wait_seconds == pytest.approx(10.5, abs=0.01)


async def test_an_empty_window(db: Database) -> None:
    await insert(db, rows()[-1:])
    stats = await activity_since(db, T0)
    assert stats.total == 0 and stats.users == 0 and stats.waited == 0
    assert stats.by_status == {"queued": 0, "running": 0, "done": 0, "failed": 0, "cancelled": 0}
    assert stats.mean_wait_seconds is None and stats.p90_wait_seconds is None and stats.mean_run_seconds is None
    assert stats.engine_seconds == 0.0
