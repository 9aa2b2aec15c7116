"""One attempt at one job, from the moment the scheduler takes it from the queue to its final
store write: marked running, run in the engine, then settled (done, failed, cancelled, or back in
line). Every state change is written to the job store before it is told to anyone.

Outcomes of one attempt:

* ``Result`` → ``mark_done`` (commits the quota charge) → ``Done``.
* ``EngineError(retryable=True)`` (the engine process died, a replica was lost, or any unexpected
  exception from the engine client) → ``requeue`` and back to the FRONT of its band while
  ``attempts < max_attempts``, else ``mark_failed`` (refund) → ``Failed``.
* ``EngineError(retryable=False)`` → ``mark_failed`` → ``Failed``.
* ``JobCancelled`` → ``mark_cancelled`` (refund) → ``Cancelled``.

A member of a batch (bot.queue.batching) is a run like any other: it hands its engine job to its
``RunGroup`` instead of submitting it, and gets its own stream back; every outcome above is its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol

from tenacity import AsyncRetrying, RetryCallState, stop_after_attempt, stop_any, wait_exponential
from tenacity.stop import stop_base

from bot.queue.batching import RunGroup
from bot.queue.eta import EtaEstimator
from bot.queue.fairqueue import QueueEntry
from bot.queue.ports import FINAL_STATUSES, JobStorePort, describe_images, terminal_event
from config.settings import QueueSettings
from engine.api import EngineClient, EngineError, JobCancelled, Result
from engine.jobs import Job
from engine.jobs.events import Cancelled, Done, Failed, JobEvent, Progress, ProgressEvent, Started

log = logging.getLogger(__name__)

# A job's final store write, tried again with a growing pause (0.5 s … 16 s, 7 tries in all)
# while the store is down or locked; then start-up recovery settles it.
WRITE_WAIT = wait_exponential(multiplier=0.5, max=16)
WRITE_TRIES = 7


class StopWhen(stop_base):
    """Stop retrying as soon as `predicate()` says so (the scheduler is stopping)."""

    def __init__(self, predicate: Callable[[], bool]) -> None:
        self.predicate = predicate

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.predicate()


class RunHost(Protocol):
    """What a run needs of its scheduler."""

    store: JobStorePort[Any]
    engine: EngineClient
    settings: QueueSettings
    estimator: EtaEstimator
    job_factory: Callable[[Any], Job]
    store_images: Callable[[Any, Result], Awaitable[list[dict[str, Any]]]] | None
    stop_timeout: float

    @property
    def stopping(self) -> bool: ...
    def prefetch(self) -> int: ...
    def emit(self, event: JobEvent) -> None: ...
    def back_in_line(self, entry: QueueEntry) -> None: ...
    def hold_dispatch(self) -> None: ...
    def slot_freed(self) -> None: ...


class JobRun:
    def __init__(self, host: RunHost, entry: QueueEntry, started_at: float, group: RunGroup | None = None) -> None:
        self.host = host
        self.entry = entry
        self.group = group  # the batch it runs in (None: alone)
        self.record: Any = entry.payload
        self.started_at = started_at
        self.task: asyncio.Task[None] | None = None
        self.phase: Literal["starting", "engine", "finishing"] = "starting"
        self.started = False  # Started was emitted
        self.settled = False  # a final state (or a requeue) was written to the store
        self.progress: Progress | None = None
        self.cancel_requested = False
        self.cancel_unsent = False  # the engine did not know the job yet: ask again on progress
        self.stop_requeue = False
        self.holds_slot = True  # until the engine's compute for this job is over
        self.engine_started = False  # the engine reported progress: it left the engine's own queue

    @property
    def job_id(self) -> str:
        return self.entry.job_id

    @property
    def slot_key(self) -> object:
        """What holds an engine slot: the run alone, or its whole batch."""
        return self.group if self.group is not None else self

    def remaining_cost(self) -> float:
        done = 0.0
        if self.progress is not None and self.progress.total > 0:
            done = min(1.0, max(0.0, self.progress.step / self.progress.total))
        return self.entry.cost * (1.0 - done)

    # ------------------------------------------------------------------ the attempt
    async def run(self) -> None:
        try:
            await self._execute()
        except asyncio.CancelledError:
            if self.group is not None:
                self.group.leave(self.job_id)
            if self.stop_requeue and not self.settled:
                if self.cancel_requested:  # the user's cancel wins over the shutdown
                    await self._settle_cancelled()
                else:
                    await self._settle_requeue("interrupted by shutdown", back_in_line=False)
            raise
        except Exception:
            log.exception("job=%s unexpected scheduler error", self.job_id)
            if not self.settled:
                await self._settle_failed("internal error in the scheduler")
        finally:
            if self.group is not None:
                self.group.leave(self.job_id)  # it never reached the engine: the others go without it

    async def _execute(self) -> None:
        host, job_id = self.host, self.job_id
        if self.cancel_requested:
            await self._settle_cancelled()
            return
        try:
            self.record = await host.store.mark_running(job_id)
        except Exception as exc:
            await self._mark_running_failed(exc)
            return
        self.started = True
        host.emit(Started(job_id, self.record.attempts))
        if self.cancel_requested:
            await self._settle_cancelled()
            return
        if host.stopping:  # popped as the scheduler stopped: nothing ran, put it back
            await self._settle_requeue("interrupted by shutdown", back_in_line=False)
            return
        try:
            job = host.job_factory(self.record)
        except Exception as exc:
            log.exception("job=%s could not build the engine job", job_id)
            # A ValueError says what is wrong with the parameters; anything else (a missing input
            # file, …) would show paths: its details stay in the log.
            why = str(exc) if isinstance(exc, ValueError) else "its input image is missing"
            await self._settle_failed(f"invalid job parameters: {why}")
            return
        self.phase = "engine"
        try:
            result = await self._run_engine(job)
        except JobCancelled:
            self.phase = "finishing"
            if self.stop_requeue and not self.cancel_requested:
                await self._settle_requeue("interrupted by shutdown", back_in_line=False)
            else:
                await self._settle_cancelled()
            return
        except EngineError as exc:
            self.phase = "finishing"
            if exc.detail:
                log.error("job=%s engine: %s", job_id, exc.detail)
            await self._engine_failed(str(exc) or type(exc).__name__, retryable=exc.retryable)
            return
        except Exception:
            log.exception("job=%s the engine client raised", job_id)
            self.phase = "finishing"
            await self._engine_failed("the engine hit an error", retryable=True)
            return
        self.phase = "finishing"
        await self._settle_done(result)

    async def _run_engine(self, job: Job) -> Result:
        result: Result | None = None
        if self.group is None:
            stream = self.host.engine.submit(job)
        else:
            stream = await self.group.join(self.job_id, job)
            if self.cancel_unsent:  # cancelled while its batch gathered: the engine knows it now
                await self.send_cancel()
        try:
            async for item in stream:
                if isinstance(item, Result):
                    result = item
                    self._free_slot()
                    break
                if isinstance(item, Progress):
                    self.engine_started = True
                    if item.phase == "encode":
                        self._free_slot()
                    self.progress = item
                    self.host.emit(ProgressEvent(self.job_id, item))
                    if self.cancel_unsent:
                        await self.send_cancel()
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    log.debug("job=%s closing the engine stream failed", self.job_id, exc_info=True)
        if result is None:
            raise EngineError("the engine ended the job without a result", retryable=True)
        return result

    def _free_slot(self) -> None:
        if self.holds_slot:
            self.holds_slot = False
            self.host.slot_freed()

    async def _engine_failed(self, error: str, *, retryable: bool) -> None:
        attempts = self.record.attempts
        if self.cancel_requested:
            await self._settle_cancelled()
        elif self.stop_requeue or self.host.stopping:
            await self._settle_requeue(f"interrupted by shutdown ({error})", back_in_line=False)
        elif retryable and attempts < self.host.settings.max_attempts:
            log.warning("job=%s attempt %d failed (%s); retrying", self.job_id, attempts, error)
            await self._settle_requeue(error, back_in_line=True)
        elif retryable:
            await self._settle_failed(f"the engine failed {attempts} times; last error: {error}")
        else:
            await self._settle_failed(error)

    async def _mark_running_failed(self, exc: Exception) -> None:
        host, job_id = self.host, self.job_id
        log.warning("job=%s could not mark it running: %s", job_id, exc)
        try:
            record = await host.store.get(job_id)
        except Exception:
            log.warning("job=%s the store is unreachable; retrying shortly", job_id, exc_info=True)
            record, reachable = None, False
        else:
            reachable = True
        if reachable and record is None:
            log.error("job=%s no longer in the store; dropped", job_id)
            self.settled = True
        elif record is not None and record.status in FINAL_STATUSES:
            self.settled = True  # finished elsewhere (e.g. cancelled by another path)
            host.emit(terminal_event(record))
        elif record is not None and record.status != "queued":
            log.error("job=%s is %s in the store, not queued; left to recovery", job_id, record.status)
        elif self.cancel_requested:
            await self._settle_cancelled()
        elif not host.stopping:
            # Transient (the store is down or busy): back in line, and no dispatch for a moment.
            host.back_in_line(self.entry)
            host.hold_dispatch()

    # ------------------------------------------------------------------ cancelling
    async def send_cancel(self) -> None:
        self.cancel_unsent = not await engine_cancel(self.host, self.job_id)

    # ------------------------------------------------------------------ store writes
    async def _write(self, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """A job's final write. A store that is down or locked for a while (SQLite past its busy
        timeout) is tried again with a growing pause, so the job still ends instead of staying
        "running" with its units reserved until a restart; when stopping, recovery does it."""
        if self.settled:
            return None
        retrying = AsyncRetrying(
            wait=WRITE_WAIT,
            stop=stop_any(stop_after_attempt(WRITE_TRIES), StopWhen(lambda: self.host.stopping)),
            before_sleep=lambda state: log.error(
                "job=%s %s failed in the store (try %d)",
                self.job_id,
                what,
                state.attempt_number,
                exc_info=state.outcome.exception() if state.outcome else None,
            ),
        )
        try:
            async for attempt in retrying:
                with attempt:
                    record = await call()
        except Exception:
            log.exception("job=%s %s failed in the store; left to start-up recovery", self.job_id, what)
            return None
        self.settled = True
        return record

    async def _settle_done(self, result: Result) -> None:
        host = self.host
        try:
            if host.store_images is not None:
                images = await host.store_images(self.record, result)
            else:
                images = describe_images(self.record, result)
        except Exception:
            log.exception("job=%s saving the images failed", self.job_id)
            await self._settle_failed("could not save the images")
            return
        seeds = [image.seed for image in result.images]
        record = await self._write(
            "mark_done", lambda: host.store.mark_done(self.job_id, images=images, seeds=seeds, seconds=result.seconds)
        )
        if record is None:
            return
        seconds = result.compute_seconds if result.compute_seconds > 0 else result.seconds
        host.estimator.observe(self.entry.cost, seconds)
        host.emit(Done(result, record=record))

    async def _settle_failed(self, error: str) -> None:
        record = await self._write("mark_failed", lambda: self.host.store.mark_failed(self.job_id, error))
        if record is not None:
            self.host.emit(Failed(record.id, error, record=record))

    async def _settle_cancelled(self) -> None:
        record = await self._write("mark_cancelled", lambda: self.host.store.mark_cancelled(self.job_id))
        if record is not None:
            self.host.emit(Cancelled(record))

    async def _settle_requeue(self, error: str, *, back_in_line: bool) -> None:
        """running → queued in the store; with ``back_in_line`` also to the front of its band
        here (otherwise it resumes from the store after a restart)."""
        host = self.host
        # A prefetched job interrupted by a shutdown while it still waited inside the engine never
        # ran: that attempt does not count against max_attempts (an engine failure always does).
        used = self.engine_started or not host.prefetch() or back_in_line
        record = await self._write("requeue", lambda: host.store.requeue(self.job_id, error, attempt_used=used))
        if record is None or not back_in_line or host.stopping:
            return
        host.back_in_line(queue_entry(record, enqueued_at=self.entry.enqueued_at))


def queue_entry(record: Any, *, enqueued_at: float | None = None) -> QueueEntry:
    return QueueEntry(
        job_id=record.id,
        owner_id=record.owner_id,
        cost=float(record.cost),
        band=int(record.band),
        enqueued_at=enqueued_at,
        payload=record,
        guild_id=record.guild_id,
    )


async def engine_cancel(host: RunHost, job_id: str) -> bool:
    try:
        return bool(await asyncio.wait_for(host.engine.cancel(job_id), host.stop_timeout))
    except Exception:
        log.warning("job=%s the engine did not take the cancellation", job_id, exc_info=True)
        return False


__all__ = ["JobRun", "RunHost", "engine_cancel", "queue_entry"]
