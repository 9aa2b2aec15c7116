"""Telling a job's events: to every listener (delivery, metrics, coordination), and to whoever
follows one job (`subscribe`), starting with where the job stands so nothing is missed by
following late. The final events of recent jobs are kept for late followers, with their images
only for the latest few (image bytes are big)."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from cachetools import LRUCache

from bot.queue.ports import FINAL_STATUSES, JobRecordLike, UnknownJob, terminal_event
from engine.jobs.events import TERMINAL_EVENTS, Done, JobEvent

log = logging.getLogger(__name__)


class EventBus:
    """``current(job_id)`` says where a job stands now (its events so far: None when it is
    neither queued nor running here); ``read(job_id)`` reads its record from the store."""

    def __init__(
        self,
        *,
        current: Callable[[str], list[JobEvent] | None],
        read: Callable[[str], Awaitable[JobRecordLike | None]],
        history: int = 256,
        results_kept: int = 16,
    ) -> None:
        self._current = current
        self._read = read
        self._history: LRUCache[str, JobEvent] = LRUCache(maxsize=history)
        self._results_kept = results_kept
        self._with_result: deque[str] = deque()
        self._subscribers: dict[str, set[asyncio.Queue[JobEvent]]] = {}
        self._listeners: list[Callable[[JobEvent], object]] = []
        self._background: set[asyncio.Future[Any]] = set()

    def on_event(self, callback: Callable[[JobEvent], object]) -> Callable[[], None]:
        """Call ``callback(event)`` for every event of every job (a coroutine result is run as a
        task). Exceptions are logged, never propagated. Returns a function that unregisters."""
        self._listeners.append(callback)

        def remove() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return remove

    def ended(self, job_id: str) -> JobEvent | None:
        """The final event of a job that ended recently here."""
        return self._history.get(job_id)

    def subscribe(self, job_id: str) -> AsyncIterator[JobEvent]:
        """The job's events, starting with its current state, ending after its final event.
        Raises ``UnknownJob`` (on first iteration) for an id the store does not know."""
        return self._subscription(job_id)

    async def _subscription(self, job_id: str) -> AsyncIterator[JobEvent]:
        inbox: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._subscribers.setdefault(job_id, set()).add(inbox)
        try:
            # In the same tick as the registration: nothing can fall in between.
            ended = self._history.get(job_id)
            current = [ended] if ended is not None else self._current(job_id)
            if current is None:
                record = await self._read(job_id)
                if record is None:
                    raise UnknownJob(job_id)
                if record.status in FINAL_STATUSES and inbox.empty():
                    yield terminal_event(record)
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

    def emit(self, event: JobEvent) -> None:
        job_id = event.job_id
        if isinstance(event, TERMINAL_EVENTS):
            self._keep(job_id, event)
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

    def _keep(self, job_id: str, event: JobEvent) -> None:
        self._history[job_id] = event
        if isinstance(event, Done) and event.result is not None:
            self._with_result.append(job_id)
            while len(self._with_result) > self._results_kept:
                past = self._history.get(old := self._with_result.popleft())
                if isinstance(past, Done):
                    self._history[old] = Done(None, record=past.record)

    def _background_done(self, future: asyncio.Future[Any]) -> None:
        self._background.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("event listener failed", exc_info=future.exception())


__all__ = ["EventBus"]
