"""engine.client.LocalEngineClient: the asyncio handle on a real engine process running the real
Runner on the tiny model. One client is shared by the module and the tests run in file order:
the crash test restarts its process, the last test closes it."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from config.settings import Settings
from engine.api import EngineClient, EngineError, JobCancelled, Result
from engine.client import LocalEngineClient
from engine.jobs import Text2Img
from engine.jobs.events import Progress
from engine.pnginfo import read_parameters
from tests.engine.conftest import tiny_settings
from tests.engine.streams import collect

pytestmark = pytest.mark.asyncio(loop_scope="module")


def job(job_id: str, steps: int = 3, size: int = 128, **fields: Any) -> Text2Img:
    return Text2Img(
        job_id=job_id, prompt=fields.pop("prompt", "a red fox"), steps=steps, width=size, height=size, **fields
    )


def gone(pid: int) -> bool:
    """True when no process (not even a zombie) has this pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, tiny_models_config: dict[str, dict[str, Any]]) -> Settings:
    return tiny_settings(tmp_path_factory.mktemp("client-config"), tiny_models_config)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(settings: Settings) -> AsyncIterator[LocalEngineClient]:
    engine = LocalEngineClient(settings)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


async def test_start_and_health(client: LocalEngineClient) -> None:
    engine: EngineClient = client  # the Protocol the scheduler codes against
    assert engine.slots == 1
    health = client.health()
    assert (health.alive, health.slots, health.busy, health.restarts) == (True, 1, 0, 0)
    assert "ready" in health.detail
    assert client.startup_seconds is not None and client.ready_info is not None
    # Libraries and models are out of the garbage collector's full passes (engine.worker.freeze_loaded_heap).
    frozen = re.search(r"(\d+) objects frozen", client.ready_info.detail)
    assert frozen is not None and int(frozen[1]) > 100_000, client.ready_info.detail
    print(f"\nengine start-up (spawn → ready): {client.startup_seconds:.2f} s")


async def test_job_streams_progress_then_result(client: LocalEngineClient) -> None:
    progress, result = await collect(client.submit(job("j1", steps=4, count=2, seed=9)))
    # Started (step 0), the steps, then "encode": the compute is over, the slot is free while the
    # images are encoded.
    assert [p.step for p in progress] == [0, 1, 2, 3, 4, 4]
    assert (progress[0].phase, progress[1].phase, progress[-1].phase) == ("load", "base", "encode")
    assert any(p.preview for p in progress)
    assert result.job_id == "j1" and result.model == "tiny"
    assert [image.seed for image in result.images] == [9, 10]
    assert read_parameters(result.images[1].data)["seed"] == 10
    assert client.stats[-1].job_id == "j1"
    assert client.health().busy == 0


async def test_event_loop_keeps_running_during_a_job(client: LocalEngineClient) -> None:
    lags: list[float] = []

    async def ticker() -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - started - 0.01)

    task = asyncio.create_task(ticker())
    try:
        await collect(client.submit(job("j2", steps=4, size=256, count=4)))
    finally:
        task.cancel()
    assert len(lags) > 10
    assert max(lags) < 0.5, f"the event loop stalled for {max(lags) * 1000:.0f} ms"


async def test_cancel_running_job(client: LocalEngineClient) -> None:
    stream = client.submit(job("c1", steps=40, size=256, refiner=False))
    seen = after_cancel = 0
    with pytest.raises(JobCancelled):
        async for item in stream:
            assert isinstance(item, Progress)
            seen += 1
            if seen == 1:
                assert await client.cancel("c1") is True
                cancelled_at = time.perf_counter()
            else:
                after_cancel += 1
    latency = time.perf_counter() - cancelled_at
    # Within one step: at most the step in flight (and one already on the pipe) is reported after
    # the cancel, never the remaining ~38. (No wall-clock bound: this machine is shared and noisy.)
    assert after_cancel <= 2
    assert await client.cancel("c1") is False
    assert client.health().busy == 0
    print(f"\ncancel → JobCancelled in {latency * 1000:.0f} ms")


async def test_cancel_queued_job_and_unknown_job(client: LocalEngineClient) -> None:
    first = client.submit(job("q1", steps=4))
    second = client.submit(job("q2", steps=4))
    assert client.health().busy == 1  # one slot, however many are queued
    assert await client.cancel("q2") is True
    with pytest.raises(JobCancelled):
        await collect(second)
    _, result = await collect(first)
    assert result.job_id == "q1"
    assert await client.cancel("no-such-job") is False


