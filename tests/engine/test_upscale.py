"""engine.upscale: sizes, tiling and feathering math on plain arrays, the pixel upscalers, and
the real upscale job (whole and tiled) on the tiny SDXL."""

from __future__ import annotations

import importlib.util
import io
import itertools
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from config.settings import EngineSettings, GenerationSettings
from engine.jobs import Text2Img, Upscale
from engine.jobs.events import Progress
from engine.models import ModelRegistry
from engine.pipelines import Runner
from engine.upscale import (
    LanczosUpscaler,
    Tile,
    blend,
    blend_images,
    default_overlap,
    load_upscaler,
    ramp,
    ramps,
    spans,
    tile_grid,
    tile_side_for,
    upscaled_size,
)

# --- sizes -----------------------------------------------------------------------------------


def test_upscaled_size() -> None:
    assert upscaled_size(1024, 768, 2, 4096) == (2048, 1536)
    assert upscaled_size(2048, 1024, 2, 3000) == (3000 // 8 * 8, 1496)  # capped at the max side
    assert upscaled_size(100, 60, 2, 4096) == (200, 120)
    assert upscaled_size(101, 61, 2, 4096) == (200, 120)  # multiples of 8


def test_tile_side() -> None:
    assert tile_side_for(2048) == 1024  # never above SDXL's native size
    assert tile_side_for(256) == 256
    assert tile_side_for(300) == 296
    assert default_overlap(1024) == 256
    assert default_overlap(256) == 64


# --- spans and ramps -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "tile", "overlap"),
    [(384, 256, 64), (4096, 1024, 256), (2056, 1024, 256), (1000, 256, 64), (1024, 1024, 256), (520, 512, 128)],
)
def test_spans_cover_with_overlap_and_alignment(length, tile, overlap) -> None:
    intervals = spans(length, tile, overlap)
    assert intervals[0][0] == 0 and intervals[-1][1] == length
    for start, end in intervals:
        assert start % 8 == 0
        assert end - start == min(tile, length)
    for (_, end), (start, _) in itertools.pairwise(intervals):
        assert end - start >= overlap  # neighbours overlap at least as asked


def test_small_side_is_one_span() -> None:
    assert spans(200, 256, 64) == [(0, 200)]


def test_ramp_is_linear_in_the_overlaps_and_flat_elsewhere() -> None:
    weight = ramp((100, 200), previous_end=120, next_start=170)
    assert np.allclose(weight[:20], np.arange(1, 21) / 21)  # up across the 20 shared px
    assert np.all(weight[20:70] == 1)
    assert np.allclose(weight[70:], np.arange(30, 0, -1) / 31)  # down across the 30 shared px
    assert np.all(weight > 0)
    assert np.all(ramp((0, 50), None, None) == 1)  # image borders are not feathered


@pytest.mark.parametrize(("length", "tile", "overlap"), [(384, 256, 64), (1000, 256, 64), (2056, 1024, 256)])
def test_one_dimensional_weights_sum_to_one(length, tile, overlap) -> None:
    intervals = spans(length, tile, overlap)
    total = np.zeros(length)
    for (start, end), weight in zip(intervals, ramps(intervals), strict=True):
        total[start:end] += weight
    assert np.allclose(total, 1.0)


# --- 2-D tiles and blending ------------------------------------------------------------------


def _coverage(tiles: list[Tile], width: int, height: int) -> np.ndarray:
    total = np.zeros((height, width))
    for tile in tiles:
        left, top, right, bottom = tile.box
        assert tile.weight.shape == (bottom - top, right - left)
        total[top:bottom, left:right] += tile.weight
    return total


@pytest.mark.parametrize(("width", "height"), [(384, 384), (1000, 520), (256, 640)])
def test_tile_weights_sum_to_one(width, height) -> None:
    tiles = tile_grid(width, height, 256, 64)
    assert len(tiles) > 1
    assert np.allclose(_coverage(tiles, width, height), 1.0)


def test_constant_image_stays_constant() -> None:
    width, height = 1000, 520
    tiles = tile_grid(width, height, 256, 64)
    out = blend([(tile, np.full((*tile.weight.shape, 3), 0.37)) for tile in tiles], width, height)
    assert out.shape == (height, width, 3)
    assert np.allclose(out, 0.37)


def test_tiles_of_one_image_blend_back_to_it() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((520, 1000))
    tiles = tile_grid(1000, 520, 256, 64)
    parts = [(tile, image[tile.box[1] : tile.box[3], tile.box[0] : tile.box[2]]) for tile in tiles]
    assert np.allclose(blend(parts, 1000, 520), image)


