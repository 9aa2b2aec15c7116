"""The bot-side handle on the local engine process (implements engine.api.EngineClient).

    client = LocalEngineClient(settings)
    await client.start()                    # spawn the worker, wait for Ready (engine.start_timeout)
    async for item in client.submit(job):   # Progress…, then exactly one Result
        ...                                 # or raises EngineError(retryable) / JobCancelled
    await client.cancel(job_id)             # queued or running; True when the job was found
    client.health()                         # alive, slots=1, busy, restarts, detail
    await client.close()                    # Shutdown, wait, then terminate / kill

Asyncio integration: a reader thread per worker process blocks on the pipe and hands every
message to the event loop with `call_soon_threadsafe`; sends go through a one-thread executor.
The event loop never blocks on the pipe, whatever the size of a message.

Concurrency: `slots = 1` (one worker, one GPU), `prefetch = 1`. Several submits at once are
accepted and SERIALIZED (not refused): each job is forwarded to the worker as soon as it is submitted and the
worker runs them in order. A job holds the slot (`health().busy`) while it waits or computes, not
while its images are encoded. The stream yields a Progress with step 0 (phase "load") when the
worker starts the job, and one with phase "encode" when its compute is over, so a
scheduler that dispatches to free slots can hand over the next job during the encoding, which
the worker overlaps with the next job's compute.

Crashes: when the worker process exits for any reason other than `close()` (SIGKILL, a CUDA
crash, a segfault), the job that was RUNNING raises EngineError(retryable=True) at once; jobs
forwarded but not yet started are re-sent to the new process (they did not run, so they are not
retried as failures). The process is restarted right away (counted in `health().restarts`); if
the restart fails, waiting jobs raise EngineError(retryable=True) and the start is retried with a
growing delay, and at the latest on the next submit.

Cancelling: after `cancel(job_id)` returned True the job's iterator raises JobCancelled, even if
the worker finished it in the meantime (its result is dropped), so the bot can refund it safely.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import multiprocessing
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Literal

from tenacity import RetryCallState, wait_exponential

from config.settings import Settings
from engine.api import EngineError, EngineHealth, JobCancelled, Result
from engine.jobs import Job
from engine.jobs.events import Progress
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
from engine.stream import JobStream
from engine.worker import worker_main

log = logging.getLogger("atelier.engine.client")

# Seconds between close()'s escalation steps after the graceful wait: SIGTERM, then SIGKILL.
TERMINATE_WAIT = 3.0
# Restart delays after consecutive failed restarts (seconds).
# A start that failed is tried again after 1, 2, 4 … 60 s (the first restart after a crash at
# once), as tenacity's exponential wait says: the same retry policy as the bot's store writes.
RESTART_WAIT = wait_exponential(multiplier=1, max=60)


def restart_delay(failed_starts: int) -> float:
    """Seconds before the next start after `failed_starts` failed starts in a row."""
    if failed_starts <= 0:
        return 0.0
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = failed_starts
    return float(RESTART_WAIT(state))


_EXITED = object()
_LIVE_CLIENTS: weakref.WeakSet[LocalEngineClient] = weakref.WeakSet()

# waiting: not sent to any process · sent: in the worker's queue · running: started ·
# encoding: computed, images being encoded (no longer holds the slot; a crash still fails it)
JobStatus = Literal["waiting", "sent", "running", "encoding"]


@dataclass(eq=False)
class _JobState:
    job: Job
    queue: asyncio.Queue[Progress | Result | BaseException] = field(default_factory=asyncio.Queue)
    status: JobStatus = "waiting"
    generation: int = 0
    sends: int = 0
    cancel_requested: bool = False
    finished: bool = False
    total_steps: int = 0  # of the last Progress, repeated by the "encode" one


class LocalEngineClient:
    """One engine child process on this machine (see the module docstring)."""

    slots: int = 1
    # One job waits in the worker's queue behind the running one: it starts with no hand-over gap.
    prefetch: int = 1

    def __init__(
        self,
        settings: Settings,
        *,
        runner_factory: str = DEFAULT_RUNNER_FACTORY,
        shutdown_timeout: float = 15.0,
    ) -> None:
        self._settings = settings
        self._config = WorkerConfig.from_settings(settings, runner_factory)
        self.shutdown_timeout = shutdown_timeout
        self._context = multiprocessing.get_context("spawn")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None
        self._sender: ThreadPoolExecutor | None = None
        self._generation = 0
        self._ready = False
        self._closed = False
        self._start_task: asyncio.Task[None] | None = None
        self._ready_future: asyncio.Future[Any] | None = None
        self._retry_handle: asyncio.TimerHandle | None = None
        self._failed_restarts = 0
        self._jobs: dict[str, _JobState] = {}
        self._restarts = 0
        self._detail = "not started"
        self._background: set[asyncio.Task[Any]] = set()
        # Spawn → Ready of the latest start, and the worker's own breakdown.
        self.startup_seconds: float | None = None
        self.ready_info: Ready | None = None
        # Worker-side timings of recent jobs (for the bench, metrics and ETA tuning).
        self.stats: deque[JobStats] = deque(maxlen=1000)
        _LIVE_CLIENTS.add(self)

    # ------------------------------------------------------------------ public API

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.is_alive() else None

    @property
    def restarts(self) -> int:
        return self._restarts

    async def start(self) -> None:
        """Spawn the worker and wait until it has loaded the models. Raises EngineError when it
        cannot start (retryable=False for a load failure such as a missing model)."""
        if self._closed:
            raise EngineError("The engine is closed.", retryable=False)
        self._bind_loop()
        if self._ready:
            return
        await self._ensure_start()

    def submit(self, job: Job) -> AsyncIterator[Progress | Result]:
        """Queue `job`; the iterator yields Progress then one Result, or raises EngineError /
        JobCancelled. The job is registered (and cancellable) as soon as this returns."""
        if self._closed:
            return JobStream(self.cancel, None, EngineError("The engine is shut down.", retryable=True))
        self._bind_loop()
        if job.job_id in self._jobs:
            return JobStream(self.cancel, None, EngineError(f"Job {job.job_id} is already submitted.", retryable=False))
        state = _JobState(job)
        self._jobs[job.job_id] = state
        if self._ready:
            self._send_job(state)
        else:
            self._start_in_background()
        return JobStream(self.cancel, state)

    async def cancel(self, job_id: str) -> bool:
        state = self._jobs.get(job_id)
        if state is None or state.finished:
            return False
        state.cancel_requested = True
        if state.status != "waiting":
            self._send(Cancel(job_id), state.generation)
        if state.status != "running":
            # Not started (the worker drops it from its queue) or already computed: nothing to wait for.
            self._finish(state, JobCancelled(f"Job {job_id} was cancelled."))
        return True

    def health(self) -> EngineHealth:
        process = self._process
        alive = self._ready and process is not None and process.is_alive()
        return EngineHealth(
            alive=alive,
            slots=self.slots,
            busy=min(self.slots, sum(1 for state in self._jobs.values() if state.status != "encoding")),
            restarts=self._restarts,
            detail=self._detail,
        )

    async def close(self, grace: float | None = None) -> None:
        """Stop the worker: the running job may finish within `grace` seconds (default
        `shutdown_timeout`), jobs not started yet raise EngineError(retryable=True) at once; then
        SIGTERM, then SIGKILL. The process is reaped (no zombie)."""
        if self._closed:
            return
        self._closed = True
        was_ready, self._ready = self._ready, False
        self._detail = "closed"
        grace = self.shutdown_timeout if grace is None else grace
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        for state in list(self._jobs.values()):
            if state.status not in ("running", "encoding"):
                self._finish(state, EngineError("The engine is shutting down.", retryable=True))
        start_task = self._start_task
        if start_task is not None and not start_task.done():
            # Still loading: nothing to finish. _spawn kills its process when cancelled.
            start_task.cancel()
            with contextlib.suppress(BaseException):
                await start_task
        process = self._process
        if process is not None and process.is_alive():
            if was_ready:
                self._send(Shutdown(drain=True), self._generation)
                await self._join(process, grace)
            if process.is_alive():
                if was_ready:
                    log.warning("engine did not stop within %.0f s: terminating it", grace)
                process.terminate()
                await self._join(process, TERMINATE_WAIT)
            if process.is_alive():
                process.kill()
                await self._join(process, TERMINATE_WAIT)
        for state in list(self._jobs.values()):
            self._finish(state, EngineError("The engine shut down before the job finished.", retryable=True))
        loop = asyncio.get_running_loop()
        reader = self._reader
        if reader is not None:
            await loop.run_in_executor(None, reader.join, 5.0)
        if self._sender is not None:
            await loop.run_in_executor(None, self._sender.shutdown, True)
        await asyncio.sleep(0)  # let the reader's last callback run
        if self._background:
            await asyncio.wait(set(self._background), timeout=TERMINATE_WAIT)
        _LIVE_CLIENTS.discard(self)

    # ------------------------------------------------------------------ process lifecycle

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None or self._loop.is_closed():
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("LocalEngineClient is bound to another event loop")

    def _start_in_background(self) -> None:
        if self._start_task is None or self._start_task.done():
            self._spawn_task(self._start_or_fail_waiting())

    def _spawn_task(self, coro: Any) -> asyncio.Task[Any]:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _start_or_fail_waiting(self) -> None:
        try:
            await self._ensure_start()
        except EngineError as exc:
            self._fail_waiting(exc)
            self._schedule_retry()
        except asyncio.CancelledError:
            pass

    def _fail_waiting(self, exc: EngineError) -> None:
        for state in list(self._jobs.values()):
            if state.status == "waiting":
                self._finish(state, EngineError(f"The engine is not available: {exc}", retryable=True))

    def _schedule_retry(self) -> None:
        if self._closed or self._loop is None:
            return
        delay = restart_delay(self._failed_restarts)
        self._failed_restarts += 1
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        self._retry_handle = self._loop.call_later(delay, self._start_in_background)

    async def _ensure_start(self) -> None:
        if self._ready:
            return
        if self._closed:
            raise EngineError("The engine is shut down.", retryable=True)
        if self._start_task is None or self._start_task.done():
            self._start_task = self._loop.create_task(self._spawn())  # type: ignore[union-attr]
        try:
            await asyncio.shield(self._start_task)
        except (EngineError, asyncio.CancelledError):
            raise
        except Exception as exc:  # OSError from spawning (no memory, too many open files…)
            self._detail = f"failed to start: {exc}"
            log.error("the engine could not be started: %s", exc)
            raise EngineError("The engine could not be started.", retryable=True, detail=str(exc)) from exc

    async def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        self._generation += 1
        generation = self._generation
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=worker_main,
            args=(child, self._config),
            name=f"atelier-engine-{generation}",
            daemon=False,
        )
        self._ready_future = ready = loop.create_future()
        self._detail = "starting"
        if self._sender is None:
            self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-send")
        started = time.perf_counter()
        self._process = process
        # Spawning execs a new interpreter: a few ms the event loop need not wait for.
        start = loop.run_in_executor(None, process.start)
        try:
            await asyncio.shield(start)
            child.close()
            self._conn = parent
            self._reader = threading.Thread(
                target=self._read_loop,
                args=(parent, generation),
                name=f"engine-reader-{generation}",
                daemon=True,
            )
            self._reader.start()
            message = await self._wait_ready(ready, process)
        except BaseException:
            # Cancelled (close() during start-up) or failed: never leave a process behind.
            if not start.done():
                with contextlib.suppress(BaseException):
                    await start
            if process.pid is not None and process.exitcode is None:
                process.kill()
                await self._join(process, TERMINATE_WAIT)
            raise
        finally:
            self._ready_future = None
        self.startup_seconds = time.perf_counter() - started
        self.ready_info = message
        self._ready = True
        self._failed_restarts = 0
        self._detail = (
            f"ready: pid {message.pid}, started in {self.startup_seconds:.1f} s "
            f"(models {message.load_seconds:.1f} s){', ' + message.detail if message.detail else ''}"
        )
        log.info("engine %s", self._detail)
        for state in list(self._jobs.values()):
            if state.status == "waiting":
                self._send_job(state)

    async def _wait_ready(self, ready: asyncio.Future[Any], process: BaseProcess) -> Ready:
        timeout = self._settings.engine.start_timeout
        try:
            message = await asyncio.wait_for(asyncio.shield(ready), timeout)
        except TimeoutError:
            self._detail = f"did not become ready within {timeout:.0f} s"
            raise EngineError(f"The engine did not start within {timeout:.0f} s.", retryable=True) from None
        if isinstance(message, Fatal):
            await self._join(process, TERMINATE_WAIT)
            self._detail = f"failed to start: {message.message}"
            log.error("the engine failed to start: %s", message.message)
            raise EngineError(
                "The engine failed to start: tell the bot's operator.", retryable=False, detail=message.message
            )
        if not isinstance(message, Ready):
            await self._join(process, TERMINATE_WAIT)
            self._detail = f"exited during start-up (exit code {process.exitcode})"
            raise EngineError(
                f"The engine process exited during start-up (exit code {process.exitcode}).", retryable=True
            )
        return message

    def _read_loop(self, conn: Connection, generation: int) -> None:
        """Reader thread: every message, then the end of the pipe, to the event loop."""
        loop = self._loop
        assert loop is not None
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            except Exception:
                log.exception("unreadable message from the engine process")
                continue
            try:
                loop.call_soon_threadsafe(self._on_message, generation, message)
            except RuntimeError:  # the event loop is closed
                return
        # Closed by the sender thread, after any send already queued to it (never under a send).
        sender = self._sender
        if sender is not None:
            with contextlib.suppress(RuntimeError):
                sender.submit(conn.close)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._on_exit, generation)

    def _on_message(self, generation: int, message: Any) -> None:
        if generation != self._generation:
            return
        if isinstance(message, Ready | Fatal):
            if self._ready_future is not None and not self._ready_future.done():
                self._ready_future.set_result(message)
            return
        if isinstance(message, Progress):
            state = self._jobs.get(message.job_id)
            if state is not None and not state.cancel_requested:
                state.total_steps = message.total
                state.queue.put_nowait(message)
            return
        if isinstance(message, Done):
            if message.stats is not None:
                self.stats.append(message.stats)
            state = self._jobs.get(message.result.job_id)
            if state is not None:
                if state.cancel_requested:
                    self._finish(state, JobCancelled(f"Job {state.job.job_id} was cancelled."))
                else:
                    self._finish(state, message.result)
            return
        state = self._jobs.get(getattr(message, "job_id", ""))
        if state is None:
            return
        if isinstance(message, Started):
            state.status = "running"
            if not state.cancel_requested:
                # Tells the scheduler the job left the worker's queue and really started.
                state.queue.put_nowait(Progress(message.job_id, 0, 1, "load"))
        elif isinstance(message, Computed):
            state.status = "encoding"
            if not state.cancel_requested:
                # Tells the scheduler the slot is free: the next job can start while this one encodes.
                total = state.total_steps or 1
                state.queue.put_nowait(Progress(message.job_id, total, total, "encode"))
        elif isinstance(message, Failed):
            if message.cancelled or state.cancel_requested:
                self._finish(state, JobCancelled(f"Job {state.job.job_id} was cancelled."))
            else:
                self._finish(state, EngineError(message.message, retryable=message.retryable))

    def _on_exit(self, generation: int) -> None:
        if generation != self._generation:
            return
        process = self._process
        was_ready = self._ready
        self._ready = False
        if self._ready_future is not None and not self._ready_future.done():
            self._ready_future.set_result(_EXITED)
        code = process.exitcode if process is not None else None
        for state in list(self._jobs.values()):
            if state.generation != generation or state.status == "waiting":
                continue
            if state.cancel_requested:
                self._finish(state, JobCancelled(f"Job {state.job.job_id} was cancelled."))
            elif state.status in ("running", "encoding"):
                self._finish(
                    state,
                    EngineError("The engine process stopped unexpectedly while running the job.", retryable=True),
                )
            elif state.sends >= 3:
                self._finish(state, EngineError("The engine keeps stopping before the job.", retryable=True))
            else:
                state.status = "waiting"  # never started: it goes to the next process
        if process is not None:
            self._spawn_task(self._reap(process, generation))
        if self._closed or not was_ready:
            return
        self._restarts += 1
        self._detail = f"restarting: the engine process exited (exit code {code})"
        log.warning("engine process %s exited; restarting it", process and process.pid)
        self._start_in_background()

    async def _reap(self, process: BaseProcess, generation: int) -> None:
        """Join a dead process (no zombie)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, process.join, TERMINATE_WAIT)
        if process.is_alive():
            process.kill()
            await loop.run_in_executor(None, process.join, TERMINATE_WAIT)
        if process.exitcode and process.exitcode < 0:
            log.warning("engine process %s was killed by signal %d", process.pid, -process.exitcode)
        elif process.exitcode:
            log.warning("engine process %s exited with code %d", process.pid, process.exitcode)

    async def _join(self, process: BaseProcess, seconds: float) -> None:
        """Wait up to `seconds` for the process to exit (in a thread: the loop keeps running)."""
        await asyncio.get_running_loop().run_in_executor(None, process.join, seconds)

    # ------------------------------------------------------------------ sending

    def _send_job(self, state: _JobState) -> None:
        state.status = "sent"
        state.generation = self._generation
        state.sends += 1
        self._send(Submit(state.job), self._generation)

    def _send(self, message: Any, generation: int) -> None:
        conn, sender = self._conn, self._sender
        if conn is None or sender is None or generation != self._generation:
            return
        sender.submit(_send_quietly, conn, message)

    def _finish(self, state: _JobState, item: Result | BaseException) -> None:
        if state.finished:
            return
        state.finished = True
        if self._jobs.get(state.job.job_id) is state:
            del self._jobs[state.job.job_id]
        state.queue.put_nowait(item)

    def _kill_now(self) -> None:
        """Interpreter exit without close(): do not leave the worker behind."""
        process = self._process
        if process is not None and process.is_alive():
            process.kill()
            process.join(TERMINATE_WAIT)


def _send_quietly(conn: Connection, message: Any) -> None:
    try:
        conn.send(message)
    except (OSError, ValueError):
        pass  # the process is gone: the reader thread reports it


@atexit.register
def _kill_leftovers() -> None:
    for client in list(_LIVE_CLIENTS):
        client._kill_now()


__all__ = ["LocalEngineClient"]
