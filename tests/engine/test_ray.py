"""engine.ray_client.RayEngineClient against a real local Ray with a 2-replica Serve deployment
of the real engine on the tiny model (CPU replicas: num_gpus=0, num_cpus=1, one torch thread).

One Ray session and one client are shared by the module (Ray start-up and the replicas' model
loads are most of the cost); the tests run in file order and the replica-kill tests come last.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from PIL import Image

from config.settings import Settings, load_settings
from engine.api import EngineError, JobCancelled
from engine.jobs import Job, Refine, Text2Img, Upscale, Variations
from engine.jobs.events import Progress
from engine.pnginfo import read_parameters

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install '.[ray]'")
pytest.importorskip("ray.serve", reason="Ray Serve is an optional extra: pip install '.[ray]'")

from engine.ray_client import RayEngineClient  # noqa: E402  (after the skip: needs nothing from Ray)
from tests.engine.raysession import local_ray  # noqa: E402  (after the skip: imports Ray)
from tests.engine.streams import collect  # noqa: E402  (with the imports above)

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

REPLICAS = 2
ENGINE: dict[str, Any] = {
    "backend": "ray",
    "device": "cpu",
    "dtype": "fp32",
    "torch_threads": 1,
    "preview_every": 2,
    "preview_size": 64,
    "start_timeout": 300,
    "ray_replicas": REPLICAS,
    "ray_num_gpus": 0,
    "ray_num_cpus": 1,
    "ray_app": "atelier-test",
}


def write_config(directory: Path, models: dict[str, dict[str, Any]]) -> Path:
    lines = ["[engine]", *(f"{key} = {json.dumps(value)}" for key, value in ENGINE.items())]
    for name, table in models.items():
        lines.append(f"[models.{json.dumps(name)}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    path = directory / "atelier.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def load_from(path: Path, **env: str) -> Settings:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATELIER_CONFIG", str(path))
        for name, value in env.items():
            patch.setenv(name, value)
        return load_settings()


def t2i(job_id: str, seed: int, *, steps: int = 3, size: int = 128, **fields: Any) -> Text2Img:
    return Text2Img(
        job_id=job_id,
        prompt=fields.pop("prompt", "a red fox in the snow"),
        steps=steps,
        width=size,
        height=size,
        seed=seed,
        **fields,
    )


async def until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.1)


def pixels(data: bytes) -> tuple[tuple[int, int], bytes]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size, image.convert("RGB").tobytes()


def replica_names(app: str) -> list[str]:
    names = ray.util.list_named_actors(all_namespaces=True)
    return sorted(
        entry["name"]
        for entry in names
        if entry["namespace"] == "serve" and entry["name"].startswith(f"SERVE_REPLICA::{app}#")
    )


def kill_one_replica(app: str) -> str:
    """SIGKILL-like death of one replica actor (Serve starts a replacement by itself)."""
    name = replica_names(app)[0]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return name


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """A private local Ray (2 CPUs, no dashboard, no token file under ~/.ray)."""
    with local_ray(REPLICAS):
        yield


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory, tiny_models_config: dict[str, dict[str, Any]]) -> Path:
    return write_config(tmp_path_factory.mktemp("ray-config"), tiny_models_config)


@pytest.fixture(scope="module")
def settings(config_file: Path) -> Settings:
    return load_from(config_file)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(ray_session: None, settings: Settings) -> AsyncIterator[RayEngineClient]:
    engine = RayEngineClient(settings, poll_interval=0.5)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close(grace=5)


async def test_two_replicas_up(client: RayEngineClient) -> None:
    health = client.health()
    assert health.alive and health.slots == REPLICAS == client.slots
    assert health.busy == 0 and health.restarts == 0
    assert f"{REPLICAS} replicas running" in health.detail
    assert client.startup_seconds is not None
    print(f"\nray engine up in {client.startup_seconds:.1f} s: {health.detail}")


async def test_mixed_queue_runs_to_completion(client: RayEngineClient) -> None:
    _, first = await collect(client.submit(t2i("mix-0", 1)))
    source = first.images[0].data
    jobs: list[Job] = [
        t2i("mix-1", 2, count=2),
        t2i("mix-2", 3, refiner=False, model="tiny-base"),
        Variations(job_id="mix-3", image=source, prompt="a fox", steps=3, strength=0.6, count=2, seed=4),
        Refine(job_id="mix-4", image=source, prompt="a fox", steps=3, strength=0.5, seed=5),
        Upscale(job_id="mix-5", image=source, prompt="a fox", steps=2, strength=0.3, seed=6),
        t2i("mix-6", 7, model="tiny-single", refiner=False),
    ]
    busy_seen: list[int] = []

    async def watch() -> None:
        while True:
            busy_seen.append(client.health().busy)
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        # All at once: the client keeps at most one call per replica and the rest waiting here.
        outcomes = await asyncio.gather(*(collect(client.submit(job)) for job in jobs))
    finally:
        watcher.cancel()
    expected = {"mix-1": (2, 128), "mix-2": (1, 128), "mix-3": (2, 128), "mix-4": (1, 128), "mix-5": (1, 256)}
    expected["mix-6"] = (1, 128)
    for job, (progress, result) in zip(jobs, outcomes, strict=True):
        count, side = expected[job.job_id]
        assert result.job_id == job.job_id
        assert len(result.images) == count
        assert all((image.width, image.height) == (side, side) for image in result.images)
        assert read_parameters(result.images[0].data)["job_id"] == job.job_id
        assert progress and progress[-1].phase == "encode"  # the slot is handed back before the Result
        assert result.compute_seconds > 0
    assert max(busy_seen) <= REPLICAS
    assert client.health().busy == 0
    assert len(client.stats) >= len(jobs)


async def test_results_match_the_local_engine(client: RayEngineClient, settings: Settings) -> None:
    from engine.client import LocalEngineClient

    jobs: list[Job] = [t2i("same-1", 1234, count=2), t2i("same-2", 99, steps=4, refiner=False)]
    ray_results = [result for _, result in await asyncio.gather(*(collect(client.submit(job)) for job in jobs))]
    local = LocalEngineClient(settings)
    try:
        await local.start()
        local_results = [(await collect(local.submit(job)))[1] for job in jobs]
    finally:
        await local.close()
    for ray_result, local_result in zip(ray_results, local_results, strict=True):
        assert [image.seed for image in ray_result.images] == [image.seed for image in local_result.images]
        for ray_image, local_image in zip(ray_result.images, local_result.images, strict=True):
            assert pixels(ray_image.data) == pixels(local_image.data)
            assert read_parameters(ray_image.data) == read_parameters(local_image.data)


async def test_a_batch_is_one_call_and_each_member_its_own_job(client: RayEngineClient) -> None:
    jobs = [t2i(f"batch-{i}", 40 + i, prompt=f"a red fox, number {i}", refiner=False) for i in range(3)]
    batched = await asyncio.gather(*(collect(stream) for stream in client.submit_batch(jobs)))
    alone = await asyncio.gather(*(collect(client.submit(t2i(f"alone-{i}", 40 + i, prompt=j.prompt, refiner=False)))
                                   for i, j in enumerate(jobs)))  # fmt: skip
    for job, (progress, result), (_, solo) in zip(jobs, batched, alone, strict=True):
        assert result.job_id == job.job_id and progress[-1].phase == "encode"
        assert {p.job_id for p in progress} == {job.job_id}
        assert pixels(result.images[0].data) == pixels(solo.images[0].data)
    # A member cancelled while the others run ends at once; the others finish.
    long_jobs = [t2i(f"lb-{i}", i, steps=30, size=256, prompt=f"a fox {i}") for i in range(2)]
    streams = client.submit_batch(long_jobs)
    await anext(streams[0])
    assert await client.cancel("lb-1")
    with pytest.raises(JobCancelled):
        await collect(streams[1])
    _, kept = await collect(streams[0])
    assert kept.job_id == "lb-0"


async def test_bad_input_fails_for_good(client: RayEngineClient) -> None:
    with pytest.raises(EngineError) as caught:
        await collect(client.submit(t2i("bad-1", 1, model="no-such-model")))
    assert caught.value.retryable is False
    duplicate = t2i("dup-1", 1, steps=2)
    first = client.submit(duplicate)
    with pytest.raises(EngineError) as again:
        await collect(client.submit(duplicate))
    assert again.value.retryable is False
    await collect(first)


async def test_cancel_running_and_waiting_jobs(client: RayEngineClient) -> None:
    long_jobs = [t2i(f"long-{i}", i, steps=60, size=256) for i in range(REPLICAS)]
    streams = [client.submit(job) for job in long_jobs]
    waiting = client.submit(t2i("waits", 5, steps=2))
    firsts = await asyncio.gather(*(anext(stream) for stream in streams))
    assert all(isinstance(item, Progress) for item in firsts)
    assert client.health().busy == REPLICAS

    # Waiting in the client (both replicas taken): cancelled at once, never sent.
    assert await client.cancel("waits")
    with pytest.raises(JobCancelled):
        await anext(waiting)

    started = time.perf_counter()
    assert await client.cancel("long-0")
    with pytest.raises(JobCancelled):
        await collect(streams[0])
    cancel_seconds = time.perf_counter() - started
    assert cancel_seconds < 10
    assert not await client.cancel("long-0")

    # The freed replica takes the next job while the other long job still runs.
    _, result = await collect(client.submit(t2i("after-cancel", 8, steps=2)))
    assert result.job_id == "after-cancel"
    _, other = await collect(streams[1])
    assert other.job_id == "long-1"
    print(f"\ncancel of a running job took {cancel_seconds:.2f} s")


async def test_engine_serve_deploys_and_a_bot_uses_that_deployment(
    client: RayEngineClient, config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`atelier engine serve` deploys the application on the running cluster; a client for the
    same application then uses it as it is (no second deployment) and runs jobs on it."""
    from ray import serve

    from bot.cli import main
    from engine.ray_serve import replica_states

    # A second application beside the client's: no CPU of its own (both are taken by `client`).
    env = {"ATELIER_ENGINE__RAY_APP": "atelier-cli", "ATELIER_ENGINE__RAY_NUM_CPUS": "0"}
    for name, value in {"ATELIER_CONFIG": str(config_file), **env}.items():
        monkeypatch.setenv(name, value)
    try:
        assert main(["engine", "serve", "--replicas", "1"]) == 0
        status, states = replica_states("atelier-cli")
        assert status == "RUNNING" and states.get("RUNNING") == 1
        bot_side = RayEngineClient(load_from(config_file, **env), poll_interval=0.5)
        await bot_side.start()
        try:
            assert bot_side.slots == 1 and "atelier-cli running: 1 replica running" in bot_side.health().detail
            _, result = await collect(bot_side.submit(t2i("via-cli", 3, steps=2)))
            assert result.job_id == "via-cli"
        finally:
            await bot_side.close()
        assert replica_states("atelier-cli")[0] == "RUNNING"  # the cluster's application outlives the bot
    finally:
        await asyncio.to_thread(serve.delete, "atelier-cli")
    assert client.slots == REPLICAS


