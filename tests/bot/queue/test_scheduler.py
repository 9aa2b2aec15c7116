"""bot.queue.scheduler (with bot.queue.eta): dispatch, outcomes, events, cancel, stop/restart, recovery.

Most tests use the second implementations in tests/bot/fakes.py (a dict job store with the real
transition rules, an in-process engine); the restart tests at the end use the real
``db.jobs.JobStore`` on a SQLite file.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bot.queue.eta import EtaEstimator
from bot.queue.scheduler import (
    Cancelled,
    Done,
    Failed,
    JobEvent,
    ProgressEvent,
    Queued,
    QueueFull,
    Scheduler,
    Started,
    UnknownJob,
)
from config.settings import QueueSettings
from tests.bot.fakes import FakeEngine, FakeJobRecord, MemoryJobStore, text2img_factory

TERMINAL = (Done, Failed, Cancelled)


def queue_settings(**overrides: Any) -> QueueSettings:
    values: dict[str, Any] = {"per_user_cap": 100, "global_cap": 100, "max_attempts": 3, "aging_seconds": 1e6}
    values.update(overrides)
    return QueueSettings(**values)


def make_scheduler(store: Any, engine: FakeEngine, **kwargs: Any) -> Scheduler[Any]:
    settings_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in QueueSettings.model_fields}
    kwargs.setdefault("retry_delay", 0.01)
    return Scheduler(store, engine, queue=queue_settings(**settings_kw), job_factory=text2img_factory, **kwargs)


async def collect(stream: AsyncIterator[JobEvent], timeout: float = 10.0) -> list[JobEvent]:
    async def drain() -> list[JobEvent]:
        return [event async for event in stream]

    return await asyncio.wait_for(drain(), timeout)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


async def add(store: MemoryJobStore, sched: Scheduler[Any], job_id: str, owner: int, **kw: Any) -> FakeJobRecord:
    record = await store.create(job_id=job_id, owner_id=owner, **kw)
    await sched.enqueue(record)
    return record


# ---------------------------------------------------------------------------- the big property
job_specs = st.lists(
    st.fixed_dictionaries(
        {
            "owner": st.integers(0, 3),
            "band": st.integers(0, 1),
            "cost": st.sampled_from([0.5, 1.0, 2.0]),
            "crashes": st.sampled_from([0, 0, 0, 1, 2, 4]),
            "fatal": st.sampled_from([False, False, False, True]),
            "cancel": st.sampled_from([None, None, None, "queued", "running"]),
        }
    ),
    min_size=1,
    max_size=10,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    jobs=job_specs,
    slots=st.integers(1, 3),
    max_attempts=st.integers(1, 3),
    crash_submissions=st.sets(st.integers(1, 12), max_size=3),
)
def test_every_job_ends_exactly_once(
    jobs: list[dict[str, Any]], slots: int, max_attempts: int, crash_submissions: set[int]
) -> None:
    asyncio.run(_every_job_ends_exactly_once(jobs, slots, max_attempts, crash_submissions))


async def _every_job_ends_exactly_once(
    jobs: list[dict[str, Any]], slots: int, max_attempts: int, crash_submissions: set[int]
) -> None:
    ids = [f"J{i}" for i in range(len(jobs))]
    spec = dict(zip(ids, jobs, strict=True))
    for s in jobs:
        if s["fatal"]:
            s["crashes"] = 0
    cancel_running = {j for j in ids if spec[j]["cancel"] == "running"}
    store = MemoryJobStore()
    engine = FakeEngine(
        slots=slots,
        crash_attempts={j: spec[j]["crashes"] for j in ids},
        crash_submissions=crash_submissions,
        fatal=[j for j in ids if spec[j]["fatal"]],
        hold=cancel_running,  # held until cancelled, so the cancel always lands while running
    )
    sched = make_scheduler(store, engine, max_attempts=max_attempts)
    seen: list[JobEvent] = []
    pending_cancel = set(cancel_running)

    def listener(event: JobEvent) -> Any:
        seen.append(event)
        if isinstance(event, ProgressEvent) and event.job_id in pending_cancel:
            pending_cancel.discard(event.job_id)
            return sched.cancel(event.job_id)  # a coroutine: the scheduler runs it as a task
        return None

    sched.on_event(listener)
    await sched.start()
    sched.pause()
    for j in ids:
        await add(store, sched, j, spec[j]["owner"], band=spec[j]["band"], cost=spec[j]["cost"])
    streams = {j: asyncio.create_task(collect(sched.subscribe(j))) for j in ids}
    for j in ids:
        if spec[j]["cancel"] == "queued":
            assert await sched.cancel(j)
    sched.resume()
    got = dict(zip(ids, await asyncio.gather(*streams.values()), strict=True))
    await until(lambda: not sched.snapshot())
    await sched.stop(0)

    assert engine.max_running <= slots and engine.overlaps == 0
    for j in ids:
        record = store.records[j]
        # exactly one terminal state, and the quota ledger matches it
        assert record.status in ("done", "failed", "cancelled")
        assert store.terminal_count(j) == 1
        assert store.ledger[j] == ["reserve", "commit" if record.status == "done" else "refund"]
        # at most one result, only for done jobs; every attempt was recorded before it was submitted
        assert engine.results[j] == (1 if record.status == "done" else 0)
        assert engine.submitted.count(j) == record.attempts <= max_attempts
        # the subscriber saw the job to its one end, matching the store
        stream = got[j]
        assert isinstance(stream[-1], TERMINAL) and sum(isinstance(e, TERMINAL) for e in stream) == 1
        assert stream[-1].record.status == record.status
        assert sum(isinstance(e, TERMINAL) and e.job_id == j for e in seen) == 1
        assert sum(isinstance(e, Started) and e.job_id == j for e in seen) == record.attempts
        if isinstance(stream[-1], Done):
            assert stream[-1].result is not None and stream[-1].result.job_id == j
        event(f"outcome: {record.status} after {record.attempts} attempt(s)")
        if crash_submissions:
            continue
        s = spec[j]
        if s["cancel"] == "queued":
            expected = ("cancelled", 0)
        elif s["fatal"]:
            expected = ("failed", 1)
        elif s["crashes"] >= max_attempts:
            expected = ("failed", max_attempts)
        elif s["cancel"] == "running":
            expected = ("cancelled", s["crashes"] + 1)
        else:
            expected = ("done", s["crashes"] + 1)
        assert (record.status, record.attempts) == expected
        if expected[0] == "failed" and not s["fatal"]:
            assert f"failed {max_attempts} times" in (record.error or "")


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, 1), st.sampled_from([0.5, 1.0, 3.0])), min_size=1, max_size=16)
)
def test_bands_and_fairness_in_start_order(jobs: list[tuple[int, int, float]]) -> None:
    asyncio.run(_bands_and_fairness(jobs))


async def _bands_and_fairness(jobs: list[tuple[int, int, float]]) -> None:
    store, engine = MemoryJobStore(), FakeEngine(slots=1)
    sched = make_scheduler(store, engine)
    starts: list[str] = []
    sched.on_event(lambda e: starts.append(e.job_id) if isinstance(e, Started) else None)
    await sched.start()
    sched.pause()
    nth: Counter[tuple[int, int]] = Counter()
    info: dict[str, tuple[int, int, int]] = {}  # job -> (band, owner, n-th job of owner in band)
    for i, (owner, band, cost) in enumerate(jobs):
        await add(store, sched, f"J{i}", owner, band=band, cost=cost)
        info[f"J{i}"] = (band, owner, nth[(owner, band)])
        nth[(owner, band)] += 1
    sched.resume()
    await until(lambda: len(starts) == len(jobs))
    await sched.stop(0)
    bands = [info[j][0] for j in starts]
    assert bands == sorted(bands)  # band order
    for band in (0, 1):
        in_band = [info[j][2] for j in starts if info[j][0] == band]
        if 0 in in_band and 2 in in_band:  # every user's first job starts before any user's third
            assert max(i for i, n in enumerate(in_band) if n == 0) < min(i for i, n in enumerate(in_band) if n == 2)


# ---------------------------------------------------------------------------- examples
async def test_caps_refuse_clearly_and_count_running_jobs() -> None:
    store = MemoryJobStore()
    engine = FakeEngine(hold=["A1"])
    sched = make_scheduler(store, engine, per_user_cap=2, global_cap=2)
    await sched.start()
    await add(store, sched, "A1", 1)
    await until(lambda: sched.position("A1") == 0)  # running
    await add(store, sched, "A2", 1)
    with pytest.raises(QueueFull) as exc:
        sched.check_admission(1, 1)  # one running + one queued = the cap
    assert exc.value.reason == "user_cap"
    # enqueue re-checks: a job that slipped past check_admission is refused and refunded
    late = await store.create(job_id="A3", owner_id=1)
    with pytest.raises(QueueFull):
        await sched.enqueue(late)
    assert store.records["A3"].status == "failed" and store.ledger["A3"] == ["reserve", "refund"]
    await add(store, sched, "B1", 2)
    with pytest.raises(QueueFull) as exc:
        sched.check_admission(3, 1)
    assert exc.value.reason == "global_cap" and "queue is full" in str(exc.value)
    assert await sched.enqueue(store.records["A2"]) == 2  # idempotent; B1 (a first job) is ahead
    engine.release()
    await until(lambda: not sched.snapshot())
    await sched.stop(0)
    assert [store.records[j].status for j in ("A1", "A2", "B1")] == ["done"] * 3


async def test_retried_job_goes_back_to_the_front() -> None:
    store = MemoryJobStore()
    engine = FakeEngine(crash_attempts={"A1": 1})
    sched = make_scheduler(store, engine)
    queued: list[Queued] = []
    sched.on_event(lambda e: queued.append(e) if isinstance(e, Queued) and e.attempt else None)
    await sched.start()
    sched.pause()
    for job_id, owner in (("A1", 1), ("B1", 2), ("C1", 3)):
        await add(store, sched, job_id, owner)
    sched.resume()
    await until(lambda: all(store.records[j].status == "done" for j in ("A1", "B1", "C1")))
    await sched.stop(0)
    assert engine.submitted == ["A1", "A1", "B1", "C1"]
    assert store.records["A1"].attempts == 2
    assert queued and queued[0].job_id == "A1" and queued[0].position == 1 and queued[0].attempt == 1


async def test_non_retryable_and_exhausted_failures_refund() -> None:
    store = MemoryJobStore()
    engine = FakeEngine(crash_attempts={"X": 9}, fatal=["Y"])
    sched = make_scheduler(store, engine, max_attempts=3)
    await sched.start()
    streams = {}
    for job_id in ("X", "Y"):
        await add(store, sched, job_id, 1)
        streams[job_id] = asyncio.create_task(collect(sched.subscribe(job_id)))
    x, y = [(await streams[j])[-1] for j in ("X", "Y")]
    await sched.stop(0)
    assert isinstance(x, Failed) and x.record.attempts == 3 and "failed 3 times" in x.error
    assert isinstance(y, Failed) and y.record.attempts == 1 and "out of memory" in y.error
    assert store.ledger["X"] == store.ledger["Y"] == ["reserve", "refund"]


async def test_cancel_queued_running_and_unknown() -> None:
    store = MemoryJobStore()
    engine = FakeEngine(hold=["R"])
    sched = make_scheduler(store, engine)
    await sched.start()
    await add(store, sched, "R", 1)
    await add(store, sched, "Q", 2)
    await until(lambda: "R" in engine.running)
    subscription = sched.subscribe("R")
    first = await anext(subscription)  # subscribed before the cancels: sees the whole ending
    stream = asyncio.create_task(collect(subscription))
    assert await sched.cancel("Q")
    assert await sched.cancel("R")
    assert not await sched.cancel("nope")
    events = [first, *await stream]
    await sched.stop(0)
    assert isinstance(events[0], Started) and isinstance(events[-1], Cancelled)
    assert store.records["R"].status == store.records["Q"].status == "cancelled"
    assert "Q" not in engine.submitted and engine.results["R"] == 0
    assert store.ledger["R"] == store.ledger["Q"] == ["reserve", "refund"]
    assert not await sched.cancel("Q")  # already final


async def test_cancel_while_being_marked_running_never_reaches_the_engine() -> None:
    gate = asyncio.Event()

    class SlowStore(MemoryJobStore):
        async def mark_running(self, job_id: str) -> FakeJobRecord:
            await gate.wait()
            return await super().mark_running(job_id)

    store, engine = SlowStore(), FakeEngine()
    sched = make_scheduler(store, engine)
    await sched.start()
    await add(store, sched, "S", 1)
    await until(lambda: sched.position("S") == 0)
    assert await sched.cancel("S")
    gate.set()
    await until(lambda: store.records["S"].status == "cancelled")
    await sched.stop(0)
    assert engine.submitted == []


async def test_slots_run_jobs_concurrently() -> None:
    store = MemoryJobStore()
    engine = FakeEngine(slots=3, hold_after=0)
    sched = make_scheduler(store, engine)
    await sched.start()
    for i in range(5):
        await add(store, sched, f"J{i}", i)
    await until(lambda: len(engine.running) == 3)
    views = sched.snapshot()
    assert [v.status for v in views] == ["running"] * 3 + ["queued"] * 2
    assert [v.position for v in views] == [0, 0, 0, 1, 2]
    engine.release()
    await until(lambda: not sched.snapshot())
    await sched.stop(0)
    assert engine.max_running == 3 and all(store.records[f"J{i}"].status == "done" for i in range(5))


async def test_the_next_job_starts_while_the_last_one_is_stored() -> None:
    """The slot frees when the engine's result arrives: storing and posting overlap the next job,
    and at most 2 × slots jobs are in flight however slow finishing is."""
    gate = asyncio.Event()

    class SlowDoneStore(MemoryJobStore):
        async def mark_done(self, job_id: str, **kwargs: Any) -> FakeJobRecord:
            await gate.wait()
            return await super().mark_done(job_id, **kwargs)

    store, engine = SlowDoneStore(), FakeEngine(slots=1)
    sched = make_scheduler(store, engine)
    await sched.start()
    for name in "ABC":
        await add(store, sched, name, 1)
    await until(lambda: engine.submitted == ["A", "B"])
    await asyncio.sleep(0.05)
    assert engine.submitted == ["A", "B"]  # A and B are finishing: C waits for one of them
    assert [store.records[n].status for n in "ABC"] == ["running", "running", "queued"]
    gate.set()
    await until(lambda: all(store.records[n].status == "done" for n in "ABC"))
    await sched.stop(0)
    assert engine.max_running == 1 and engine.overlaps == 0


async def test_an_engine_with_prefetch_gets_the_next_job_ahead() -> None:
    store, engine = MemoryJobStore(), FakeEngine(slots=1, prefetch=1, hold_after=0)
    sched = make_scheduler(store, engine)
    await sched.start()
    for name in "ABC":
        await add(store, sched, name, 1)
    await until(lambda: engine.submitted == ["A", "B"])
    await asyncio.sleep(0.05)
    assert engine.submitted == ["A", "B"] and store.records["C"].status == "queued"
    engine.release()
    await until(lambda: all(store.records[n].status == "done" for n in "ABC"))
    await sched.stop(0)


async def test_the_local_engine_starts_the_prefetched_job_back_to_back(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Through the real engine process: the next job waits in the worker, so it starts the moment
    the previous job's compute ends (no hand-over by the bot in between)."""
    from engine.client import LocalEngineClient
    from studio.harness import tiny_settings

    config = tiny_settings(tiny_model_dir, tmp_path, engine={"preview_every": 0})
    engine = LocalEngineClient(config)
    store = MemoryJobStore()
    sched = make_scheduler(store, engine)  # type: ignore[arg-type]
    await engine.start()
    try:
        await sched.start()
        for i in range(3):
            await add(store, sched, f"J{i}", i)
        await until(lambda: all(store.records[f"J{i}"].status == "done" for i in range(3)), timeout=120)
        await sched.stop(0)
    finally:
        await engine.close()
    assert [s.back_to_back for s in engine.stats] == [False, True, True]


