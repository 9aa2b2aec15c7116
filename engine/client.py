"""The bot-side handle on the local engine process (implements engine.api.EngineClient).

    client = LocalEngineClient(settings)
    await client.start()                    # spawn the worker, wait for Ready (engine.start_timeout)
    async for item in client.submit(job):   # Progress…, then exactly one Result
        ...                                 # or raises EngineError(retryable) / JobCancelled
    await client.cancel(job_id)             # queued or running; True when the job was found
    client.health()                         # alive, slots=1, busy, restarts, detail
    await client.close()                    # Shutdown, wait, then terminate / kill

Asyncio integration: a reader thread per worker process blocks on the pipe and hands every
message to the event loop with `call_soon_threadsafe`; sends go through a one-thread executor.
The event loop never blocks on the pipe, whatever the size of a message.

Batches: `submit_batch(jobs)` sends jobs of one shape to run as ONE batched call (engine.batch),
with one stream per job, each told, cancelled and ended on its own; `max_batch` is the most images
the worker said one call may make (1: no batching). A crash fails each started member on its own,
and members not yet started go to the new process together again.

Concurrency: `slots = 1` (one worker, one GPU), `prefetch = 1`. Several submits at once are
accepted and SERIALIZED (not refused): each job is forwarded to the worker as soon as it is submitted and the
worker runs them in order. A job holds the slot (`health().busy`) while it waits or computes, not
while its images are encoded. The stream yields a Progress with step 0 (phase "load") when the
worker starts the job, and one with phase "encode" when its compute is over, so a
scheduler that dispatches to free slots can hand over the next job during the encoding, which
the worker overlaps with the next job's compute.

Crashes: when the worker process exits for any reason other than `close()` (SIGKILL, a CUDA
crash, a segfault), the job that was RUNNING raises EngineError(retryable=True) at once; jobs
forwarded but not yet started are re-sent to the new process (they did not run, so they are not
retried as failures). The process is restarted right away (counted in `health().restarts`); if
the restart fails, waiting jobs raise EngineError(retryable=True) and the start is retried with a
growing delay, and at the latest on the next submit.

Cancelling: after `cancel(job_id)` returned True the job's iterator raises JobCancelled, even if
the worker finished it in the meantime (its result is dropped), so the bot can refund it safely.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from config.settings import Settings
from engine.api import EngineError, EngineHealth, JobCancelled, Result
from engine.jobs import Job
from engine.jobs.events import Progress
from engine.process import EXITED, TERMINATE_WAIT, EngineProcess, restart_delay
from engine.protocol import (
    DEFAULT_RUNNER_FACTORY,
    Cancel,
    Computed,
    Done,
    Failed,
    Fatal,
    JobStats,
    Ready,
    Shutdown,
    Started,
    Submit,
    SubmitBatch,
    WorkerConfig,
)
from engine.stream import JobStream

log = logging.getLogger("atelier.engine.client")

__all__ = ["LocalEngineClient", "restart_delay"]

# waiting: not sent to any process · sent: in the worker's queue · running: started ·
# encoding: computed, images being encoded (no longer holds the slot; a crash still fails it)
JobStatus = Literal["waiting", "sent", "running", "encoding"]


@dataclass(eq=False)
class _JobState:
    job: Job
    queue: asyncio.Queue[Progress | Result | BaseException] = field(default_factory=asyncio.Queue)
    status: JobStatus = "waiting"
    generation: int = 0
    sends: int = 0
    cancel_requested: bool = False
    finished: bool = False
    total_steps: int = 0  # of the last Progress, repeated by the "encode" one
    batch: tuple[str, ...] = ()  # the members of its batch (empty: a job alone)


class LocalEngineClient(EngineProcess):
    """One engine child process on this machine (see the module docstring)."""

    slots: int = 1
    # One job waits in the worker's queue behind the running one: it starts with no hand-over gap.
    prefetch: int = 1

    def __init__(
        self,
        settings: Settings,
        *,
        runner_factory: str = DEFAULT_RUNNER_FACTORY,
        shutdown_timeout: float = 15.0,
    ) -> None:
        super().__init__(settings, WorkerConfig.from_settings(settings, runner_factory))
        self.shutdown_timeout = shutdown_timeout
        self._jobs: dict[str, _JobState] = {}
        # Worker-side timings of recent jobs (for the bench, metrics and ETA tuning).
        self.stats: deque[JobStats] = deque(maxlen=1000)

    # ------------------------------------------------------------------ public API

    @property
    def max_batch(self) -> int:
        """The most images one batched call may make (the worker's `Ready`; 1 before it)."""
        return self.ready_info.max_batch if self.ready_info is not None else 1

    async def start(self) -> None:
        """Spawn the worker and wait until it has loaded the models. Raises EngineError when it
        cannot start (retryable=False for a load failure such as a missing model)."""
        if self._closed:
            raise EngineError("The engine is closed.", retryable=False)
        self._bind_loop()
        if self._ready:
            return
        await self._ensure_start()

    def submit(self, job: Job) -> AsyncIterator[Progress | Result]:
        """Queue `job`; the iterator yields Progress then one Result, or raises EngineError /
        JobCancelled. The job is registered (and cancellable) as soon as this returns."""
        return self._submit([job])[0]

    def submit_batch(self, jobs: Sequence[Job]) -> list[AsyncIterator[Progress | Result]]:
        """`submit` for jobs of one shape run as ONE batched call: one stream per job, in order.
        A job refused at submit time (a duplicate id) raises from its stream and stays out."""
        return self._submit(jobs)

    def _submit(self, jobs: Sequence[Job]) -> list[AsyncIterator[Progress | Result]]:
        if self._closed:
            return [JobStream(self.cancel, None, EngineError("The engine is shut down.", retryable=True)) for _ in jobs]
        self._bind_loop()
        streams: list[AsyncIterator[Progress | Result]] = []
        states: list[_JobState] = []
        for job in jobs:
            if job.job_id in self._jobs:
                error = EngineError(f"Job {job.job_id} is already submitted.", retryable=False)
                streams.append(JobStream(self.cancel, None, error))
                continue
            state = self._jobs[job.job_id] = _JobState(job)
            states.append(state)
            streams.append(JobStream(self.cancel, state))
        if len(jobs) > 1:
            for state in states:
                state.batch = tuple(member.job.job_id for member in states)
        if not states:
            return streams
        if self._ready:
            self._send_jobs(states)
        else:
            self._start_in_background()
        return streams

    async def cancel(self, job_id: str) -> bool:
        state = self._jobs.get(job_id)
        if state is None or state.finished:
            return False
        state.cancel_requested = True
        if state.status != "waiting":
            self._send(Cancel(job_id), state.generation)
        if state.status != "running":
            # Not started (the worker drops it from its queue) or already computed: nothing to wait for.
            self._finish(state, JobCancelled(f"Job {job_id} was cancelled."))
        return True

    def health(self) -> EngineHealth:
        process = self._process
        alive = self._ready and process is not None and process.is_alive()
        return EngineHealth(
            alive=alive,
            slots=self.slots,
            busy=min(self.slots, sum(1 for state in self._jobs.values() if state.status != "encoding")),
            restarts=self._restarts,
            detail=self._detail,
        )

    async def close(self, grace: float | None = None) -> None:
        """Stop the worker: the running job may finish within `grace` seconds (default
        `shutdown_timeout`), jobs not started yet raise EngineError(retryable=True) at once; then
        SIGTERM, then SIGKILL. The process is reaped (no zombie)."""
        if self._closed:
            return
        self._closed = True
        was_ready, self._ready = self._ready, False
        self._detail = "closed"
        grace = self.shutdown_timeout if grace is None else grace
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        for state in list(self._jobs.values()):
            if state.status not in ("running", "encoding"):
                self._finish(state, EngineError("The engine is shutting down.", retryable=True))
        start_task = self._start_task
        if start_task is not None and not start_task.done():
            # Still loading: nothing to finish. _spawn kills its process when cancelled.
            start_task.cancel()
            with contextlib.suppress(BaseException):
                await start_task
        process = self._process
        if process is not None and process.is_alive():
            if was_ready:
                self._send(Shutdown(drain=True), self._generation)
                await self._join(process, grace)
            if process.is_alive():
                if was_ready:
                    log.warning("engine did not stop within %.0f s: terminating it", grace)
                process.terminate()
                await self._join(process, TERMINATE_WAIT)
            if process.is_alive():
                process.kill()
                await self._join(process, TERMINATE_WAIT)
        for state in list(self._jobs.values()):
            self._finish(state, EngineError("The engine shut down before the job finished.", retryable=True))
        loop = asyncio.get_running_loop()
        reader = self._reader
        if reader is not None:
            await loop.run_in_executor(None, reader.join, 5.0)
        if self._sender is not None:
            await loop.run_in_executor(None, self._sender.shutdown, True)
        await asyncio.sleep(0)  # let the reader's last callback run
        if self._background:
            await asyncio.wait(set(self._background), timeout=TERMINATE_WAIT)

    # ------------------------------------------------------------------ process lifecycle

    def _fail_waiting(self, exc: EngineError) -> None:
        for state in list(self._jobs.values()):
            if state.status == "waiting":
                self._finish(state, EngineError(f"The engine is not available: {exc}", retryable=True))

    def _send_waiting(self) -> None:
        """Jobs not in any process yet (new, or not started by one that died): batches together."""
        batches: dict[tuple[str, ...], list[_JobState]] = {}
        for state in list(self._jobs.values()):
            if state.status == "waiting":
                batches.setdefault(state.batch or (state.job.job_id,), []).append(state)
        for states in batches.values():
            self._send_jobs(states)

    def _on_message(self, generation: int, message: Any) -> None:
        if generation != self._generation:
            return
        if isinstance(message, Ready | Fatal):
            if self._ready_future is not None and not self._ready_future.done():
                self._ready_future.set_result(message)
            return
        if isinstance(message, Progress):
            state = self._jobs.get(message.job_id)
            if state is not None and not state.cancel_requested:
                state.total_steps = message.total
                state.queue.put_nowait(message)
            return
        if isinstance(message, Done):
            if message.stats is not None:
                self.stats.append(message.stats)
            state = self._jobs.get(message.result.job_id)
            if state is not None:
                if state.cancel_requested:
                    self._finish(state, JobCancelled(f"Job {state.job.job_id} was cancelled."))
                else:
                    self._finish(state, message.result)
            return
        state = self._jobs.get(getattr(message, "job_id", ""))
        if state is None:
            return
        if isinstance(message, Started):
            state.status = "running"
            if not state.cancel_requested:
                # Tells the scheduler the job left the worker's queue and really started.
                state.queue.put_nowait(Progress(message.job_id, 0, 1, "load"))
        elif isinstance(message, Computed):
            state.status = "encoding"
            if not state.cancel_requested:
                # Tells the scheduler the slot is free: the next job can start while this one encodes.
                total = state.total_steps or 1
                state.queue.put_nowait(Progress(message.job_id, total, total, "encode"))
        elif isinstance(message, Failed):
            if message.cancelled or state.cancel_requested:
                self._finish(state, JobCancelled(f"Job {state.job.job_id} was cancelled."))
            else:
                self._finish(state, EngineError(message.message, retryable=message.retryable))

    def _on_exit(self, generation: int) -> None:
        if generation != self._generation:
            return
        process = self._process
        was_ready = self._ready
        self._ready = False
        if self._ready_future is not None and not self._ready_future.done():
            self._ready_future.set_result(EXITED)
        code = process.exitcode if process is not None else None
        for state in list(self._jobs.values()):
            if state.generation != generation or state.status == "waiting":
                continue
            if state.cancel_requested:
                self._finish(state, JobCancelled(f"Job {state.job.job_id} was cancelled."))
            elif state.status in ("running", "encoding"):
                self._finish(
                    state,
                    EngineError("The engine process stopped unexpectedly while running the job.", retryable=True),
                )
            elif state.sends >= 3:
                self._finish(state, EngineError("The engine keeps stopping before the job.", retryable=True))
            else:
                state.status = "waiting"  # never started: it goes to the next process
        if process is not None:
            self._spawn_task(self._reap(process, generation))
        if self._closed or not was_ready:
            return
        self._restarts += 1
        self._detail = f"restarting: the engine process exited (exit code {code})"
        log.warning("engine process %s exited; restarting it", process and process.pid)
        self._start_in_background()

    # ------------------------------------------------------------------ sending

    def _send_jobs(self, states: Sequence[_JobState]) -> None:
        for state in states:
            state.status = "sent"
            state.generation = self._generation
            state.sends += 1
        if len(states) == 1:
            self._send(Submit(states[0].job), self._generation)
        else:
            self._send(SubmitBatch(tuple(state.job for state in states)), self._generation)

    def _finish(self, state: _JobState, item: Result | BaseException) -> None:
        if state.finished:
            return
        state.finished = True
        if self._jobs.get(state.job.job_id) is state:
            del self._jobs[state.job.job_id]
        state.queue.put_nowait(item)
