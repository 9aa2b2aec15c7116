"""The scheduler: the queue in memory, the truth in the database, the work in the engine.

``Scheduler`` takes persisted job records (``enqueue``), orders them with ``bot.queue.fairqueue``
(bands, per-user fair sharing, aging, caps), and dispatches them to free engine slots. Every
state change is written to the job store *before* it is acted on: a job is marked running before
it is submitted, done before anyone is told, requeued before it goes back in line. A crash or
restart at any point therefore leaves a state ``store.recover_detailed`` can resume from, and no
job is lost or run twice.

One attempt at a job, from the queue to its final store write, is a ``JobRun`` (bot.queue.runs).

Events (``subscribe(job_id)``, or every event through ``on_event``): ``Queued(position, eta)``
(again whenever the position changes), ``Started``, ``ProgressEvent``, then exactly one of
``Done`` / ``Failed`` / ``Cancelled``. A subscriber first gets the job's current state, so nothing
is missed by subscribing late.

Slots: a running job holds an engine slot until the engine reports its compute is over (a
``Progress`` with phase ``"encode"``) or its ``Result`` arrives, so encoding, storing and posting
one job overlap with the next job's compute. An engine with ``prefetch`` (jobs per slot it may
hold ahead) gets that many more, chosen by the fair queue like any other: they wait in the
engine and start the moment the slot frees, with no hand-over gap. At most
``2 × slots + prefetch × slots`` jobs are in flight, so finishing work never piles up.

Several bot processes (``bot.coordination``): every process keeps the queued jobs in its
``FairQueue`` (``adopt`` / ``forget`` follow the database), but only the one ``may_dispatch`` lets
dispatches; the store's ``mark_running`` is then a claim that fails for a job someone else took.

Caps: ``per_user_cap`` counts a user's queued *and* running jobs; ``global_cap`` counts queued jobs.

Batches (bot.queue.batching): with ``batch_shape`` and an engine whose ``max_batch`` is over 1, the
dispatch takes the head of the fair order with its same-shape companions (``FairQueue.pop_batch``)
and runs them as one batched engine call in one slot; each member is still its own ``JobRun``.

"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from datetime import UTC, datetime
from typing import Any, Generic

from bot.errors import QueueFull
from bot.queue.batching import RunGroup, batch_limit
from bot.queue.bus import EventBus
from bot.queue.eta import EtaEstimator
from bot.queue.fairqueue import FairQueue, QueueEntry
from bot.queue.ports import (
    FINAL_STATUSES,
    JobRecordLike,
    JobStorePort,
    JobView,
    R,
    RecoveryLike,
    UnknownJob,
    age_seconds,
    describe_images,
    terminal_event,
)
from bot.queue.runs import JobRun, engine_cancel, queue_entry
from bot.queue.views import MOVES_EVERY, Positions, QueueViews
from config.settings import QueueSettings
from engine.api import EngineClient, Result
from engine.jobs import Job
from engine.jobs.events import (
    Cancelled,
    Done,
    Failed,
    JobEvent,
    ProgressEvent,
    Queued,
    Started,
)

__all__ = [
    "MOVES_EVERY",
    "Cancelled",
    "Done",
    "Failed",
    "JobEvent",
    "JobRecordLike",
    "JobStorePort",
    "JobView",
    "ProgressEvent",
    "QueueFull",
    "Queued",
    "Scheduler",
    "Started",
    "UnknownJob",
    "describe_images",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- scheduler
class Scheduler(Generic[R]):
    """See the module docstring.

    ``store_images(record, result) -> list[dict]`` may save the images (e.g. to the output folder)
    and returns the metadata stored with ``mark_done``; a failure there fails the job (refund).
    ``clock`` (monotonic seconds) drives aging and ETAs. The final events of the last ``history``
    jobs are kept for late subscribers, with their ``Result`` (image bytes) only for the last
    ``results_kept``. ``retry_delay``: dispatch pause after the store failed to mark a job running.
    ``stop_timeout``: the most ``stop`` waits, after ``grace``, for cancelled jobs to be requeued.
    ``batch_shape(record) -> (shape, images) | None`` says which jobs may share a batched call
    (bot.queue.batching.batch_shape; None or absent: no batching).
    A stopped scheduler is not restarted: build a new one over the same store.
    """

    def __init__(
        self,
        store: JobStorePort[R],
        engine: EngineClient,
        *,
        queue: QueueSettings,
        job_factory: Callable[[R], Job],
        clock: Callable[[], float] = time.monotonic,
        estimator: EtaEstimator | None = None,
        store_images: Callable[[R, Result], Awaitable[list[dict[str, Any]]]] | None = None,
        history: int = 256,
        results_kept: int = 16,
        retry_delay: float = 1.0,
        stop_timeout: float = 3.0,
        may_dispatch: Callable[[], bool] | None = None,
        batch_shape: Callable[[R], tuple[Hashable, int] | None] | None = None,
    ) -> None:
        # What each JobRun reads (bot.queue.runs.RunHost).
        self.store = store
        self.engine = engine
        self.settings = queue
        self.job_factory = job_factory
        self.estimator = estimator or EtaEstimator()
        self.store_images = store_images
        self.stop_timeout = stop_timeout
        self._clock = clock
        self._retry_delay = retry_delay
        self._queue = FairQueue(
            per_user_cap=queue.per_user_cap,
            global_cap=queue.global_cap,
            aging_seconds=queue.aging_seconds,
            clock=clock,
        )
        self._running: dict[str, JobRun] = {}
        self._views = QueueViews(self._queue, self._running, self.estimator, self._slots)
        self._bus = EventBus(current=self._current_events, read=store.get, history=history, results_kept=results_kept)
        self._positions = Positions(self._views, self.emit)
        self._wake = asyncio.Event()
        self._paused = False
        self._stopping = False
        self._hold_until = 0.0  # event-loop time before which nothing is dispatched (store trouble)
        self._loop_task: asyncio.Task[None] | None = None
        self._may_dispatch = may_dispatch
        self._batch_shape = batch_shape

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Recover the store (interrupted jobs back to the queue, exhausted ones failed), load
        every queued job in creation order, then start dispatching."""
        if self._loop_task is not None or self._stopping:
            raise RuntimeError("the scheduler was already started")
        recovery = await self.store.recover_detailed(self.settings.max_attempts)
        self.absorb(recovery)
        self._loop_task = asyncio.create_task(self._dispatch_loop(), name="atelier-scheduler")

    def absorb(self, recovery: RecoveryLike[R]) -> None:
        """Take a recovery's outcome in: final events for the jobs it failed, and every queued job
        not known yet (also used by a process that becomes the dispatcher)."""
        for record in recovery.failed:
            self.emit(terminal_event(record))
        for record in recovery.queued:
            self.adopt(record, publish=False)
        self._publish_positions()
        self._wake.set()

    def adopt(self, record: R, *, publish: bool = True, front: bool = False) -> bool:
        """Queue a job that is already queued in the store (recovered, or enqueued by another
        process), without caps; ``front``: at the front of its band, as a retry goes. False if it
        is known here already."""
        if record.id in self._queue or record.id in self._running or self._bus.ended(record.id) is not None:
            return False  # (in the history: it ended here; a stale read must not queue it again)
        # Credit the time already waited, so aging keeps working across restarts and processes.
        enqueued_at = self._clock() - age_seconds(record.created_at, datetime.now(UTC))
        self._push(queue_entry(record, enqueued_at=enqueued_at), front=front)
        if publish:
            self._publish_positions()
            self._wake.set()
        return True

    def forget(self, job_id: str, *, ended: R | None = None) -> bool:
        """Drop a queued job that another process started or ended, without writing anything;
        ``ended`` (its final record) also emits its final event here. False if it was not queued."""
        entry = self._queue.remove(job_id)
        if entry is None:
            return False
        self._positions.gone(job_id)
        if ended is not None and ended.status in FINAL_STATUSES:
            self.emit(terminal_event(ended))
        self._publish_positions()
        return True

    def knows(self, job_id: str) -> bool:
        """Whether the job is queued or running here."""
        return job_id in self._queue or job_id in self._running

    def wake(self) -> None:
        """Look at the queue again now (e.g. ``may_dispatch`` turned true)."""
        self._wake.set()

    async def stop(self, grace: float = 20.0) -> None:
        """Stop taking work. Running jobs get ``grace`` seconds to finish; the rest are cancelled
        in the engine and requeued in the store, so they resume after a restart. Returns within
        about ``grace + stop_timeout`` seconds whatever the engine does. Queued jobs stay queued."""
        self._stopping = True
        self._wake.set()
        self._positions.stop()
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.wait([self._loop_task])
        states = list(self._running.values())
        tasks = [st.task for st in states if st.task is not None]
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        late = [st for st in states if st.task is not None and not st.task.done()]
        if not late:
            return
        waiting: list[asyncio.Future[Any]] = []
        for st in late:
            st.stop_requeue = True
            assert st.task is not None
            waiting.append(st.task)
            if st.phase == "engine":  # starting/finishing are short store writes: let them end
                st.task.cancel()
                waiting.append(asyncio.ensure_future(engine_cancel(self, st.job_id)))
        _, pending = await asyncio.wait(waiting, timeout=self.stop_timeout)
        for future in pending:
            log.warning("scheduler stop: %s did not end in time; cancelling it", future)
            future.cancel()

    # ------------------------------------------------------------------ intake
    def check_admission(self, owner_id: int, band: int = 1) -> None:
        """Raise ``QueueFull`` if the queue would refuse a new job of ``owner_id`` now. Call it
        before reserving quota and persisting the job. (``band`` is accepted so per-band caps can
        be added without touching callers; the caps are band-independent today.)"""
        self._queue.check(owner_id, extra_user=self._running_count(owner_id))

    async def enqueue(self, record: R) -> int:
        """Queue a job the caller has already persisted (quota reserved, status queued); returns
        its position. Idempotent for a job already queued or running (0 = running). If a cap is
        hit after all (a race with ``check_admission``), the job is marked failed, which refunds
        it, and ``QueueFull`` is raised for the caller to show."""
        job_id = record.id
        if job_id in self._running:
            return 0
        if job_id in self._queue:
            return self._queue.position(job_id) or 0
        try:
            self.check_admission(record.owner_id, record.band)
        except QueueFull as exc:
            try:
                await self.store.mark_failed(job_id, str(exc))
            except Exception:
                log.exception("job=%s could not record the queue-full refusal", job_id)
            raise
        self._push(queue_entry(record))
        self._publish_positions()
        self._wake.set()
        # Admissions committed together (db.admission) all push in this turn; their positions
        # are then read from one new order instead of one each.
        await asyncio.sleep(0)
        if job_id in self._running:
            return 0
        return self._queue.position(job_id) or 0

    async def cancel(self, job_id: str) -> bool:
        """Cancel a queued job (removed, marked cancelled, refunded) or ask the engine to cancel a
        running one (its ``Cancelled`` event follows). False when the job is neither, or is
        already finishing."""
        entry = self._queue.remove(job_id)
        if entry is not None:
            self._positions.gone(job_id)
            try:
                record = await self.store.mark_cancelled(job_id)
            except Exception:
                log.exception("job=%s could not record the cancellation; it stays queued", job_id)
                self._push(entry)
                self._wake.set()
                raise
            self.emit(Cancelled(record))
            self._publish_positions()
            return True
        st = self._running.get(job_id)
        if st is None or st.settled or st.phase == "finishing":
            return False
        if not st.cancel_requested:
            st.cancel_requested = True
            if st.phase == "engine":
                await st.send_cancel()
        return True

    # ------------------------------------------------------------------ control
    def pause(self) -> None:
        """Dispatch nothing new, for any server (the operator's pause); running jobs continue."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._wake.set()

    @property
    def paused(self) -> bool:
        return self._paused

    def pause_server(self, guild_id: int | None, paused: bool = True) -> None:
        """One server's moderators paused (or resumed) it: its jobs wait, the others run."""
        if paused:
            self._queue.pause_server(guild_id)
        else:
            self._queue.resume_server(guild_id)
        self._publish_positions()
        self._wake.set()

    def set_paused_servers(self, guild_ids: Sequence[int | None]) -> None:
        self._queue.set_paused_servers(guild_ids)
        self._publish_positions()
        self._wake.set()

    def server_paused(self, guild_id: int | None) -> bool:
        """Whether new jobs of this server wait (it, or everything, is paused)."""
        return self._paused or self._queue.is_paused(guild_id)

    # ------------------------------------------------------------------ queries
    def position(self, job_id: str) -> int | None:
        """1-based queue position, 0 when running, None when neither."""
        if job_id in self._running:
            return 0
        return self._queue.position(job_id)

    def eta(self, job_id: str) -> float | None:
        """Estimated seconds until the job is done; None when it is neither queued nor running."""
        return self._views.eta(job_id)

    def snapshot(self) -> list[JobView]:
        """Running jobs (oldest first), then queued jobs in the order they will run."""
        return self._views.snapshot()

    def queued_for(self, owner_id: int) -> list[JobView]:
        """One user's running and queued jobs."""
        return self._views.queued_for(owner_id)

    def depth_by_band(self, guild_id: int | None = None, *, every_server: bool = True) -> dict[int, int]:
        """Queued jobs per (effective) band, of one server unless ``every_server``."""
        return self._queue.depth_by_band(guild_id, every_server=every_server)

    # ------------------------------------------------------------------ events
    def on_event(self, callback: Callable[[JobEvent], object]) -> Callable[[], None]:
        """Call ``callback(event)`` for every event of every job (bot.queue.bus)."""
        return self._bus.on_event(callback)

    def subscribe(self, job_id: str) -> AsyncIterator[JobEvent]:
        """The job's events, starting with its current state, ending after its final event.
        Raises ``UnknownJob`` (on first iteration) for an id the store does not know."""
        return self._bus.subscribe(job_id)

    def _current_events(self, job_id: str) -> list[JobEvent] | None:
        st = self._running.get(job_id)
        if st is not None:
            if not st.started:
                return []
            events: list[JobEvent] = [Started(job_id, st.record.attempts)]
            if st.progress is not None:
                events.append(ProgressEvent(job_id, st.progress))
            return events
        view = self._views.queued_view(job_id)
        return None if view is None else [Queued(job_id, view.position, view.eta, view.attempts)]

    def _push(self, entry: QueueEntry, *, front: bool = False) -> None:
        """Into the queue (caps were checked before); the job is told its place on the next turn."""
        shape = None
        if self._batch_shape is not None and entry.payload is not None:
            shape = self._batch_shape(entry.payload)
        entry.shape, entry.size = shape if shape is not None else (None, 1)
        self._queue.push(entry, front=front, enforce_caps=False, placed=False)
        self._positions.new(entry.job_id)

    def _publish_positions(self) -> None:
        self._positions.publish()

    # ------------------------------------------------------------------ dispatch
    async def _dispatch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._wake.clear()
            try:
                self._dispatch_ready()
            except Exception:
                log.exception("scheduler: dispatching failed; trying again shortly")
                self._hold_until = loop.time() + self._retry_delay
            timeout: float | None = None
            if self._hold_until > loop.time():
                timeout = self._hold_until - loop.time()
            elif self._slots() <= 0:
                timeout = 1.0  # the engine has no slot (restarting): look again now and then
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    def _dispatch_ready(self) -> None:
        launched = False
        while (
            not self._paused
            and not self._stopping
            and (self._may_dispatch is None or self._may_dispatch())
            and self._hold_until <= asyncio.get_running_loop().time()
            and self._slots_in_use() < self._slots() * (1 + self.prefetch())
            and len({st.slot_key for st in self._running.values()}) < self._slots() * (2 + self.prefetch())
        ):
            entries = self._take()
            if not entries:
                break
            group = RunGroup(self.engine, [e.job_id for e in entries]) if len(entries) > 1 else None
            for entry in entries:
                self._positions.gone(entry.job_id)
                run = JobRun(self, entry, self._clock(), group)
                self._running[entry.job_id] = run
                run.task = asyncio.create_task(self._run(run), name=f"atelier-job-{entry.job_id}")
            launched = True
        if launched:
            self._publish_positions()

    def _take(self) -> list[QueueEntry]:
        """The next job, with its batch companions when the engine batches."""
        limit = batch_limit(self.engine) if self._batch_shape is not None else 1
        if limit <= 1:
            entry = self._queue.pop()
            return [] if entry is None else [entry]
        return self._queue.pop_batch(limit, key=lambda e: e.shape, size=lambda e: e.size)

    async def _run(self, run: JobRun) -> None:
        try:
            await run.run()
        finally:
            self._running.pop(run.job_id, None)
            self._wake.set()

    # ------------------------------------------------------------------ what each run needs
    @property
    def stopping(self) -> bool:
        return self._stopping

    def emit(self, event: JobEvent) -> None:
        if isinstance(event, Done | Failed | Cancelled):
            self._positions.gone(event.job_id)
        self._bus.emit(event)

    def back_in_line(self, entry: QueueEntry) -> None:
        """An interrupted job goes to the front of its band (it already waited its turn)."""
        self._push(entry, front=True)
        self._publish_positions()
        self._wake.set()

    def hold_dispatch(self) -> None:
        """The store is in trouble: dispatch nothing for a moment."""
        self._hold_until = asyncio.get_running_loop().time() + self._retry_delay

    def slot_freed(self) -> None:
        self._wake.set()

    def prefetch(self) -> int:
        try:
            return max(0, int(getattr(self.engine, "prefetch", 0)))
        except Exception:
            return 0

    # ------------------------------------------------------------------ helpers
    def _slots(self) -> int:
        try:
            return int(self.engine.slots)
        except Exception:
            return 0

    def _slots_in_use(self) -> int:
        return len({st.slot_key for st in self._running.values() if st.holds_slot})

    def _running_count(self, owner_id: int) -> int:
        return sum(1 for st in self._running.values() if st.entry.owner_id == owner_id)
