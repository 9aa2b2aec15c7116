"""Messages between the bot process (engine.client) and the engine child process (engine.worker).

Every message is a small frozen dataclass pickled over one duplex `multiprocessing.Pipe`; job
specs, `Progress` and `Result` come from engine.jobs and engine.api unchanged.

Parent → child::

    Submit(job)          queue a job (the child runs jobs one at a time, in order received)
    SubmitBatch(jobs)    queue jobs of one shape to run as ONE batched call (engine.batch); each
                         member is still told, cancelled and answered on its own
    Cancel(job_id)       cancel a queued or running job (ignored when unknown or finished)
    Shutdown(drain)      stop: finish the running job (drain=True) or abort it, report queued
                         jobs as Failed(retryable), then exit 0

Child → parent::

    Ready(...)           sent once, after the registry and Runner are loaded (or Fatal instead);
                         says how many images a batch may make there (`max_batch`)
    Fatal(message)       start-up failed (model missing, bad config…); the child then exits 1
    Started(job_id)      the job left the queue and is running: from now on a crash fails it
    Progress             engine.jobs.events.Progress, as the Runner reports it
    Computed(job_id)     the pipeline work is over; the images are being encoded (in a thread,
                         while the next job may already run): the job no longer holds the slot
    Done(result, stats)  the job finished: engine.api.Result plus worker-side timings
    Failed(...)          the job did not finish: cancelled, bad input (retryable=False), or an
                         engine-side error (retryable=True)

A job's messages are ordered (Started, Progress…, Computed, then Done or Failed), but messages of
different jobs may interleave: images are encoded in a thread while the next job already runs, and
the members of a batch are told each step in turn. A batch member's cancel is answered at once
while other members still run (its images are dropped); the batch stops when all are cancelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from config.addons import ControlNetSettings, EmbeddingSettings, LoraSettings, ModelSettings
from config.settings import EngineSettings, GenerationSettings, Settings
from engine.jobs import Job
from engine.jobs.events import Done, Failed, JobStats, Progress, Started
from engine.styles import Catalog

# "module:function" building the Runner in the child; tests may name a stand-in.
DEFAULT_RUNNER_FACTORY = "engine.worker:build_runner"


@dataclass(frozen=True)
class WorkerConfig:
    """What the child needs, passed at spawn (plain pydantic sections, no env or files read)."""

    models: dict[str, ModelSettings]
    default_model: str
    engine: EngineSettings
    generation: GenerationSettings
    runner_factory: str = DEFAULT_RUNNER_FACTORY
    log_level: str = "INFO"
    controlnets: dict[str, ControlNetSettings] = field(default_factory=dict)
    loras: dict[str, LoraSettings] = field(default_factory=dict)
    embeddings: dict[str, EmbeddingSettings] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings, runner_factory: str = DEFAULT_RUNNER_FACTORY) -> WorkerConfig:
        """What an engine process or a Ray replica is built with."""
        return cls(
            models=dict(settings.models),
            default_model=settings.default_model,
            engine=settings.engine,
            generation=settings.generation,
            runner_factory=runner_factory,
            log_level=settings.logging.level,
            controlnets=dict(settings.controlnets),
            loras=dict(settings.loras),
            embeddings=dict(settings.embeddings),
        )

    def catalog(self) -> Catalog:
        """The LoRAs, embeddings and draft adapters jobs are checked against and run with."""
        return Catalog(
            loras=self.loras, embeddings=self.embeddings, models=self.models, default_model=self.default_model
        )


# ---------------------------------------------------------------------------- parent → child


@dataclass(frozen=True)
class Submit:
    job: Job


@dataclass(frozen=True)
class SubmitBatch:
    jobs: tuple[Job, ...]


@dataclass(frozen=True)
class Cancel:
    job_id: str


@dataclass(frozen=True)
class Shutdown:
    drain: bool = True


# ---------------------------------------------------------------------------- child → parent


@dataclass(frozen=True)
class Ready:
    pid: int
    # Importing torch/diffusers, then building the registry + Runner and loading the default model.
    import_seconds: float
    load_seconds: float
    detail: str = ""
    # The most images one batched call makes there (config.settings.EngineSettings.batch_limit).
    max_batch: int = 1


@dataclass(frozen=True)
class Fatal:
    message: str


@dataclass(frozen=True)
class Computed:
    job_id: str


ToWorker = Submit | SubmitBatch | Cancel | Shutdown
FromWorker = Ready | Fatal | Started | Progress | Computed | Done | Failed

__all__ = [
    "DEFAULT_RUNNER_FACTORY",
    "Cancel",
    "Computed",
    "Done",
    "Failed",
    "Fatal",
    "FromWorker",
    "JobStats",
    "Ready",
    "Shutdown",
    "Started",
    "Submit",
    "SubmitBatch",
    "ToWorker",
    "WorkerConfig",
]
