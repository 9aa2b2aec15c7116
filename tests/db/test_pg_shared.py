"""Several bot processes on one PostgreSQL (``[database] shared``), at the database level, on a real
server started by the test run: claims with SKIP LOCKED, notices over LISTEN/NOTIFY, the dispatcher
advisory lock and its hand-over, posting claims, and quotas under concurrent enqueues from two
independent connection pools (as two bot processes have)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from db.coordination import DispatcherLock, JobNotice, NoticeListener, NoticeSender, raw_dsn
from db.jobs import InvalidTransition, JobRecord, JobStore
from db.ledger import SIGN
from db.quotas import QuotaStore, Refusal
from db.session import Database
from tests.db.conftest import PgTarget

pytestmark = [pytest.mark.slow]

G, U = 7000, 77


@pytest.fixture
async def pg_url(pg: PgTarget, pg_database: str) -> str:
    await pg.clear(pg_database)
    return pg.url(pg_database)


@pytest.fixture
async def two(pg_url: str) -> AsyncIterator[tuple[Database, Database]]:
    """Two independent engines on one database: what two bot processes hold."""
    a, b = Database(pg_url), Database(pg_url)
    await a.connect()
    await b.connect()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def enqueue(jobs: JobStore, quotas: QuotaStore, job_id: str, cost: float = 1.0, user: int = U) -> Any:
    return await jobs.enqueue(
        quotas, job_id=job_id, kind="text2img", owner_id=user, guild_id=G, channel_id=1,
        params={"prompt": job_id}, cost=cost, band=1,
    )  # fmt: skip


def record_of(result: Any) -> JobRecord:
    assert not isinstance(result, Refusal), result
    return result[0] if isinstance(result, tuple) else result


class Inbox:
    """Collects notices from a NoticeListener."""

    def __init__(self) -> None:
        self.notices: list[JobNotice] = []
        self.changed = asyncio.Event()

    def __call__(self, notice: JobNotice) -> None:
        self.notices.append(notice)
        self.changed.set()

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[JobNotice]:
        deadline = time.monotonic() + timeout
        while len(self.notices) < count:
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"got {len(self.notices)} notices, wanted {count}: {self.notices}")
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                pass
        return list(self.notices)


# ------------------------------------------------------------------ claims
async def test_claims_from_two_processes_start_every_job_exactly_once(two: tuple[Database, Database]) -> None:
    a, b = two
    store_a, store_b = JobStore(a), JobStore(b)
    quotas = QuotaStore(a, window_seconds=3600, default_limit=1000)
    ids = [f"CLM{i:05d}" for i in range(40)]
    for job_id in ids:
        record_of(await enqueue(store_a, quotas, job_id))
    # Both "dispatchers" try every job at once, in opposite orders.
    calls = [store_a.claim(j) for j in ids] + [store_b.claim(j) for j in reversed(ids)]
    results = await asyncio.gather(*calls)
    won = [r.id for r in results if r is not None]
    assert sorted(won) == sorted(ids)  # each job claimed once, none left behind
    for job_id in ids:
        record = await store_a.get(job_id)
        assert record is not None and record.status == "running" and record.attempts == 1


async def test_a_claim_skips_a_locked_row_instead_of_waiting(two: tuple[Database, Database]) -> None:
    a, b = two
    store_a, store_b = JobStore(a), JobStore(b)
    record_of(await enqueue(store_a, QuotaStore(a, window_seconds=3600, default_limit=10), "LOCKED01"))
    locked = asyncio.Event()
    release = asyncio.Event()

    async def hold_row() -> None:
        from sqlalchemy import text

        async with a.session() as s:
            await s.execute(text("SELECT id FROM jobs WHERE id = 'LOCKED01' FOR UPDATE"))
            locked.set()
            await release.wait()

    holder = asyncio.create_task(hold_row())
    await locked.wait()
    started = time.monotonic()
    assert await store_b.claim("LOCKED01") is None  # another transaction has it: skipped
    assert time.monotonic() - started < 1.0
    release.set()
    await holder
    claimed = await store_b.claim("LOCKED01")
    assert claimed is not None and claimed.status == "running"
    assert await store_a.claim("LOCKED01") is None  # not queued any more


async def test_a_cancel_from_another_process_and_a_claim_never_both_win(two: tuple[Database, Database]) -> None:
    a, b = two
    dispatcher, other = JobStore(a), JobStore(b)
    quotas = QuotaStore(a, window_seconds=3600, default_limit=1000)
    ids = [f"RACE{i:04d}" for i in range(30)]
    for job_id in ids:
        record_of(await enqueue(dispatcher, quotas, job_id))

    async def cancel(job_id: str) -> bool:
        try:
            await other.mark_cancelled(job_id, only_queued=True)
        except InvalidTransition:
            return False
        return True

    claims = await asyncio.gather(*(dispatcher.claim(j) for j in ids))
    cancels = await asyncio.gather(*(cancel(j) for j in ids))
    for job_id, claim, cancelled in zip(ids, claims, cancels, strict=True):
        assert (claim is not None) != cancelled, job_id
        record = await dispatcher.get(job_id)
        assert record is not None
        assert record.status == ("running" if claim is not None else "cancelled")
    # Interleaved as well: start both kinds at the same moment.
    more = [f"MIX{i:04d}" for i in range(30)]
    for job_id in more:
        record_of(await enqueue(dispatcher, quotas, job_id))
    results = await asyncio.gather(*(f for j in more for f in (dispatcher.claim(j), cancel(j))))
    for i, job_id in enumerate(more):
        claim, cancelled = results[2 * i], results[2 * i + 1]
        assert (claim is not None) != cancelled, job_id


async def test_posting_claims_let_exactly_one_process_post(two: tuple[Database, Database]) -> None:
    a, b = two
    store_a, store_b = JobStore(a), JobStore(b)
    record_of(await enqueue(store_a, QuotaStore(a, window_seconds=3600, default_limit=10), "POST0001"))
    assert not await store_a.claim_post("POST0001")  # not done yet: nothing to post
    await store_a.claim("POST0001")
    await store_a.mark_done("POST0001", images=[{"seed": 1}], seeds=[1], seconds=0.1)
    results = await asyncio.gather(*(s.claim_post("POST0001") for s in (store_a, store_b) for _ in range(5)))
    assert results.count(True) == 1
    await store_b.release_post("POST0001")  # the post failed: someone may try again
    assert await store_a.claim_post("POST0001")
    assert await store_b.release_stale_posts() == 1  # a new dispatcher gives a dead one's claims back
    assert await store_b.claim_post("POST0001")
    await store_b.set_messages("POST0001", result_message_id=123)
    assert not await store_a.claim_post("POST0001")
    assert await store_a.release_stale_posts() == 0


# ------------------------------------------------------------------ notices
async def test_state_changes_notify_at_commit_and_only_then(two: tuple[Database, Database], pg_url: str) -> None:
    a, b = two
    inbox = Inbox()
    listener = NoticeListener(pg_url, inbox)
    await listener.start()
    try:
        sender = NoticeSender("proc-a")
        jobs = JobStore(a, notices=sender)
        quotas = QuotaStore(a, window_seconds=3600, default_limit=2)
        record_of(await enqueue(jobs, quotas, "NOTE0001", cost=2))
        assert isinstance(await enqueue(jobs, quotas, "NOTE0002", cost=1), Refusal)  # refused: no notice
        claimed = await jobs.claim("NOTE0001")
        assert claimed is not None
        await jobs.set_messages("NOTE0001", status_message_id=555)
        await jobs.mark_done("NOTE0001", images=[], seeds=[], seconds=0.1)
        got = await inbox.wait_for(4)
        assert [(n.event, n.job_id) for n in got] == [
            ("queued", "NOTE0001"),
            ("running", "NOTE0001"),
            ("card", "NOTE0001"),
            ("done", "NOTE0001"),
        ]
        assert all(n.origin == "proc-a" for n in got)
        assert got[2].message_id == 555
        # A rolled-back transaction sends nothing.
        with pytest.raises(RuntimeError):
            async with b.session() as s:
                await NoticeSender("proc-b").in_session(s, "cancel", "NOTE0001")
                raise RuntimeError("roll back")
        async with b.session() as s:
            await NoticeSender("proc-b").in_session(s, "pause", None)
        got = await inbox.wait_for(5)
        assert [(n.event, n.origin) for n in got[4:]] == [("pause", "proc-b")]
        # Latency from a committed change to its notice in another connection.
        waits = []
        for i in range(20):
            sent = time.monotonic()
            async with b.session() as s:
                await NoticeSender("proc-b").in_session(s, "resume", None)
            await inbox.wait_for(6 + i)
            waits.append(time.monotonic() - sent)
        waits.sort()
        print(f"\nnotice after commit: median {waits[10] * 1000:.1f} ms, max {waits[-1] * 1000:.1f} ms")
        assert waits[10] < 0.5
    finally:
        await listener.close()


async def test_the_listener_reconnects_and_asks_for_a_resync(two: tuple[Database, Database], pg_url: str) -> None:
    import asyncpg

    a, _ = two
    inbox = Inbox()
    resynced = asyncio.Event()

    async def on_reconnect() -> None:
        resynced.set()

    listener = NoticeListener(pg_url, inbox, on_reconnect=on_reconnect, retry_seconds=0.1)
    await listener.start()
    try:
        admin = await asyncpg.connect(raw_dsn(pg_url))
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
            )
        finally:
            await admin.close()
        assert killed >= 1
        await asyncio.wait_for(resynced.wait(), 5)
        async with a.session() as s:
            await NoticeSender("x").in_session(s, "resume", None)
        got = await inbox.wait_for(1)
        assert got[-1].event == "resume"
    finally:
        await listener.close()


# ------------------------------------------------------------------ the dispatcher lock
async def test_one_dispatcher_at_a_time_and_handover_when_it_dies(pg_url: str) -> None:
    import asyncpg

    lost: list[str] = []
    first = DispatcherLock(pg_url, on_lost=lambda: lost.append("first"))
    second = DispatcherLock(pg_url)
    try:
        assert await first.try_acquire()
        assert not await second.try_acquire()
        assert not await second.try_acquire()  # retrying never waits
        # Kill the holder's session, as the death of its process would end it.
        admin = await asyncpg.connect(raw_dsn(pg_url))
        try:
            pid = await admin.fetchval(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objid = $1",
                first.key & 0xFFFFFFFF,
            )
            assert pid is not None
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
        started = time.monotonic()
        while not await second.try_acquire():
            assert time.monotonic() - started < 5, "the lock was not released"
            await asyncio.sleep(0.05)
        handover = time.monotonic() - started
        print(f"\nadvisory lock free for the next process {handover * 1000:.0f} ms after its holder's session died")
        assert handover < 2
        assert not await first.check()
        assert lost == ["first"]
        assert not await first.try_acquire()  # the new holder keeps it
        await second.release()  # a graceful stop
        assert await first.try_acquire()
    finally:
        await first.release()
        await second.release()


# ------------------------------------------------------------------ quotas across processes
async def test_quotas_are_exact_under_concurrent_enqueues_from_two_processes(two: tuple[Database, Database]) -> None:
    """Two bot processes, 60 simultaneous clicks by one member with room for 10 units (cost 1 each,
    some cost 2): never more than the limit, every accepted job has exactly its reservation, and
    after running, failing and cancelling some of them the ledger explains the balance."""
    a, b = two
    stores = [JobStore(d, notices=NoticeSender(f"p{i}")) for i, d in enumerate((a, b))]
    quotas = [QuotaStore(d, window_seconds=3600, default_limit=10) for d in (a, b)]
    costs = [1.0 if i % 3 else 2.0 for i in range(60)]
    results = await asyncio.gather(
        *(enqueue(stores[i % 2], quotas[i % 2], f"Q{i:07d}", cost=costs[i]) for i in range(60))
    )
    accepted = [record_of(r) for r in results if not isinstance(r, Refusal)]
    assert sum(r.cost for r in accepted) <= 10
    assert sum(r.cost for r in accepted) >= 9  # the refusals were real: at most one unit was left
    status = await quotas[0].status(G, U)
    assert status.used == pytest.approx(sum(r.cost for r in accepted))
    jobs = await stores[1].list_by_status(["queued"])
    assert sorted(j.id for j in jobs) == sorted(r.id for r in accepted)
    # Run them: both processes claim, one finishes, fails or cancels each.
    outcomes = ["done", "failed", "cancelled"]
    for i, record in enumerate(accepted):
        claimed = await asyncio.gather(stores[0].claim(record.id), stores[1].claim(record.id))
        assert sum(c is not None for c in claimed) == 1
        owner = stores[0] if claimed[0] is not None else stores[1]
        outcome = outcomes[i % 3]
        if outcome == "done":
            await owner.mark_done(record.id, images=[], seeds=[], seconds=0.1)
        elif outcome == "failed":
            await owner.mark_failed(record.id, "boom")
        else:
            await owner.mark_cancelled(record.id)
    charged = sum(r.cost for i, r in enumerate(accepted) if outcomes[i % 3] == "done")
    status = await quotas[1].status(G, U)
    assert status.used == pytest.approx(charged)
    ledger = await quotas[0].ledger(G, U)
    assert sum(SIGN[e.kind] * e.units for e in ledger) == pytest.approx(charged)
    assert sorted({e.job_id for e in ledger}) == sorted(r.id for r in accepted)