def test_seam_is_a_linear_crossfade() -> None:
    # Two tiles of different constants: across their overlap the result ramps linearly.
    tiles = tile_grid(384, 8, 256, 64)
    assert [t.box for t in tiles] == [(0, 0, 256, 8), (128, 0, 384, 8)]
    out = blend([(tiles[0], np.zeros((8, 256))), (tiles[1], np.ones((8, 256)))], 384, 8)[0]
    assert np.all(out[:128] == 0) and np.all(out[256:] == 1)
    steps = np.diff(out[128:256])
    assert np.allclose(steps, steps[0]) and steps[0] > 0


def test_blend_images_round_trips_pil() -> None:
    image = Image.effect_noise((384, 384), 60).convert("RGB")
    tiles = tile_grid(384, 384, 256, 64)
    out = blend_images([(tile, image.crop(tile.box)) for tile in tiles], 384, 384)
    assert np.array_equal(np.asarray(out), np.asarray(image))


# --- pixel upscalers ---------------------------------------------------------------------------


def test_lanczos_upscaler() -> None:
    out = LanczosUpscaler()(Image.new("L", (64, 32), 128), (128, 64))
    assert out.size == (128, 64) and out.mode == "RGB"


def test_no_upscaler_configured_is_lanczos() -> None:
    assert load_upscaler("").name == "lanczos"


@pytest.mark.skipif(importlib.util.find_spec("spandrel") is not None, reason="spandrel is installed")
def test_missing_spandrel_falls_back_to_lanczos(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        upscaler = load_upscaler("/models/4x-esrgan.safetensors")
    assert upscaler.name == "lanczos"
    assert "spandrel" in caplog.text


def test_spandrel_model_with_tiles(tmp_path) -> None:
    """A random-weight ×4 ESRGAN saved as safetensors: loaded by spandrel, tiled like the rest."""
    pytest.importorskip("spandrel")
    from safetensors.torch import save_file
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    net = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4)
    path = tmp_path / "tiny-esrgan.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    upscaler = load_upscaler(str(path))
    assert upscaler.name.startswith("spandrel:") and upscaler.scale == 4
    image = Image.effect_noise((200, 120), 50).convert("RGB")
    whole = upscaler(image, (400, 240))  # ×4 by the model, then Lanczos down to ×2
    assert whole.size == (400, 240)
    upscaler.tile = 64
    tiled = upscaler(image, (400, 240))
    assert np.abs(np.asarray(whole, dtype=int) - np.asarray(tiled, dtype=int)).mean() < 1


# --- the real upscale job ------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def registry(tiny_models_config) -> ModelRegistry:
    return ModelRegistry(tiny_models_config, EngineSettings(device="cpu"))


def _runner(registry, **engine) -> Runner:
    return Runner(registry, EngineSettings(device="cpu", **engine), GenerationSettings())


@pytest.fixture(scope="module")
def source_png(registry) -> bytes:
    [out] = _runner(registry).run(
        Text2Img(job_id="src", prompt="a tree", width=192, height=192, steps=2, refiner=False),
        on_progress=lambda _p: None,
        cancelled=lambda: False,
    )
    data = io.BytesIO()
    out.image.save(data, "PNG")
    return data.getvalue()


def _upscale(runner: Runner, data: bytes, **fields) -> tuple[Image.Image, list[Progress]]:
    progress: list[Progress] = []
    job = Upscale(job_id="u", image=data, prompt="a tree", steps=10, strength=0.3, seed=9, **fields)
    [out] = runner.run(job, on_progress=progress.append, cancelled=lambda: False)
    return out.image, progress


def test_upscale_whole_image(registry, source_png) -> None:
    image, progress = _upscale(_runner(registry, preview_every=1), source_png)
    assert image.size == (384, 384)
    assert [p.step for p in progress] == [1, 2, 3]
    assert all(p.phase == "upscale" and p.total == 3 and p.preview for p in progress)
    lanczos = Image.open(io.BytesIO(source_png)).resize((384, 384), Image.Resampling.LANCZOS)
    assert not np.array_equal(np.asarray(image), np.asarray(lanczos))  # img2img did change it


def test_upscale_in_tiles(registry, source_png) -> None:
    # 384 px > 256 px: four 256² tiles (starts 0 and 128 on each side), 3 steps each.
    runner = _runner(registry, vae_tiling_above=256)
    image, progress = _upscale(runner, source_png)
    assert image.size == (384, 384)
    assert [p.step for p in progress] == list(range(1, 13))
    assert {p.total for p in progress} == {12}
    again, _ = _upscale(runner, source_png)
    assert np.array_equal(np.asarray(image), np.asarray(again))
    whole, _ = _upscale(_runner(registry), source_png)
    assert not np.array_equal(np.asarray(image), np.asarray(whole))
    vae = registry.get().base.vae
    assert vae.use_tiling is False  # tiling was only on for the job


def test_upscale_respects_the_max_side(registry, source_png) -> None:
    runner = Runner(registry, EngineSettings(device="cpu"), GenerationSettings(upscale_max_side=512))
    image, _ = _upscale(runner, source_png, factor=4)
    assert image.size == (512, 512)
