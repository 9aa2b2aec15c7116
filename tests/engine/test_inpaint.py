"""engine.inpaint on the tiny SDXL: kept pixels exact, the region changed, seeds reproducible,
large sources worked on around the region, progress and cancellation, no weights copied or cast."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine.api import JobCancelled
from engine.callbacks import JobSteps
from engine.inpaint import denoise_mask, inpaint, inpaint_steps, inpaint_view, work_region, work_size
from engine.jobs.events import Progress
from engine.masks import pan_canvas, region_mask, zoom_canvas

STEPS = 4
STRENGTH = 0.9  # int(4 · 0.9) = 3 steps run


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> Any:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir / "base", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random picture (noise would hide a VAE round trip less honestly)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize((width, height), Image.Resampling.BICUBIC)


def far_from(mask: Image.Image, distance: int) -> np.ndarray:
    """Pixels further than `distance` px (Chebyshev) from any white pixel of `mask`."""
    white = np.asarray(mask) > 0
    near = np.zeros_like(white)
    ys, xs = np.nonzero(white)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()  # masks here are boxes
    near[max(0, y0 - distance) : y1 + distance + 1, max(0, x0 - distance) : x1 + distance + 1] = True
    return ~near


def diff(a: Image.Image, b: Image.Image) -> np.ndarray:
    return np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int))


def run(base: Any, image: Image.Image, mask: Image.Image, **kwargs: Any) -> list[Image.Image]:
    args: dict[str, Any] = {
        "prompt": "a cat on a windowsill",
        "negative": "",
        "steps": STEPS,
        "cfg": 5.0,
        "sampler": "euler_a",
        "strength": STRENGTH,
        "seeds": [7],
        "blur": 8,
        "padding_mask_crop": None,
    }
    args.update(kwargs)
    return inpaint(base, image=image, mask=mask, **args)


def test_keeps_outside_changes_inside_reproducible(base: Any) -> None:
    image = picture(256, 192)
    mask = region_mask(["center"], image.size)
    first = run(base, image, mask, seeds=[7, 8])
    again = run(base, image, mask, seeds=[7])
    assert [result.size for result in first] == [image.size, image.size]
    result = first[0]
    far = far_from(mask, 32)
    assert diff(result, image)[far].max() == 0  # the contract allows ±8; composited, it is exact
    inside = np.asarray(mask) == 255
    assert diff(result, image)[inside].mean() > 10
    assert result.tobytes() == again[0].tobytes()  # same seed, same bytes (also inside a batch)
    assert first[1].tobytes() != result.tobytes()


def test_large_source_worked_around_its_region(base: Any) -> None:
    """A 512² source with a corner region: worked on at ~128² around it, result at 512²."""
    image = picture(512, 512, seed=1)
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (400, 400, 480, 480))
    region = work_region(mask, 32)
    assert region != (0, 0, 512, 512)
    x0, y0, x1, y1 = region
    assert x0 <= 368 and y0 <= 368 and x1 >= 480 and y1 >= 480
    assert work_size((x1 - x0, y1 - y0), 128 * 128, whole=False) == (128, 128)
    (result,) = run(base, image, mask, padding_mask_crop=32, work_pixels=128 * 128, blur=4)
    assert result.size == (512, 512)
    d = diff(result, image)
    outside = np.ones((512, 512), bool)
    outside[y0:y1, x0:x1] = False
    assert d[outside].max() == 0 and d[far_from(mask, 32)].max() == 0
    assert d[400:480, 400:480].mean() > 10


def test_whole_image_sizes() -> None:
    assert work_size((832, 1216), 1024 * 1024, whole=True) == (832, 1216)  # fitted already: untouched
    assert work_size((2048, 2048), 1024 * 1024, whole=True) == (1024, 1024)
    assert work_size((200, 120), 1024 * 1024, whole=False)[0] >= 1024  # a crop is scaled up


def test_denoise_mask_covers_every_touched_cell() -> None:
    soft = Image.new("L", (32, 16), 0)
    soft.putpixel((9, 3), 1)
    cells = np.asarray(denoise_mask(soft))
    assert cells[0:8, 8:16].min() == 255 and cells.sum() == 255 * 64


def test_outpaint_keeps_the_source_exactly(base: Any) -> None:
    image = picture(128, 128, seed=2)
    canvas, mask, keep = zoom_canvas(image, 2, seed=1)
    (result,) = run(base, canvas, mask, blur=0, strength=1.0, steps=2)
    assert np.array_equal(np.asarray(result.crop(keep)), np.asarray(canvas.crop(keep)))
    assert diff(result, canvas)[np.asarray(mask) == 255].mean() > 10
    canvas, mask, keep = pan_canvas(image, "up", max_side=1024, seed=1)
    (result,) = run(base, canvas, mask, blur=0, strength=1.0, steps=2)
    assert result.size == (128, 192)
    assert np.array_equal(np.asarray(result.crop(keep)), np.asarray(image))


def test_progress_counts_the_planned_steps_with_cfg_cutoff(base: Any) -> None:
    call_steps, planned = inpaint_steps(base, "euler_a", STEPS, STRENGTH)
    assert (call_steps, planned) == (4, 3)
    assert inpaint_steps(base, "euler", 4, 0.1) == (10, 1)  # int(4 · 0.1) = 0 would run nothing
    reports: list[Progress] = []
    tracker = JobSteps("job", planned, on_progress=reports.append, cancelled=lambda: False)
    image = picture(128, 128)
    run(base, image, region_mask(["left"], image.size), steps_tracker=tracker, cfg_off_after=1)
    assert [p.step for p in reports] == [1, 2, 3] and tracker.total == 3
    assert {p.phase for p in reports} == {"base"}


def test_cancel_mid_job(base: Any) -> None:
    reports: list[Progress] = []
    tracker = JobSteps("job", 3, on_progress=reports.append, cancelled=lambda: len(reports) >= 1)
    image = picture(128, 128)
    with pytest.raises(JobCancelled):
        run(base, image, region_mask(["top"], image.size), steps_tracker=tracker)
    assert len(reports) == 1


def test_shares_modules_without_casting(base: Any) -> None:
    dtypes = {name: module.dtype for name, module in base.components.items() if isinstance(module, torch.nn.Module)}
    view = inpaint_view(base)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert getattr(view, name) is getattr(base, name)
    base.unet.to(torch.bfloat16)  # as on a GPU with an fp32 VAE: nothing may be cast by the view
    try:
        inpaint_view(base)
        assert base.unet.dtype == torch.bfloat16 and base.vae.dtype == dtypes["vae"]
    finally:
        base.unet.to(dtypes["unet"])


def test_inpainting_unet_gets_the_masked_image(base: Any) -> None:
    """A 9-channel inpainting UNet (random, from the tiny config) runs through the same call."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9})
    pipe = StableDiffusionXLPipeline(**{**base.components, "unet": unet})
    image = picture(128, 128)
    mask = region_mask(["center"], image.size)
    (result,) = run(pipe, image, mask, steps=2, strength=1.0)
    assert diff(result, image)[far_from(mask, 32)].max() == 0
    assert diff(result, image)[np.asarray(mask) == 255].mean() > 10
