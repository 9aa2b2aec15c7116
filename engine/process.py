"""The engine child process as the bot process sees it: spawn it, wait for its `Ready`, read its
messages in a thread and hand them to the event loop, send to it, restart it after a crash with a
growing delay, stop and reap it. `EngineProcess` is the base of engine.client.LocalEngineClient,
which keeps the jobs' side (what was submitted, what each message means for a job).

Asyncio integration: a reader thread per worker process blocks on the pipe and hands every
message to the event loop with `call_soon_threadsafe`; sends go through a one-thread executor.
The event loop never blocks on the pipe, whatever the size of a message.
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
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from tenacity import RetryCallState, wait_exponential

from config.settings import Settings
from engine.api import EngineError
from engine.protocol import Fatal, Ready, WorkerConfig
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


EXITED = object()
_LIVE: weakref.WeakSet[EngineProcess] = weakref.WeakSet()


class EngineProcess:
    """One engine child process and its restarts (see the module docstring). Subclasses say what
    messages and the process's end mean (`_on_message`, `_on_exit`) and what waits for a start
    (`_send_waiting`, `_fail_waiting`)."""

    def __init__(self, settings: Settings, config: WorkerConfig) -> None:
        self._settings = settings
        self._config = config
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
        self._restarts = 0
        self._detail = "not started"
        self._background: set[asyncio.Task[Any]] = set()
        # Spawn → Ready of the latest start, and the worker's own breakdown.
        self.startup_seconds: float | None = None
        self.ready_info: Ready | None = None
        _LIVE.add(self)

    # ------------------------------------------------------------------ what subclasses say

    def _on_message(self, generation: int, message: Any) -> None:
        raise NotImplementedError

    def _on_exit(self, generation: int) -> None:
        raise NotImplementedError

    def _send_waiting(self) -> None:
        """The process is ready: send what waited for it."""
        raise NotImplementedError

    def _fail_waiting(self, exc: EngineError) -> None:
        """No process could be started: fail what waited for one."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the process

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.is_alive() else None

    @property
    def restarts(self) -> int:
        return self._restarts

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
        self._send_waiting()

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

    def _send(self, message: Any, generation: int) -> None:
        conn, sender = self._conn, self._sender
        if conn is None or sender is None or generation != self._generation:
            return
        sender.submit(_send_quietly, conn, message)

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
    for engine in list(_LIVE):
        engine._kill_now()


__all__ = ["EXITED", "TERMINATE_WAIT", "EngineProcess", "restart_delay"]
