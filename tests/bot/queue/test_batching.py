"""Batches of same-shape jobs through the scheduler (bot.queue.batching, bot.queue.runs,
FairQueue.pop_batch): which jobs join, and that every member keeps its own outcome, events, cost,
cancel and retries. The fake engine first, then the real engine process on the tiny model, whose
batched images must equal the same jobs run alone."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bot.queue.batching import batch_limit, batch_shape
from bot.queue.scheduler import Cancelled, Done, JobEvent, Scheduler, Started
from engine.api import Result
from engine.jobs import Job, Text2Img
from engine.jobs.events import Progress
from tests.bot.fakes import FakeEngine, MemoryJobStore, text2img_factory
from tests.bot.queue.test_scheduler import queue_settings, until

SQUARE = {"prompt": "a boat", "width": 256, "height": 256, "steps": 2}


class BatchingFakeEngine(FakeEngine):
    """FakeEngine that also takes batches (each member runs as the fake runs a job)."""

    def __init__(self, *, max_batch: int = 4, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_batch = max_batch
        self.calls: list[list[str]] = []  # job ids per engine call, in order

    def submit(self, job: Job) -> AsyncIterator[Progress | Result]:
        self.calls.append([job.job_id])
        return super().submit(job)

    def submit_batch(self, jobs: Sequence[Job]) -> list[AsyncIterator[Progress | Result]]:
        self.calls.append([job.job_id for job in jobs])
        return [self._run(job) for job in jobs]


def batching_scheduler(store: MemoryJobStore, engine: Any, **kwargs: Any) -> Scheduler[Any]:
    return Scheduler(
        store,
        engine,
        queue=queue_settings(),
        job_factory=kwargs.pop("job_factory", text2img_factory),
        batch_shape=batch_shape,
        retry_delay=0.01,
        **kwargs,
    )


async def queue_paused(
    store: MemoryJobStore, sched: Scheduler[Any], jobs: list[tuple[str, int, dict[str, Any]]]
) -> None:
    await sched.start()
    sched.pause()
    for job_id, owner, params in jobs:
        record = await store.create(job_id=job_id, owner_id=owner, params=params)
        await sched.enqueue(record)


def test_batch_shape_and_limit() -> None:
    store = MemoryJobStore()
    record = asyncio.run(store.create(job_id="a", owner_id=1, params={**SQUARE, "count": 3}))
    shape = batch_shape(record)
    assert shape is not None and shape[1] == 3
    assert batch_shape(record.__class__(**{**record.__dict__, "attempts": 1})) is None  # a retry runs alone
    assert batch_shape(record.__class__(**{**record.__dict__, "kind": "refine"})) is None
    assert batch_limit(FakeEngine()) == 1 and batch_limit(BatchingFakeEngine(max_batch=3)) == 3


async def test_same_shape_jobs_of_several_members_run_as_one_call_each_with_its_own_outcome() -> None:
    store, engine = MemoryJobStore(), BatchingFakeEngine(max_batch=4)
    sched = batching_scheduler(store, engine)
    events: list[JobEvent] = []
    sched.on_event(events.append)
    jobs = [(f"J{i}", 10 + i, {**SQUARE, "prompt": f"boat {i}"}) for i in range(5)]
    jobs.append(("W", 20, {**SQUARE, "width": 512}))  # another shape: never in their batch
    await queue_paused(store, sched, jobs)
    sched.resume()
    await until(lambda: all(r.status == "done" for r in store.records.values()))
    await sched.stop(0)
    assert engine.calls[0] == ["J0", "J1", "J2", "J3"]  # the fair order's first four, at most 4 images
    assert sorted(map(tuple, engine.calls[1:])) == [("J4",), ("W",)]
    for job_id in store.records:
        assert store.ledger[job_id] == ["reserve", "commit"]
        assert [type(e) for e in events if e.job_id == job_id and isinstance(e, Started | Done)] == [Started, Done]


async def test_a_batch_that_crashes_is_retried_one_job_at_a_time() -> None:
    store = MemoryJobStore()
    engine = BatchingFakeEngine(max_batch=4, crash_attempts={"A": 1, "B": 1, "C": 1})
    sched = batching_scheduler(store, engine)
    await queue_paused(store, sched, [(name, i, {**SQUARE, "prompt": name}) for i, name in enumerate("ABC")])
    sched.resume()
    await until(lambda: all(r.status == "done" for r in store.records.values()))
    await sched.stop(0)
    assert engine.calls[0] == ["A", "B", "C"]
    assert sorted(map(tuple, engine.calls[1:])) == [("A",), ("B",), ("C",)]  # alone, second attempt
    assert all(r.attempts == 2 and store.ledger[r.id] == ["reserve", "commit"] for r in store.records.values())


async def test_cancelling_one_member_leaves_the_others_running() -> None:
    store = MemoryJobStore()
    engine = BatchingFakeEngine(max_batch=4, hold=["A", "B", "C"])
    sched = batching_scheduler(store, engine)
    await queue_paused(store, sched, [(name, i, {**SQUARE, "prompt": name}) for i, name in enumerate("ABC")])
    sched.resume()
    await until(lambda: engine.running == {"A", "B", "C"})
    assert await sched.cancel("B")
    await until(lambda: store.records["B"].status == "cancelled")
    engine.release()
    await until(lambda: store.records["A"].status == store.records["C"].status == "done")
    await sched.stop(0)
    assert engine.calls == [["A", "B", "C"]] and store.ledger["B"] == ["reserve", "refund"]


async def test_a_member_cancelled_before_its_batch_is_submitted_is_left_out() -> None:
    store = MemoryJobStore()
    engine = BatchingFakeEngine(max_batch=4)
    sched = batching_scheduler(store, engine)
    await queue_paused(store, sched, [(name, i, {**SQUARE, "prompt": name}) for i, name in enumerate("ABC")])
    # The store is slow to mark B running: it is cancelled meanwhile, so the others go without it.
    original = store.mark_running

    async def slow_mark_running(job_id: str) -> Any:
        if job_id == "B":
            await asyncio.sleep(0.05)
        return await original(job_id)

    store.mark_running = slow_mark_running  # type: ignore[method-assign]
    sched.resume()
    await until(lambda: store.records["A"].status == "running")
    assert await sched.cancel("B")
    await until(lambda: all(r.status in ("done", "cancelled") for r in store.records.values()))
    await sched.stop(0)
    assert store.records["B"].status == "cancelled" and "B" not in engine.submitted


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.sampled_from([1, 2]), st.sampled_from([256, 512])), min_size=1, max_size=12
    ),
    st.integers(1, 4),
)
def test_batches_hold_one_shape_fit_the_limit_and_every_job_ends_once(
    jobs: list[tuple[int, int, int]], max_batch: int
) -> None:
    asyncio.run(_batches_property(jobs, max_batch))


async def _batches_property(jobs: list[tuple[int, int, int]], max_batch: int) -> None:
    store, engine = MemoryJobStore(), BatchingFakeEngine(max_batch=max_batch)
    sched = batching_scheduler(store, engine)
    specs = {
        f"J{i}": {**SQUARE, "prompt": f"p{i}", "count": count, "width": width}
        for i, (_, count, width) in enumerate(jobs)
    }
    await queue_paused(store, sched, [(f"J{i}", owner, specs[f"J{i}"]) for i, (owner, _, _) in enumerate(jobs)])
    sched.resume()
    await until(lambda: all(r.status == "done" for r in store.records.values()))
    await sched.stop(0)
    assert sorted(j for call in engine.calls for j in call) == sorted(specs)  # each job once
    for call in engine.calls:
        assert len({specs[j]["width"] for j in call}) == 1
        assert len(call) == 1 or sum(specs[j]["count"] for j in call) <= max_batch


async def test_through_the_engine_process_a_batch_makes_the_images_of_each_job_alone(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from engine.client import LocalEngineClient
    from studio.harness import tiny_settings

    config = tiny_settings(tiny_model_dir, tmp_path, engine={"preview_every": 0, "max_batch": 4})
    engine = LocalEngineClient(config)
    store = MemoryJobStore()

    def job_factory(record: Any) -> Job:
        return Text2Img(job_id=record.id, prompt=record.params["prompt"], width=256, height=256, steps=2, seed=5)

    sched = batching_scheduler(store, engine, job_factory=job_factory)
    results: dict[str, Result] = {}
    sched.on_event(lambda e: results.__setitem__(e.job_id, e.result) if isinstance(e, Done) and e.result else None)
    cancelled: list[str] = []
    sched.on_event(lambda e: cancelled.append(e.job_id) if isinstance(e, Cancelled) else None)
    calls: list[list[str]] = []
    submit_batch = engine.submit_batch

    def recorded(jobs: Sequence[Job]) -> list[AsyncIterator[Progress | Result]]:
        calls.append([job.job_id for job in jobs])
        return submit_batch(jobs)

    engine.submit_batch = recorded  # type: ignore[method-assign]
    await engine.start()
    try:
        assert engine.max_batch == 4
        await queue_paused(store, sched, [(f"J{i}", i, {**SQUARE, "prompt": f"a boat, number {i}"}) for i in range(3)])
        sched.resume()
        await until(lambda: len(results) == 3, timeout=180)
        solo = [job_factory(store.records[f"J{i}"]) for i in range(3)]
        alone: list[Result] = []
        for i, job in enumerate(solo):
            job = Text2Img(**{**job.__dict__, "job_id": f"solo{i}"})
            async for item in engine.submit(job):
                if isinstance(item, Result):
                    alone.append(item)
        await sched.stop(0)
    finally:
        await engine.close()
    assert not cancelled and calls == [["J0", "J1", "J2"]]
    compute = [s.compute_seconds for s in engine.stats]
    for i in range(3):
        mine = np.asarray(Image.open(io.BytesIO(results[f"J{i}"].images[0].data)).convert("RGB"))
        theirs = np.asarray(Image.open(io.BytesIO(alone[i].images[0].data)).convert("RGB"))
        assert np.array_equal(mine, theirs), f"J{i} batched differs from the job alone"
    # The batch's compute is shared among its members (the ETA estimator sees each one's share).
    assert len(compute) == 6 and all(c > 0 for c in compute)
