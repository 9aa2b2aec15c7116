"""Metrics: values appear in the exposition text, registries are private, /metrics is served; the
engine health and Discord HTTP trace feed them; the scheduler's listener records and logs jobs."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from bot.metrics import DISCORD_EPOCH_MS, PENDING_KINDS, JobObserver, Metrics
from bot.queue.scheduler import Done, Failed, JobEvent, Scheduler
from config.settings import QueueSettings
from db.jobs import JobStore
from db.migrate import upgrade
from db.session import Database
from engine.api import EngineHealth
from tests.bot.fakes import FakeEngine, text2img_factory


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, tuple(sorted(labels.items())))]


def test_every_metric_is_recorded() -> None:
    m = Metrics()
    m.set_queue_depth(0, 3)
    m.set_queue_depth("1", 7)
    m.job_finished("done", wait_s=12.0, run_s=4.0)
    m.job_finished("failed", wait_s=1.0, run_s=0.5)
    m.job_finished("cancelled", wait_s=2.0)  # cancelled while queued: no run time
    m.engine_cost(10.0, 4.0)
    m.engine_cost(3.0, 1.0)
    m.engine_cost(1.0, 0)  # ignored: no division by zero
    m.quota_refused("over_quota")
    m.quota_refused("over_quota")
    m.quota_refused("banned")
    m.engine_restarted()
    m.discord_error(429)
    m.discord_error(500)
    m.discord_error(429)
    m.interaction_answered(0.12)
    m.interaction_answered(2.7, kind="component")

    assert value(m, "atelier_queue_depth", band="0") == 3
    assert value(m, "atelier_queue_depth", band="1") == 7
    assert value(m, "atelier_jobs_total", status="done") == 1
    assert value(m, "atelier_jobs_total", status="failed") == 1
    assert value(m, "atelier_jobs_total", status="cancelled") == 1
    assert value(m, "atelier_job_wait_seconds_count") == 3
    assert value(m, "atelier_job_wait_seconds_sum") == 15.0
    assert value(m, "atelier_job_wait_seconds_bucket", le="5.0") == 2
    assert value(m, "atelier_job_run_seconds_count") == 2
    assert value(m, "atelier_job_run_seconds_sum") == 4.5
    assert value(m, "atelier_engine_seconds_per_cost_unit_count") == 2
    assert value(m, "atelier_engine_seconds_per_cost_unit_sum") == 5.5
    assert value(m, "atelier_engine_seconds_per_cost_unit_last") == 3.0
    assert value(m, "atelier_quota_refusals_total", reason="over_quota") == 2
    assert value(m, "atelier_quota_refusals_total", reason="banned") == 1
    assert value(m, "atelier_engine_restarts_total") == 1
    assert value(m, "atelier_discord_api_errors_total", status="429") == 2
    assert value(m, "atelier_discord_api_errors_total", status="500") == 1
    assert value(m, "atelier_interactions_total", kind="command") == 1
    assert value(m, "atelier_interactions_total", kind="component") == 1
    assert value(m, "atelier_interaction_first_response_seconds_count") == 2
    assert value(m, "atelier_interaction_first_response_seconds_bucket", le="3.0") == 2
    assert value(m, "atelier_interaction_first_response_seconds_bucket", le="2.5") == 1


def test_known_label_values_start_at_zero() -> None:
    m = Metrics()
    for status in ("done", "failed", "cancelled"):
        assert value(m, "atelier_jobs_total", status=status) == 0
    for kind in ("command", "component", "autocomplete"):
        assert value(m, "atelier_interactions_total", kind=kind) == 0
    assert value(m, "atelier_engine_restarts_total") == 0
    text = m.render().decode()
    assert "# HELP atelier_queue_depth" in text and "# TYPE atelier_job_wait_seconds histogram" in text


def test_set_queue_depths_zeroes_emptied_bands() -> None:
    m = Metrics()
    m.set_queue_depths({0: 2, 1: 5})
    m.set_queue_depths({1: 4})
    assert value(m, "atelier_queue_depth", band="0") == 0
    assert value(m, "atelier_queue_depth", band="1") == 4


def test_registries_are_private() -> None:
    a, b = Metrics(), Metrics()  # no "Duplicated timeseries" error
    a.engine_restarted()
    assert value(a, "atelier_engine_restarts_total") == 1
    assert value(b, "atelier_engine_restarts_total") == 0
    assert REGISTRY.get_sample_value("atelier_engine_restarts_total") is None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_http_endpoint_serves_the_metrics() -> None:
    m = Metrics()
    m.job_finished("done", wait_s=1.0, run_s=2.0)
    m.discord_error(503)
    port = m.start_http(free_port(), addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            body = response.read().decode()
        assert 'atelier_jobs_total{status="done"} 1.0' in body
        assert 'atelier_discord_api_errors_total{status="503"} 1.0' in body
        assert "python_gc" not in body  # nothing from the global registry
        m.engine_restarted()  # live values, not a snapshot
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert "atelier_engine_restarts_total 1.0" in response.read().decode()
        with pytest.raises(RuntimeError, match="already running"):
            m.start_http(free_port(), addr="127.0.0.1")
    finally:
        m.stop_http()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    m.stop_http()  # idempotent


def test_port_zero_disables_the_endpoint() -> None:
    m = Metrics()
    assert m.start_http(0) == 0
    m.stop_http()


def test_taken_port_fails_loudly() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError):
            Metrics().start_http(port, addr="127.0.0.1")


# ---------------------------------------------------------------------- engine health, refusals


def test_engine_health_sets_the_gauges_and_counts_restarts_as_deltas() -> None:
    m = Metrics()
    m.engine_health(EngineHealth(alive=False, slots=2, busy=0, restarts=0, detail="loading"))
    assert value(m, "atelier_engine_alive") == 0 and value(m, "atelier_engine_slots") == 2
    m.engine_health(EngineHealth(alive=True, slots=2, busy=1, restarts=0))
    assert value(m, "atelier_engine_alive") == 1 and value(m, "atelier_engine_busy_slots") == 1
    m.engine_health(EngineHealth(alive=True, slots=2, busy=1, restarts=2))
    m.engine_health(EngineHealth(alive=True, slots=2, busy=1, restarts=2))  # seen already: no double count
    assert value(m, "atelier_engine_restarts_total") == 2
    m.engine_health(EngineHealth(alive=True, slots=3, busy=0, restarts=0))  # a fresh backend counts from 0
    m.engine_health(EngineHealth(alive=True, slots=3, busy=0, restarts=1))
    assert value(m, "atelier_engine_restarts_total") == 3 and value(m, "atelier_engine_slots") == 3


def test_quota_refusals_total_sums_every_reason() -> None:
    m = Metrics()
    assert m.quota_refusals_total() == 0
    m.quota_refused("over_quota")
    m.quota_refused("over_quota")
    m.quota_refused("blocked")
    assert m.quota_refusals_total() == 3


# ---------------------------------------------------------------------- the Discord HTTP trace


async def test_discord_trace_counts_errors_and_first_responses() -> None:
    """A real aiohttp session with the trace, against a real local HTTP server."""

    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["status"]))

    async def callback(request: web.Request) -> web.Response:
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/fail/{status}", fail)
    app.router.add_post("/api/v10/interactions/{id}/{token}/callback", callback)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    m = Metrics()
    # Interaction ids are snowflakes: their timestamp says when Discord created them (here 0.25 s ago).
    created_ms = int((time.time() - 0.25) * 1000) - DISCORD_EPOCH_MS
    component, command = created_ms << 22, (created_ms << 22) + 1
    m.note_interaction(component, "component")
    try:
        async with aiohttp.ClientSession(trace_configs=[m.discord_trace()]) as session:
            for status in (500, 429, 404, 500):
                async with session.get(f"http://127.0.0.1:{port}/fail/{status}") as response:
                    assert response.status == status
            for interaction_id in (component, command):
                url = f"http://127.0.0.1:{port}/api/v10/interactions/{interaction_id}/tok/callback?with_response=1"
                async with session.post(url) as response:
                    assert response.status == 204
            with pytest.raises(aiohttp.ClientConnectionError):
                async with session.get(f"http://127.0.0.1:{free_port()}/nobody-listens"):
                    pass
    finally:
        await runner.cleanup()
    assert value(m, "atelier_discord_api_errors_total", status="500") == 2
    assert value(m, "atelier_discord_api_errors_total", status="429") == 1
    assert value(m, "atelier_discord_api_errors_total", status="404") == 1
    assert value(m, "atelier_discord_api_errors_total", status="network") == 1
    assert value(m, "atelier_interactions_total", kind="component") == 1
    assert value(m, "atelier_interactions_total", kind="command") == 1  # not noted: counted as a command
    assert value(m, "atelier_interaction_first_response_seconds_count") == 2
    assert value(m, "atelier_interaction_first_response_seconds_bucket", le="0.1") == 0
    assert value(m, "atelier_interaction_first_response_seconds_bucket", le="1.0") == 2


def test_noted_interactions_are_bounded() -> None:
    m = Metrics()
    for interaction_id in range(PENDING_KINDS + 10):
        m.note_interaction(interaction_id, "autocomplete")
    m.note_interaction(-1, "modal")
    assert len(m._pending_kinds) == PENDING_KINDS and m._pending_kinds[-1] == "other"


# ---------------------------------------------------------------------- the scheduler's listener


async def test_job_observer_records_and_logs_each_life_cycle(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The real scheduler on the real job store (SQLite): a job retried once then done, one failed
    for good, one cancelled while queued."""
    caplog.set_level(logging.INFO, logger="bot.metrics")
    url = f"sqlite+aiosqlite:///{tmp_path / 'atelier.db'}"
    await upgrade(url)
    db = Database(url)
    await db.connect()
    store = JobStore(db)
    engine = FakeEngine(slots=1, crash_attempts={"RETRIED1": 1}, fatal=["FAILED01"], compute_seconds=3.0)
    queue = QueueSettings(per_user_cap=100, global_cap=100, max_attempts=3, aging_seconds=1e6)
    scheduler: Scheduler[Any] = Scheduler(store, engine, queue=queue, job_factory=text2img_factory, retry_delay=0.01)
    m = Metrics()
    observer = JobObserver(m, scheduler, engine)
    scheduler.on_event(observer.on_event)
    await scheduler.start()
    try:
        scheduler.pause()
        for job_id in ("RETRIED1", "FAILED01", "CANCEL01"):
            record = await store.create(
                job_id=job_id, kind="text2img", owner_id=7, guild_id=1, channel_id=2,
                params={"prompt": "x"}, cost=1.5, band=1,
            )  # fmt: skip
            await scheduler.enqueue(record)
        for _ in range(3):  # positions, then the gauges, are refreshed once per event-loop turn
            await asyncio.sleep(0)
        assert value(m, "atelier_queue_depth", band="1") == 3
        assert await scheduler.cancel("CANCEL01")
        await asyncio.sleep(0)
        assert value(m, "atelier_queue_depth", band="1") == 2
        ends = [asyncio.create_task(last_event(scheduler, job_id)) for job_id in ("RETRIED1", "FAILED01")]
        scheduler.resume()
        done, failed = await asyncio.wait_for(asyncio.gather(*ends), 10)
    finally:
        await scheduler.stop(0)
        await db.close()
    assert isinstance(done, Done) and isinstance(failed, Failed)
    assert value(m, "atelier_jobs_total", status="done") == 1
    assert value(m, "atelier_jobs_total", status="failed") == 1
    assert value(m, "atelier_jobs_total", status="cancelled") == 1
    assert value(m, "atelier_job_wait_seconds_count") == 2  # the cancelled job never started
    assert value(m, "atelier_job_run_seconds_count") == 2
    assert value(m, "atelier_engine_seconds_per_cost_unit_count") == 1
    assert value(m, "atelier_engine_seconds_per_cost_unit_last") == 2.0  # 3 s of compute for 1.5 units
    assert value(m, "atelier_queue_depth", band="1") == 0
    assert value(m, "atelier_engine_slots") == 1 and value(m, "atelier_engine_alive") == 1

    lines = [r.getMessage() for r in caplog.records if r.name == "bot.metrics"]
    retried = [line.split(" ", 2)[1] for line in lines if line.startswith("job=RETRIED1 ")]
    assert retried == [
        "event=queued", "event=started", "event=requeued", "event=started", "event=done",
    ], lines  # fmt: skip
    assert any(line.startswith("job=FAILED01 event=failed attempts=1 refunded=1.5000 error=") for line in lines)
    assert any(line.startswith("job=CANCEL01 event=cancelled refunded=1.5000") for line in lines)


async def last_event(scheduler: Scheduler[Any], job_id: str) -> JobEvent:
    events = [event async for event in scheduler.subscribe(job_id)]
    return events[-1]