async def test_positions_etas_views_and_estimator() -> None:
    store = MemoryJobStore()
    engine = FakeEngine(slots=1, hold=["H"], compute_seconds=4.0)
    sched = make_scheduler(store, engine, estimator=EtaEstimator(initial_rate=10.0))
    await sched.start()
    await add(store, sched, "H", 1, cost=1.0)
    await until(lambda: "H" in engine.running)
    sched.pause()
    await add(store, sched, "A", 1, cost=2.0)
    await add(store, sched, "B", 2, cost=1.0, band=0)
    assert sched.paused
    assert sched.position("B") == 1 and sched.position("A") == 2 and sched.position("H") == 0
    assert sched.position("zz") is None and sched.eta("zz") is None
    # H has finished 2 of 2 progress steps: nothing of it is counted as remaining
    assert sched.eta("B") == pytest.approx(10.0)
    assert sched.eta("A") == pytest.approx(30.0)
    assert sched.depth_by_band() == {0: 1, 1: 1}
    assert [v.job_id for v in sched.queued_for(1)] == ["H", "A"]
    assert len(sched.snapshot()) == 3
    stream = sched.subscribe("A")  # a late subscriber gets the current state first
    assert await asyncio.wait_for(anext(stream), 5) == Queued("A", 2, pytest.approx(30.0), 0)
    await stream.aclose()
    engine.release()
    sched.resume()
    await until(lambda: not sched.snapshot())
    await sched.stop(0)
    # measured 4 s for each job: H and B (1 unit) give 4 s/unit, then A (2 units) 2 s/unit
    assert sched.estimator.samples == 3 and sched.estimator.rate == pytest.approx(0.2 * 2 + 0.8 * 4)


