"""bot.coordination.SharedStore: the job store as the scheduler sees it in shared mode, kept to the
same port as db.jobs.JobStore (mypy checks it; this checks what it does)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from bot.coordination import SharedStore
from db.jobs import JobStore
from db.migrate import upgrade
from db.quotas import QuotaStore
from db.session import Database


@pytest_asyncio.fixture
async def jobs(tmp_path: Path) -> AsyncIterator[JobStore]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}"
    await upgrade(url)
    async with Database(url) as db:
        store = JobStore(db)
        quotas = QuotaStore(db, window_seconds=3600, default_limit=10)
        await store.enqueue(
            quotas, job_id="JOB1", kind="text2img", owner_id=1, guild_id=5, channel_id=9, params={}, cost=1, band=1
        )
        yield store


async def test_a_requeue_after_a_prefetched_shutdown_gives_the_attempt_back(jobs: JobStore) -> None:
    shared = SharedStore(jobs)
    running = await shared.mark_running("JOB1")  # a claim
    assert running.status == "running" and running.attempts == 1
    back = await shared.requeue("JOB1", "interrupted by shutdown", attempt_used=False)
    assert back.status == "queued" and back.attempts == 0
    await shared.mark_running("JOB1")
    again = await shared.requeue("JOB1", "the engine died")  # an engine failure counts
    assert again.attempts == 1
