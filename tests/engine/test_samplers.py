"""engine.samplers: the six samplers as fresh schedulers, each run for real in every mode the
engine uses (base alone, base → refiner ensemble, img2img)."""

from __future__ import annotations

import inspect
import io

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from config.settings import EngineSettings, GenerationSettings
from engine.callbacks import X0Tap
from engine.jobs import Text2Img, Variations
from engine.jobs.events import Progress
from engine.models import ModelRegistry
from engine.options import SAMPLERS
from engine.pipelines import Runner
from engine.samplers import make_scheduler

# SDXL's shipped scheduler config (EulerDiscreteScheduler, "leading" spacing).
SDXL_CONFIG = EulerDiscreteScheduler(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    timestep_spacing="leading",
    steps_offset=1,
).config


@pytest.mark.parametrize(
    ("name", "cls", "settings"),
    [
        ("dpmpp_2m_karras", DPMSolverMultistepScheduler, {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"}),
        ("euler_a", EulerAncestralDiscreteScheduler, {}),
        ("euler", EulerDiscreteScheduler, {"use_karras_sigmas": False}),
        ("ddim", DDIMScheduler, {}),
        ("unipc", UniPCMultistepScheduler, {}),
        (
            "dpmpp_sde_karras",
            DPMSolverMultistepScheduler,
            {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"},
        ),
    ],
)
def test_each_name_builds_its_scheduler(name, cls, settings) -> None:
    scheduler = make_scheduler(name, SDXL_CONFIG)
    assert type(scheduler) is cls
    for key, value in settings.items():
        assert scheduler.config[key] == value
    # The model's own settings carry over.
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.prediction_type == "epsilon"


def test_every_contract_sampler_is_known() -> None:
    for name in SAMPLERS:
        make_scheduler(name, SDXL_CONFIG)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("heun", SDXL_CONFIG)


def test_fresh_instance_per_call_and_config_untouched() -> None:
    before = dict(SDXL_CONFIG)
    first = make_scheduler("dpmpp_2m_karras", SDXL_CONFIG)
    second = make_scheduler("dpmpp_2m_karras", SDXL_CONFIG)
    assert first is not second
    first.set_timesteps(10)
    assert second.num_inference_steps is None
    assert dict(SDXL_CONFIG) == before


def test_euler_asked_for_is_plain_euler_even_from_a_karras_config() -> None:
    karras = make_scheduler("dpmpp_2m_karras", SDXL_CONFIG).config
    assert make_scheduler("euler", karras).config.use_karras_sigmas is False


@pytest.mark.parametrize("name", SAMPLERS)
def test_x0_is_visible_for_previews(name) -> None:
    scheduler = make_scheduler(name, SDXL_CONFIG)
    tap = X0Tap(scheduler)
    scheduler.set_timesteps(4)
    sample = torch.randn(1, 4, 8, 8)
    t = scheduler.timesteps[0]
    out = scheduler.step(torch.randn(1, 4, 8, 8), t, scheduler.scale_model_input(sample, t), return_dict=False)
    assert isinstance(out, tuple)
    assert out[0].shape == sample.shape
    assert tap.latest is not None and tap.latest.shape == sample.shape
    # Pipelines pass `generator` only to a step() that declares it: the tap must keep the signature.
    original = inspect.signature(type(scheduler).step).parameters
    assert ("generator" in inspect.signature(scheduler.step).parameters) == ("generator" in original)


# --- every sampler in every mode, on the tiny model ----------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runner(tiny_models_config) -> Runner:
    engine = EngineSettings(device="cpu", preview_every=1, preview_size=32)
    return Runner(ModelRegistry(tiny_models_config, engine), engine, GenerationSettings())


@pytest.fixture(scope="module")
def input_png(runner) -> bytes:
    [out] = runner.run(
        Text2Img(job_id="in", prompt="a house", width=128, height=128, steps=2, refiner=False),
        on_progress=lambda _p: None,
        cancelled=lambda: False,
    )
    data = io.BytesIO()
    out.image.save(data, "PNG")
    return data.getvalue()


def _check(runner: Runner, job, expected_phases: set[str]) -> None:
    progress: list[Progress] = []
    out = runner.run(job, on_progress=progress.append, cancelled=lambda: False)
    assert len(out) == job.image_count
    for generated in out:
        array = np.asarray(generated.image, dtype=np.float32)
        assert array.shape == (128, 128, 3)
        assert np.isfinite(array).all() and array.std() > 0
    assert [p.step for p in progress] == list(range(1, len(progress) + 1))
    assert progress and {p.total for p in progress} == {len(progress)}
    assert {p.phase for p in progress} == expected_phases
    assert all(p.preview for p in progress)


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_base_alone(runner, name) -> None:
    job = Text2Img(job_id="s", prompt="a dog", width=128, height=128, steps=3, sampler=name, refiner=False, count=2)
    _check(runner, job, {"base"})


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_ensemble(runner, name) -> None:
    # 5 steps: enough that both experts get at least one step with every schedule.
    job = Text2Img(job_id="s", prompt="a dog", width=128, height=128, steps=5, sampler=name, count=2)
    _check(runner, job, {"base", "refiner"})


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_img2img(runner, input_png, name) -> None:
    job = Variations(job_id="s", image=input_png, prompt="a dog", steps=4, strength=0.5, sampler=name, count=2)
    _check(runner, job, {"base"})