async def test_aging_promotes_waiting_jobs() -> None:
    now = [0.0]
    store, engine = MemoryJobStore(), FakeEngine()
    sched = make_scheduler(store, engine, aging_seconds=300, clock=lambda: now[0])
    starts: list[str] = []
    sched.on_event(lambda e: starts.append(e.job_id) if isinstance(e, Started) else None)
    await sched.start()
    sched.pause()
    await add(store, sched, "low", 1, band=1)
    for i in range(3):
        await add(store, sched, f"mod{i}", 2, band=0)
    assert sched.position("low") == 4
    now[0] = 301.0
    assert sched.position("low") <= 2 and sched.depth_by_band() == {0: 4}
    sched.resume()
    await until(lambda: len(starts) == 4)
    await sched.stop(0)
    assert starts.index("low") <= 1


async def test_subscribe_after_the_end_and_unknown_jobs() -> None:
    store, engine = MemoryJobStore(), FakeEngine()
    sched = make_scheduler(store, engine)
    await sched.start()
    await add(store, sched, "D", 1)
    await until(lambda: store.records["D"].status == "done")
    events = await collect(sched.subscribe("D"))
    assert len(events) == 1 and isinstance(events[0], Done) and events[0].result is not None
    await sched.stop(0)
    fresh = make_scheduler(store, FakeEngine())  # a new process knows the job only from the store
    replay = await collect(fresh.subscribe("D"))
    assert isinstance(replay[0], Done) and replay[0].result is None and replay[0].record.images
    with pytest.raises(UnknownJob):
        await collect(fresh.subscribe("missing"))


