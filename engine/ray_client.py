"""The bot-side handle on the Ray Serve engine (implements engine.api.EngineClient).

    client = RayEngineClient(settings)      # [engine] backend = "ray"
    await client.start()                    # join Ray, deploy the app if absent, wait for replicas
    async for item in client.submit(job):   # Progress…, then exactly one Result
        ...                                 # or raises EngineError(retryable) / JobCancelled
    await client.cancel(job_id)
    client.health()                         # alive, slots = live replicas, busy, restarts, detail
    await client.close()

Ray itself: with `engine.ray_address = ""` the client starts a private Ray inside the bot process
(and stops it on close); "auto" or "HOST:PORT" joins a cluster (see docs/scaling.md). When Ray is
already initialised in the process (tests, benches) the client uses it as it is. The Serve
application `engine.ray_app` is used when it is deployed (`atelier engine serve`), otherwise the
client deploys it (engine.ray_serve.deploy).

Slots and ordering: `slots` is the number of RUNNING replicas (polled from the Serve controller
every `poll_interval` seconds; 0 before start or while none is up). The bot's scheduler keeps
ordering, fairness and quotas and submits while its running jobs hold fewer than `slots`; this
client sends a call to Serve only while fewer calls are in flight than replicas are up (each
replica takes one: max_ongoing_requests=1), so Serve never holds a queue of its own. A submit
beyond that waits here, in submission order: it happens only for a job submitted while a
replica is still encoding the previous job's images (the scheduler frees a slot when it sees the
Progress with phase "encode", as with the local engine), and for a moment after a replica died.

Failures: the call of a replica that dies (ActorDiedError and the like) raises
EngineError(retryable=True) at once, and the scheduler requeues the job (attempt + 1); Serve
starts a replacement replica by itself. A job's own failure (bad input, a model that cannot be
loaded) comes back from the replica as a message and raises EngineError(retryable=False).

Cancelling: `cancel(job_id)` cancels the Serve call; the replica sets the Runner's cancel flag and
the job stops within about one step. After cancel() returned True the job's iterator raises
JobCancelled, even if it finished in the meantime (its result is dropped).

Batches: `submit_batch(jobs)` sends jobs of one shape as ONE Serve call (`run_batch`, one replica,
engine.batch), one stream per job. A member cancelled while others still run ends at once here
(its images are dropped when they come); the call is cancelled when every member is. `max_batch`
is `[engine] max_batch`, by default by the replicas' device (GPUs when `ray_num_gpus` > 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from config.settings import Settings
from engine.api import EngineError, EngineHealth, JobCancelled, Result
from engine.jobs import Job
from engine.jobs.events import Progress
from engine.protocol import DEFAULT_RUNNER_FACTORY, Computed, Done, Failed, JobStats
from engine.ray_support import (
    is_replica_death,
    like,
    message_job_id,
    remote_without_auth,
    retrieve_exception,
    shutdown_ray,
)
from engine.stream import JobStream

log = logging.getLogger("atelier.engine.ray_client")

# waiting: in this client, not sent · running: a Serve call in flight, computing ·
# encoding: computed, images being encoded on the replica (the replica is still taken) · ended
CallStatus = Literal["waiting", "running", "encoding", "ended"]

# A replica loss seen by a failing call and a drop in the polled replica count are matched
# within this many seconds, so one death is not counted twice.
LOSS_MATCH_SECONDS = 30.0


@dataclass(eq=False)
class _Call:
    job: Job
    queue: asyncio.Queue[Progress | Result | BaseException] = field(default_factory=asyncio.Queue)
    status: CallStatus = "waiting"
    response: Any = None  # the DeploymentResponseGenerator while the call is in flight
    task: asyncio.Task[None] | None = None
    last: Progress | None = None
    cancel_requested: bool = False
    finished: bool = False  # the iterator got its last item
    members: list[_Call] = field(default_factory=list)  # a batch's calls, on its first (which is sent)
    batch: _Call | None = None  # a batch member's first call (the one sent)


class RayEngineClient:
    """Jobs to a Ray Serve deployment of engine replicas (see the module docstring)."""

    prefetch = 0  # a replica takes one job at a time: nothing waits in it ahead

    def __init__(
        self,
        settings: Settings,
        *,
        runner_factory: str = DEFAULT_RUNNER_FACTORY,
        poll_interval: float = 1.0,
        shutdown_timeout: float = 15.0,
        ray_init_options: dict[str, Any] | None = None,
    ) -> None:
        self._settings = settings
        self._runner_factory = runner_factory
        self.poll_interval = poll_interval
        self.shutdown_timeout = shutdown_timeout
        self._ray_init_options = dict(ray_init_options or {})
        self._app = settings.engine.ray_app
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: Any = None
        self._owns_ray = False
        self._ready = False
        self._closed = False
        self._start_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._poll_now = asyncio.Event()
        self._jobs: dict[str, _Call] = {}
        self._waiting: deque[_Call] = deque()
        self._in_flight: set[_Call] = set()
        self._live = 0  # replicas taking jobs: the polled count less the ones known dead
        self._polled = 0  # RUNNING replicas as the Serve controller last reported them
        self._restarts = 0
        self._unmatched_losses: deque[float] = deque()  # calls lost to a dead replica
        self._unmatched_drops: deque[float] = deque()  # drops of the polled replica count
        self._detail = "not started"
        # Replica-side timings of recent jobs (for the bench and ETA tuning), as LocalEngineClient.
        self.stats: deque[JobStats] = deque(maxlen=1000)
        self.startup_seconds: float | None = None

    # ------------------------------------------------------------------ public API

    @property
    def slots(self) -> int:
        """Replicas up and taking jobs (0 before start, after close, or while none is up)."""
        return self._live if self._ready else 0

    @property
    def restarts(self) -> int:
        return self._restarts

    @property
    def max_batch(self) -> int:
        """The most images one batched call makes (the replicas' device decides the default)."""
        engine = self._settings.engine
        gpu = engine.device == "cuda" or (engine.device == "auto" and engine.ray_num_gpus > 0)
        return engine.batch_limit("cuda" if gpu else engine.device if engine.device != "auto" else "cpu")

    async def start(self) -> None:
        """Join Ray, deploy the application when it is absent, and wait until the deployment is
        running. Raises EngineError (retryable=False when Ray is not installed or the replicas
        cannot load the models)."""
        if self._closed:
            raise EngineError("The engine is closed.", retryable=False)
        self._bind_loop()
        if self._ready:
            return
        if self._start_task is None or self._start_task.done():
            self._start_task = asyncio.get_running_loop().create_task(self._connect())
        await asyncio.shield(self._start_task)

    def submit(self, job: Job) -> AsyncIterator[Progress | Result]:
        return self._submit([job])[0]

    def submit_batch(self, jobs: Sequence[Job]) -> list[AsyncIterator[Progress | Result]]:
        """`submit` for jobs of one shape run as ONE Serve call: one stream per job, in order. A
        job refused at submit time (a duplicate id) raises from its stream and stays out."""
        return self._submit(jobs)

    def _submit(self, jobs: Sequence[Job]) -> list[AsyncIterator[Progress | Result]]:
        if self._closed:
            return [JobStream(self.cancel, None, EngineError("The engine is shut down.", retryable=True)) for _ in jobs]
        self._bind_loop()
        streams: list[AsyncIterator[Progress | Result]] = []
        calls: list[_Call] = []
        for job in jobs:
            if job.job_id in self._jobs:
                error = EngineError(f"Job {job.job_id} is already submitted.", retryable=False)
                streams.append(JobStream(self.cancel, None, error))
                continue
            call = self._jobs[job.job_id] = _Call(job)
            calls.append(call)
            streams.append(JobStream(self.cancel, call))
        if not calls:
            return streams
        if len(jobs) > 1:
            calls[0].members = calls
            for call in calls:
                call.batch = calls[0]
        self._waiting.append(calls[0])
        if self._ready:
            self._dispatch()
        elif self._start_task is None or self._start_task.done():
            # Started in the background; a start that fails fails the waiting jobs (retried at the next submit).
            self._start_task = asyncio.get_running_loop().create_task(self._connect())
            self._start_task.add_done_callback(retrieve_exception)
        return streams

    async def cancel(self, job_id: str) -> bool:
        call = self._jobs.get(job_id)
        if call is None or call.finished:
            return False
        call.cancel_requested = True
        batch = call.batch
        if batch is not None:
            # A batch member ends now (its images, if the others run on, are dropped when they
            # come); the call itself is stopped once every member is cancelled.
            self._finish(call, JobCancelled(f"Job {job_id} was cancelled."))
            if all(member.cancel_requested for member in batch.members):
                if batch.status == "waiting":
                    with contextlib.suppress(ValueError):
                        self._waiting.remove(batch)
                elif batch.response is not None:
                    batch.response.cancel()
            return True
        if call.status == "waiting":
            with contextlib.suppress(ValueError):
                self._waiting.remove(call)
            self._finish(call, JobCancelled(f"Job {job_id} was cancelled."))
        elif call.status == "running":
            if call.response is not None:
                call.response.cancel()  # the replica stops the Runner; _drive then ends the job
        else:  # encoding: the images are made; drop them (the replica frees itself when done)
            self._finish(call, JobCancelled(f"Job {job_id} was cancelled."))
        return True

    def health(self) -> EngineHealth:
        computing = sum(1 for call in self._jobs.values() if call.status in ("waiting", "running"))
        return EngineHealth(
            alive=self._ready and self._live > 0,
            slots=self.slots,
            busy=min(self.slots, computing),
            restarts=self._restarts,
            detail=self._detail,
        )

    async def close(self, grace: float | None = None) -> None:
        """Stop: jobs not sent yet raise EngineError(retryable=True) at once; calls in flight may
        finish within `grace` seconds (default `shutdown_timeout`), then they are cancelled and
        raise EngineError(retryable=True). A Ray started by this client is shut down; the
        application of a cluster is left running (it belongs to the cluster)."""
        if self._closed:
            return
        self._closed = True
        self._ready = False
        self._detail = "closed"
        grace = self.shutdown_timeout if grace is None else grace
        for call in list(self._waiting):
            self._finish(call, EngineError("The engine is shutting down.", retryable=True))
        self._waiting.clear()
        for task in (self._watch_task, self._start_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        tasks = [call.task for call in self._in_flight if call.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for call in list(self._in_flight):
            if call.response is not None:
                call.response.cancel()
        tasks = [call.task for call in self._in_flight if call.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=10.0)
        for call in list(self._jobs.values()):
            self._finish(call, EngineError("The engine shut down before the job finished.", retryable=True))
        if self._owns_ray:
            await asyncio.to_thread(shutdown_ray)

    # ------------------------------------------------------------------ connecting

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None or self._loop.is_closed():
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("RayEngineClient is bound to another event loop")

    async def _connect(self) -> None:
        try:
            await self._connect_and_wait()
        except BaseException as exc:
            error = exc if isinstance(exc, EngineError) else EngineError(f"{exc!r}", retryable=True)
            for call in list(self._waiting):
                self._finish(call, EngineError(f"The engine is not available: {error}", retryable=error.retryable))
            self._waiting.clear()
            raise

    async def _connect_and_wait(self) -> None:
        started = time.perf_counter()
        self._detail = "starting"
        timeout = self._settings.engine.start_timeout
        try:
            await asyncio.wait_for(asyncio.to_thread(self._connect_blocking), timeout)
        except TimeoutError:
            self._detail = f"did not become ready within {timeout:.0f} s"
            raise EngineError(f"The Ray engine did not start within {timeout:.0f} s.", retryable=True) from None
        except EngineError as exc:
            self._detail = f"failed to start: {exc}"
            raise
        except Exception as exc:
            self._detail = f"failed to start: {type(exc).__name__}: {exc}"
            log.exception("the Ray engine could not be started")
            # A deployment that failed (models missing, out of memory) will not do better on a retry.
            raise EngineError(f"The Ray engine could not be started: {exc}", retryable=False) from exc
        if self._closed:
            return
        self.startup_seconds = time.perf_counter() - started
        self._ready = True
        await self._poll()
        log.info("Ray engine ready in %.1f s: %s", self.startup_seconds, self._detail)
        self._watch_task = asyncio.get_running_loop().create_task(self._watch(), name="atelier-ray-watch")
        self._dispatch()

    def _connect_blocking(self) -> None:
        try:
            import ray
        except ImportError:
            raise EngineError(
                "[engine] backend = \"ray\" needs Ray: pip install '.[ray]' (ray[serve])", retryable=False
            ) from None
        from engine import ray_serve

        if not ray.is_initialized():
            address = self._settings.engine.ray_address or "local"
            problem = remote_without_auth(address, os.environ)
            if problem is not None:
                raise EngineError(problem, retryable=False)
            if address == "local":
                # A private Ray for this bot: no usage reports to Ray's servers unless asked for.
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(address=address, **self._ray_init_options)
            self._owns_ray = address == "local"
        status, _states = ray_serve.replica_states(self._app)
        if status in ("", "DEPLOY_FAILED", "DELETING"):
            log.info("deploying the Serve application %r (%d replicas)", self._app, self._settings.engine.ray_replicas)
            ray_serve.deploy(self._settings, runner_factory=self._runner_factory)
        else:
            log.info("using the deployed Serve application %r (%s)", self._app, status)
        self._handle = ray_serve.deployment_handle(self._app).options(stream=True)

    # ------------------------------------------------------------------ replica count

    async def _watch(self) -> None:
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poll_now.wait(), self.poll_interval)
            self._poll_now.clear()
            await self._poll()
            self._dispatch()

    async def _poll(self) -> None:
        from engine import ray_serve

        try:
            status, states = await asyncio.to_thread(ray_serve.replica_states, self._app)
        except Exception as exc:
            if self._live:
                log.warning("the Ray cluster does not answer: %s", exc)
            self._live = 0
            self._detail = f"Ray cluster unreachable: {type(exc).__name__}: {exc}"
            return
        polled = states.get("RUNNING", 0)
        if polled < self._polled:
            self._count_drop(self._polled - polled)
        self._polled = polled
        self._expire_sightings()
        # The controller reports a dead replica as running for a few seconds after its call failed:
        # one that is known dead takes no job (Serve would hold it in its own queue meanwhile).
        live = max(0, polled - len(self._unmatched_losses))
        self._live = live
        others = ", ".join(f"{count} {state.lower()}" for state, count in sorted(states.items()) if state != "RUNNING")
        self._detail = (
            f"ray app {self._app} {status.lower() or 'not deployed'}: {live} replica{'' if live == 1 else 's'} running"
            f"{', ' + others if others else ''}; {self._restarts} replica restarts"
        )

    def _count_drop(self, drop: int) -> None:
        log.warning("Ray engine: %d replica(s) went down; Serve starts replacements", drop)
        for _ in range(drop):
            self._count_death(self._unmatched_losses, self._unmatched_drops)

    def _replica_lost(self) -> None:
        if self._count_death(self._unmatched_drops, self._unmatched_losses):
            self._live = max(0, self._live - 1)  # before the controller says so
        self._poll_now.set()

    def _expire_sightings(self) -> None:
        now = time.monotonic()
        for pending in (self._unmatched_drops, self._unmatched_losses):
            while pending and now - pending[0] > LOSS_MATCH_SECONDS:
                pending.popleft()

    def _count_death(self, seen_other_way: deque[float], unmatched: deque[float]) -> bool:
        """One replica death is seen twice, in either order: its call fails, and the polled count
        drops. Count it once: match each sighting with one of the other kind seen shortly before.
        True when this sighting is the first of its death."""
        self._expire_sightings()
        if seen_other_way:
            seen_other_way.popleft()
            return False
        self._restarts += 1
        unmatched.append(time.monotonic())
        return True

    # ------------------------------------------------------------------ calls

    def _dispatch(self) -> None:
        """Send waiting jobs while a replica is free (in submission order)."""
        while self._waiting and self._ready and len(self._in_flight) < self._live:
            call = self._waiting.popleft()
            if all(member.finished for member in call.members or [call]):
                continue
            for member in call.members or [call]:
                member.status = "running"
            self._in_flight.add(call)
            assert self._loop is not None
            call.task = self._loop.create_task(self._drive(call), name=f"atelier-ray-{call.job.job_id}")

    async def _drive(self, call: _Call) -> None:
        error: BaseException | None = None
        members = {member.job.job_id: member for member in call.members or [call]}
        try:
            if call.members:
                jobs = tuple(member.job for member in call.members if not member.finished)
                call.response = self._handle.run_batch.remote(jobs)
            else:
                call.response = self._handle.run.remote(call.job)
            if all(member.cancel_requested for member in members.values()):
                call.response.cancel()
            async for message in call.response:
                member = members.get(message_job_id(message))
                if member is not None:
                    self._on_message(member, message)
        except Exception as exc:
            error = exc
        finally:
            call.response = None
            self._in_flight.discard(call)
            failure: BaseException | None = None
            for member in members.values():
                member.status = "ended"
                if not member.finished:
                    if member.cancel_requested:
                        self._finish(member, JobCancelled(f"Job {member.job.job_id} was cancelled."))
                    else:
                        # One lost call, however many members: counted and logged once.
                        failure = failure or self._failure(member, error)
                        self._finish(member, like(failure, member.job.job_id))
                if self._jobs.get(member.job.job_id) is member:
                    del self._jobs[member.job.job_id]
            self._dispatch()

    def _failure(self, call: _Call, error: BaseException | None) -> BaseException:
        job_id = call.job.job_id
        if call.cancel_requested:
            return JobCancelled(f"Job {job_id} was cancelled.")
        if self._closed:
            return EngineError("The engine shut down before the job finished.", retryable=True)
        if error is None:
            return EngineError("The engine replica ended the job without a result.", retryable=True)
        log.warning("job %s: the Ray call failed: %s: %s", job_id, type(error).__name__, error)
        if is_replica_death(error):
            self._replica_lost()
            return EngineError(f"The engine replica running the job was lost ({type(error).__name__}).", retryable=True)
        self._poll_now.set()
        return EngineError(f"The Ray engine call failed: {type(error).__name__}: {error}", retryable=True)

    def _on_message(self, call: _Call, message: Any) -> None:
        job_id = call.job.job_id
        if isinstance(message, Progress):
            call.last = message
            if not call.cancel_requested and not call.finished:
                call.queue.put_nowait(message)
        elif isinstance(message, Computed):
            call.status = "encoding"
            total = call.last.total if call.last is not None else 0
            if not call.cancel_requested and not call.finished:
                # Tells the scheduler the compute is over (it frees the slot), as the local engine does.
                call.queue.put_nowait(Progress(job_id, total, total, "encode"))
        elif isinstance(message, Done):
            if message.stats is not None:
                self.stats.append(message.stats)
            if call.cancel_requested:
                self._finish(call, JobCancelled(f"Job {job_id} was cancelled."))
            else:
                self._finish(call, message.result)
        elif isinstance(message, Failed):
            if message.cancelled or call.cancel_requested:
                self._finish(call, JobCancelled(f"Job {job_id} was cancelled."))
            else:
                self._finish(call, EngineError(message.message, retryable=message.retryable))
        else:
            log.warning("job %s: unexpected message from the replica: %r", job_id, type(message).__name__)

    def _finish(self, call: _Call, item: Result | BaseException) -> None:
        if call.finished:
            return
        call.finished = True
        if call.status in ("waiting", "ended") and self._jobs.get(call.job.job_id) is call:
            del self._jobs[call.job.job_id]
        call.queue.put_nowait(item)


__all__ = ["RayEngineClient", "remote_without_auth"]
