"""JobStore on both backends: transitions, their ledger effects, recovery, queries."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from db.jobs import DuplicateJobId, InvalidTransition, JobNotFound, JobRecord, JobStore
from db.ledger import SIGN
from db.quotas import QuotaStore, Refusal, Reservation
from db.session import Database
from engine.jobs import KINDS
from tests.db.conftest import FakeClock

G, U, V, CH = 1000, 42, 43, 555
PARAMS = {"prompt": "a lighthouse at dusk", "steps": 30, "cfg": 7.0, "seed": 123, "count": 2}


@pytest.fixture
def jobs(db: Database, clock: FakeClock) -> JobStore:
    return JobStore(db, clock=clock, kinds=KINDS)


@pytest.fixture
def quotas(db: Database, clock: FakeClock) -> QuotaStore:
    return QuotaStore(db, window_seconds=86_400, default_limit=20, clock=clock)


async def enqueue(
    jobs: JobStore, quotas: QuotaStore, job_id: str, cost: float = 2, user: int = U, guild: int | None = G
) -> JobRecord:
    """What the bot does on an accepted command: reserve, then record the job."""
    r = await quotas.reserve(guild, user, [], cost, job_id)
    assert isinstance(r, Reservation)
    return await jobs.create(
        job_id=job_id,
        kind="text2img",
        owner_id=user,
        guild_id=guild,
        channel_id=CH,
        params=PARAMS,
        cost=cost,
        band=1,
        interaction_id=777,
    )


async def test_create_and_get(jobs: JobStore, clock: FakeClock) -> None:
    rec = await jobs.create(
        job_id="AAAA0001",
        kind="text2img",
        owner_id=U,
        guild_id=G,
        channel_id=CH,
        params=PARAMS,
        cost=2.5,
        band=2,
        interaction_id=99,
    )
    assert (rec.status, rec.attempts, rec.cost, rec.band, rec.interaction_id) == ("queued", 0, 2.5, 2, 99)
    assert rec.created_at == clock.now and rec.images == [] and rec.seeds == []
    got = await jobs.get("AAAA0001")
    assert got == rec
    assert got is not None and got.params == PARAMS
    assert await jobs.get("NOPE0000") is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.status = "done"  # type: ignore[misc]
    with pytest.raises(DuplicateJobId):
        await jobs.create(
            job_id="AAAA0001",
            kind="upscale",
            owner_id=U,
            guild_id=G,
            channel_id=CH,
            params={},
            cost=1,
            band=0,
        )
    with pytest.raises(ValueError):
        await jobs.create(
            job_id="AAAA0002", kind="paint", owner_id=U, guild_id=G, channel_id=CH, params={}, cost=1, band=0
        )


async def test_happy_path_commits_quota(jobs: JobStore, quotas: QuotaStore, clock: FakeClock) -> None:
    await enqueue(jobs, quotas, "J1", cost=3)
    clock.advance(5)
    running = await jobs.mark_running("J1")
    assert (running.status, running.attempts, running.started_at) == ("running", 1, clock.now)
    clock.advance(12)
    images = [{"path": "out/J1_0.png", "url": None}, {"path": "out/J1_1.png", "url": None}]
    done = await jobs.mark_done("J1", images=images, seeds=[123, 124], seconds=11.5)
    assert (done.status, done.seeds, done.seconds, done.finished_at) == ("done", [123, 124], 11.5, clock.now)
    assert done.images == images and done.is_final
    assert [e.kind for e in await quotas.ledger(G, U)] == ["reserve", "commit"]
    assert (await quotas.status(G, U)).used == 3
    posted = await jobs.record_post("J1", 777, [dict(i, url=f"https://cdn/p{n}") for n, i in enumerate(images)])
    assert (posted.result_message_id, posted.images[0]["url"]) == (777, "https://cdn/p0")
    assert posted.images[1]["url"] == "https://cdn/p1"
    assert posted.images[0]["path"] == images[0]["path"]


@pytest.mark.parametrize("how", ["failed", "cancelled_running", "cancelled_queued", "failed_queued"])
async def test_failure_and_cancel_refund(how: str, jobs: JobStore, quotas: QuotaStore) -> None:
    await enqueue(jobs, quotas, "J1", cost=4)
    if how in ("failed", "cancelled_running"):
        await jobs.mark_running("J1")
    if how.startswith("failed"):
        rec = await jobs.mark_failed("J1", "CUDA out of memory")
        assert (rec.status, rec.error) == ("failed", "CUDA out of memory")
    else:
        rec = await jobs.mark_cancelled("J1")
        assert rec.status == "cancelled"
    assert rec.finished_at is not None
    assert (await quotas.status(G, U)).used == 0
    assert [e.kind for e in await quotas.ledger(G, U)] == ["reserve", "refund"]


async def test_invalid_transitions_are_refused(jobs: JobStore, quotas: QuotaStore) -> None:
    await enqueue(jobs, quotas, "J1")
    with pytest.raises(InvalidTransition):
        await jobs.mark_done("J1", images=[], seeds=[], seconds=1)  # never ran
    with pytest.raises(InvalidTransition):
        await jobs.requeue("J1", "x")  # not running
    await jobs.mark_running("J1")
    with pytest.raises(InvalidTransition):
        await jobs.mark_running("J1")
    await jobs.mark_done("J1", images=[], seeds=[1], seconds=1)
    for attempt in (
        jobs.mark_failed("J1", "late"),
        jobs.mark_cancelled("J1"),
        jobs.mark_running("J1"),
        jobs.requeue("J1", "x"),
        jobs.mark_done("J1", images=[], seeds=[], seconds=1),
    ):
        with pytest.raises(InvalidTransition) as info:
            await attempt
        assert info.value.current == "done"
    got = await jobs.get("J1")
    assert got is not None and got.status == "done"
    assert [e.kind for e in await quotas.ledger(G, U)] == ["reserve", "commit"]  # no stray refund
    with pytest.raises(JobNotFound):
        await jobs.mark_running("NOPE0000")


async def test_requeue_keeps_attempts(jobs: JobStore, quotas: QuotaStore) -> None:
    await enqueue(jobs, quotas, "J1")
    await jobs.mark_running("J1")
    rec = await jobs.requeue("J1", "engine crashed")
    assert (rec.status, rec.attempts, rec.error, rec.started_at) == ("queued", 1, "engine crashed", None)
    rec = await jobs.mark_running("J1")
    assert rec.attempts == 2
    assert (await quotas.status(G, U)).used == 2  # still reserved, not refunded


async def test_recover(jobs: JobStore, quotas: QuotaStore, clock: FakeClock) -> None:
    for job_id in ("QUEUED01", "RUN1TRY0", "RUN3TRY0", "DONE0000", "RUN2TRY0"):
        await enqueue(jobs, quotas, job_id, cost=1)
        clock.advance(1)
    await jobs.mark_running("RUN1TRY0")
    for _ in range(3):
        await jobs.mark_running("RUN3TRY0")
        if (await jobs.get("RUN3TRY0")).attempts < 3:  # type: ignore[union-attr]
            await jobs.requeue("RUN3TRY0", "crash")
    for _ in range(2):
        await jobs.mark_running("RUN2TRY0")
        if (await jobs.get("RUN2TRY0")).attempts < 2:  # type: ignore[union-attr]
            await jobs.requeue("RUN2TRY0", "crash")
    await jobs.mark_running("DONE0000")
    await jobs.mark_done("DONE0000", images=[], seeds=[1], seconds=1)

    result = await jobs.recover_detailed(max_attempts=3)
    assert [j.id for j in result.requeued] == ["RUN1TRY0", "RUN2TRY0"]
    assert [j.id for j in result.failed] == ["RUN3TRY0"]
    assert [(j.id, j.attempts) for j in result.queued] == [("QUEUED01", 0), ("RUN1TRY0", 1), ("RUN2TRY0", 2)]
    failed = await jobs.get("RUN3TRY0")
    assert failed is not None and failed.status == "failed" and "3 attempts" in (failed.error or "")
    assert (await quotas.status(G, U)).used == 4  # 5 charged, the failed one refunded
    assert [j.id for j in await jobs.recover()] == ["QUEUED01", "RUN1TRY0", "RUN2TRY0"]  # idempotent


async def test_ledger_balances_after_a_mix(jobs: JobStore, quotas: QuotaStore, clock: FakeClock) -> None:
    outcomes = {
        "M0": "done",
        "M1": "failed",
        "M2": "cancelled",
        "M3": "done",
        "M4": "queued",
        "M5": "running",
    }
    costs = {"M0": 1.0, "M1": 2.0, "M2": 1.5, "M3": 4.0, "M4": 0.5, "M5": 3.0}
    for job_id, outcome in outcomes.items():
        await enqueue(jobs, quotas, job_id, cost=costs[job_id])
        clock.advance(1)
        if outcome == "queued":
            continue
        if outcome == "cancelled":
            await jobs.mark_cancelled(job_id)
            continue
        await jobs.mark_running(job_id)
        if outcome == "done":
            await jobs.mark_done(job_id, images=[], seeds=[0], seconds=2)
        elif outcome == "failed":
            await jobs.mark_failed(job_id, "boom")
    expected = sum(c for j, c in costs.items() if outcomes[j] in ("done", "queued", "running"))
    status = await quotas.status(G, U)
    entries = await quotas.ledger(G, U)
    assert status.used == pytest.approx(expected) == pytest.approx(sum(SIGN[e.kind] * e.units for e in entries))
    by_job = {j: sorted(e.kind for e in entries if e.job_id == j) for j in outcomes}
    assert by_job == {
        "M0": ["commit", "reserve"],
        "M1": ["refund", "reserve"],
        "M2": ["refund", "reserve"],
        "M3": ["commit", "reserve"],
        "M4": ["reserve"],
        "M5": ["reserve"],
    }


async def test_racing_done_and_cancel_only_one_wins(jobs: JobStore, quotas: QuotaStore) -> None:
    await enqueue(jobs, quotas, "R1", cost=2)
    await jobs.mark_running("R1")
    results = await asyncio.gather(
        jobs.mark_done("R1", images=[], seeds=[1], seconds=1),
        jobs.mark_cancelled("R1"),
        return_exceptions=True,
    )
    wins = [r for r in results if isinstance(r, JobRecord)]
    assert len(wins) == 1 and sum(isinstance(r, InvalidTransition) for r in results) == 1
    kinds = sorted(e.kind for e in await quotas.ledger(G, U))
    assert kinds == (["commit", "reserve"] if wins[0].status == "done" else ["refund", "reserve"])


async def test_messages_and_lists(jobs: JobStore, quotas: QuotaStore, clock: FakeClock) -> None:
    await enqueue(jobs, quotas, "A1")
    clock.advance(1)
    await enqueue(jobs, quotas, "A2")
    clock.advance(1)
    await enqueue(jobs, quotas, "B1", user=V)
    clock.advance(1)
    await enqueue(jobs, quotas, "DM", guild=None)
    rec = await jobs.set_messages("A1", status_message_id=11)
    assert (rec.status_message_id, rec.result_message_id) == (11, None)
    rec = await jobs.set_messages("A1", result_message_id=12)
    assert (rec.status_message_id, rec.result_message_id) == (11, 12)
    with pytest.raises(JobNotFound):
        await jobs.set_messages("NOPE0000", status_message_id=1)
    await jobs.set_status_messages({"A2": 21, "B1": 22})  # a burst's cards, one transaction
    await jobs.set_status_messages({})
    assert [(await jobs.get(i)).status_message_id for i in ("A1", "A2", "B1", "DM")] == [11, 21, 22, None]  # type: ignore[union-attr]

    clock.advance(10)
    await jobs.mark_running("A1")  # waited 13 s
    clock.advance(4)
    await jobs.mark_done("A1", images=[], seeds=[1], seconds=3.5)
    await jobs.mark_running("B1")  # waited 15 s
    await jobs.mark_failed("B1", "x")

    assert [j.id for j in await jobs.list_for_user(G, U, ["queued", "running"])] == ["A2"]
    assert [j.id for j in await jobs.list_for_user(G, U, ["done", "queued"])] == ["A1", "A2"]
    assert [j.id for j in await jobs.list_for_user(None, U, ["queued"])] == ["DM"]
    assert [j.id for j in await jobs.list_by_status(["queued"])] == ["A2", "DM"]
    assert [j.id for j in await jobs.list_by_status(("done", "failed"))] == ["A1", "B1"]
    assert await jobs.count_by_status() == 2
    with pytest.raises(ValueError):
        await jobs.list_by_status(["bogus"])


def job_fields(job_id: str, cost: float = 1, user: int = U) -> dict[str, object]:
    return {
        "job_id": job_id,
        "kind": "text2img",
        "owner_id": user,
        "guild_id": G,
        "channel_id": CH,
        "params": PARAMS,
        "cost": cost,
        "band": 0,
    }


async def test_enqueue_reserves_and_records_atomically(jobs: JobStore, quotas: QuotaStore) -> None:
    await quotas.set_user_limit(G, U, 3)
    admitted = await jobs.enqueue(quotas, **job_fields("E1", cost=2))  # type: ignore[arg-type]
    assert not isinstance(admitted, Refusal)
    rec, reservation = admitted
    assert isinstance(rec, JobRecord) and rec.status == "queued"
    assert (reservation.job_id, reservation.used, reservation.remaining) == ("E1", 2, 1)
    refused = await jobs.enqueue(quotas, **job_fields("E2", cost=2))  # type: ignore[arg-type]
    assert isinstance(refused, Refusal) and refused.remaining == 1
    assert await jobs.get("E2") is None  # a refusal records nothing
    with pytest.raises(DuplicateJobId):
        await jobs.enqueue(quotas, **job_fields("E1", cost=1))  # type: ignore[arg-type]
    assert (await quotas.status(G, U)).used == 2  # the duplicate's reservation was rolled back
    exempt = await jobs.enqueue(quotas, **job_fields("E3", cost=50), role_ids=[1], exempt=True)  # type: ignore[arg-type]
    assert not isinstance(exempt, Refusal) and exempt[1].remaining is None


async def test_concurrent_enqueue_creates_exactly_the_room(jobs: JobStore, quotas: QuotaStore) -> None:
    await quotas.set_user_limit(G, U, 3)
    results = await asyncio.gather(
        *(jobs.enqueue(quotas, **job_fields(f"K{i:02d}")) for i in range(50))  # type: ignore[arg-type]
    )
    assert sum(not isinstance(r, Refusal) for r in results) == 3
    assert len(await jobs.list_for_user(G, U, ["queued"])) == 3
    assert (await quotas.status(G, U)).used == 3


async def test_recover_refunds_orphan_reservations(jobs: JobStore, quotas: QuotaStore, clock: FakeClock) -> None:
    await quotas.reserve(G, U, [], 2, "ORPHAN01")  # crashed before create()
    await enqueue(jobs, quotas, "HASJOB01", cost=1)
    await quotas.reserve(G, U, [], 1, "REFUNDED")
    await quotas.refund("REFUNDED")
    clock.advance(60)
    await quotas.reserve(G, U, [], 4, "INFLIGHT")  # too recent: may still be created elsewhere
    clock.advance(250)
    result = await jobs.recover_detailed(orphan_grace_seconds=300)
    assert result.orphans_refunded == ["ORPHAN01"]
    assert (await quotas.status(G, U)).used == 5  # HASJOB01 + INFLIGHT
    again = await jobs.recover_detailed(orphan_grace_seconds=300)
    assert again.orphans_refunded == []