async def test_errors_never_stop_the_dispatch_loop(caplog: pytest.LogCaptureFixture) -> None:
    store, engine = MemoryJobStore(), FakeEngine()

    def factory(record: Any) -> Any:
        if record.id == "BAD":
            raise ValueError("unknown sampler")
        return text2img_factory(record)

    sched = Scheduler(store, engine, queue=queue_settings(), job_factory=factory, retry_delay=0.01)

    def broken_listener(event: JobEvent) -> None:
        raise RuntimeError("listener bug")

    async def broken_async_listener(event: JobEvent) -> None:
        raise RuntimeError("async listener bug")

    sched.on_event(broken_listener)
    remove = sched.on_event(broken_async_listener)
    store.fail_next["mark_running"] = 2  # the store is briefly down when the first job starts
    await sched.start()
    for job_id in ("OK1", "BAD", "OK2"):
        await add(store, sched, job_id, 1)
    await until(lambda: all(store.records[j].status in ("done", "failed") for j in ("OK1", "BAD", "OK2")))
    remove()
    await sched.stop(0)
    assert [store.records[j].status for j in ("OK1", "BAD", "OK2")] == ["done", "failed", "done"]
    assert "invalid job parameters: unknown sampler" in (store.records["BAD"].error or "")
    assert store.records["OK1"].attempts == 1  # the failed writes did not count as attempts
    assert "listener bug" in caplog.text and "could not mark it running" in caplog.text


