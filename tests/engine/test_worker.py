"""engine.worker over the raw pipe protocol (engine.protocol): a real spawned child running the
real Runner on the tiny model. One worker is shared by the module (spawning torch + diffusers
costs seconds); the tests that stop a worker use their own."""

from __future__ import annotations

import dataclasses
import io
import multiprocessing
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import pytest
from PIL import Image

from config.settings import Settings
from engine.jobs import Refine, Text2Img, Upscale, Variations
from engine.jobs.events import Progress
from engine.pnginfo import read_parameters
from engine.protocol import (
    Cancel,
    Computed,
    Done,
    Failed,
    Fatal,
    Ready,
    Shutdown,
    Started,
    Submit,
    WorkerConfig,
)
from engine.validate import prepare_input_image
from engine.worker import worker_main
from tests.engine.conftest import tiny_settings

START_TIMEOUT = 300.0


def worker_config(settings: Settings, **overrides: Any) -> WorkerConfig:
    return dataclasses.replace(WorkerConfig.from_settings(settings), **overrides)


@dataclass
class Child:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    # Messages read while waiting for another job (jobs' messages interleave).
    backlog: list[Any] = field(default_factory=list)

    def send(self, message: Any) -> None:
        self.conn.send(message)

    def recv(self, timeout: float = 120.0) -> Any:
        assert self.conn.poll(timeout), f"no message from the worker within {timeout} s"
        return self.conn.recv()

    def until(self, job_id: str, timeout: float = 120.0) -> list[Any]:
        """Messages of `job_id` up to its Done or Failed (other jobs' messages are kept for later calls)."""
        messages: list[Any] = []
        pending: list[Any] = []
        deadline = time.monotonic() + timeout
        while True:
            message = self.backlog.pop(0) if self.backlog else self.recv(max(0.1, deadline - time.monotonic()))
            found = message.result.job_id if isinstance(message, Done) else getattr(message, "job_id", None)
            if found != job_id:
                if isinstance(message, Started | Progress | Done | Failed):
                    pending.append(message)
                continue
            messages.append(message)
            if isinstance(message, Done | Failed):
                self.backlog[:0] = pending
                return messages

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.send(Shutdown(drain=False))
            except OSError:
                pass
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()


def spawn(config: WorkerConfig) -> Child:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe(duplex=True)
    process = context.Process(target=worker_main, args=(child, config), daemon=True)
    process.start()
    child.close()
    return Child(process, parent)


# A stand-in Runner for the tests of process plumbing that never reach a pipeline.
class _IdleRunner:
    def run(self, job: Any, *, on_progress: Any, cancelled: Any) -> list[Any]:
        raise AssertionError("not used")


def idle_runner(config: WorkerConfig) -> _IdleRunner:
    return _IdleRunner()


def broken_runner(config: WorkerConfig) -> _IdleRunner:
    raise FileNotFoundError("no weights at /nowhere")


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, tiny_models_config: dict[str, dict[str, Any]]) -> Settings:
    return tiny_settings(tmp_path_factory.mktemp("worker-config"), tiny_models_config)


@pytest.fixture(scope="module")
def worker(settings: Settings) -> Iterator[tuple[Child, Ready]]:
    child = spawn(worker_config(settings))
    try:
        ready = child.recv(START_TIMEOUT)
        assert isinstance(ready, Ready), ready
        yield child, ready
    finally:
        child.stop()


def input_png(size: tuple[int, int] = (128, 128)) -> bytes:
    out = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(out, "PNG")
    data, _ = prepare_input_image(out.getvalue(), max_bytes=10**7, max_pixels=10**7, target_pixels=size[0] * size[1])
    return data


def test_ready_reports_load_time(worker: tuple[Child, Ready]) -> None:
    child, ready = worker
    assert ready.pid == child.process.pid
    assert ready.load_seconds > 0 and ready.import_seconds > 0
    print(f"\nworker: imports {ready.import_seconds:.2f} s, models {ready.load_seconds:.2f} s")


