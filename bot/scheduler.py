"""The scheduler: the queue in memory, the truth in the database, the work in the engine.

``Scheduler`` takes persisted job records (``enqueue``), orders them with ``bot.fairqueue``
(bands, per-user fair sharing, aging, caps), and dispatches them to free engine slots. Every
state change is written to the job store *before* it is acted on: a job is marked running before
it is submitted, done before anyone is told, requeued before it goes back in line. A crash or
restart at any point therefore leaves a state ``store.recover_detailed`` can resume from, and no
job is lost or run twice.

Outcomes of one attempt:

* ``Result`` → ``mark_done`` (commits the quota charge) → ``Done``.
* ``EngineError(retryable=True)`` (the engine process died, a replica was lost, or any unexpected
  exception from the engine client) → ``requeue`` and back to the FRONT of its band while
  ``attempts < max_attempts``, else ``mark_failed`` (refund) → ``Failed``.
* ``EngineError(retryable=False)`` → ``mark_failed`` → ``Failed``.
* ``JobCancelled`` → ``mark_cancelled`` (refund) → ``Cancelled``.

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

Batching of several members' same-shape jobs into one engine call is not offered: the engine
protocol submits one ``Job`` at a time (a job's own ``count`` images are batched by the engine).
``FairQueue.pop_batch`` implements the fair choice of such jobs for when the engine takes them.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, Literal, Protocol, TypeVar

from bot.eta import EtaEstimator
from bot.fairqueue import FairQueue, QueueEntry, QueueFull
from config.settings import QueueSettings
from engine.spec import EngineClient, EngineError, Job, JobCancelled, Progress, Result

__all__ = [
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

# Seconds between two walks of the whole queue for position changes: a queue card is edited at
# most every 2 s anyway, and in a burst every enqueue moves hundreds of queued jobs.
MOVES_EVERY = 0.5

FINAL_STATUSES = frozenset({"done", "failed", "cancelled"})


# --------------------------------------------------------------------------- ports
class JobRecordLike(Protocol):
    """The fields of ``db.jobs.JobRecord`` the scheduler reads."""

    @property
    def id(self) -> str: ...
    @property
    def owner_id(self) -> int: ...
    @property
    def guild_id(self) -> int | None: ...
    @property
    def cost(self) -> float: ...
    @property
    def band(self) -> int: ...
    @property
    def status(self) -> str: ...
    @property
    def attempts(self) -> int: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def error(self) -> str | None: ...


R = TypeVar("R", bound=JobRecordLike)
R_co = TypeVar("R_co", bound=JobRecordLike, covariant=True)


class RecoveryLike(Protocol[R_co]):
    """The fields of ``db.jobs.RecoveryResult`` the scheduler reads."""

    @property
    def failed(self) -> Sequence[R_co]: ...
    @property
    def queued(self) -> Sequence[R_co]: ...


class JobStorePort(Protocol[R_co]):
    """Exactly the job store methods the scheduler calls (``db.jobs.JobStore`` satisfies it).
    Each must be durable when it returns and raise on a transition its state forbids."""

    async def get(self, job_id: str) -> R_co | None: ...
    async def mark_running(self, job_id: str) -> R_co: ...
    async def mark_done(
        self, job_id: str, *, images: list[dict[str, Any]], seeds: list[int], seconds: float
    ) -> R_co: ...
    async def mark_failed(self, job_id: str, error: str) -> R_co: ...
    async def mark_cancelled(self, job_id: str) -> R_co: ...
    async def requeue(self, job_id: str, error: str, *, attempt_used: bool = True) -> R_co: ...
    async def recover_detailed(self, max_attempts: int = 3) -> RecoveryLike[R_co]: ...


# --------------------------------------------------------------------------- events
@dataclass(frozen=True)
class Queued:
    job_id: str
    position: int
    eta: float
    """Estimated seconds until the job is done."""
    attempt: int = 0
    """Attempts already made (> 0: waiting again after an engine failure)."""


@dataclass(frozen=True)
class Started:
    job_id: str
    attempt: int


@dataclass(frozen=True)
class ProgressEvent:
    job_id: str
    progress: Progress


@dataclass(frozen=True)
class Done:
    record: Any
    result: Result | None
    """None when replayed from history or the store (late subscribers): see ``record.images``."""

    @property
    def job_id(self) -> str:
        return self.record.id


@dataclass(frozen=True)
class Failed:
    record: Any
    error: str

    @property
    def job_id(self) -> str:
        return self.record.id


@dataclass(frozen=True)
class Cancelled:
    record: Any

    @property
    def job_id(self) -> str:
        return self.record.id


JobEvent = Queued | Started | ProgressEvent | Done | Failed | Cancelled
TERMINAL_EVENTS = (Done, Failed, Cancelled)


@dataclass(frozen=True)
class JobView:
    """One line of ``/queue`` or ``/mod queue``. ``position`` is 0 for a running job."""

    job_id: str
    owner_id: int
    status: Literal["queued", "running"]
    position: int
    band: int
    cost: float
    eta: float
    attempts: int
    record: Any
    progress: Progress | None = None


class UnknownJob(LookupError):
    """``subscribe`` was given a job id the store does not know."""


def _terminal_event(record: JobRecordLike) -> JobEvent:
    if record.status == "done":
        return Done(record, None)
    if record.status == "cancelled":
        return Cancelled(record)
    return Failed(record, record.error or "failed")


def _age_seconds(created_at: datetime, now: datetime) -> float:
    if created_at.tzinfo is None:
        created_at = created_at.replace(tzinfo=UTC)
    return max(0.0, (now - created_at).total_seconds())


def describe_images(record: JobRecordLike, result: Result) -> list[dict[str, Any]]:
    """Default image metadata written with ``mark_done`` when no ``store_images`` hook is given."""
    return [
        {"seed": im.seed, "format": im.format, "width": im.width, "height": im.height, "bytes": len(im.data)}
        for im in result.images
    ]


# Pauses before trying a job's final store write again (then it is left to start-up recovery).
WRITE_RETRY_PAUSES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


# --------------------------------------------------------------------------- running state
class _Running:
    def __init__(self, entry: QueueEntry, started_at: float) -> None:
        self.entry = entry
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

    def remaining_cost(self) -> float:
        done = 0.0
        if self.progress is not None and self.progress.total > 0:
            done = min(1.0, max(0.0, self.progress.step / self.progress.total))
        return self.entry.cost * (1.0 - done)


# --------------------------------------------------------------------------- scheduler
class Scheduler(Generic[R]):
    """See the module docstring.

    ``store_images(record, result) -> list[dict]`` may save the images (e.g. to the output folder)
    and returns the metadata stored with ``mark_done``; a failure there fails the job (refund).
    ``clock`` (monotonic seconds) drives aging and ETAs. The final events of the last ``history``
    jobs are kept for late subscribers, with their ``Result`` (image bytes) only for the last
    ``results_kept``. ``retry_delay``: dispatch pause after the store failed to mark a job running.
    ``stop_timeout``: the most ``stop`` waits, after ``grace``, for cancelled jobs to be requeued.
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
    ) -> None:
        self._store = store
        self._engine = engine
        self._settings = queue
        self._job_factory = job_factory
        self._clock = clock
        self._estimator = estimator or EtaEstimator()
        self._store_images = store_images
        self._history_size = history
        self._results_kept = results_kept
        self._with_result: deque[str] = deque()
        self._retry_delay = retry_delay
        self._stop_timeout = stop_timeout
        self._queue = FairQueue(
            per_user_cap=queue.per_user_cap,
            global_cap=queue.global_cap,
            aging_seconds=queue.aging_seconds,
            clock=clock,
        )
        self._running: dict[str, _Running] = {}
        self._history: OrderedDict[str, JobEvent] = OrderedDict()
        self._subscribers: dict[str, set[asyncio.Queue[JobEvent]]] = {}
        self._listeners: list[Callable[[JobEvent], object]] = []
        self._last_position: dict[str, int] = {}
        self._positions_due = False
        self._unannounced: set[str] = set()  # queued jobs not told their place yet
        self._moves_told_at = -math.inf  # loop time of the last full walk
        self._moves_timer: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Future[Any]] = set()
        self._wake = asyncio.Event()
        self._paused = False
        self._stopping = False
        self._hold_until = 0.0  # event-loop time before which nothing is dispatched (store trouble)
        self._loop_task: asyncio.Task[None] | None = None
        self._may_dispatch = may_dispatch

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Recover the store (interrupted jobs back to the queue, exhausted ones failed), load
        every queued job in creation order, then start dispatching."""
        if self._loop_task is not None or self._stopping:
            raise RuntimeError("the scheduler was already started")
        recovery = await self._store.recover_detailed(self._settings.max_attempts)
        self.absorb(recovery)
        self._loop_task = asyncio.create_task(self._dispatch_loop(), name="atelier-scheduler")

    def absorb(self, recovery: RecoveryLike[R]) -> None:
        """Take a recovery's outcome in: final events for the jobs it failed, and every queued job
        not known yet (also used by a process that becomes the dispatcher)."""
        for record in recovery.failed:
            self._emit(_terminal_event(record))
        for record in recovery.queued:
            self.adopt(record, publish=False)
        self._publish_positions()
        self._wake.set()

    def adopt(self, record: R, *, publish: bool = True, front: bool = False) -> bool:
        """Queue a job that is already queued in the store (recovered, or enqueued by another
        process), without caps; ``front``: at the front of its band, as a retry goes. False if it
        is known here already."""
        if record.id in self._queue or record.id in self._running or record.id in self._history:
            return False  # (in the history: it ended here; a stale read must not queue it again)
        # Credit the time already waited, so aging keeps working across restarts and processes.
        enqueued_at = self._clock() - _age_seconds(record.created_at, datetime.now(UTC))
        self._push(self._entry(record, enqueued_at=enqueued_at), front=front)
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
        self._last_position.pop(job_id, None)
        if ended is not None and ended.status in FINAL_STATUSES:
            self._emit(_terminal_event(ended))
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
        if self._moves_timer is not None:
            self._moves_timer.cancel()
            self._moves_timer = None
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
                waiting.append(asyncio.ensure_future(self._engine_cancel(st.job_id)))
        _, pending = await asyncio.wait(waiting, timeout=self._stop_timeout)
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
                await self._store.mark_failed(job_id, str(exc))
            except Exception:
                log.exception("job=%s could not record the queue-full refusal", job_id)
            raise
        self._push(self._entry(record))
        self._publish_positions()
        self._wake.set()
        return self._queue.position(job_id) or 0

    async def cancel(self, job_id: str) -> bool:
        """Cancel a queued job (removed, marked cancelled, refunded) or ask the engine to cancel a
        running one (its ``Cancelled`` event follows). False when the job is neither, or is
        already finishing."""
        entry = self._queue.remove(job_id)
        if entry is not None:
            self._last_position.pop(job_id, None)
            try:
                record = await self._store.mark_cancelled(job_id)
            except Exception:
                log.exception("job=%s could not record the cancellation; it stays queued", job_id)
                self._push(entry)
                self._wake.set()
                raise
            self._emit(Cancelled(record))
            self._publish_positions()
            return True
        st = self._running.get(job_id)
        if st is None or st.settled or st.phase == "finishing":
            return False
        if not st.cancel_requested:
            st.cancel_requested = True
            if st.phase == "engine":
                await self._send_cancel(st)
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
        st = self._running.get(job_id)
        if st is not None:
            return self._estimator.seconds_for(st.remaining_cost())
        view = self._queued_view(job_id)
        return None if view is None else view.eta

    def snapshot(self) -> list[JobView]:
        """Running jobs (oldest first), then queued jobs in the order they will run."""
        return self._running_views() + self._queued_views()

    def queued_for(self, owner_id: int) -> list[JobView]:
        """One user's running and queued jobs."""
        return [v for v in self._running_views() if v.owner_id == owner_id] + [
            self._view(*step) for step in self._walk_queue() if step[1].owner_id == owner_id
        ]

    def _running_views(self) -> list[JobView]:
        return [
            JobView(
                job_id=st.job_id,
                owner_id=st.entry.owner_id,
                status="running",
                position=0,
                band=st.entry.band,
                cost=st.entry.cost,
                eta=self._estimator.seconds_for(st.remaining_cost()),
                attempts=st.record.attempts,
                record=st.record,
                progress=st.progress,
            )
            for st in sorted(self._running.values(), key=lambda s: s.started_at)
        ]

    def depth_by_band(self, guild_id: int | None = None, *, every_server: bool = True) -> dict[int, int]:
        """Queued jobs per (effective) band, of one server unless ``every_server``."""
        return self._queue.depth_by_band(guild_id, every_server=every_server)

    @property
    def estimator(self) -> EtaEstimator:
        return self._estimator

    # ------------------------------------------------------------------ events
    def on_event(self, callback: Callable[[JobEvent], object]) -> Callable[[], None]:
        """Call ``callback(event)`` for every event of every job (a coroutine result is run as a
        task). Exceptions are logged, never propagated. Returns a function that unregisters."""
        self._listeners.append(callback)

        def remove() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return remove

    def subscribe(self, job_id: str) -> AsyncIterator[JobEvent]:
        """The job's events, starting with its current state, ending after its final event.
        Raises ``UnknownJob`` (on first iteration) for an id the store does not know."""
        return self._subscription(job_id)

    async def _subscription(self, job_id: str) -> AsyncIterator[JobEvent]:
        inbox: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._subscribers.setdefault(job_id, set()).add(inbox)
        try:
            current = self._current_events(job_id)  # same tick as the registration: nothing lost
            if current is None:
                record = await self._store.get(job_id)
                if record is None:
                    raise UnknownJob(job_id)
                if record.status in FINAL_STATUSES and inbox.empty():
                    yield _terminal_event(record)
                    return
                current = []  # persisted but not (or no longer) in memory: wait for its events
            for event in current:
                yield event
                if isinstance(event, TERMINAL_EVENTS):
                    return
            while True:
                event = await inbox.get()
                yield event
                if isinstance(event, TERMINAL_EVENTS):
                    return
        finally:
            subscribers = self._subscribers.get(job_id)
            if subscribers is not None:
                subscribers.discard(inbox)
                if not subscribers:
                    del self._subscribers[job_id]

    def _current_events(self, job_id: str) -> list[JobEvent] | None:
        if job_id in self._history:
            return [self._history[job_id]]
        st = self._running.get(job_id)
        if st is not None:
            if not st.started:
                return []
            events: list[JobEvent] = [Started(job_id, st.record.attempts)]
            if st.progress is not None:
                events.append(ProgressEvent(job_id, st.progress))
            return events
        view = self._queued_view(job_id)
        return None if view is None else [Queued(job_id, view.position, view.eta, view.attempts)]

    def _emit(self, event: JobEvent) -> None:
        job_id = event.job_id
        if isinstance(event, TERMINAL_EVENTS):
            self._last_position.pop(job_id, None)
            self._history[job_id] = event
            self._history.move_to_end(job_id)
            while len(self._history) > self._history_size:
                self._history.popitem(last=False)
            if isinstance(event, Done) and event.result is not None:
                # Image bytes are big: only the latest few finished jobs keep theirs in memory.
                self._with_result.append(job_id)
                while len(self._with_result) > self._results_kept:
                    past = self._history.get(old := self._with_result.popleft())
                    if isinstance(past, Done):
                        self._history[old] = Done(past.record, None)
        for inbox in tuple(self._subscribers.get(job_id, ())):
            inbox.put_nowait(event)
        for callback in tuple(self._listeners):
            try:
                outcome = callback(event)
            except Exception:
                log.exception("job=%s event listener failed on %s", job_id, type(event).__name__)
                continue
            if inspect.isawaitable(outcome):
                future = asyncio.ensure_future(outcome)
                self._background.add(future)
                future.add_done_callback(self._background_done)

    def _background_done(self, future: asyncio.Future[Any]) -> None:
        self._background.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("event listener failed", exc_info=future.exception())

    def _push(self, entry: QueueEntry, *, front: bool = False) -> None:
        """Into the queue (caps were checked before); the job is told its place on the next turn."""
        self._queue.push(entry, front=front, enforce_caps=False)
        self._unannounced.add(entry.job_id)

    def _publish_positions(self) -> None:
        """Emit ``Queued`` for every queued job whose position changed since it was last told,
        once per event-loop turn however many changes it had (a burst of enqueues would
        otherwise recompute every position and ETA once per job)."""
        if not self._positions_due:
            self._positions_due = True
            asyncio.get_running_loop().call_soon(self._publish_positions_now)

    def _publish_positions_now(self, *, walk: bool = False) -> None:
        self._positions_due = False
        loop = asyncio.get_running_loop()
        if not walk and loop.time() - self._moves_told_at < MOVES_EVERY:
            # A job new in the queue (or back in it) learns its place at once; the moves of the
            # others wait for the next walk: in a burst each enqueue moves hundreds of them.
            for job_id in self._unannounced:
                view = self._queued_view(job_id)
                if view is not None:
                    self._tell(job_id, view.position, view.eta, view.attempts)
            self._unannounced.clear()
            if self._moves_timer is None:
                self._moves_timer = loop.call_at(self._moves_told_at + MOVES_EVERY, self._publish_moves)
            return
        self._moves_told_at = loop.time()
        self._unannounced.clear()
        for position, entry, _, eta in self._walk_queue():
            if self._last_position.get(entry.job_id) != position:
                self._tell(entry.job_id, position, eta, entry.payload.attempts)

    def _publish_moves(self) -> None:
        self._moves_timer = None
        self._publish_positions_now(walk=True)

    def _tell(self, job_id: str, position: int, eta: float, attempts: int) -> None:
        self._last_position[job_id] = position
        self._emit(Queued(job_id, position, eta, attempts))

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
            and self._slots_in_use() < self._slots() * (1 + self._prefetch())
            and len(self._running) < self._slots() * (2 + self._prefetch())
        ):
            entry = self._queue.pop()
            if entry is None:
                break
            self._last_position.pop(entry.job_id, None)
            st = _Running(entry, self._clock())
            self._running[entry.job_id] = st
            st.task = asyncio.create_task(self._run(st), name=f"atelier-job-{entry.job_id}")
            launched = True
        if launched:
            self._publish_positions()

    async def _run(self, st: _Running) -> None:
        try:
            await self._execute(st)
        except asyncio.CancelledError:
            if st.stop_requeue and not st.settled:
                if st.cancel_requested:  # the user's cancel wins over the shutdown
                    await self._settle_cancelled(st)
                else:
                    await self._settle_requeue(st, "interrupted by shutdown", back_in_line=False)
            raise
        except Exception:
            log.exception("job=%s unexpected scheduler error", st.job_id)
            if not st.settled:
                await self._settle_failed(st, "internal error in the scheduler")
        finally:
            self._running.pop(st.job_id, None)
            self._wake.set()

    async def _execute(self, st: _Running) -> None:
        job_id = st.job_id
        if st.cancel_requested:
            await self._settle_cancelled(st)
            return
        try:
            st.record = await self._store.mark_running(job_id)
        except Exception as exc:
            await self._mark_running_failed(st, exc)
            return
        st.started = True
        self._emit(Started(job_id, st.record.attempts))
        if st.cancel_requested:
            await self._settle_cancelled(st)
            return
        if self._stopping:  # popped as the scheduler stopped: nothing ran, put it back
            await self._settle_requeue(st, "interrupted by shutdown", back_in_line=False)
            return
        try:
            job = self._job_factory(st.record)
        except Exception as exc:
            log.exception("job=%s could not build the engine job", job_id)
            # A ValueError says what is wrong with the parameters; anything else (a missing input
            # file, …) would show paths: its details stay in the log.
            why = str(exc) if isinstance(exc, ValueError) else "its input image is missing"
            await self._settle_failed(st, f"invalid job parameters: {why}")
            return
        st.phase = "engine"
        try:
            result = await self._run_engine(st, job)
        except JobCancelled:
            st.phase = "finishing"
            if st.stop_requeue and not st.cancel_requested:
                await self._settle_requeue(st, "interrupted by shutdown", back_in_line=False)
            else:
                await self._settle_cancelled(st)
            return
        except EngineError as exc:
            st.phase = "finishing"
            if exc.detail:
                log.error("job=%s engine: %s", job_id, exc.detail)
            await self._engine_failed(st, str(exc) or type(exc).__name__, retryable=exc.retryable)
            return
        except Exception:
            log.exception("job=%s the engine client raised", job_id)
            st.phase = "finishing"
            await self._engine_failed(st, "the engine hit an error", retryable=True)
            return
        st.phase = "finishing"
        await self._settle_done(st, result)

    async def _run_engine(self, st: _Running, job: Job) -> Result:
        result: Result | None = None
        stream = self._engine.submit(job)
        try:
            async for item in stream:
                if isinstance(item, Result):
                    result = item
                    self._free_slot(st)
                    break
                if isinstance(item, Progress):
                    st.engine_started = True
                    if item.phase == "encode":
                        self._free_slot(st)
                    st.progress = item
                    self._emit(ProgressEvent(st.job_id, item))
                    if st.cancel_unsent:
                        await self._send_cancel(st)
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    log.debug("job=%s closing the engine stream failed", st.job_id, exc_info=True)
        if result is None:
            raise EngineError("the engine ended the job without a result", retryable=True)
        return result

    async def _engine_failed(self, st: _Running, error: str, *, retryable: bool) -> None:
        attempts = st.record.attempts
        if st.cancel_requested:
            await self._settle_cancelled(st)
        elif st.stop_requeue or self._stopping:
            await self._settle_requeue(st, f"interrupted by shutdown ({error})", back_in_line=False)
        elif retryable and attempts < self._settings.max_attempts:
            log.warning("job=%s attempt %d failed (%s); retrying", st.job_id, attempts, error)
            await self._settle_requeue(st, error, back_in_line=True)
        elif retryable:
            await self._settle_failed(st, f"the engine failed {attempts} times; last error: {error}")
        else:
            await self._settle_failed(st, error)

    async def _mark_running_failed(self, st: _Running, exc: Exception) -> None:
        job_id = st.job_id
        log.warning("job=%s could not mark it running: %s", job_id, exc)
        try:
            record = await self._store.get(job_id)
        except Exception:
            log.warning("job=%s the store is unreachable; retrying shortly", job_id, exc_info=True)
            record, reachable = None, False
        else:
            reachable = True
        if reachable and record is None:
            log.error("job=%s no longer in the store; dropped", job_id)
            st.settled = True
        elif record is not None and record.status in FINAL_STATUSES:
            st.settled = True  # finished elsewhere (e.g. cancelled by another path)
            self._emit(_terminal_event(record))
        elif record is not None and record.status != "queued":
            log.error("job=%s is %s in the store, not queued; left to recovery", job_id, record.status)
        elif st.cancel_requested:
            await self._settle_cancelled(st)
        elif not self._stopping:
            # Transient (the store is down or busy): back in line, and no dispatch for a moment.
            self._push(st.entry, front=True)
            self._hold_until = asyncio.get_running_loop().time() + self._retry_delay
            self._publish_positions()

    # ------------------------------------------------------------------ store writes
    async def _write(self, st: _Running, what: str, call: Callable[[], Awaitable[R]]) -> R | None:
        """A job's final write. A store that is down or locked for a while (SQLite past its busy
        timeout) is tried again with a growing pause, so the job still ends instead of staying
        "running" with its units reserved until a restart; when stopping, recovery does it."""
        if st.settled:
            return None
        for attempt, pause in enumerate((*WRITE_RETRY_PAUSES, None), start=1):
            try:
                record = await call()
            except Exception:
                log.exception("job=%s %s failed in the store (try %d)", st.job_id, what, attempt)
                if pause is None or self._stopping:
                    return None
                await asyncio.sleep(pause)
            else:
                st.settled = True
                return record
        return None

    async def _settle_done(self, st: _Running, result: Result) -> None:
        try:
            if self._store_images is not None:
                images = await self._store_images(st.record, result)
            else:
                images = describe_images(st.record, result)
        except Exception:
            log.exception("job=%s saving the images failed", st.job_id)
            await self._settle_failed(st, "could not save the images")
            return
        seeds = [image.seed for image in result.images]
        record = await self._write(
            st,
            "mark_done",
            lambda: self._store.mark_done(st.job_id, images=images, seeds=seeds, seconds=result.seconds),
        )
        if record is None:
            return
        seconds = result.compute_seconds if result.compute_seconds > 0 else result.seconds
        self._estimator.observe(st.entry.cost, seconds)
        self._emit(Done(record, result))

    async def _settle_failed(self, st: _Running, error: str) -> None:
        record = await self._write(st, "mark_failed", lambda: self._store.mark_failed(st.job_id, error))
        if record is not None:
            self._emit(Failed(record, error))

    async def _settle_cancelled(self, st: _Running) -> None:
        record = await self._write(st, "mark_cancelled", lambda: self._store.mark_cancelled(st.job_id))
        if record is not None:
            self._emit(Cancelled(record))

    async def _settle_requeue(self, st: _Running, error: str, *, back_in_line: bool) -> None:
        """running → queued in the store; with ``back_in_line`` also to the front of its band
        here (otherwise it resumes from the store after a restart)."""
        # A prefetched job interrupted by a shutdown while it still waited inside the engine never
        # ran: that attempt does not count against max_attempts (an engine failure always does).
        used = st.engine_started or not self._prefetch() or back_in_line
        record = await self._write(st, "requeue", lambda: self._store.requeue(st.job_id, error, attempt_used=used))
        if record is None or not back_in_line or self._stopping:
            return
        entry = self._entry(record, enqueued_at=st.entry.enqueued_at)
        self._push(entry, front=True)
        self._publish_positions()
        self._wake.set()

    # ------------------------------------------------------------------ helpers
    def _entry(self, record: R, *, enqueued_at: float | None = None) -> QueueEntry:
        return QueueEntry(
            job_id=record.id,
            owner_id=record.owner_id,
            cost=float(record.cost),
            band=int(record.band),
            enqueued_at=enqueued_at,
            payload=record,
            guild_id=record.guild_id,
        )

    def _slots(self) -> int:
        try:
            return int(self._engine.slots)
        except Exception:
            return 0

    def _prefetch(self) -> int:
        try:
            return max(0, int(getattr(self._engine, "prefetch", 0)))
        except Exception:
            return 0

    def _slots_in_use(self) -> int:
        return sum(1 for st in self._running.values() if st.holds_slot)

    def _free_slot(self, st: _Running) -> None:
        if st.holds_slot:
            st.holds_slot = False
            self._wake.set()

    def _running_count(self, owner_id: int) -> int:
        return sum(1 for st in self._running.values() if st.entry.owner_id == owner_id)

    def _walk_queue(self) -> Iterator[tuple[int, QueueEntry, int, float]]:
        """(position, entry, band, ETA) for every queued job, in pop order."""
        running = sum(st.remaining_cost() for st in self._running.values())
        slots = max(1, self._slots())
        ahead = 0.0
        for position, (entry, band) in enumerate(self._queue.ranked(), start=1):
            eta = self._estimator.eta(cost_ahead=ahead, running_remaining=running, own_cost=entry.cost, slots=slots)
            yield position, entry, band, eta if math.isfinite(eta) else 0.0
            ahead += entry.cost

    @staticmethod
    def _view(position: int, entry: QueueEntry, band: int, eta: float) -> JobView:
        return JobView(
            job_id=entry.job_id,
            owner_id=entry.owner_id,
            status="queued",
            position=position,
            band=band,
            cost=entry.cost,
            eta=eta,
            attempts=entry.payload.attempts,
            record=entry.payload,
        )

    def _queued_views(self) -> list[JobView]:
        return [self._view(*step) for step in self._walk_queue()]

    def _queued_view(self, job_id: str) -> JobView | None:
        """One queued job's view (position and ETA need only the jobs ahead of it)."""
        if job_id not in self._queue:
            return None
        for step in self._walk_queue():
            if step[1].job_id == job_id:
                return self._view(*step)
        return None  # pragma: no cover - it is queued

    async def _send_cancel(self, st: _Running) -> None:
        st.cancel_unsent = not await self._engine_cancel(st.job_id)

    async def _engine_cancel(self, job_id: str) -> bool:
        try:
            return bool(await asyncio.wait_for(self._engine.cancel(job_id), self._stop_timeout))
        except Exception:
            log.warning("job=%s the engine did not take the cancellation", job_id, exc_info=True)
            return False