async def test_start_recovers_interrupted_and_exhausted_jobs() -> None:
    store = MemoryJobStore()
    for job_id in ("old", "mid", "new"):
        await store.create(job_id=job_id, owner_id=1)
    await store.mark_running("old")  # interrupted on attempt 1: resumes
    for _ in range(2):  # "mid" has used all its attempts: failed and refunded at start
        await store.mark_running("mid")
        await store.requeue("mid", "crash")
    await store.mark_running("mid")
    engine = FakeEngine()
    sched = make_scheduler(store, engine, max_attempts=3)
    seen: list[JobEvent] = []
    sched.on_event(seen.append)
    await sched.start()
    await until(lambda: store.records["old"].status == store.records["new"].status == "done")
    await sched.stop(0)
    assert engine.submitted == ["old", "new"]
    assert store.records["mid"].status == "failed" and store.ledger["mid"] == ["reserve", "refund"]
    assert any(isinstance(e, Failed) and e.job_id == "mid" for e in seen)


async def test_stop_with_grace_lets_the_running_job_finish() -> None:
    store, engine = MemoryJobStore(), FakeEngine(hold=["J"])
    sched = make_scheduler(store, engine)
    await sched.start()
    await add(store, sched, "J", 1)
    await add(store, sched, "K", 2)
    await until(lambda: "J" in engine.running)
    asyncio.get_running_loop().call_later(0.05, engine.release, "J")
    await sched.stop(grace=5)
    assert store.records["J"].status == "done" and store.records["K"].status == "queued"
    assert engine.submitted == ["J"]


