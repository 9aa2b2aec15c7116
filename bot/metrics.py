"""Prometheus metrics for operators: is the queue backing up, is the GPU keeping up, is Discord
unhappy with us, do interactions get their first answer inside Discord's 3 seconds?

Every `Metrics` owns a private `CollectorRegistry` (never prometheus_client's global one): the
bot, the demo and each test can build their own without "Duplicated timeseries" errors, and
nothing from other libraries leaks into our endpoint. Callers use the small methods below and
never touch prometheus objects, so the metric names live in this one file.

Label values are bounded on purpose (job status, a refusal reason, an HTTP status code, a
band number, an interaction kind): never a user id, prompt or job id, which would make one
time series per user and swamp Prometheus.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from wsgiref.simple_server import WSGIServer

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

NAMESPACE = "atelier"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Terminal job statuses (db.models.JOB_STATUSES minus queued/running), pre-created at 0 so
# `rate()` and alerts work before the first failure ever happens.
TERMINAL_STATUSES = ("done", "failed", "cancelled")
INTERACTION_KINDS = ("command", "component", "autocomplete")

# Waiting can take many minutes on a busy community GPU; running is seconds to minutes.
WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
RUN_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
# Discord drops an interaction not answered within 3 s: resolve finely up to there.
FIRST_RESPONSE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 5)


class Metrics:
    def __init__(self) -> None:
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
        self.jobs = Counter(
            "jobs", "Jobs that reached a terminal status", ["status"], namespace=ns, registry=r
        )
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
        self.interactions = Counter(
            "interactions", "Interactions answered", ["kind"], namespace=ns, registry=r
        )
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
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ recording

    def set_queue_depth(self, band: int | str, depth: int) -> None:
        self.queue_depth.labels(band=str(band)).set(depth)

    def set_queue_depths(self, depths: Mapping[int | str, int]) -> None:
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

    def quota_refused(self, reason: str) -> None:
        self.quota_refusals.labels(reason=reason).inc()

    def engine_restarted(self) -> None:
        self.engine_restarts.inc()

    def discord_error(self, status: int | str) -> None:
        """A failed Discord API call; `status` is the HTTP code (0 or "network" for no response)."""
        self.discord_errors.labels(status=str(status)).inc()

    def interaction_answered(self, latency_s: float, kind: str = "command") -> None:
        self.interactions.labels(kind=kind).inc()
        self.first_response.observe(max(0.0, latency_s))

    # ------------------------------------------------------------------ exposing

    def render(self) -> bytes:
        """The exposition text (what GET /metrics returns)."""
        return generate_latest(self.registry)

    def start_http(self, port: int, addr: str = "0.0.0.0") -> int:
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


__all__ = ["CONTENT_TYPE", "Metrics"]
