"""The engine child process: load the models once, then run jobs (or batches of jobs) one at a time.

Started by engine.client with the multiprocessing `spawn` context (`worker_main(conn, config)`).
Three threads share one duplex pipe (sends are serialized by a lock):

- the reader thread receives Submit / Cancel / Shutdown at any time: jobs go to a queue, a cancel
  sets the flag the Runner's `cancelled()` reads (so a running job stops within about one step);
- the main thread takes jobs from the queue, runs them through the Runner and streams Progress
  (a batch, engine.protocol.SubmitBatch, is one item: its members start and compute together);
- the encoder thread turns each finished job's images into PNG (or the WebP/JPEG fallback) with
  their parameters and sends the Result, while the main thread already runs the next job.

A load failure is reported as `Fatal` (never a hang); a job's own bad input as a non-retryable
`Failed`; any other exception as a retryable one. When the parent disappears (the pipe reaches
EOF) the child exits at once. See engine.protocol for the messages.
"""

from __future__ import annotations

import logging
import multiprocessing.util
import os
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from engine.jobs import Job
from engine.protocol import (
    Cancel,
    Computed,
    Done,
    Failed,
    Fatal,
    JobStats,
    Shutdown,
    Started,
    Submit,
    SubmitBatch,
    WorkerConfig,
)
from engine.serving import (
    GeneratedLike,
    RunnerLike,
    encode_result,
    image_params,
    load_runner,
    model_load_error,
    run_members,
    version,
)

log = logging.getLogger("atelier.engine.worker")

# Images of a finished job waiting to be encoded: a small bound keeps memory flat when encoding
# is slower than computing (the main thread then waits).
ENCODE_BACKLOG = 2


def build_runner(config: WorkerConfig) -> RunnerLike:
    """The real thing: a ModelRegistry with the default model loaded, and the Runner over it."""
    from engine.models import ModelRegistry
    from engine.pipelines import Runner

    registry = ModelRegistry(config.models, config.engine, controlnets=config.controlnets)
    registry.get(config.default_model)
    runner = Runner(registry, config.engine, config.generation, catalog=config.catalog())
    warmup = getattr(runner, "warmup", None)
    if config.engine.warmup and callable(warmup):
        warmup()
    return runner


@dataclass
class _Queued:
    jobs: tuple[Job, ...]  # one job, or a batch of one shape
    received: float


@dataclass
class _Finished:
    job: Job
    images: list[GeneratedLike]
    started: float
    compute_seconds: float
    stats: dict[str, Any]


class Worker:
    def __init__(self, conn: Connection, config: WorkerConfig) -> None:
        self._conn = conn
        self._config = config
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._queue: queue.Queue[_Queued | None] = queue.Queue()
        self._queued_ids: set[str] = set()
        self._cancelled: set[str] = set()  # running jobs, cancelled
        self._answered: set[str] = set()  # running batch members whose cancel was answered at once
        self._skip: set[str] = set()  # queued jobs cancelled (already answered)
        self._running: set[str] = set()  # the job, or the batch's members, running now
        self._stopping = False
        self._aborting = threading.Event()
        self._encode_queue: queue.Queue[_Finished | None] = queue.Queue(maxsize=ENCODE_BACKLOG)
        self._previous_end: float | None = None
        self._runner: RunnerLike | None = None
        self._model_load_error: type[Exception] | None = None
        self._version = version()

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
            if isinstance(message, Submit | SubmitBatch):
                jobs = (message.job,) if isinstance(message, Submit) else tuple(message.jobs)
                with self._state_lock:
                    self._queued_ids.update(job.job_id for job in jobs)
                self._queue.put(_Queued(jobs, time.perf_counter()))
            elif isinstance(message, Cancel):
                self._cancel(message.job_id)
            elif isinstance(message, Shutdown):
                log.info("shutdown requested (drain=%s)", message.drain)
                self._stopping = True
                if not message.drain:
                    self._aborting.set()
                self._queue.put(None)
            else:
                log.warning("unknown message %r", type(message).__name__)

    def _cancel(self, job_id: str) -> None:
        with self._state_lock:
            if job_id in self._queued_ids:
                # Answered now, not when the job reaches the head of the queue.
                self._queued_ids.discard(job_id)
                self._skip.add(job_id)
                self.send(Failed(job_id, "Cancelled.", retryable=False, cancelled=True))
            elif job_id in self._running:
                self._cancelled.add(job_id)
                if self._running - self._cancelled:
                    # A batch member: the others run on, so its member need not wait for the
                    # batch to stop (it does not); its images will be dropped.
                    self._answered.add(job_id)
                    self.send(Failed(job_id, "Cancelled.", retryable=False, cancelled=True))

    def _is_cancelled(self, job_id: str) -> bool:
        return job_id in self._cancelled or self._aborting.is_set()

    def _cancel_failure(self, job_id: str) -> Failed | None:
        """How a member that stopped by a cancel is answered (None: it was, at once)."""
        if job_id in self._answered:
            return None
        if self._aborting.is_set() and job_id not in self._cancelled:
            return Failed(job_id, "The engine shut down before the job finished.", retryable=True)
        return Failed(job_id, "Cancelled.", retryable=False, cancelled=True)

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
                self._refuse(item)
                continue
            self._run(item)
        # Jobs that arrived after the Shutdown.
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                self._refuse(item)
        self._encode_queue.put(None)
        encoder.join()
        return True

    def _refuse(self, item: _Queued) -> None:
        for job in item.jobs:
            self.send(Failed(job.job_id, "The engine is shutting down.", retryable=True))

    def _run(self, item: _Queued) -> None:
        with self._state_lock:
            jobs = [job for job in item.jobs if job.job_id not in self._skip]
            self._skip.difference_update(job.job_id for job in item.jobs)
            self._queued_ids.difference_update(job.job_id for job in jobs)
            self._running = {job.job_id for job in jobs}
        if not jobs:
            return
        started = time.perf_counter()
        idle = None if self._previous_end is None else started - self._previous_end
        back_to_back = self._previous_end is not None and item.received <= self._previous_end
        for job in jobs:
            self.send(Started(job.job_id))
        assert self._runner is not None
        try:
            made = run_members(
                self._config,
                self._runner,
                jobs,
                send=self.send,
                cancelled=self._is_cancelled,
                cancel_failure=self._cancel_failure,
                load_error=self._model_load_error,
            )
        finally:
            with self._state_lock:
                self._running = set()
                self._cancelled.clear()
                self._answered.clear()
            self._previous_end = time.perf_counter()
        stats = {"wait_seconds": started - item.received, "idle_seconds": idle, "back_to_back": back_to_back}
        for member in made:
            self.send(Computed(member.job.job_id))
        for member in made:
            self._encode_queue.put(_Finished(member.job, member.images, started, member.compute_seconds, stats))

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


__all__ = ["RunnerLike", "Worker", "build_runner", "worker_main"]