async def test_stop_returns_promptly_when_the_engine_ignores_cancel() -> None:
    store, engine = MemoryJobStore(), FakeEngine(hold=["J"], ignore_cancel=True)
    sched = make_scheduler(store, engine)
    await sched.start()
    await add(store, sched, "J", 1)
    await until(lambda: "J" in engine.running)
    began = time.monotonic()
    await sched.stop(grace=0.1)
    assert time.monotonic() - began < 1.5
    assert store.records["J"].status == "queued" and store.records["J"].attempts == 1
    assert store.ledger["J"] == ["reserve"]  # still reserved: it will run after the restart


async def test_a_users_cancel_wins_over_shutdown_requeue() -> None:
    store, engine = MemoryJobStore(), FakeEngine(hold=["J"], ignore_cancel=True)
    sched = make_scheduler(store, engine)
    await sched.start()
    await add(store, sched, "J", 1)
    await until(lambda: "J" in engine.running)
    assert await sched.cancel("J")  # the hung engine does not act on it...
    await sched.stop(grace=0)  # ...so the shutdown ends the job: cancelled, not resumed later
    assert store.records["J"].status == "cancelled" and store.ledger["J"] == ["reserve", "refund"]


async def _restart_scenario(store: Any, create: Callable[[str, int], Any], total: int = 10) -> None:
    """Queue `total` jobs, stop with grace 0 while the 5th runs, start a new scheduler on the same
    store: every job finishes exactly once across both engines."""
    first_engine = FakeEngine(hold_after=4)
    sched = make_scheduler(store, first_engine)
    await sched.start()
    ids = [f"JOB{i:05d}" for i in range(total)]
    for i, job_id in enumerate(ids):
        await sched.enqueue(await create(job_id, i % 3))
    await until(lambda: len(first_engine.submitted) == 5 and first_engine.running)
    interrupted = first_engine.submitted[-1]
    await sched.stop(grace=0)
    record = await store.get(interrupted)
    assert record.status == "queued" and record.attempts == 1
    assert sum(first_engine.results.values()) == 4

    second_engine = FakeEngine()
    again = make_scheduler(store, second_engine)
    await again.start()
    await until(lambda: not again.snapshot(), timeout=20)
    await again.stop(0)
    for job_id in ids:
        record = await store.get(job_id)
        assert record.status == "done", job_id
        assert first_engine.results[job_id] + second_engine.results[job_id] == 1
    assert (await store.get(interrupted)).attempts == 2
    assert set(second_engine.submitted) == set(ids) - set(first_engine.results)


