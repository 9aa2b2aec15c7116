"""The steps of running jobs that do not depend on how messages travel: the pipe worker
(engine.worker) and each Ray Serve replica (engine.ray_serve) call these, so both backends load
the same way, refuse the same jobs, run batches the same way and produce the same bytes.

`run_members` runs what one engine call received: one job, or a batch of jobs of one shape
(engine.batch). It tells the caller, per member, exactly what a job run alone would have told:
a bad input or a failure as that member's `Failed`, a cancel as its cancelled `Failed`, and its
images for encoding. A batch that fails fails each member on its own (retryable or not, as the
exception says), so the bot retries or fails each job as it would a single one.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from engine import styles
from engine.api import EngineError, JobCancelled, Result
from engine.jobs import Job, Limits
from engine.jobs.events import Progress
from engine.pnginfo import encode_image
from engine.protocol import DEFAULT_RUNNER_FACTORY, Failed, Ready, WorkerConfig
from engine.validate import ValidationFailed

log = logging.getLogger("atelier.engine.worker")


class GeneratedLike(Protocol):
    @property
    def image(self) -> Any: ...
    @property
    def seed(self) -> int: ...


class RunnerLike(Protocol):
    def run(
        self, job: Job, *, on_progress: Callable[[Progress], None], cancelled: Callable[[], bool]
    ) -> Sequence[GeneratedLike]: ...


class BatchRunnerLike(RunnerLike, Protocol):
    def run_batch(
        self, jobs: Sequence[Job], *, on_progress: Callable[[Progress], None], cancelled: Callable[[str], bool]
    ) -> Sequence[Sequence[GeneratedLike]]: ...


def version() -> str:
    try:
        from importlib.metadata import version

        return f"Atelier {version('atelier')}"
    except Exception:
        return "Atelier"


def source_name(source: str) -> str:
    """A short name for a model source: a file's stem, a folder's name, or the hub id."""
    path = Path(source)
    if path.suffix.lower() == ".safetensors":
        return path.stem
    if source and path.exists():
        return path.name
    return source


def _thread_lock_for_tqdm() -> None:
    """diffusers' progress bars (tqdm) would create a multiprocessing lock, a named semaphore the
    resource tracker reports as leaked whenever the worker is killed. A thread lock is enough."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.set_lock(threading.RLock())


def _resolve(path: str) -> Callable[[WorkerConfig], RunnerLike]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------- start-up


def set_torch_threads(config: WorkerConfig) -> None:
    """Apply engine.torch_threads to the calling thread (OpenMP keeps the setting per thread)."""
    if config.engine.torch_threads > 0:
        import torch

        torch.set_num_threads(config.engine.torch_threads)


def max_batch(config: WorkerConfig, runner: Any) -> int:
    """Images one batched call may make here: `engine.max_batch`, by default by the device the
    models run on (config.settings.EngineSettings.batch_limit); 1 for a runner that cannot batch."""
    if not callable(getattr(runner, "run_batch", None)):
        return 1
    registry = getattr(runner, "registry", None)
    device = getattr(getattr(registry, "device", None), "type", None) or config.engine.device
    return config.engine.batch_limit("cpu" if device == "auto" else str(device))


def load_runner(config: WorkerConfig) -> tuple[RunnerLike, Ready]:
    """Import torch/diffusers, build the Runner with the default model loaded; raise on failure.
    The returned Ready holds this process's timings and batch size."""
    started = time.perf_counter()
    set_torch_threads(config)
    _thread_lock_for_tqdm()
    if config.runner_factory == DEFAULT_RUNNER_FACTORY:
        importlib.import_module("engine.pipelines")  # torch + diffusers: timed apart
    factory = _resolve(config.runner_factory)
    imported = time.perf_counter()
    runner = factory(config)
    freeze_loaded_heap()
    loaded = time.perf_counter()
    detail = f"{gc.get_freeze_count()} objects frozen"
    if "torch" in sys.modules:
        detail = f"torch threads {sys.modules['torch'].get_num_threads()}, {detail}"
    batch = max_batch(config, runner)
    if batch > 1:
        detail += f", batches of up to {batch} images"
    ready = Ready(
        pid=os.getpid(),
        import_seconds=imported - started,
        load_seconds=loaded - imported,
        detail=detail,
        max_batch=batch,
    )
    return runner, ready


def freeze_loaded_heap() -> None:
    """Take torch's, diffusers' and the loaded models' Python objects (about 400k) out of the
    cyclic garbage collector's sight: they live as long as the process, and each full collection
    walked them all, 230 ms with the job's thread stopped, several times in a run of jobs. Only for
    processes that exist to run jobs (the pipe worker, a Serve replica): frozen objects that later
    die in a reference cycle are never freed."""
    gc.collect()
    gc.freeze()


def model_load_error() -> type[Exception] | None:
    """The registry's load error ("this model cannot be used": not worth a retry), once imported."""
    return getattr(sys.modules.get("engine.models"), "ModelLoadError", None)


# ---------------------------------------------------------------------------- jobs


def check_job(config: WorkerConfig, job: Job) -> Failed | None:
    """The engine-side validation of a job: a non-retryable Failed when its input is bad."""
    generation = config.generation
    limits = Limits(
        models=config.models,
        max_prompt_chars=generation.max_prompt_chars,
        max_attachment_bytes=generation.max_attachment_bytes,
        max_attachment_pixels=generation.max_attachment_pixels,
        upscale_max_side=generation.upscale_max_side,
        catalog=config.catalog(),
    )
    try:
        job.check(limits)
    except ValidationFailed as exc:
        return Failed(job.job_id, exc.message, retryable=False)
    return None