def test_job_streams_progress_then_result(worker: tuple[Child, Ready]) -> None:
    child, _ = worker
    job = Text2Img(job_id="t1", prompt="a red fox", negative="blurry", steps=4, seed=77, width=128, height=128, count=2)
    child.send(Submit(job))
    messages = child.until("t1")
    assert isinstance(messages[0], Started)
    progress = [m for m in messages if isinstance(m, Progress)]
    assert [p.step for p in progress] == [1, 2, 3, 4] and {p.total for p in progress} == {4}
    assert progress[0].phase == "base" and progress[-1].phase == "refiner"
    previews = [p.preview for p in progress if p.preview]
    assert previews and Image.open(io.BytesIO(previews[0])).format == "JPEG"
    done = messages[-1]
    assert isinstance(done, Done), done
    assert isinstance(messages[-2], Computed)  # the slot is free while the images are encoded
    result = done.result
    assert result.model == "tiny" and result.seconds >= result.compute_seconds > 0
    assert [image.seed for image in result.images] == [77, 78]
    for image in result.images:
        assert (image.format, image.width, image.height) == ("png", 128, 128)
        params = read_parameters(image.data)
        assert params["prompt"] == "a red fox" and params["negative"] == "blurry"
        assert params["seed"] == image.seed and params["model"] == "tiny" and params["steps"] == 4
        assert params["refiner"] == "refiner" and params["job_id"] == "t1"
    assert done.stats.compute_seconds == result.compute_seconds and done.stats.encode_seconds > 0


def test_cancel_mid_job_stops_within_about_a_step(worker: tuple[Child, Ready]) -> None:
    child, _ = worker
    child.send(Submit(Text2Img(job_id="c1", prompt="slow", steps=40, width=256, height=256, refiner=False)))
    steps: list[float] = []
    while True:
        message = child.recv()
        if isinstance(message, Progress) and message.job_id == "c1":
            steps.append(time.perf_counter())
            if len(steps) == 2:
                child.send(Cancel("c1"))
                cancelled_at = time.perf_counter()
        if isinstance(message, Failed | Done) and getattr(message, "job_id", "") == "c1":
            break
    assert isinstance(message, Failed) and message.cancelled and not message.retryable
    step = steps[1] - steps[0]
    latency = time.perf_counter() - cancelled_at
    assert len(steps) <= 4, "kept running after the cancel"
    assert latency < 3 * step + 1.0
    print(f"\ncancel latency {latency * 1000:.0f} ms (one step {step * 1000:.0f} ms)")


def test_cancel_of_a_queued_job_never_starts_it(worker: tuple[Child, Ready]) -> None:
    child, _ = worker
    child.send(Submit(Text2Img(job_id="q1", prompt="first", steps=3, width=128, height=128)))
    child.send(Submit(Text2Img(job_id="q2", prompt="second", steps=3, width=128, height=128)))
    child.send(Cancel("q2"))
    first = child.until("q1")
    second = child.until("q2", timeout=10)
    assert isinstance(first[-1], Done)
    assert len(second) == 1 and isinstance(second[0], Failed) and second[0].cancelled


@pytest.mark.parametrize(
    ("job", "needle"),
    [
        (Text2Img(job_id="b1", prompt="x", model="nope", width=128, height=128), "Unknown model"),
        (Text2Img(job_id="b2", prompt="", width=128, height=128), "prompt is empty"),
        (Text2Img(job_id="b3", prompt="x", steps=99, width=128, height=128), "steps"),
        (Refine(job_id="b4", prompt="x", image=b"GIF89a garbage"), "PNG, JPEG or WebP"),
    ],
)
def test_bad_input_fails_without_retry(worker: tuple[Child, Ready], job: Any, needle: str) -> None:
    child, _ = worker
    child.send(Submit(job))
    messages = child.until(job.job_id)
    failed = messages[-1]
    assert isinstance(failed, Failed) and not failed.retryable and not failed.cancelled
    assert needle in failed.message


