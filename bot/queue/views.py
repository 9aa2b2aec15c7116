"""What members see of the queue: each job's place and ETA (`QueueViews`), and telling a queued
job when its place changes (`Positions`), without walking the whole queue on every change."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator, Mapping

from bot.queue.eta import EtaEstimator
from bot.queue.fairqueue import FairQueue, QueueEntry
from bot.queue.ports import JobView
from bot.queue.runs import JobRun
from engine.jobs.events import JobEvent, Queued

# Seconds between two walks of the whole queue for position changes: a queue card is edited at
# most every 2 s anyway, and in a burst every enqueue moves hundreds of queued jobs.
MOVES_EVERY = 0.5


class QueueViews:
    def __init__(
        self,
        queue: FairQueue,
        running: Mapping[str, JobRun],
        estimator: EtaEstimator,
        slots: Callable[[], int],
    ) -> None:
        self._queue = queue
        self._running = running
        self.estimator = estimator
        self._slots = slots

    def walk(self) -> Iterator[tuple[int, QueueEntry, int, float]]:
        """(position, entry, band, ETA) for every queued job, in pop order."""
        running = sum(st.remaining_cost() for st in self._running.values())
        slots = max(1, self._slots())
        ahead = 0.0
        for position, (entry, band) in enumerate(self._queue.ranked(), start=1):
            eta = self.estimator.eta(cost_ahead=ahead, running_remaining=running, own_cost=entry.cost, slots=slots)
            yield position, entry, band, eta if math.isfinite(eta) else 0.0
            ahead += entry.cost

    @staticmethod
    def queued(position: int, entry: QueueEntry, band: int, eta: float) -> JobView:
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

    def queued_view(self, job_id: str) -> JobView | None:
        """One queued job's view: its place and the units ahead of it, kept by the queue until
        the order changes, so a burst's views are not one walk each; the same figures as `walk`."""
        band = self._queue.effective_band(job_id)  # first: it applies any aging due
        place = self._queue.place(job_id)
        entry = self._queue.get(job_id)
        if place is None or entry is None or band is None:
            return None
        position, ahead = place
        running = sum(st.remaining_cost() for st in self._running.values())
        eta = self.estimator.eta(
            cost_ahead=ahead, running_remaining=running, own_cost=entry.cost, slots=max(1, self._slots())
        )
        return self.queued(position, entry, band, eta if math.isfinite(eta) else 0.0)

    def running_views(self) -> list[JobView]:
        return [
            JobView(
                job_id=st.job_id,
                owner_id=st.entry.owner_id,
                status="running",
                position=0,
                band=st.entry.band,
                cost=st.entry.cost,
                eta=self.estimator.seconds_for(st.remaining_cost()),
                attempts=st.record.attempts,
                record=st.record,
                progress=st.progress,
            )
            for st in sorted(self._running.values(), key=lambda s: s.started_at)
        ]

    def snapshot(self) -> list[JobView]:
        """Running jobs (oldest first), then queued jobs in the order they will run."""
        return self.running_views() + [self.queued(*step) for step in self.walk()]

    def queued_for(self, owner_id: int) -> list[JobView]:
        """One user's running and queued jobs."""
        return [v for v in self.running_views() if v.owner_id == owner_id] + [
            self.queued(*step) for step in self.walk() if step[1].owner_id == owner_id
        ]

    def eta(self, job_id: str) -> float | None:
        """Estimated seconds until the job is done; None when it is neither queued nor running."""
        st = self._running.get(job_id)
        if st is not None:
            return self.estimator.seconds_for(st.remaining_cost())
        view = self.queued_view(job_id)
        return None if view is None else view.eta


class Positions:
    """`Queued` for every queued job whose position changed since it was last told, once per
    event-loop turn however many changes it had (a burst of enqueues would otherwise recompute
    every position and ETA once per job); a job new in the queue (or back in it) learns its place
    at once, the others' moves wait for the next walk, at most every MOVES_EVERY seconds."""

    def __init__(self, views: QueueViews, emit: Callable[[JobEvent], None]) -> None:
        self._views = views
        self._emit = emit
        self._last_position: dict[str, int] = {}
        self._due = False
        self._unannounced: set[str] = set()  # queued jobs not told their place yet
        self._walked_at = -math.inf  # loop time of the last full walk
        self._timer: asyncio.TimerHandle | None = None

    def new(self, job_id: str) -> None:
        """A job entered the queue (or came back to it): it is told its place on the next turn."""
        self._unannounced.add(job_id)

    def gone(self, job_id: str) -> None:
        """The job left the queue (started, ended, or was dropped)."""
        self._last_position.pop(job_id, None)

    def publish(self) -> None:
        if not self._due:
            self._due = True
            asyncio.get_running_loop().call_soon(self._publish_now)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _publish_now(self, *, walk: bool = False) -> None:
        self._due = False
        loop = asyncio.get_running_loop()
        if not walk and loop.time() - self._walked_at < MOVES_EVERY:
            for job_id in self._unannounced:
                view = self._views.queued_view(job_id)
                if view is not None:
                    self._tell(job_id, view.position, view.eta, view.attempts)
            self._unannounced.clear()
            if self._timer is None:
                self._timer = loop.call_at(self._walked_at + MOVES_EVERY, self._walk)
            return
        self._walked_at = loop.time()
        self._unannounced.clear()
        for position, entry, _, eta in self._views.walk():
            if self._last_position.get(entry.job_id) != position:
                self._tell(entry.job_id, position, eta, entry.payload.attempts)

    def _walk(self) -> None:
        self._timer = None
        self._publish_now(walk=True)

    def _tell(self, job_id: str, position: int, eta: float, attempts: int) -> None:
        self._last_position[job_id] = position
        self._emit(Queued(job_id, position, eta, attempts))


__all__ = ["MOVES_EVERY", "Positions", "QueueViews"]
