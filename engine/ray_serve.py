"""The Ray Serve side of `[engine] backend = "ray"`: one replica per GPU, each a whole engine.

Topology::

    bot (scheduler → engine.ray_client.RayEngineClient) ──handle, streaming──▶ Serve deployment
                                                                               "AtelierEngine"
                                                          replica 1 (GPU 0) ◀──┤ num_gpus=1,
                                                          replica 2 (GPU 1) ◀──┘ max_ongoing_requests=1

Each replica loads the configured models once (engine.serving.load_runner, the same code as the
local engine process) and runs one call at a time: `run(job)` is a streaming method that yields
the engine.protocol messages the local worker sends over its pipe: Progress…, Computed (compute
over, encoding starts), then Done or Failed; `run_batch(jobs)` the same for a batch of jobs of
one shape run as one batched call (engine.batch), each member's messages under its own id. A
job's own failure is a Failed message, never an exception, so an exception at the caller always
means the call itself was lost (a dead replica).

The bot keeps ordering, fairness and quotas: it sends a job only when it knows a replica is free
(engine.ray_client), so Serve's own queue stays empty. Cancelling the call (Serve cancels the
replica's task) sets the Runner's cancel flag, which stops the job within about one step.

Ray is an optional extra: nothing here imports it at module level, and only engine.ray_client
and `atelier engine serve` import this module.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from config.settings import EngineSettings, Settings
from engine.jobs import Job
from engine.jobs.events import Progress
from engine.protocol import DEFAULT_RUNNER_FACTORY, Computed, Done, Failed, JobStats, WorkerConfig
from engine.serving import encode_result, load_runner, model_load_error, run_members, set_torch_threads, version

log = logging.getLogger("atelier.engine.ray")

DEPLOYMENT_NAME = "AtelierEngine"
# Seconds Serve gives a replica being stopped (scale-down, redeploy) to finish its job.
GRACEFUL_SHUTDOWN_SECONDS = 60.0

ReplicaMessage = Progress | Computed | Done | Failed
_END = object()


class AtelierReplica:
    """One Serve replica: the models, the Runner, and one job at a time (see the module docstring)."""

    def __init__(self, config: WorkerConfig) -> None:
        logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._config = config
        # Jobs run in one thread of their own: the replica's event loop stays free for Serve
        # (health checks, cancellation), and torch's per-thread settings are made once.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atelier-job")
        self._executor.submit(set_torch_threads, config).result()
        self._runner, self.ready = self._executor.submit(load_runner, config).result()
        self._load_error = model_load_error()
        self._version = version()
        self._previous_end: float | None = None
        log.info(
            "replica ready: models %.1f s, imports %.1f s (%s)",
            self.ready.load_seconds,
            self.ready.import_seconds,
            self.ready.detail,
        )

    async def run(self, job: Job) -> AsyncIterator[ReplicaMessage]:
        """Progress…, Computed, then Done or Failed (see engine.protocol)."""
        async for message in self.run_batch((job,)):
            yield message

    async def run_batch(self, jobs: tuple[Job, ...]) -> AsyncIterator[ReplicaMessage]:
        """`run` for jobs of one shape as one batched call: every member's messages, each under
        its own job id. Cancelling the call cancels every member (the client drops a member it
        was asked to cancel while the others run on)."""
        loop = asyncio.get_running_loop()
        messages: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def send(message: Any) -> None:
            loop.call_soon_threadsafe(messages.put_nowait, message)

        def work() -> None:
            try:
                self._execute(jobs, send, cancel)
            finally:
                send(_END)

        task = loop.run_in_executor(self._executor, work)
        try:
            while True:
                message = await messages.get()
                if message is _END:
                    break
                yield message
        finally:
            if not task.done():
                # Cancelled by the caller (or the caller went away): stop the Runner and hold the
                # replica until it has really stopped, so the next job does not share the CPU/GPU.
                cancel.set()
                await asyncio.shield(task)

    def _execute(self, jobs: tuple[Job, ...], send: Callable[[Any], None], cancel: threading.Event) -> None:
        started = time.perf_counter()
        idle = None if self._previous_end is None else started - self._previous_end
        try:
            made = run_members(
                self._config,
                self._runner,
                jobs,
                send=send,
                cancelled=lambda _job_id: cancel.is_set(),
                cancel_failure=lambda job_id: Failed(job_id, "Cancelled.", retryable=False, cancelled=True),
                load_error=self._load_error,
            )
        finally:
            self._previous_end = time.perf_counter()
        for member in made:
            send(Computed(member.job.job_id))
        for member in made:
            job_id = member.job.job_id
            encode_started = time.perf_counter()
            try:
                result = encode_result(
                    self._config,
                    member.job,
                    member.images,
                    started=started,
                    compute_seconds=member.compute_seconds,
                    version=self._version,
                )
            except Exception as exc:
                log.exception("encoding job %s failed", job_id)
                send(Failed(job_id, f"Encoding failed: {exc}", retryable=True))
                continue
            stats = JobStats(
                job_id=job_id,
                wait_seconds=0.0,
                idle_seconds=idle,
                back_to_back=False,
                compute_seconds=member.compute_seconds,
                encode_seconds=time.perf_counter() - encode_started,
            )
            send(Done(result, stats=stats))


def build_app(config: WorkerConfig, engine: EngineSettings | None = None) -> Any:
    """The Serve application (a bound deployment): `ray_replicas` replicas of AtelierReplica, each
    reserving `ray_num_gpus` GPUs and `ray_num_cpus` CPUs, and taking one request at a time."""
    from ray import serve

    engine = engine or config.engine
    deployment = serve.deployment(
        AtelierReplica,
        name=DEPLOYMENT_NAME,
        num_replicas=engine.ray_replicas,
        max_ongoing_requests=1,
        ray_actor_options={"num_gpus": engine.ray_num_gpus, "num_cpus": engine.ray_num_cpus},
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_SECONDS,
        health_check_period_s=5.0,
    )
    return deployment.bind(config)


def deploy(settings: Settings, *, runner_factory: str = DEFAULT_RUNNER_FACTORY) -> Any:
    """Deploy (or update) the application `engine.ray_app` on the connected Ray cluster and wait
    until its replicas are up; returns the deployment handle. Blocking: call it from a thread."""
    from ray import serve

    # The bot talks to replicas through handles only: no HTTP proxy (it would take a port).
    serve.start(proxy_location="Disabled")
    app = build_app(WorkerConfig.from_settings(settings, runner_factory), settings.engine)
    return serve.run(app, name=settings.engine.ray_app, route_prefix=None)


def deployment_handle(app_name: str) -> Any:
    from ray import serve

    return serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app_name)


def replica_states(app_name: str) -> tuple[str, dict[str, int]]:
    """(application status, replica count per state) from the Serve controller; ("", {}) when the
    application is not deployed."""
    from ray import serve

    application = serve.status().applications.get(app_name)
    if application is None:
        return "", {}
    deployment = application.deployments.get(DEPLOYMENT_NAME)
    counts = {} if deployment is None else deployment.replica_states
    states = {str(getattr(state, "value", state)): count for state, count in counts.items()}
    return str(getattr(application.status, "value", application.status)), states


__all__ = [
    "DEPLOYMENT_NAME",
    "AtelierReplica",
    "build_app",
    "deploy",
    "deployment_handle",
    "replica_states",
]
