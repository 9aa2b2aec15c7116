"""Prometheus metrics for operators: is the queue backing up, is the GPU keeping up, is Discord
unhappy with us, do interactions get their first answer inside Discord's 3 seconds?

Every `Metrics` owns a private `CollectorRegistry` (never prometheus_client's global one): the
bot, the demo and each test can build their own without "Duplicated timeseries" errors, and
nothing from other libraries leaks into our endpoint. Callers use the small methods below and
never touch prometheus objects, so the metric names live in this one file.

Label values are bounded on purpose (job status, a refusal reason, an HTTP status code, a
band number, an interaction kind): never a user id, prompt or job id, which would make one
time series per user and swamp Prometheus.

`JobObserver` feeds the metrics from the running bot (the scheduler's events, and a look at the
queue and the engine every few seconds) and writes the job life cycle to the log as `job=<id>
event=...` lines; `discord_trace` counts every failed Discord API call at the HTTP layer.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import Counter as Tally
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any
from wsgiref.simple_server import WSGIServer

import aiohttp
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    generate_latest,
    start_http_server,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from bot.queue.scheduler import Cancelled, Done, Failed, JobEvent, Queued, Scheduler, Started
from engine.api import EngineClient, EngineHealth

log = logging.getLogger(__name__)

NAMESPACE = "atelier"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Terminal job statuses (db.models.JOB_STATUSES minus queued/running), pre-created at 0 so
# `rate()` and alerts work before the first failure ever happens.
TERMINAL_STATUSES = ("done", "failed", "cancelled")
INTERACTION_KINDS = ("command", "component", "autocomplete")
# An interaction's first (and only) callback: `POST .../interactions/<id>/<token>/callback`.
INTERACTION_CALLBACK = re.compile(r"/interactions/(\d+)/[^/]+/callback$")
DISCORD_EPOCH_MS = 1420070400000
PENDING_KINDS = 1024  # interactions noted but not answered yet (bounded: a lost one must not leak)
# The bands bot.requests uses (0 moderators and priority roles, 1 everyone else): shown at 0 from the start.
BANDS = ("0", "1")

# Waiting can take many minutes on a busy community GPU; running is seconds to minutes.
WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
RUN_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
# Discord drops an interaction not answered within 3 s: resolve finely up to there.
FIRST_RESPONSE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 5)


class Metrics:
    def __init__(self) -> None:
        self._refusals_by_server: Tally[int | None] = Tally()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ns = NAMESPACE
        self.queue_depth = Gauge(
            "queue_depth", "Jobs waiting in the queue, per priority band", ["band"], namespace=ns, registry=r
        )
        self.job_wait = Histogram(
            "job_wait_seconds",
            "Seconds from enqueue to start of the final attempt",
            namespace=ns,
            registry=r,
            buckets=WAIT_BUCKETS,
        )
        self.job_run = Histogram(
            "job_run_seconds",
            "Seconds a job ran in the engine",
            namespace=ns,
            registry=r,
            buckets=RUN_BUCKETS,
        )
        self.jobs = Counter("jobs", "Jobs that reached a terminal status", ["status"], namespace=ns, registry=r)
        self.engine_seconds_per_unit = Summary(
            "engine_seconds_per_cost_unit",
            "Engine compute seconds per quota cost unit, per finished job (sum/count is the average)",
            namespace=ns,
            registry=r,
        )
        self.engine_seconds_per_unit_last = Gauge(
            "engine_seconds_per_cost_unit_last",
            "Engine compute seconds per cost unit of the most recent job",
            namespace=ns,
            registry=r,
        )
        self.quota_refusals = Counter(
            "quota_refusals", "Requests refused by quota or policy", ["reason"], namespace=ns, registry=r
        )
        self.engine_restarts = Counter(
            "engine_restarts", "Times the engine process was restarted", namespace=ns, registry=r
        )
        self.discord_errors = Counter(
            "discord_api_errors",
            "Failed Discord API calls, by HTTP status code",
            ["status"],
            namespace=ns,
            registry=r,
        )
        self.interactions = Counter("interactions", "Interactions answered", ["kind"], namespace=ns, registry=r)
        self.first_response = Histogram(
            "interaction_first_response_seconds",
            "Seconds from receiving an interaction to its first response",
            namespace=ns,
            registry=r,
            buckets=FIRST_RESPONSE_BUCKETS,
        )
        for status in TERMINAL_STATUSES:
            self.jobs.labels(status=status)
        for kind in INTERACTION_KINDS:
            self.interactions.labels(kind=kind)
        for band in BANDS:
            self.queue_depth.labels(band=band)
        self.engine_slots = Gauge(
            "engine_slots", "Jobs the engine can run at once (GPUs or replicas)", namespace=ns, registry=r
        )
        self.engine_busy = Gauge("engine_busy_slots", "Engine slots holding a job", namespace=ns, registry=r)
        self.engine_alive = Gauge(
            "engine_alive", "1 when the engine is up with its models loaded, else 0", namespace=ns, registry=r
        )
        self._restarts_seen = 0
        self._pending_kinds: dict[int, str] = {}
        self.started_at = time.time()
        """Wall-clock start of this bot (uptime for /mod stats)."""
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ recording

    def set_queue_depth(self, band: int | str, depth: int) -> None:
        self.queue_depth.labels(band=str(band)).set(depth)

    def set_queue_depths(self, depths: Mapping[int, int] | Mapping[str, int]) -> None:
        """Set every band at once; bands missing from `depths` drop to 0 (they emptied)."""
        seen = {str(band) for band in depths}
        for labels in list(self._band_labels()):
            if labels not in seen:
                self.queue_depth.labels(band=labels).set(0)
        for band, depth in depths.items():
            self.set_queue_depth(band, depth)

    def job_finished(self, status: str, wait_s: float | None = None, run_s: float | None = None) -> None:
        """A job reached `status` (done/failed/cancelled). Times are recorded when known:
        a job cancelled while queued has no run time."""
        self.jobs.labels(status=status).inc()
        if wait_s is not None:
            self.job_wait.observe(max(0.0, wait_s))
        if run_s is not None:
            self.job_run.observe(max(0.0, run_s))

    def engine_cost(self, compute_seconds: float, cost_units: float) -> None:
        """Record how many engine seconds one cost unit took (the quota price vs. reality)."""
        if cost_units <= 0 or compute_seconds < 0:
            return
        per_unit = compute_seconds / cost_units
        self.engine_seconds_per_unit.observe(per_unit)
        self.engine_seconds_per_unit_last.set(per_unit)

    def quota_refused(self, reason: str, guild_id: int | None = None) -> None:
        self.quota_refusals.labels(reason=reason).inc()
        self._refusals_by_server[guild_id] += 1

    def quota_refusals_in(self, guild_id: int | None) -> int:
        """Quota refusals since this bot started in one server (for its moderators' /mod stats)."""
        return self._refusals_by_server[guild_id]

    def engine_restarted(self) -> None:
        self.engine_restarts.inc()

    def engine_health(self, health: EngineHealth) -> None:
        """The engine's own view: slots, busy, alive, and its restart count (counted as a delta,
        so `engine_restarts_total` stays a proper counter whatever the backend reports)."""
        self.engine_slots.set(health.slots)
        self.engine_busy.set(health.busy)
        self.engine_alive.set(1 if health.alive else 0)
        if health.restarts > self._restarts_seen:
            self.engine_restarts.inc(health.restarts - self._restarts_seen)
        # A backend replaced by a fresh one counts from 0 again: follow it down.
        self._restarts_seen = health.restarts

    def discord_error(self, status: int | str) -> None:
        """A failed Discord API call; `status` is the HTTP code (0 or "network" for no response)."""
        self.discord_errors.labels(status=str(status)).inc()

    def interaction_answered(self, latency_s: float, kind: str = "command") -> None:
        self.interactions.labels(kind=kind).inc()
        self.first_response.observe(max(0.0, latency_s))

    def note_interaction(self, interaction_id: int, kind: str) -> None:
        """Remember an interaction's kind until its first response is seen by `discord_trace`."""
        if len(self._pending_kinds) >= PENDING_KINDS:
            self._pending_kinds.pop(next(iter(self._pending_kinds)))
        self._pending_kinds[interaction_id] = kind if kind in INTERACTION_KINDS else "other"

    def quota_refusals_total(self) -> int:
        """Quota refusals since this bot started, all reasons together."""
        return int(
            sum(
                sample.value
                for metric in self.quota_refusals.collect()
                for sample in metric.samples
                if sample.name.endswith("_total")
            )
        )

    def discord_trace(self) -> aiohttp.TraceConfig:
        """An aiohttp trace for discord.py's HTTP session (`Client(http_trace=...)`): every Discord
        API answer with a status >= 400 (including the 429s discord.py retries by itself) and every
        request that got no answer at all is counted, whichever code path made the call. A
        successful interaction callback is an interaction's first response: its latency is
        measured from the interaction's snowflake time (when Discord created it)."""
        trace = aiohttp.TraceConfig()

        async def on_end(session: Any, context: SimpleNamespace, params: aiohttp.TraceRequestEndParams) -> None:
            status = params.response.status
            if status >= 400:
                self.discord_error(status)
            elif params.method == "POST" and (match := INTERACTION_CALLBACK.search(params.url.path)):
                interaction_id = int(match[1])
                created = ((interaction_id >> 22) + DISCORD_EPOCH_MS) / 1000
                kind = self._pending_kinds.pop(interaction_id, "command")
                self.interaction_answered(time.time() - created, kind)

        async def on_exception(
            session: Any, context: SimpleNamespace, params: aiohttp.TraceRequestExceptionParams
        ) -> None:
            self.discord_error("network")

        trace.on_request_end.append(on_end)
        trace.on_request_exception.append(on_exception)
        return trace

    # ------------------------------------------------------------------ exposing

    def render(self) -> bytes:
        """The exposition text (what GET /metrics returns)."""
        return generate_latest(self.registry)

    def start_http(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve /metrics on `port` in a daemon thread; port 0 means disabled (returns 0).

        Returns the bound port. Raises OSError when the port is taken, so a misconfigured port
        is reported at startup rather than silently missing.
        """
        if port <= 0:
            return 0
        if self._server is not None:
            raise RuntimeError("the metrics server is already running")
        self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(self._server.server_port)

    def stop_http(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def _band_labels(self) -> list[str]:
        return [
            sample.labels["band"]
            for metric in self.queue_depth.collect()
            for sample in metric.samples
            if "band" in sample.labels
        ]


class JobObserver:
    """The scheduler's listener for operators: records every job's ending in the metrics, keeps
    the queue and engine gauges current, and logs the life cycle as `job=<id> event=<what>`.

    Listeners run on the event loop and must not block: everything here is in-memory.
    """

    def __init__(self, metrics: Metrics, scheduler: Scheduler[Any], engine: EngineClient) -> None:
        self.metrics = metrics
        self.scheduler = scheduler
        self.engine = engine
        # Attempts made when a job's queueing was last logged: a Queued with more attempts is a requeue,
        # one with the same is only a move up the line (not logged).
        self._logged: dict[str, int] = {}
        self._refresh_pending = False

    def on_event(self, event: JobEvent) -> None:
        if isinstance(event, Queued):
            if not self._queued(event):
                return  # a move up the line: every queued job gets one per dispatch, depth unchanged
        elif isinstance(event, Started):
            log.info("job=%s event=started attempt=%d", event.job_id, event.attempt)
        elif isinstance(event, Done):
            self._done(event)
        elif isinstance(event, Failed):
            record = event.record
            self._finished("failed", record)
            log.warning(
                "job=%s event=failed attempts=%d refunded=%.4f error=%r",
                record.id,
                record.attempts,
                record.cost,
                event.error,
            )
        elif isinstance(event, Cancelled):
            record = event.record
            self._finished("cancelled", record)
            log.info("job=%s event=cancelled refunded=%.4f", record.id, record.cost)
        else:
            return  # progress: many per job, nothing to record
        self._refresh_soon()

    def refresh(self) -> None:
        """Queue depth per band and the engine's health, now."""
        try:
            self.metrics.set_queue_depths(self.scheduler.depth_by_band())
            self.metrics.engine_health(self.engine.health())
        except Exception:
            log.exception("metrics: reading the queue or the engine failed")

    def _refresh_soon(self) -> None:
        """One refresh per event-loop turn, however many jobs a burst queues in it."""
        if self._refresh_pending:
            return
        self._refresh_pending = True
        asyncio.get_running_loop().call_soon(self._deferred_refresh)

    def _deferred_refresh(self) -> None:
        self._refresh_pending = False
        self.refresh()

    async def run(self, interval: float = 2.0) -> None:
        """Refresh the gauges every `interval` seconds (an idle queue emits no events, but an
        engine can die or come back at any time)."""
        while True:
            self.refresh()
            await asyncio.sleep(interval)

    # ------------------------------------------------------------------ internals

    def _queued(self, event: Queued) -> bool:
        """Log a job joining the queue (first time, or again after a failed attempt); True then."""
        logged = self._logged.get(event.job_id)
        if logged is None or event.attempt > logged:
            self._logged[event.job_id] = event.attempt
            what = "queued" if event.attempt == 0 else "requeued"
            log.info(
                "job=%s event=%s position=%d attempt=%d eta=%.0fs",
                event.job_id,
                what,
                event.position,
                event.attempt,
                event.eta,
            )
            return True
        return False

    def _done(self, event: Done) -> None:
        record, result = event.record, event.result
        run_s = result.seconds if result is not None else record.seconds
        self._finished("done", record, run_s=run_s)
        if result is not None:
            compute = result.compute_seconds if result.compute_seconds > 0 else result.seconds
            self.metrics.engine_cost(compute, record.cost)
        log.info(
            "job=%s event=done attempts=%d seconds=%.2f cost=%.4f",
            record.id,
            record.attempts,
            run_s or 0.0,
            record.cost,
        )

    def _finished(self, status: str, record: Any, *, run_s: float | None = None) -> None:
        self._logged.pop(record.id, None)
        # db.jobs.JobRecord has the timestamps; the scheduler's minimal record protocol does not.
        created = record.created_at
        started, finished = getattr(record, "started_at", None), getattr(record, "finished_at", None)
        wait_s = (started - created).total_seconds() if started is not None else None
        if run_s is None and started is not None and finished is not None:
            run_s = (finished - started).total_seconds()
        self.metrics.job_finished(status, wait_s=wait_s, run_s=run_s)


__all__ = ["CONTENT_TYPE", "JobObserver", "Metrics"]
