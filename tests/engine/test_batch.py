"""Batches of queued jobs of one shape (engine.batch, Runner.run_batch, engine.kinds.text2img.run_batch)
on the real pipelines of the tiny SDXL: every member's images bit-identical to the same job run
alone, its own progress and previews, its own cancel; and which jobs may share a batch
(`JobBase.batch_key`)."""

from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from config.settings import EngineSettings, GenerationSettings
from engine.api import JobCancelled
from engine.jobs import Refine, Text2Img
from engine.jobs.events import Progress
from engine.models import ModelRegistry
from engine.pipelines import Generated, Runner

SIZE = 128
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runner(tiny_models_config) -> Runner:
    registry = ModelRegistry(tiny_models_config, EngineSettings(device="cpu"))
    return Runner(registry, EngineSettings(device="cpu", preview_every=1, preview_size=64), GenerationSettings())


def t2i(job_id: str, **fields) -> Text2Img:
    defaults = {"prompt": f"a cat in a hat, {job_id}", "width": SIZE, "height": SIZE, "steps": 4, "seed": 7}
    return Text2Img(job_id=job_id, **{**defaults, **fields})


def pixels(generated: Generated) -> np.ndarray:
    return np.asarray(generated.image, dtype=np.int16)


def alone(runner: Runner, job: Text2Img) -> list[Generated]:
    return runner.run(job, on_progress=lambda _p: None, cancelled=lambda: False)


def batched(
    runner: Runner, jobs: list[Text2Img], cancelled=lambda _job_id: False
) -> tuple[list[list[Generated]], dict[str, list[Progress]]]:
    progress: dict[str, list[Progress]] = defaultdict(list)
    out = runner.run_batch(jobs, on_progress=lambda p: progress[p.job_id].append(p), cancelled=cancelled)
    return out, progress


def test_every_member_is_bit_identical_to_its_job_alone(runner) -> None:
    # Different prompts, negatives (one empty: zeroed by the base, as diffusers does), seeds and
    # counts; an ancestral sampler (fresh noise every step) and the refiner hand-off.
    jobs = [
        t2i("a", seed=11, count=2, sampler="euler_a"),
        t2i("b", seed=99, negative="", sampler="euler_a"),
        t2i("c", seed=5, negative="blurry, dark", sampler="euler_a"),
    ]
    out, progress = batched(runner, jobs)
    assert [len(images) for images in out] == [2, 1, 1]
    for job, images in zip(jobs, out, strict=True):
        solo = alone(runner, job)
        assert [g.seed for g in images] == [g.seed for g in solo]
        for mine, theirs in zip(images, solo, strict=True):
            assert np.array_equal(pixels(mine), pixels(theirs)), f"{job.job_id} differs from the job alone"
    assert not np.array_equal(pixels(out[1][0]), pixels(out[2][0]))
    # Each member is told every step of the whole ensemble under its own id, with a preview of
    # its own images only (a 2×2 grid would be twice as wide as one image).
    for job in jobs:
        steps = progress[job.job_id]
        assert [p.step for p in steps] == list(range(1, steps[-1].total + 1))
        assert {p.phase for p in steps} == {"base", "refiner"}
    one = Image.open(io.BytesIO(progress["b"][-1].preview))
    two = Image.open(io.BytesIO(progress["a"][-1].preview))
    assert one.size == (16, 16) and two.size == (32, 16)


def test_prompts_of_different_lengths_run_in_separate_calls_unchanged(runner) -> None:
    long_prompt = ", ".join(f"detail number {i}" for i in range(40))  # over one 77-token chunk
    jobs = [t2i("short", seed=1, refiner=False), t2i("long", prompt=long_prompt, seed=2, refiner=False)]
    out, _ = batched(runner, jobs)
    for job, images in zip(jobs, out, strict=True):
        assert np.array_equal(pixels(images[0]), pixels(alone(runner, job)[0]))


def test_a_cancelled_member_stops_being_told_and_the_others_finish(runner) -> None:
    jobs = [t2i("keep", seed=3, steps=6), t2i("drop", seed=4, steps=6)]
    told: dict[str, list[Progress]] = defaultdict(list)

    def cancelled(job_id: str) -> bool:
        return job_id == "drop" and len(told["drop"]) >= 2

    out = runner.run_batch(jobs, on_progress=lambda p: told[p.job_id].append(p), cancelled=cancelled)
    assert len(told["drop"]) == 2 and told["keep"][-1].step == told["keep"][-1].total
    assert np.array_equal(pixels(out[0][0]), pixels(alone(runner, jobs[0])[0]))


def test_the_batch_stops_when_every_member_is_cancelled(runner) -> None:
    jobs = [t2i("x", steps=20), t2i("y", steps=20)]
    told: list[Progress] = []
    with pytest.raises(JobCancelled):
        runner.run_batch(jobs, on_progress=told.append, cancelled=lambda _job_id: len(told) >= 4)
    assert len(told) == 4  # two steps, each told to both members, then it stopped


def test_batch_key_says_which_jobs_may_share_a_call() -> None:
    job = t2i("k", prompt="a", negative="b", seed=1, count=1)
    same = replace(job, job_id="other", prompt="something else", negative="", seed=9, count=3, max_image_bytes=10)
    assert job.batch_key() is not None and job.batch_key() == same.batch_key()
    for change in (
        {"steps": 5},
        {"sampler": "euler"},
        {"cfg": 3.0},
        {"width": 256},
        {"height": 256},
        {"model": "tiny-base"},
        {"refiner": False},
    ):
        assert replace(job, **change).batch_key() != job.batch_key(), change
    # Kinds that start from an image never batch (each has its own input).
    assert Refine(job_id="r", image=b"png", prompt="x").batch_key() is None


def test_run_batch_refuses_jobs_of_different_shapes(runner) -> None:
    with pytest.raises(ValueError, match="batch_key"):
        runner.run_batch([t2i("p"), t2i("q", steps=3)], on_progress=lambda _p: None, cancelled=lambda _j: False)
