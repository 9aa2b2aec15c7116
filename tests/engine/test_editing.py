"""Vary Region, Zoom Out and Pan as jobs, through the real Runner and the tiny SDXL's real
inpainting pipeline: what is kept stays (the contract's ±8 beyond 32 px; composited, exactly),
what is redone changes, sizes per factor and direction, seeds, progress, cancel, masks of every
mode and size, prices, storage, metadata, and a dedicated inpainting checkpoint."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from config.addons import ModelSettings
from config.settings import EngineSettings, GenerationSettings
from engine.api import JobCancelled
from engine.jobs import Edit, JobOrder, Limits, Pan, Zoom, load_order, units
from engine.jobs.events import Progress
from engine.masks import decode_mask, encode_mask, region_mask, zoom_canvas
from engine.models import ModelLoadError, ModelRegistry
from engine.pipelines import Generated, Runner
from engine.pnginfo import format_parameters, parse_parameters
from engine.validate import ValidationFailed

pytestmark = pytest.mark.usefixtures("one_thread")

CAPS = {"max_bytes": 2_000_000, "max_pixels": 2048 * 2048}
LIMITS = Limits(
    models=("tiny", "tiny-base"),
    max_prompt_chars=1500,
    max_attachment_bytes=CAPS["max_bytes"],
    max_attachment_pixels=CAPS["max_pixels"],
    upscale_max_side=4096,
)


@pytest.fixture(scope="module")
def registry(tiny_models_config: dict[str, Any]) -> ModelRegistry:
    return ModelRegistry(tiny_models_config, EngineSettings(device="cpu"))


@pytest.fixture(scope="module")
def runner(registry: ModelRegistry) -> Runner:
    return Runner(registry, EngineSettings(device="cpu", preview_every=0), GenerationSettings())


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize((width, height), Image.Resampling.BICUBIC)


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def run(runner: Runner, job: Any, progress: list[Progress] | None = None, **kwargs: Any) -> list[Generated]:
    sink = progress if progress is not None else []
    return runner.run(job, on_progress=sink.append, cancelled=kwargs.get("cancelled", lambda: False))


def diff(a: Image.Image, b: Image.Image) -> np.ndarray:
    return np.abs(np.asarray(a.convert("RGB")).astype(int) - np.asarray(b.convert("RGB")).astype(int))


def far_from(mask: Image.Image, distance: int) -> np.ndarray:
    """Pixels further than `distance` px (Chebyshev) from every white pixel of `mask`."""
    white = np.asarray(mask.convert("L")) > 0
    grown = white.copy()
    for _ in range(distance):  # a square dilation, one pixel at a time
        padded = np.pad(grown, 1)
        grown = grown | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        grown = grown | padded[:-2, :-2] | padded[:-2, 2:] | padded[2:, :-2] | padded[2:, 2:]
    return ~grown


def edit(image: Image.Image, **fields: Any) -> Edit:
    defaults: dict[str, Any] = {"job_id": "e", "prompt": "a red door", "steps": 4, "seed": 5, "image": png(image)}
    return Edit(**{**defaults, **fields})


# ---------------------------------------------------------------------------- Vary Region


def test_regions_keep_the_rest_and_redo_the_region(runner: Runner) -> None:
    image = picture(256, 192)
    job = edit(image, regions=("top-left", "center"))
    job.check(LIMITS)
    progress: list[Progress] = []
    (first,) = run(runner, job, progress)
    (again,) = run(runner, job)
    (other,) = run(runner, edit(image, regions=("top-left", "center"), seed=6))
    assert first.image.size == image.size and first.seed == 5
    mask = region_mask(job.regions, image.size)
    d = diff(first.image, image)
    assert d[far_from(mask, 32)].max() <= 8  # the contract
    assert d[far_from(mask, 32)].max() == 0  # composited: exact
    assert d[np.asarray(mask) == 255].mean() > 10
    assert first.image.tobytes() == again.image.tobytes()
    assert first.image.tobytes() != other.image.tobytes()
    assert [p.step for p in progress] == [1, 2, 3]  # int(4 × 0.9) steps run, numbered


@pytest.mark.parametrize(
    ("mode", "size"),
    [("L", (256, 192)), ("RGB", (64, 48)), ("RGBA", (512, 384)), ("1", (100, 75)), ("P", (256, 192))],
)
def test_uploaded_masks_of_every_mode_and_size(runner: Runner, mode: str, size: tuple[int, int]) -> None:
    """The member's mask, decoded by content at the image's size, goes through the job (stored as
    PNG in the job) and redoes exactly its white (or, with transparency, its painted) part."""
    image = picture(256, 192, seed=3)
    width, height = size
    box = (width // 4, height // 4, width // 2, height // 2)  # a quarter-size rectangle
    if mode == "RGBA":  # strokes painted in black on a transparent layer: coverage decides
        drawn = Image.new("RGBA", size, (0, 0, 0, 0))
        drawn.paste((0, 0, 0, 255), box)
    else:
        drawn = Image.new("L", size, 0)
        drawn.paste(255, box)
        drawn = drawn.convert(mode)
    mask = decode_mask(png(drawn), image.size, **CAPS)
    job = edit(image, mask=encode_mask(mask), seed=9)
    job.check(LIMITS)
    stored = json.loads(json.dumps(JobOrder(job, input_size=image.size).to_json()))
    again = load_order("edit", stored, job_id="e", image=job.image).spec
    assert again == job
    (result,) = run(runner, again)
    d = diff(result.image, image)
    assert d[far_from(mask, 32)].max() == 0
    assert d[np.asarray(mask) == 255].mean() > 10


def test_edit_needs_a_mask_or_a_region_and_refuses_full_ones() -> None:
    image = picture(64, 64)
    with pytest.raises(ValidationFailed, match="Say what to redo"):
        edit(image).check(LIMITS)
    with pytest.raises(ValidationFailed, match="not both"):
        edit(image, regions=("top",), mask=encode_mask(region_mask(["top"], (64, 64)))).check(LIMITS)
    with pytest.raises(ValidationFailed, match="whole image"):
        edit(image, regions=("top", "bottom", "left", "center", "right")).check(LIMITS)
    with pytest.raises(ValidationFailed, match="Unknown region"):
        edit(image, regions=("middle",)).check(LIMITS)
    with pytest.raises(ValidationFailed, match="all white"):
        edit(image, mask=encode_mask(Image.new("L", (64, 64), 255))).check(LIMITS)


def test_large_source_keeps_its_resolution(runner: Runner) -> None:
    """A source over SDXL's size is worked on around its region; the result keeps its size."""
    image = picture(1280, 1024, seed=4)
    job = edit(image, regions=("bottom-right",), steps=2)
    (result,) = run(runner, job)
    assert result.image.size == (1280, 1024)
    mask = region_mask(job.regions, image.size)
    d = diff(result.image, image)
    assert d[far_from(mask, 32)].max() == 0
    assert d[np.asarray(mask) == 255].mean() > 10