def test_image_jobs(worker: tuple[Child, Ready]) -> None:
    child, _ = worker
    image = input_png((128, 128))
    jobs = [
        Refine(job_id="i1", prompt="sharper", image=image, steps=4, strength=0.5),
        Variations(job_id="i2", image=image, steps=4, strength=0.6, count=2, seed=5),
        Upscale(job_id="i3", image=image, steps=4, strength=0.3),
    ]
    for job in jobs:
        child.send(Submit(job))
    results = {job.job_id: child.until(job.job_id)[-1] for job in jobs}
    for done in results.values():
        assert isinstance(done, Done), done
    assert [(i.width, i.height) for i in results["i1"].result.images] == [(128, 128)]
    assert [i.seed for i in results["i2"].result.images] == [5, 6]
    assert [(i.width, i.height) for i in results["i3"].result.images] == [(256, 256)]
    params = read_parameters(results["i3"].result.images[0].data)
    assert params["strength"] == 0.3 and params["upscale"] == 2 and "refiner" not in params


def test_size_limit_falls_back_to_smaller_formats(worker: tuple[Child, Ready]) -> None:
    child, _ = worker
    child.send(Submit(Text2Img(job_id="s1", prompt="noise", steps=2, width=256, height=256, max_image_bytes=20_000)))
    done = child.until("s1")[-1]
    assert isinstance(done, Done)
    image = done.result.images[0]
    assert image.format in ("webp", "jpeg") and len(image.data) <= 20_000
    assert read_parameters(image.data)["prompt"] == "noise"


def test_back_to_back_jobs_have_a_small_idle_gap(worker: tuple[Child, Ready]) -> None:
    child, _ = worker
    ids = [f"g{i}" for i in range(4)]
    for job_id in ids:
        child.send(Submit(Text2Img(job_id=job_id, prompt="gap", steps=3, width=128, height=128)))
    stats = [child.until(job_id)[-1].stats for job_id in ids]
    gaps = [s.idle_seconds for s in stats[1:] if s.back_to_back]
    assert len(gaps) == 3
    assert max(gaps) < 0.5
    print(f"\nidle gaps between back-to-back jobs: {', '.join(f'{g * 1000:.1f} ms' for g in gaps)}")


def test_load_failure_is_reported_not_a_hang(settings: Settings) -> None:
    child = spawn(worker_config(settings, runner_factory="tests.engine.test_worker:broken_runner"))
    try:
        fatal = child.recv(60)
        assert isinstance(fatal, Fatal) and "no weights at /nowhere" in fatal.message
        child.process.join(10)
        assert child.process.exitcode == 1
    finally:
        child.stop()


def test_child_exits_when_the_parent_goes_away(settings: Settings) -> None:
    child = spawn(worker_config(settings, runner_factory="tests.engine.test_worker:idle_runner"))
    try:
        assert isinstance(child.recv(60), Ready)
        child.conn.close()  # what the OS does when the bot process dies
        child.process.join(10)
        assert child.process.exitcode == 0
    finally:
        if child.process.is_alive():
            child.process.kill()
            child.process.join(5)


def test_shutdown_drains_the_running_job_and_fails_the_queued(worker: tuple[Child, Ready]) -> None:
    """Last test on the module's worker: it stops it."""
    child, _ = worker
    child.send(Submit(Text2Img(job_id="d1", prompt="finish me", steps=6, width=128, height=128)))
    child.send(Submit(Text2Img(job_id="d2", prompt="never run", steps=6, width=128, height=128)))
    while not (isinstance(message := child.recv(), Progress) and message.job_id == "d1"):
        pass
    child.send(Shutdown(drain=True))
    assert isinstance(child.until("d1")[-1], Done)
    queued = child.until("d2")[-1]
    assert isinstance(queued, Failed) and queued.retryable
    child.process.join(10)
    assert child.process.exitcode == 0
