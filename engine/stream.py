"""The async iterator an engine client's `submit` returns, shared by the local and Ray clients.

The client puts a job's Progress items, then its Result (or the exception that ends it), on the
job's queue; the stream hands them out in order and stops after the Result or the exception.
Closing the stream early cancels the job if it has not finished.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from engine.api import Result
from engine.jobs import Job
from engine.jobs.events import Progress


class StreamedJob(Protocol):
    """A client's bookkeeping of one submitted job, as far as its stream needs it."""

    job: Job
    queue: asyncio.Queue[Progress | Result | BaseException]
    finished: bool  # the client put the job's last item on the queue


class JobStream:
    def __init__(
        self,
        cancel: Callable[[str], Awaitable[Any]],
        state: StreamedJob | None,
        error: BaseException | None = None,
    ) -> None:
        """``state`` is None with ``error``: a job refused at submit time raises it at once."""
        self._cancel = cancel
        self._state = state
        self._error = error
        self._done = False

    def __aiter__(self) -> JobStream:
        return self

    async def __anext__(self) -> Progress | Result:
        if self._done:
            raise StopAsyncIteration
        if self._error is not None:
            self._done = True
            raise self._error
        assert self._state is not None
        item = await self._state.queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if isinstance(item, Result):
            self._done = True
        return item

    async def aclose(self) -> None:
        """Stop listening; a job still waiting or running is cancelled."""
        if not self._done and self._state is not None and not self._state.finished:
            await self._cancel(self._state.job.job_id)
        self._done = True