def job_failure(job_id: str, exc: BaseException, load_error: type[Exception] | None) -> Failed:
    """What a Runner exception means for the bot: the job's fault (final) or not (retry)."""
    if isinstance(exc, EngineError):
        return Failed(job_id, str(exc), retryable=exc.retryable)
    if isinstance(exc, ValidationFailed):
        return Failed(job_id, exc.message, retryable=False)
    if isinstance(exc, KeyboardInterrupt | SystemExit):
        raise exc
    # Members see a plain reason; what went wrong (paths, exception text) is for the operator's log.
    if load_error is not None and isinstance(exc, load_error):
        log.error("job=%s: the model cannot be loaded: %s", job_id, exc)
        return Failed(job_id, "The model cannot be loaded right now: tell a moderator.", retryable=False)
    log.error("job=%s failed:\n%s", job_id, "".join(traceback.format_exception(exc)))
    # Not known to be the job's fault (out of memory, a driver error…): let the bot retry it.
    return Failed(job_id, "The engine hit an error while making the image.", retryable=True)


@dataclass
class Made:
    """A member whose images are made: its share of the call's compute time (by images)."""

    job: Job
    images: list[GeneratedLike]
    compute_seconds: float


def run_members(
    config: WorkerConfig,
    runner: RunnerLike,
    jobs: Sequence[Job],
    *,
    send: Callable[[Any], None],
    cancelled: Callable[[str], bool],
    cancel_failure: Callable[[str], Failed | None],
    load_error: type[Exception] | None,
) -> list[Made]:
    """Check and run one call's jobs (one job, or a batch of one shape); return the members whose
    images are made. Every other member has been answered through `send`: its bad input, its
    failure, or `cancel_failure(job_id)` (None: it was answered already)."""
    members: list[Job] = []
    for job in jobs:
        failure = check_job(config, job)
        if failure is not None:
            send(failure)
        else:
            members.append(job)
    if not members:
        return []
    started = time.perf_counter()
    try:
        if len(members) == 1:
            one = members[0]
            outputs = [list(runner.run(one, on_progress=send, cancelled=lambda: cancelled(one.job_id)))]
        else:
            batcher = cast(BatchRunnerLike, runner)  # batches come only where it can (max_batch)
            outputs = [list(images) for images in batcher.run_batch(members, on_progress=send, cancelled=cancelled)]
    except JobCancelled:
        for job in members:
            _answer(send, cancel_failure(job.job_id))
        return []
    except BaseException as exc:
        for job in members:
            send(job_failure(job.job_id, exc, load_error))
        return []
    compute = time.perf_counter() - started
    images_made = sum(len(images) for images in outputs) or 1
    done = []
    for job, images in zip(members, outputs, strict=True):
        if cancelled(job.job_id):  # cancelled while the rest of its batch went on: images dropped
            _answer(send, cancel_failure(job.job_id))
        else:
            done.append(Made(job, images, compute * len(images) / images_made))
    return done


def _answer(send: Callable[[Any], None], failure: Failed | None) -> None:
    if failure is not None:
        send(failure)


def image_params(config: WorkerConfig, job: Job, out: GeneratedLike, version: str) -> dict[str, Any]:
    """The A1111-style parameters written into each image."""
    model = job.model or config.default_model
    params: dict[str, Any] = {
        "prompt": job.prompt,
        "negative": job.negative,
        "steps": job.steps,
        "sampler": job.sampler,
        "cfg": job.cfg,
        "seed": out.seed,
        "width": out.image.width,
        "height": out.image.height,
        "model": model,
    }
    settings = config.models.get(model)
    refiner = source_name(settings.refiner) if settings is not None and settings.refiner else None
    params |= job.image_params(refiner=refiner, refiner_switch=config.engine.high_noise_frac)
    params |= styles.result_params(
        config.catalog(),
        model=model,
        prompt=job.prompt,
        negative=job.negative,
        loras=job.loras,
        style=job.style,
        draft=job.draft,
    )
    params |= getattr(out, "params", None) or {}  # what the kind adds (a ControlNet unit)
    params["job_id"] = job.job_id
    params["version"] = version
    return params


def encode_result(
    config: WorkerConfig,
    job: Job,
    images: list[GeneratedLike],
    *,
    started: float,
    compute_seconds: float,
    version: str,
) -> Result:
    """Encode a finished job's images (PNG with parameters, or the size fallback) into its Result.
    `started` is the job's perf_counter start, for `Result.seconds`."""
    encoded = [
        encode_image(out.image, image_params(config, job, out, version), max_bytes=job.max_image_bytes)
        for out in images
    ]
    # A ControlNet job's control map (engine.control), shown to the member beside the images.
    maps: list[Any] = [m for out in images if (m := getattr(out, "control", None)) is not None]
    control = encode_image(maps[0], {"job_id": job.job_id}, max_bytes=job.max_image_bytes) if maps else None
    return Result(
        job_id=job.job_id,
        images=encoded,
        model=job.model or config.default_model,
        seconds=time.perf_counter() - started,
        compute_seconds=compute_seconds,
        control=control,
    )


__all__ = [
    "BatchRunnerLike",
    "GeneratedLike",
    "Made",
    "RunnerLike",
    "check_job",
    "encode_result",
    "freeze_loaded_heap",
    "image_params",
    "job_failure",
    "load_runner",
    "max_batch",
    "model_load_error",
    "run_members",
    "set_torch_threads",
    "source_name",
    "version",
]