async def test_restart_resumes_every_job_exactly_once_in_memory() -> None:
    store = MemoryJobStore()
    await _restart_scenario(store, lambda job_id, owner: store.create(job_id=job_id, owner_id=owner))
    assert all(store.terminal_count(j) == 1 for j in store.records)


async def test_restart_resumes_every_job_exactly_once_on_sqlite(tmp_path: Path) -> None:
    from db.jobs import JobStore
    from db.migrate import upgrade
    from db.quotas import QuotaStore
    from db.session import Database

    url = f"sqlite+aiosqlite:///{tmp_path / 'atelier.db'}"
    await upgrade(url)
    db = Database(url)
    await db.connect()
    try:
        jobs, quotas = JobStore(db), QuotaStore(db, default_limit=1000.0)

        async def create(job_id: str, owner: int) -> Any:
            reservation = await quotas.reserve(7, owner, [], 1.5, job_id)
            assert reservation.ok
            return await jobs.create(
                job_id=job_id,
                kind="text2img",
                owner_id=owner,
                guild_id=7,
                channel_id=1,
                params={"prompt": "a lighthouse"},
                cost=1.5,
                band=1,
            )

        await _restart_scenario(jobs, create)
        for owner in range(3):
            ledger = await quotas.ledger(7, owner)
            kinds = Counter(entry.kind for entry in ledger)
            assert kinds["refund"] == 0 and kinds["commit"] == kinds["reserve"]  # charged once each
            assert (await quotas.status(7, owner)).used == pytest.approx(1.5 * kinds["reserve"])
    finally:
        await db.close()