def test_cancel_mid_edit(runner: Runner) -> None:
    progress: list[Progress] = []
    with pytest.raises(JobCancelled):
        run(runner, edit(picture(128, 128), regions=("top",)), progress, cancelled=lambda: len(progress) >= 1)
    assert len(progress) == 1


# ------------------------------------------------------------------------ Zoom Out and Pan


@pytest.mark.parametrize("factor", [2.0, 1.5])
def test_zoom_out_keeps_the_shrunk_source_in_the_centre(runner: Runner, factor: float) -> None:
    image = picture(192, 128, seed=5)
    job = Zoom(job_id="z", prompt="a wide landscape", steps=4, seed=3, image=png(image), factor=factor)
    job.check(LIMITS)
    (result,) = run(runner, job)
    (again,) = run(runner, job)
    assert result.image.size == image.size
    canvas, mask, (x0, y0, x1, y1) = zoom_canvas(image, factor, seed=3)
    assert abs((x1 - x0) - 192 / factor) <= 1 and abs((y1 - y0) - 128 / factor) <= 1  # equal margins
    kept = np.asarray(result.image)[y0:y1, x0:x1]
    assert np.array_equal(kept, np.asarray(canvas)[y0:y1, x0:x1])  # the shrunk source, exactly
    assert diff(result.image, canvas)[np.asarray(mask) == 255].mean() > 10  # the frame is generated
    assert result.image.tobytes() == again.image.tobytes()


@pytest.mark.parametrize(
    ("direction", "size", "keep"),
    [
        ("left", (192, 128), (64, 0, 192, 128)),
        ("right", (192, 128), (0, 0, 128, 128)),
        ("up", (128, 192), (0, 64, 128, 192)),
        ("down", (128, 192), (0, 0, 128, 128)),
    ],
)
def test_pan_extends_each_way_and_keeps_the_source(
    runner: Runner, direction: str, size: tuple[int, int], keep: tuple[int, int, int, int]
) -> None:
    image = picture(128, 128, seed=6)
    job = Pan(job_id="p", prompt="more of the street", steps=4, seed=4, image=png(image), direction=direction)
    job.check(LIMITS)
    progress: list[Progress] = []
    (result,) = run(runner, job, progress)
    assert result.image.size == size == job.canvas_size(image.size)
    assert np.array_equal(np.asarray(result.image.crop(keep)), np.asarray(image))
    new = np.ones(size[::-1], bool)
    new[keep[1] : keep[3], keep[0] : keep[2]] = False
    assert np.asarray(result.image).astype(int)[new].std() > 5  # generated, not a flat fill
    assert [p.step for p in progress] == list(range(1, len(progress) + 1)) and len(progress) == 3
    (other,) = run(runner, Pan(**{**job.__dict__, "seed": 99}))
    assert other.image.tobytes() != result.image.tobytes()