async def test_killed_replica_fails_its_call_retryable(client: RayEngineClient) -> None:
    app = client._settings.engine.ray_app
    jobs = [t2i(f"kill-{i}", i, steps=60, size=256) for i in range(REPLICAS)]
    streams = [client.submit(job) for job in jobs]
    await asyncio.gather(*(anext(stream) for stream in streams))  # both replicas are computing
    killed = kill_one_replica(app)
    started = time.perf_counter()
    outcomes = await asyncio.gather(*(collect(stream) for stream in streams), return_exceptions=True)
    errors = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert len(errors) == 1, outcomes
    assert isinstance(errors[0], EngineError) and errors[0].retryable, errors[0]
    assert sum(1 for outcome in outcomes if isinstance(outcome, tuple)) == REPLICAS - 1
    assert client.health().restarts >= 1
    # Serve replaces the replica; the client's slots follow.
    await until(lambda: client.slots == REPLICAS and killed not in replica_names(app), 60, "the replacement replica")
    print(f"\nreplica killed: call failed, replacement up {time.perf_counter() - started:.1f} s later")
    _, result = await collect(client.submit(t2i("after-kill", 9, steps=2)))
    assert result.job_id == "after-kill"


async def test_scheduler_requeues_a_killed_replicas_job(client: RayEngineClient, tmp_path: Path) -> None:
    """The real scheduler over a real SQLite job store: the job of a killed replica goes back to
    the queue (attempt 2) and finishes; every job ends done."""
    from bot.queue.scheduler import Done, JobEvent, ProgressEvent, Scheduler
    from config.settings import QueueSettings
    from db.jobs import JobStore
    from db.migrate import upgrade
    from db.session import Database

    url = f"sqlite+aiosqlite:///{tmp_path / 'jobs.db'}"
    await upgrade(url)
    database = Database(url)
    await database.connect()
    store = JobStore(database)

    def job_factory(record: Any) -> Job:
        return t2i(record.id, int(record.params["seed"]), steps=int(record.params["steps"]), size=256)

    scheduler: Scheduler[Any] = Scheduler(
        store, client, queue=QueueSettings(max_attempts=3, per_user_cap=10), job_factory=job_factory
    )
    events: list[JobEvent] = []
    scheduler.on_event(events.append)
    ids = [f"sched-{i}" for i in range(4)]
    restarts_before = client.health().restarts
    try:
        await scheduler.start()
        for index, job_id in enumerate(ids):
            record = await store.create(
                job_id=job_id,
                kind="text2img",
                owner_id=100 + index,
                guild_id=None,
                channel_id=1,
                params={"seed": index, "steps": 60},
                cost=1.0,
                band=1,
            )
            await scheduler.enqueue(record)

        def computing() -> set[str]:
            """Jobs in their base steps now: each holds a replica (max_ongoing_requests=1)."""
            started = {e.job_id for e in events if isinstance(e, ProgressEvent) and e.progress.phase == "base"}
            past_base = {
                e.job_id
                for e in events
                if isinstance(e, Done) or (isinstance(e, ProgressEvent) and e.progress.phase != "base")
            }
            return started - past_base

        await until(lambda: len(computing()) >= REPLICAS, 60, "two jobs computing")
        kill_one_replica(client._settings.engine.ray_app)
        await until(lambda: sum(isinstance(e, Done) for e in events) == len(ids), 120, "every job done")
    finally:
        await scheduler.stop(grace=5)
        records = [await store.get(job_id) for job_id in ids]
        await database.close()
    assert all(record is not None and record.status == "done" for record in records), records
    attempts = sorted(record.attempts for record in records if record is not None)
    assert attempts == [1, 1, 1, 2], attempts  # exactly the killed replica's job ran twice
    assert client.health().restarts == restarts_before + 1  # the failed call and the count drop: one death
