"""engine.preview and the step callback pieces of engine.callbacks, without a model."""

from __future__ import annotations

import io
import time

import pytest
import torch
from PIL import Image

from engine.api import JobCancelled
from engine.callbacks import JobSteps, cfg_cutoff
from engine.jobs.events import Progress
from engine.preview import SDXL_LATENT_RGB, SDXL_LATENT_RGB_BIAS, grid, latents_to_rgb, preview_image, preview_jpeg


def test_linear_map_and_bias() -> None:
    latents = torch.zeros(1, 4, 2, 3)
    rgb = latents_to_rgb(latents)
    assert rgb.shape == (1, 2, 3, 3) and rgb.dtype == torch.uint8
    expected = ((SDXL_LATENT_RGB_BIAS + 1) * 127.5).to(torch.uint8)
    assert torch.equal(rgb[0, 0, 0], expected)
    one = torch.zeros(1, 4, 1, 1)
    one[0, 0] = 1.0
    expected = ((SDXL_LATENT_RGB[0] + SDXL_LATENT_RGB_BIAS + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    assert torch.equal(latents_to_rgb(one)[0, 0, 0], expected)


def test_values_are_clamped() -> None:
    rgb = latents_to_rgb(torch.full((1, 4, 4, 4), 100.0))
    assert rgb.min() >= 0 and rgb.max() <= 255


@pytest.mark.parametrize(("count", "shape"), [(1, (8, 8)), (2, (8, 16)), (3, (16, 16)), (4, (16, 16))])
def test_grid_layout(count, shape) -> None:
    images = torch.stack([torch.full((8, 8, 3), k, dtype=torch.uint8) for k in range(1, count + 1)])
    out = grid(images)
    assert out.shape[:2] == shape
    assert out[0, 0, 0] == 1
    if count >= 2:
        assert out[0, 8, 0] == 2  # second image to the right of the first
    if count == 4:
        assert out[8, 0, 0] == 3 and out[8, 8, 0] == 4


def test_preview_fits_the_size_and_is_jpeg() -> None:
    latents = torch.randn(4, 4, 128, 96)  # four 768×1024 (w×h) images
    image = preview_image(latents, 128)
    assert image.size == (96, 128)  # a 2×2 grid of 96×128 latents is 192×256, fitted into 128 px
    data = preview_jpeg(latents, 128)
    assert Image.open(io.BytesIO(data)).format == "JPEG"
    small = preview_image(torch.randn(1, 4, 16, 16), 128)
    assert small.size == (16, 16)  # never enlarged


def test_preview_is_cheap() -> None:
    latents = torch.randn(1, 4, 128, 128)  # a 1024² image
    timings = []
    for _ in range(20):
        started = time.perf_counter()
        preview_jpeg(latents, 128)
        timings.append(time.perf_counter() - started)
    # ~0.3 ms on this 2-core CPU; the best of 20 keeps a busy machine from failing the test.
    assert min(timings) < 0.02


def test_bf16_latents_work() -> None:
    assert preview_image(torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), 64).size == (8, 8)


# --- JobSteps / callbacks ----------------------------------------------------------------------


class FakePipe:
    """Only what cfg_cutoff touches: the guidance flag of a pipeline call."""

    def __init__(self) -> None:
        self._guidance_scale = 7.0
        self._num_timesteps = 3

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1


def test_steps_continue_across_calls_with_previews() -> None:
    progress: list[Progress] = []
    steps = JobSteps("j", 5, on_progress=progress.append, cancelled=lambda: False, preview_every=2)
    latents = {"latents": torch.zeros(1, 4, 4, 4)}
    base = steps.callback("base", planned=3)
    for i in range(3):
        base(FakePipe(), i, None, dict(latents))
    refiner = steps.callback("refiner", planned=2)
    pipe = FakePipe()
    pipe._num_timesteps = 2
    for i in range(2):
        refiner(pipe, i, None, dict(latents))
    assert [(p.step, p.total, p.phase) for p in progress] == [
        (1, 5, "base"),
        (2, 5, "base"),
        (3, 5, "base"),
        (4, 5, "refiner"),
        (5, 5, "refiner"),
    ]
    assert [p.preview is not None for p in progress] == [False, True, False, True, False]


def test_total_follows_the_pipeline_if_the_plan_was_off() -> None:
    progress: list[Progress] = []
    steps = JobSteps("j", 2, on_progress=progress.append, cancelled=lambda: False)
    callback = steps.callback("base", planned=2)
    pipe = FakePipe()  # runs 3
    for i in range(3):
        callback(pipe, i, None, {"latents": torch.zeros(1, 4, 2, 2)})
    assert [(p.step, p.total) for p in progress] == [(1, 3), (2, 3), (3, 3)]


def test_cancel_raises() -> None:
    flag = {"cancel": False}
    steps = JobSteps("j", 3, on_progress=lambda _p: None, cancelled=lambda: flag["cancel"])
    callback = steps.callback("base", planned=3)
    callback(FakePipe(), 0, None, {"latents": torch.zeros(1, 4, 2, 2)})
    flag["cancel"] = True
    with pytest.raises(JobCancelled):
        callback(FakePipe(), 1, None, {"latents": torch.zeros(1, 4, 2, 2)})


def test_cfg_cutoff_keeps_every_positive_row_of_a_batch() -> None:
    batch = 3
    negative, positive = torch.zeros(batch, 5, 8), torch.ones(batch, 5, 8)
    kwargs = {
        "latents": torch.zeros(batch, 4, 2, 2),
        "prompt_embeds": torch.cat([negative, positive]),
        "add_text_embeds": torch.cat([torch.zeros(batch, 4), torch.ones(batch, 4)]),
        "add_time_ids": torch.cat([torch.zeros(batch, 6), torch.ones(batch, 6)]),
    }
    pipe = FakePipe()
    out = cfg_cutoff(pipe, kwargs)
    assert not pipe.do_classifier_free_guidance
    for name in ("prompt_embeds", "add_text_embeds", "add_time_ids"):
        assert out[name].shape[0] == batch and bool((out[name] == 1).all())
    assert out["latents"].shape[0] == batch
    # Already off: nothing more is cut.
    again = cfg_cutoff(pipe, out)
    assert again["prompt_embeds"].shape[0] == batch
