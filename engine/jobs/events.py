"""A job's life, told the same way by the engine and the bot.

The engine process reports `Started`, `Progress`…, then `Done` or `Failed` (`engine.protocol`);
the bot's scheduler tells its listeners the same events, plus where a job waits (`Queued`) and how
it ended for good (`Done`, `Failed`, `Cancelled`: then with the job's final `record` from the
job store). `ProgressEvent` is the bot's: a job's latest `Progress`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Phase = Literal["load", "base", "refiner", "upscale", "decode", "encode"]


@dataclass(frozen=True)
class Progress:
    job_id: str
    step: int
    total: int
    phase: Phase
    # A small encoded preview (JPEG) of the current denoised estimate, every N steps.
    preview: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class JobStats:
    """The engine's timings of one job (perf_counter seconds in the engine process)."""

    job_id: str
    # Received → started (time spent queued in the engine).
    wait_seconds: float
    # Previous job's compute end → this job's start; None for the first job of a process.
    idle_seconds: float | None
    # True when this job was already waiting when the previous compute ended: then
    # `idle_seconds` is pure engine overhead between back-to-back jobs.
    back_to_back: bool
    compute_seconds: float
    encode_seconds: float


@dataclass(frozen=True)
class Queued:
    """Where a job waits (again whenever its position changes)."""

    job_id: str
    position: int
    eta: float
    """Estimated seconds until the job is done."""
    attempt: int = 0
    """Attempts already made (> 0: waiting again after an engine failure)."""


@dataclass(frozen=True)
class Started:
    job_id: str
    attempt: int = 0


@dataclass(frozen=True)
class ProgressEvent:
    job_id: str
    progress: Progress


@dataclass(frozen=True)
class Done:
    """The job finished. `result` (engine.api.Result) is None when the bot replays the end of a
    job it no longer holds in memory: the images are then in `record.images`."""

    result: Any
    stats: JobStats | None = None
    record: Any = None

    @property
    def job_id(self) -> str:
        return str(self.result.job_id if self.result is not None else self.record.id)


@dataclass(frozen=True)
class Failed:
    """The job did not finish: the engine says whether it was cancelled or may be retried; the
    bot's final Failed (no retry left) carries the record. `error` is what members may read."""

    job_id: str
    error: str
    retryable: bool = False
    cancelled: bool = False
    record: Any = None

    @property
    def message(self) -> str:
        return self.error


@dataclass(frozen=True)
class Cancelled:
    """The job was cancelled for good (by its owner, a moderator, or a ban) and refunded."""

    record: Any

    @property
    def job_id(self) -> str:
        return str(self.record.id)


JobEvent = Queued | Started | ProgressEvent | Done | Failed | Cancelled
TERMINAL_EVENTS = (Done, Failed, Cancelled)

__all__ = [
    "TERMINAL_EVENTS",
    "Cancelled",
    "Done",
    "Failed",
    "JobEvent",
    "JobStats",
    "Phase",
    "Progress",
    "ProgressEvent",
    "Queued",
    "Started",
]