async def test_bad_model_is_not_retryable(client: LocalEngineClient) -> None:
    with pytest.raises(EngineError) as info:
        await collect(client.submit(job("b1", model="sd15")))
    assert info.value.retryable is False
    assert "sd15" in str(info.value)
    with pytest.raises(EngineError) as info:
        await collect(client.submit(job("b2", steps=0)))
    assert info.value.retryable is False and "steps" in str(info.value)


async def test_duplicate_job_id_refused(client: LocalEngineClient) -> None:
    first = client.submit(job("d1"))
    with pytest.raises(EngineError) as info:
        await collect(client.submit(job("d1")))
    assert not info.value.retryable
    await collect(first)


async def test_concurrent_submits_run_one_after_another(client: LocalEngineClient) -> None:
    ids = ["s1", "s2", "s3"]
    finished: list[str] = []

    async def run(job_id: str) -> Result:
        _, result = await collect(client.submit(job(job_id, steps=3)))
        finished.append(job_id)
        return result

    results = await asyncio.gather(*(run(job_id) for job_id in ids))
    assert [r.job_id for r in results] == ids and finished == ids
    stats = {s.job_id: s for s in client.stats}
    assert stats["s2"].back_to_back and stats["s3"].back_to_back
    assert stats["s3"].idle_seconds is not None and stats["s3"].idle_seconds < 0.5


async def test_aclose_cancels_the_job(client: LocalEngineClient) -> None:
    async with contextlib.aclosing(client.submit(job("a1", steps=40, size=256))) as stream:
        async for _ in stream:
            break
    # The running job stops within about a step; the slot is free again when it has.
    for _ in range(100):
        if client.health().busy == 0:
            break
        await asyncio.sleep(0.05)
    assert client.health().busy == 0
    _, result = await collect(client.submit(job("a2")))
    assert result.job_id == "a2"


async def test_sigkill_mid_job_fails_it_retryable_and_restarts(client: LocalEngineClient) -> None:
    old_pid = client.pid
    assert old_pid is not None
    running = client.submit(job("k1", steps=40, size=256))
    queued = client.submit(job("k2", steps=3))  # forwarded to the worker but not started
    killed_at = 0.0
    with pytest.raises(EngineError) as info:
        async for _ in running:
            if not killed_at:
                os.kill(old_pid, signal.SIGKILL)
                killed_at = time.perf_counter()
    assert info.value.retryable is True
    assert time.perf_counter() - killed_at < 2.0
    assert client.health().restarts == 1
    # The queued job was never started: it goes to the new process instead of failing.
    _, result = await collect(queued)
    assert result.job_id == "k2"
    assert client.pid not in (None, old_pid)
    assert gone(old_pid), "the killed worker was not reaped"
    health = client.health()
    assert health.alive and health.restarts == 1
    _, result = await collect(client.submit(job("k3")))
    assert result.images


async def test_close_lets_the_running_job_finish_and_is_clean(client: LocalEngineClient) -> None:
    running = client.submit(job("r1", steps=6))
    waiting = client.submit(job("r2", steps=6))
    assert isinstance(await running.__anext__(), Progress)
    pid = client.pid
    assert pid is not None
    started = time.perf_counter()
    await client.close(grace=30)
    assert time.perf_counter() - started < 30
    _, result = await collect(running)  # finished during the grace period
    assert result.job_id == "r1"
    with pytest.raises(EngineError) as info:  # not started: back to the bot's queue
        await collect(waiting)
    assert info.value.retryable
    assert gone(pid), "the worker is still there (or a zombie)"
    assert pid not in [child.pid for child in multiprocessing.active_children()]
    health = client.health()
    assert not health.alive and health.detail == "closed"
    with pytest.raises(EngineError) as info:
        await collect(client.submit(job("after")))
    assert info.value.retryable
    await client.close()  # idempotent


async def test_load_failure_raises_at_start(tmp_path: Path, tiny_models_config: dict[str, dict[str, Any]]) -> None:
    missing = tmp_path / "no-such-model"
    settings = tiny_settings(tmp_path, {"broken": {"base": str(missing)}})
    engine = LocalEngineClient(settings)
    with pytest.raises(EngineError) as info:
        await engine.start()
    # The reason, with the operator's path, is the operator's; members read a plain sentence.
    assert not info.value.retryable and "no-such-model" in info.value.detail
    assert "no-such-model" not in str(info.value)
    health = engine.health()
    assert not health.alive and "failed to start" in health.detail
    await engine.close()
    assert engine._process is not None and engine._process.exitcode is not None
