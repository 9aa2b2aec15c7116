"""The engine child process: load the models once, then run jobs one at a time.

Started by engine.client with the multiprocessing `spawn` context (`worker_main(conn, config)`).
Three threads share one duplex pipe (sends are serialized by a lock):

- the reader thread receives Submit / Cancel / Shutdown at any time: jobs go to a queue, a cancel
  sets the flag the Runner's `cancelled()` reads (so a running job stops within about one step);
- the main thread takes jobs from the queue, runs them through the Runner and streams Progress;
- the encoder thread turns each finished job's images into PNG (or the WebP/JPEG fallback) with
  their parameters and sends the Result, while the main thread already runs the next job.

A load failure is reported as `Fatal` (never a hang); a job's own bad input as a non-retryable
`Failed`; any other exception as a retryable one. When the parent disappears (the pipe reaches
EOF) the child exits at once. See engine.protocol for the messages.
"""

from __future__ import annotations

import gc
import importlib
import logging
import multiprocessing.util
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

from engine.api import EngineError, JobCancelled, Result
from engine.jobs import Job, Limits
from engine.jobs.events import Progress
from engine.pnginfo import encode_image
from engine.protocol import (
    DEFAULT_RUNNER_FACTORY,
    Cancel,
    Computed,
    Done,
    Failed,
    Fatal,
    JobStats,
    Ready,
    Shutdown,
    Started,
    Submit,
    WorkerConfig,
)
from engine.validate import ValidationFailed

log = logging.getLogger("atelier.engine.worker")

# Images of a finished job waiting to be encoded: a small bound keeps memory flat when encoding
# is slower than computing (the main thread then waits).
ENCODE_BACKLOG = 2


class GeneratedLike(Protocol):
    @property
    def image(self) -> Any: ...
    @property
    def seed(self) -> int: ...


class RunnerLike(Protocol):
    def run(
        self, job: Job, *, on_progress: Callable[[Progress], None], cancelled: Callable[[], bool]
    ) -> Sequence[GeneratedLike]: ...


def build_runner(config: WorkerConfig) -> RunnerLike:
    """The real thing: a ModelRegistry with the default model loaded, and the Runner over it."""
    from engine.models import ModelRegistry
    from engine.pipelines import Runner

    registry = ModelRegistry(config.models, config.engine)
    registry.get(config.default_model)
    runner = Runner(registry, config.engine, config.generation)
    warmup = getattr(runner, "warmup", None)
    if config.engine.warmup and callable(warmup):
        warmup()
    return runner


def _resolve(path: str) -> Callable[[WorkerConfig], RunnerLike]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class _Queued:
    job: Job
    received: float


@dataclass
class _Finished:
    job: Job
    images: list[GeneratedLike]
    started: float
    compute_seconds: float
    stats: dict[str, Any]


def _version() -> str:
    try:
        from importlib.metadata import version

        return f"Atelier {version('atelier')}"
    except Exception:
        return "Atelier"


def _source_name(source: str) -> str:
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


# ---------------------------------------------------------------------------- shared with engine.ray_serve
# The steps of running a job that do not depend on how messages travel: the pipe worker below and
# each Ray Serve replica (engine.ray_serve) call these, so both backends produce the same bytes.


def set_torch_threads(config: WorkerConfig) -> None:
    """Apply engine.torch_threads to the calling thread (OpenMP keeps the setting per thread)."""
    if config.engine.torch_threads > 0:
        import torch

        torch.set_num_threads(config.engine.torch_threads)


def load_runner(config: WorkerConfig) -> tuple[RunnerLike, Ready]:
    """Import torch/diffusers, build the Runner with the default model loaded; raise on failure.
    The returned Ready holds this process's timings."""
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
    ready = Ready(pid=os.getpid(), import_seconds=imported - started, load_seconds=loaded - imported, detail=detail)
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


