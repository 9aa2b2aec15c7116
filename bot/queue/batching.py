"""Batching same-shape jobs without breaking fairness: which queued jobs may share one batched
pipeline call, and how the runs of one batch hand their jobs to the engine together.

* **Which.** A job's shape is its spec's `batch_key` (engine.jobs: same kind, model, size, steps,
  sampler, cfg, refiner, LoRAs, …; only prompts, seeds and counts differ; None for a job with an
  input image or of a kind that does not batch) and its size is its image count (`batch_shape`).
  A job on its second attempt or later never batches: a batch that failed is retried one job at a
  time, so one bad member cannot take its companions down with it again.
* **When.** `FairQueue.pop_batch` (bot.queue.fairqueue) chooses the companions: the head of the
  fair order first, then same-shape jobs only where that breaks no one's fair share; the images
  of a batch add up to at most the engine's `max_batch` (`[engine] max_batch`, by device).
* **How.** Each member keeps its own `JobRun` (bot.queue.runs): its own store writes, events,
  progress, cancel, cost and retries, exactly as a job run alone. The runs of a batch meet in a
  `RunGroup`: each joins with its built engine job (or leaves: cancelled, the store refused it,
  …), and once all have, the jobs go to the engine in one `submit_batch`, one stream per member.
  A batch takes one engine slot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Hashable, Sequence
from typing import Any, Protocol

from engine.api import Result
from engine.jobs import Job, load_order
from engine.jobs.events import Progress

log = logging.getLogger(__name__)


class BatchingEngine(Protocol):
    """What an engine client offers for batches (engine.client, engine.ray_client)."""

    @property
    def max_batch(self) -> int: ...

    def submit_batch(self, jobs: Sequence[Job]) -> list[AsyncIterator[Progress | Result]]: ...


def batch_limit(engine: Any) -> int:
    """Images one batched call may make on this engine (1: it does not batch)."""
    if not callable(getattr(engine, "submit_batch", None)):
        return 1
    try:
        return max(1, int(engine.max_batch))
    except Exception:
        return 1


def batch_shape(record: Any) -> tuple[Hashable, int] | None:
    """(shape, images) of a stored job, or None when it runs alone (see the module docstring)."""
    if getattr(record, "attempts", 0) > 0:
        return None
    try:
        spec = load_order(record.kind, record.params, job_id=record.id).spec
    except Exception:
        log.debug("job=%s: no batch shape (its parameters do not load)", record.id, exc_info=True)
        return None
    key = spec.batch_key()
    return None if key is None else (key, spec.image_count)


class RunGroup:
    """The runs of one batch meeting before the engine (see the module docstring)."""

    def __init__(self, engine: Any, job_ids: Sequence[str]) -> None:
        self.engine = engine
        self.members = tuple(job_ids)
        self._waiting = set(job_ids)
        self._joined: dict[str, Job] = {}
        self._streams: dict[str, AsyncIterator[Progress | Result]] = {}
        self._submitted = asyncio.Event()

    async def join(self, job_id: str, job: Job) -> AsyncIterator[Progress | Result]:
        """Hand in a member's engine job; its stream once every member has joined or left."""
        if job_id in self._waiting:
            self._waiting.discard(job_id)
            self._joined[job_id] = job
            self._submit_when_complete()
        try:
            await self._submitted.wait()
        except asyncio.CancelledError:
            if not self._submitted.is_set():
                self._joined.pop(job_id, None)  # withdrawn (the scheduler stops): not submitted
            raise
        return self._streams[job_id]

    def leave(self, job_id: str) -> None:
        """A member that will not run now (cancelled, refused by the store, stopping): the others
        go without it. Nothing for a member that joined already."""
        if job_id in self._waiting:
            self._waiting.discard(job_id)
            self._submit_when_complete()

    def _submit_when_complete(self) -> None:
        if self._waiting or self._submitted.is_set():
            return
        jobs = list(self._joined.values())
        if len(jobs) == 1:
            streams = [self.engine.submit(jobs[0])]
        elif jobs:
            streams = self.engine.submit_batch(jobs)
        else:
            streams = []
        self._streams = dict(zip(self._joined, streams, strict=True))
        self._submitted.set()


__all__ = ["BatchingEngine", "RunGroup", "batch_limit", "batch_shape"]
