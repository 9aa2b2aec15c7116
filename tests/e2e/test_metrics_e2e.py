"""Operators' metrics through the real bot: jobs, a quota refusal, a Discord server error and an
engine crash move the values served on the real /metrics HTTP endpoint (the port from the
settings); the job life cycle is logged with `job=<id>` and the token never appears in the log."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from studio.harness import Studio, job_id_of, open_studio, tiny_settings
from tests.e2e.refusals import assert_queued, assert_refused

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

RESULT_POSTS = r"^/channels/\d+/messages$"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def studio(tiny_model_dir: Path, studio_dir: Path, metrics_port: int) -> AsyncIterator[Studio]:
    settings = tiny_settings(tiny_model_dir, studio_dir, metrics={"port": metrics_port})
    async with open_studio(settings) as running:
        yield running
        running.sb.clear_faults()


async def scrape(port: int) -> Samples:
    """GET /metrics over HTTP (in a thread: the bot's loop keeps running meanwhile)."""

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
            return response.read().decode()

    text = await asyncio.to_thread(get)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def until_scraped(port: int, condition: Callable[[Samples], bool], timeout: float = 30.0) -> Samples:
    """Scrape until `condition` holds (the engine gauges are refreshed every 2 s)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        samples = await scrape(port)
        if condition(samples) or asyncio.get_running_loop().time() > deadline:
            return samples
        await asyncio.sleep(0.2)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_jobs_a_refusal_and_a_discord_error_move_the_served_metrics(
    studio: Studio, metrics_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    services = studio.bot.wiring
    before = await until_scraped(metrics_port, lambda s: value(s, "atelier_engine_alive") == 1)
    assert value(before, "atelier_engine_slots") == 1 and value(before, "atelier_engine_busy_slots") == 0

    member = studio.new_member("measured")
    services.scheduler.pause()
    try:
        jobs = []
        for prompt in ("a red kite", "a blue kite"):
            inter = await studio.command(member, "generate", {"prompt": prompt})
            assert_queued(inter)
            jobs.append(job_id_of(inter))
        waiting = await scrape(metrics_port)
        assert value(waiting, "atelier_queue_depth", band="1") == 2
        broken = studio.sb.inject_fault("POST", RESULT_POSTS, status=500, count=1)
    finally:
        services.scheduler.resume()
    for job_id in jobs:
        await studio.result_of(job_id)
    assert broken.hits == 1

    blocked = studio.new_member("blocked")
    await services.quotas.set_user_limit(studio.guild.id, blocked.id, 0)
    assert_refused(await studio.command(blocked, "generate", {"prompt": "a kite"}), "allowance")

    # The sandbox has the refusal before the bot has read the callback's HTTP answer, which is
    # when the first response is counted: scrape until all three are.
    after = await until_scraped(
        metrics_port, lambda s: moved(s, before, "atelier_interaction_first_response_seconds_count") >= 3
    )
    assert moved(after, before, "atelier_jobs_total", status="done") == 2
    assert moved(after, before, "atelier_jobs_total", status="failed") == 0
    assert moved(after, before, "atelier_job_wait_seconds_count") == 2
    assert moved(after, before, "atelier_job_wait_seconds_sum") > 0  # both waited while paused
    assert moved(after, before, "atelier_job_run_seconds_count") == 2
    assert moved(after, before, "atelier_job_run_seconds_sum") > 0
    assert moved(after, before, "atelier_engine_seconds_per_cost_unit_count") == 2
    assert value(after, "atelier_engine_seconds_per_cost_unit_last") > 0
    assert moved(after, before, "atelier_quota_refusals_total", reason="blocked") == 1
    assert moved(after, before, "atelier_discord_api_errors_total", status="500") == 1
    assert value(after, "atelier_queue_depth", band="1") == 0
    assert moved(after, before, "atelier_interactions_total", kind="command") == 3
    assert moved(after, before, "atelier_interaction_first_response_seconds_count") == 3
    assert moved(after, before, "atelier_interaction_first_response_seconds_bucket", le="3.0") == 3

    # The job life cycle is in the log with the job id as a key, and the token is nowhere.
    messages = [record.getMessage() for record in caplog.records]
    for job_id in jobs:
        for event in ("queued", "started", "done"):
            assert any(f"job={job_id} event={event}" in m for m in messages), (job_id, event)
    assert not any(studio.sb.token in m for m in messages)


async def test_an_engine_crash_counts_as_a_restart(studio: Studio, metrics_port: int) -> None:
    engine = studio.bot.wiring.engine.inner  # type: ignore[attr-defined]
    before = await scrape(metrics_port)
    pid = engine.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    after = await until_scraped(
        metrics_port,
        lambda s: moved(s, before, "atelier_engine_restarts_total") > 0 and value(s, "atelier_engine_alive") == 1,
    )
    assert moved(after, before, "atelier_engine_restarts_total") == 1
    assert value(after, "atelier_engine_alive") == 1 and engine.pid not in (None, pid)
    # And the restarted engine works.
    member = studio.new_member("after-the-crash")
    inter = await studio.command(member, "generate", {"prompt": "a phoenix"})
    assert_queued(inter)
    await studio.result_of(job_id_of(inter))