def test_pan_over_the_maximum_size_is_refused() -> None:
    wide = Pan(job_id="p", image=png(picture(2048, 512)), direction="right")
    with pytest.raises(ValidationFailed, match=r"3072×512.*4096 px a side and 1\.0 megapixels"):
        wide.check_canvas((2048, 512), max_pixels=1024 * 1024)
    with pytest.raises(ValidationFailed, match="Pan another way"):
        Pan(job_id="p", direction="left").check_canvas((3072, 1024), max_pixels=64_000_000)
    assert Pan(job_id="p", direction="up").check_canvas((1024, 1024), max_pixels=4_000_000) == (1024, 1536)
    with pytest.raises(ValidationFailed, match=r"1\.5 or 2"):
        Zoom(job_id="z", image=png(picture(64, 64)), factor=3.0).check(LIMITS)


def test_cancel_mid_pan(runner: Runner) -> None:
    progress: list[Progress] = []
    job = Pan(job_id="p", steps=4, image=png(picture(128, 128)), direction="down")
    with pytest.raises(JobCancelled):
        run(runner, job, progress, cancelled=lambda: len(progress) >= 2)
    assert len(progress) == 2


# -------------------------------------------------------------------- price, storage, metadata


def test_prices_are_pixels_denoised_times_steps_run() -> None:
    # The contract's example: a 1024² edit at strength 0.9 costs its steps × 0.9.
    assert Edit(job_id="e", steps=30, strength=0.9).cost((1024, 1024)) == units(1024 * 1024, 27)
    # A larger source is denoised at SDXL's ~1 MP around its region.
    assert Edit(job_id="e", steps=30).cost((2048, 1536)) == units(1024 * 1024, 27)
    assert Zoom(job_id="z", steps=20).cost((512, 512)) == units(512 * 512, 19)  # int(20 × 0.95)
    # Pan: the new canvas.
    assert Pan(job_id="p", steps=20, direction="left").cost((512, 512)) == units(768 * 512, 19)


@pytest.mark.parametrize(
    ("job", "expected"),
    [
        (Edit(job_id="e", regions=("top", "center")), {"kind": "edit", "region": "top, center", "mask_blur": 8}),
        (Edit(job_id="e", mask=b"\x89PNG"), {"kind": "edit", "region": "mask", "strength": 0.9}),
        (Zoom(job_id="z", factor=1.5), {"kind": "zoom", "zoom": 1.5, "strength": 0.95}),
        (Pan(job_id="p", direction="up"), {"kind": "pan", "pan": "up"}),
    ],
)
def test_png_parameters_say_how_to_redo_it(job: Any, expected: dict[str, Any]) -> None:
    params = {"prompt": "x", "steps": 4, "seed": 1, **job.image_params(refiner=None, refiner_switch=0.8)}
    parsed = parse_parameters(format_parameters(params))
    assert {key: parsed[key] for key in expected} == expected
    assert job.result_fields()


# -------------------------------------------------------------- a dedicated inpainting model


@pytest.fixture(scope="module")
def inpaint_folder(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SDXL inpainting checkpoint fitting the tiny base: the base's pipeline with a random
    9-channel UNet, saved as a diffusers folder (safetensors), as inpainting checkpoints are."""
    from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    base = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir / "base", local_files_only=True)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9})
    folder = tmp_path_factory.mktemp("tiny-inpaint")
    StableDiffusionXLInpaintPipeline(**{**base.components, "unet": unet}).save_pretrained(
        folder, safe_serialization=True
    )
    return folder


def test_dedicated_inpainting_checkpoint(
    tiny_model_dir: Path, inpaint_folder: Path, runner: Runner, registry: ModelRegistry
) -> None:
    models = {"painter": {"base": str(tiny_model_dir / "base"), "inpaint": str(inpaint_folder), "default": True}}
    own = ModelRegistry(models, EngineSettings(device="cpu"))
    model = own.get("painter")
    assert model.inpaint is not None and model.inpaint.unet.config.in_channels == 9
    for shared in ("text_encoder", "text_encoder_2", "vae"):  # loaded once, shared with the base
        assert getattr(model.inpaint, shared) is getattr(model.base, shared)
    painter = Runner(own, EngineSettings(device="cpu", preview_every=0), GenerationSettings())
    image = picture(128, 128, seed=8)
    job = edit(image, regions=("center",), model="painter")
    (result,) = run(painter, job)
    (plain,) = run(runner, edit(image, regions=("center",), model="tiny-base"))
    mask = region_mask(job.regions, image.size)
    assert diff(result.image, image)[far_from(mask, 32)].max() == 0
    assert diff(result.image, plain.image)[np.asarray(mask) == 255].mean() > 5  # its own UNet drew it


def test_inpaint_checkpoint_that_does_not_fit_or_is_a_pickle(tiny_model_dir: Path) -> None:
    models = {"wrong": {"base": str(tiny_model_dir / "base"), "inpaint": str(tiny_model_dir / "refiner")}}
    with pytest.raises(ModelLoadError, match="inpaint"):
        ModelRegistry(models, EngineSettings(device="cpu")).get("wrong")
    with pytest.raises(ValueError, match="pickle"):
        ModelSettings(base="x/y", inpaint="/models/inpaint.ckpt")