async def test_real_store_refunds_failed_and_cancelled_jobs(tmp_path: Path) -> None:
    from db.jobs import JobStore
    from db.migrate import upgrade
    from db.quotas import QuotaStore
    from db.session import Database

    url = f"sqlite+aiosqlite:///{tmp_path / 'atelier.db'}"
    await upgrade(url)
    async with Database(url) as db:
        jobs, quotas = JobStore(db), QuotaStore(db, default_limit=10.0)
        engine = FakeEngine(crash_attempts={"FAIL0001": 9}, hold=["CANC0001"])
        sched = make_scheduler(jobs, engine, max_attempts=2)
        await sched.start()
        for job_id in ("FAIL0001", "CANC0001", "DONE0001"):
            assert (await quotas.reserve(7, 1, [], 2.0, job_id)).ok
            record = await jobs.create(
                job_id=job_id, kind="text2img", owner_id=1, guild_id=7, channel_id=1, params={}, cost=2.0, band=1
            )
            await sched.enqueue(record)
        await until(lambda: "CANC0001" in engine.running)
        assert await sched.cancel("CANC0001")
        await until(lambda: not sched.snapshot())
        await sched.stop(0)
        statuses = {j: (await jobs.get(j)).status for j in ("FAIL0001", "CANC0001", "DONE0001")}
        assert statuses == {"FAIL0001": "failed", "CANC0001": "cancelled", "DONE0001": "done"}
        assert (await jobs.get("FAIL0001")).attempts == 2
        assert (await quotas.status(7, 1)).used == pytest.approx(2.0)  # only the done job is charged


# ---------------------------------------------------------------------------- eta
def test_eta_estimator() -> None:
    est = EtaEstimator(initial_rate=10.0, alpha=0.5)
    assert est.eta(cost_ahead=2, running_remaining=1, own_cost=1, slots=1) == pytest.approx(40.0)
    assert est.eta(cost_ahead=2, running_remaining=2, own_cost=1, slots=2) == pytest.approx(30.0)
    est.observe(2.0, 8.0)  # the first measurement replaces the guess
    assert est.rate == pytest.approx(4.0) and est.samples == 1
    est.observe(1.0, 8.0)
    assert est.rate == pytest.approx(6.0)
    for bad in ((0.0, 5.0), (1.0, 0.0), (1.0, float("nan")), (-1.0, 3.0)):
        est.observe(*bad)
    assert est.rate == pytest.approx(6.0) and est.samples == 2
    assert est.seconds_for(0.5) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        EtaEstimator(initial_rate=0)
    with pytest.raises(ValueError):
        EtaEstimator(alpha=0)


async def test_new_jobs_learn_their_place_at_once_and_moves_are_told_at_most_every_half_second() -> None:
    from bot.queue.scheduler import MOVES_EVERY

    store = MemoryJobStore()
    sched = make_scheduler(store, FakeEngine(), per_user_cap=10, global_cap=100)
    told: list[tuple[float, Queued]] = []
    loop = asyncio.get_running_loop()
    sched.on_event(lambda e: told.append((loop.time(), e)) if isinstance(e, Queued) else None)
    await sched.start()
    sched.pause()
    # Member 1 queues three jobs; then new members arrive one a turn, each going ahead of
    # member 1's later jobs (fair queuing), so those move back with every arrival.
    for i in range(3):
        await add(store, sched, f"m1-{i}", 1)
    # Quiet for longer than MOVES_EVERY since the last walk (the three adds may have set one off).
    await asyncio.sleep(2 * MOVES_EVERY + 0.1)
    told.clear()
    started = loop.time()
    for owner in range(2, 12):
        mark = len(told)
        await add(store, sched, f"new-{owner}", owner)
        await asyncio.sleep(0)  # the next turn: the new job has been told its place
        mine = [e for _, e in told[mark:] if e.job_id == f"new-{owner}"]
        assert mine and mine[-1].position == sched.position(f"new-{owner}")
    assert loop.time() - started < MOVES_EVERY
    # Member 1's jobs moved back ten times, but were told once: by the walk of the first arrival.
    moves = Counter(e.job_id for _, e in told if e.job_id.startswith("m1-"))
    assert set(moves) <= {"m1-1", "m1-2"} and all(n == 1 for n in moves.values()), moves
    await until(lambda: sum(e.job_id == "m1-2" for _, e in told) >= 2, timeout=MOVES_EVERY * 3)
    last = [e for _, e in told if e.job_id == "m1-2"][-1]
    assert last.position == sched.position("m1-2") == 13  # told where it really is now
    assert all(at - started < 2 * MOVES_EVERY for at, _ in told)
    await sched.stop(0)
