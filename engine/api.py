"""What the bot can ask of an engine (`EngineClient`) and what comes back: the images
(`Result`), the engine's health, and the two ways a job can end without a result. The jobs
themselves are engine.jobs; their lifecycle events are engine.jobs.events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from engine.jobs import Job
from engine.jobs.events import Progress

ImageFormat = Literal["png", "webp", "jpeg"]


@dataclass(frozen=True)
class ImageOut:
    data: bytes = field(repr=False)
    format: ImageFormat
    seed: int
    width: int
    height: int

    @property
    def filename_suffix(self) -> str:
        return "jpg" if self.format == "jpeg" else self.format


@dataclass(frozen=True)
class Result:
    job_id: str
    images: list[ImageOut]
    model: str
    seconds: float
    # Pure compute time (pipeline calls), without loading/encoding: the scheduler's ETA source.
    compute_seconds: float = 0.0
    # The control map a ControlNet job followed (edges, depth or pose), shown beside its images.
    control: ImageOut | None = None


class EngineError(Exception):
    """A job failed in the engine. `retryable` is True when the failure was not the job's fault
    (the process died, a replica was lost) and the job should go back to the queue. The message is
    what members may read; `detail` (paths, exception text) is for the operator's log only."""

    def __init__(self, message: str, *, retryable: bool, detail: str = "") -> None:
        super().__init__(message)
        self.retryable = retryable
        self.detail = detail


class JobCancelled(Exception):
    """The job was cancelled before it finished."""


@dataclass(frozen=True)
class EngineHealth:
    alive: bool
    slots: int
    busy: int
    restarts: int
    detail: str = ""


class EngineClient(Protocol):
    """What the bot's scheduler needs from an engine, local process or distributed.

    `submit` yields Progress items and ends with exactly one Result; it raises EngineError
    (check `retryable`) or JobCancelled instead when the job does not finish. `slots` is how
    many jobs may run at once (one per GPU). `prefetch` is how many more jobs per slot may be
    submitted ahead: they wait inside the engine and start the moment a slot frees, so the GPU
    does not idle while the bot hands over the next job (0: submit to free slots only).
    """

    @property
    def slots(self) -> int: ...
    @property
    def prefetch(self) -> int: ...

    async def start(self) -> None: ...

    def submit(self, job: Job) -> AsyncIterator[Progress | Result]: ...

    async def cancel(self, job_id: str) -> bool: ...

    async def close(self) -> None: ...

    def health(self) -> EngineHealth: ...