def check_job(config: WorkerConfig, job: Job) -> Failed | None:
    """The engine-side validation of a job: a non-retryable Failed when its input is bad."""
    generation = config.generation
    limits = Limits(
        models=config.models,
        max_prompt_chars=generation.max_prompt_chars,
        max_attachment_bytes=generation.max_attachment_bytes,
        max_attachment_pixels=generation.max_attachment_pixels,
        upscale_max_side=generation.upscale_max_side,
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
    refiner = _source_name(settings.refiner) if settings is not None and settings.refiner else None
    params |= job.image_params(refiner=refiner, refiner_switch=config.engine.high_noise_frac)
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
    return Result(
        job_id=job.job_id,
        images=encoded,
        model=job.model or config.default_model,
        seconds=time.perf_counter() - started,
        compute_seconds=compute_seconds,
    )


class Worker:
    def __init__(self, conn: Connection, config: WorkerConfig) -> None:
        self._conn = conn
        self._config = config
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._queue: queue.Queue[_Queued | None] = queue.Queue()
        self._queued_ids: set[str] = set()
        self._cancelled: set[str] = set()  # the running job, cancelled
        self._skip: set[str] = set()  # queued jobs cancelled (already answered)
        self._current: str | None = None
        self._stopping = False
        self._aborting = threading.Event()
        self._encode_queue: queue.Queue[_Finished | None] = queue.Queue(maxsize=ENCODE_BACKLOG)
        self._previous_end: float | None = None
        self._runner: RunnerLike | None = None
        self._model_load_error: type[Exception] | None = None
        self._version = _version()

    # ------------------------------------------------------------------ plumbing

    def send(self, message: Any) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError):
                # The parent is gone: the reader thread sees EOF and ends the process.
                pass

    def _read_loop(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                if self._stopping:
                    return
                # The parent died without a Shutdown: nobody will read our results.
                os._exit(0)
            except Exception:
                log.exception("unreadable message from the bot process")
                continue
            if isinstance(message, Submit):
                with self._state_lock:
                    self._queued_ids.add(message.job.job_id)
                self._queue.put(_Queued(message.job, time.perf_counter()))
            elif isinstance(message, Cancel):
                with self._state_lock:
                    if message.job_id in self._queued_ids:
                        # Answered now, not when the job reaches the head of the queue.
                        self._queued_ids.discard(message.job_id)
                        self._skip.add(message.job_id)
                        self.send(Failed(message.job_id, "Cancelled.", retryable=False, cancelled=True))
                    elif message.job_id == self._current:
                        self._cancelled.add(message.job_id)
            elif isinstance(message, Shutdown):
                log.info("shutdown requested (drain=%s)", message.drain)
                self._stopping = True
                if not message.drain:
                    self._aborting.set()
                self._queue.put(None)
            else:
                log.warning("unknown message %r", type(message).__name__)

    def _is_cancelled(self, job_id: str) -> bool:
        return job_id in self._cancelled or self._aborting.is_set()

    # ------------------------------------------------------------------ start-up

    def load(self) -> bool:
        try:
            self._runner, ready = load_runner(self._config)
        except BaseException as exc:
            log.error("engine start-up failed:\n%s", traceback.format_exc())
            self.send(Fatal(f"{type(exc).__name__}: {exc}"))
            return False
        self._model_load_error = model_load_error()
        self.send(ready)
        log.info("engine ready in %.2f s (%s)", ready.import_seconds + ready.load_seconds, ready.detail)
        return True

    # ------------------------------------------------------------------ jobs

    def serve(self) -> bool:
        """Load, then run jobs until Shutdown. False when loading failed (Fatal was sent)."""
        if not self.load():
            return False
        reader = threading.Thread(target=self._read_loop, name="engine-reader", daemon=True)
        encoder = threading.Thread(target=self._encode_loop, name="engine-encoder", daemon=True)
        reader.start()
        encoder.start()
        while True:
            item = self._queue.get()
            if item is None:
                break
            if self._stopping:
                self.send(Failed(item.job.job_id, "The engine is shutting down.", retryable=True))
                continue
            self._run(item)
        # Jobs that arrived after the Shutdown.
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                self.send(Failed(item.job.job_id, "The engine is shutting down.", retryable=True))
        self._encode_queue.put(None)
        encoder.join()
        return True

    def _run(self, item: _Queued) -> None:
        job = item.job
        job_id = job.job_id
        with self._state_lock:
            if job_id in self._skip:
                self._skip.discard(job_id)
                return
            self._queued_ids.discard(job_id)
            self._current = job_id
        started = time.perf_counter()
        idle = None if self._previous_end is None else started - self._previous_end
        back_to_back = self._previous_end is not None and item.received <= self._previous_end
        self.send(Started(job_id))
        try:
            failure = self._check(job)
            if failure is not None:
                self.send(failure)
                return
            assert self._runner is not None
            images = self._runner.run(job, on_progress=self.send, cancelled=lambda: self._is_cancelled(job_id))
            compute = time.perf_counter() - started
        except JobCancelled:
            if self._aborting.is_set() and job_id not in self._cancelled:
                self.send(Failed(job_id, "The engine shut down before the job finished.", retryable=True))
            else:
                self.send(Failed(job_id, "Cancelled.", retryable=False, cancelled=True))
            return
        except BaseException as exc:
            self.send(self._failure(job_id, exc))
            return
        finally:
            with self._state_lock:
                self._current = None
                self._cancelled.discard(job_id)
            self._previous_end = time.perf_counter()
        self.send(Computed(job_id))
        stats = {
            "wait_seconds": started - item.received,
            "idle_seconds": idle,
            "back_to_back": back_to_back,
        }
        self._encode_queue.put(_Finished(job, list(images), started, compute, stats))

    def _check(self, job: Job) -> Failed | None:
        return check_job(self._config, job)

    def _failure(self, job_id: str, exc: BaseException) -> Failed:
        return job_failure(job_id, exc, self._model_load_error)

    # ------------------------------------------------------------------ results

    def _encode_loop(self) -> None:
        while True:
            item = self._encode_queue.get()
            if item is None:
                return
            started = time.perf_counter()
            job = item.job
            try:
                result = encode_result(
                    self._config,
                    job,
                    item.images,
                    started=item.started,
                    compute_seconds=item.compute_seconds,
                    version=self._version,
                )
            except Exception as exc:
                log.error("job=%s encoding failed:\n%s", job.job_id, traceback.format_exc())
                self.send(Failed(job.job_id, f"Encoding failed: {exc}", retryable=True))
                continue
            finished = time.perf_counter()
            stats = JobStats(
                job_id=job.job_id,
                compute_seconds=item.compute_seconds,
                encode_seconds=finished - started,
                **item.stats,
            )
            self.send(Done(result, stats=stats))

    def image_params(self, job: Job, out: GeneratedLike) -> dict[str, Any]:
        """The A1111-style parameters written into each image."""
        return image_params(self._config, job, out, self._version)


def worker_main(conn: Connection, config: WorkerConfig) -> None:
    """Entry point of the child process."""
    # Ctrl+C in a terminal reaches the whole process group: the bot decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    logging.basicConfig(
        level=config.log_level,
        stream=sys.stderr,
        format="%(asctime)s engine[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    worker = Worker(conn, config)
    code = 1
    try:
        code = 0 if worker.serve() else 1
    finally:
        with worker._send_lock:
            conn.close()
        log.info("engine stopped")
        logging.shutdown()
        try:
            # What a normal exit runs: releases named semaphores (tqdm makes one) so the resource
            # tracker has nothing to warn about.
            getattr(multiprocessing.util, "_exit_function")()  # noqa: B009 - private, no stub
        except Exception:
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        # Skip interpreter teardown (seconds with torch loaded): everything is sent and closed.
        os._exit(code)


__all__ = [
    "RunnerLike",
    "Worker",
    "build_runner",
    "check_job",
    "encode_result",
    "image_params",
    "job_failure",
    "load_runner",
    "model_load_error",
    "set_torch_threads",
    "worker_main",
]
