"""Group commit of admissions (db.admission, db.reservations, JobStore.enqueue) on both backends:
a burst is admitted in few transactions, and every request is decided exactly as it would have
been alone, in order: the same members accepted and refused, the same units left, the same
ledger; a bad request fails alone."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from db.admission import GroupCommit
from db.jobs import DuplicateJobId, JobStore
from db.quotas import QuotaStore, Refusal, Reservation
from db.session import Database
from engine.jobs import KINDS
from tests.db.conftest import FakeClock

SEQUENTIAL, BURST = 1000, 2000  # two guilds with the same limits: one admitted in turn, one at once
ROLE_SMALL, ROLE_BIG = 7, 8


@pytest.fixture
def jobs(db: Database, clock: FakeClock) -> JobStore:
    return JobStore(db, clock=clock, kinds=KINDS)


@pytest.fixture
def quotas(db: Database, clock: FakeClock) -> QuotaStore:
    return QuotaStore(db, window_seconds=86_400, default_limit=5, clock=clock)


def fields(job_id: str, guild: int, user: int, cost: float, **extra: Any) -> dict[str, Any]:
    return {
        "job_id": job_id, "kind": "text2img", "owner_id": user, "guild_id": guild, "channel_id": 1,
        "params": {"prompt": job_id}, "cost": cost, "band": 1, **extra,
    }  # fmt: skip


async def same_limits(quotas: QuotaStore, guild: int) -> None:
    await quotas.set_user_limit(guild, 1, 2)  # an override
    await quotas.set_user_limit(guild, 2, 0)  # blocked
    await quotas.set_role_limit(guild, ROLE_SMALL, 1)
    await quotas.set_role_limit(guild, ROLE_BIG, 9)
    if guild == BURST:
        await quotas.set_default_limit(guild, 4)  # a guild default …
    else:
        await quotas.set_default_limit(guild, 4)  # … the same in both
    await quotas.grant(guild, 3, 1.5)  # extra room for member 3
    await quotas.reserve(guild, 4, [], 3, f"old-{guild}")  # member 4 used 3 already


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_burst_decides_every_request_as_one_at_a_time_would(
    jobs: JobStore, quotas: QuotaStore, seed: int
) -> None:
    rnd = random.Random(seed)
    requests = []
    for i in range(60):
        user = rnd.randint(1, 8)
        roles = rnd.choice([(), (ROLE_SMALL,), (ROLE_BIG,), (ROLE_SMALL, ROLE_BIG), (99,)])
        requests.append((f"{i:03d}", user, rnd.choice([0.5, 1.0, 1.5, 3.0]), roles, rnd.random() < 0.1))
    for guild in (SEQUENTIAL, BURST):
        await same_limits(quotas, guild)

    def call(guild: int, job: str, user: int, cost: float, roles: tuple[int, ...], exempt: bool) -> Any:
        request = fields(f"{guild // 1000}-{job}", guild, user, cost)
        return jobs.enqueue(quotas, **request, role_ids=roles, exempt=exempt)

    alone = [await call(SEQUENTIAL, *r) for r in requests]
    groups_before = jobs._admissions.groups
    burst = await asyncio.gather(*(call(BURST, *r) for r in requests))
    assert jobs._admissions.groups - groups_before <= 3  # one or two transactions, not 60

    def outcome(result: Any) -> tuple[Any, ...]:
        if isinstance(result, Refusal):
            return ("refused", result.reason, result.remaining, result.used, result.limit, result.retry_at)
        record, reservation = result
        return ("accepted", reservation.used, reservation.remaining, reservation.limit, record.cost, record.status)

    assert [outcome(r) for r in burst] == [outcome(r) for r in alone]
    assert any(isinstance(r, Refusal) for r in alone) and any(not isinstance(r, Refusal) for r in alone)
    for user in range(1, 9):
        a, b = await quotas.status(SEQUENTIAL, user), await quotas.status(BURST, user)
        assert (a.used, a.remaining, a.limit) == (b.used, b.remaining, b.limit)
        assert len(await jobs.list_for_user(SEQUENTIAL, user, ["queued"])) == len(
            await jobs.list_for_user(BURST, user, ["queued"])
        )


async def test_fifty_clicks_of_one_member_in_a_burst_take_exactly_the_room(jobs: JobStore, quotas: QuotaStore) -> None:
    await quotas.set_user_limit(SEQUENTIAL, 5, 3)
    results = await asyncio.gather(*(jobs.enqueue(quotas, **fields(f"K{i:02d}", SEQUENTIAL, 5, 1)) for i in range(50)))
    assert sum(not isinstance(r, Refusal) for r in results) == 3
    assert (await quotas.status(SEQUENTIAL, 5)).used == 3
    assert len(await jobs.list_for_user(SEQUENTIAL, 5, ["queued"])) == 3


async def test_a_duplicate_id_fails_alone_and_the_rest_of_its_group_is_admitted(
    jobs: JobStore, quotas: QuotaStore
) -> None:
    first = await jobs.enqueue(quotas, **fields("DUP", SEQUENTIAL, 1, 1))
    assert not isinstance(first, Refusal)
    calls = [jobs.enqueue(quotas, **fields(f"OK{i}", SEQUENTIAL, 10 + i, 1)) for i in range(5)]
    calls.insert(2, jobs.enqueue(quotas, **fields("DUP", SEQUENTIAL, 1, 1)))
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[2], DuplicateJobId)
    admitted = [r for i, r in enumerate(results) if i != 2]
    assert all(isinstance(r, tuple) and isinstance(r[1], Reservation) for r in admitted)
    assert (await quotas.status(SEQUENTIAL, 1)).used == 1  # the duplicate charged nothing


async def test_group_commit_answers_after_the_commit_and_groups_what_arrives_together() -> None:
    committed: list[list[int]] = []

    async def commit(items: Any) -> list[int]:
        await asyncio.sleep(0.01)  # a transaction in flight: the next ones gather meanwhile
        committed.append(list(items))
        return [item * 10 for item in items]

    group: GroupCommit[int, int] = GroupCommit(commit)
    first = asyncio.create_task(group.submit(0))
    await asyncio.sleep(0.001)
    rest = await asyncio.gather(*(group.submit(i) for i in range(1, 6)))
    assert await first == 0 and rest == [10, 20, 30, 40, 50]
    assert committed == [[0], [1, 2, 3, 4, 5]]
