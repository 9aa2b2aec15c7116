"""The optional ESRGAN upscaler (`[engine] upscaler = "x.safetensors"`, engine.upscale.SpandrelUpscaler)
on tiny random Real-ESRGAN files written in Real-ESRGAN's own key layout (engine.tiny_esrgan).

spandrel imports torchvision (for two other architectures). No torchvision on the package index
loads beside the CPU torch the venv pins (they are CUDA builds: "operator torchvision::nms does not
exist"), so `make test` runs these tests a second time with a matching pair laid over the venv
(`make test-upscalers`: torch 2.14.1 + torchvision 0.29.1 + spandrel); in the main run they skip and
say so.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from config.settings import EngineSettings, GenerationSettings
from engine.jobs import Upscale
from engine.models import ModelRegistry
from engine.pipelines import Runner
from engine.tiny_esrgan import esrgan_parameters, esrgan_state_dict, write_tiny_esrgan
from engine.upscale import LanczosUpscaler, SpandrelUpscaler, load_upscaler


@pytest.fixture(scope="module", autouse=True)
def spandrel() -> Any:
    try:
        import spandrel
    except ImportError as exc:
        pytest.skip(f"spandrel is not installed ({exc}): `make test-upscalers` runs these tests")
    except RuntimeError as exc:  # torchvision's compiled operators do not load beside this torch
        pytest.skip(f"torchvision does not import beside torch {torch.__version__}: {exc}")
    return spandrel


pytestmark = pytest.mark.usefixtures("one_thread")


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


def test_the_full_size_layout_has_real_esrgans_parameter_count() -> None:
    # RealESRGAN_x4plus: 64 filters, 23 RRDB blocks, 16,697,987 parameters.
    assert esrgan_parameters(esrgan_state_dict(num_filters=64, num_blocks=23)) == 16_697_987


@pytest.mark.parametrize("scale", [4, 2])
def test_real_esrgan_files_are_detected_and_upscale(tmp_path: Path, scale: int) -> None:
    path = write_tiny_esrgan(tmp_path / f"tiny-x{scale}.safetensors", scale=scale)
    upscaler = load_upscaler(str(path))
    assert isinstance(upscaler, SpandrelUpscaler)
    assert upscaler.scale == scale and upscaler.name == f"spandrel:tiny-x{scale}.safetensors"
    image = _noise(40, 32)
    native = upscaler(image, (40 * scale, 32 * scale))
    assert native.size == (40 * scale, 32 * scale) and native.mode == "RGB"
    # The network's own output, not a resize of the input.
    assert _diff(native, LanczosUpscaler()(image, native.size)) > 5
    # Same file, same image → same pixels.
    assert _diff(native, upscaler(image, native.size)) == 0


def test_a_x4_model_serves_a_x2_request(tmp_path: Path) -> None:
    upscaler = load_upscaler(str(write_tiny_esrgan(tmp_path / "x4.safetensors", scale=4)))
    image = _noise(48, 40, seed=1)
    assert upscaler(image, (96, 80)).size == (96, 80)  # ×4 by the model, Lanczos down to ×2


@pytest.mark.parametrize("scale", [4, 2])
def test_large_inputs_are_tiled_without_visible_seams(tmp_path: Path, scale: int) -> None:
    upscaler = load_upscaler(str(write_tiny_esrgan(tmp_path / f"x{scale}.safetensors", scale=scale)))
    assert isinstance(upscaler, SpandrelUpscaler)
    image = _noise(200, 120, seed=2)
    size = (200 * scale, 120 * scale)
    whole = upscaler(image, size)
    upscaler.tile = 64  # 200×120 in 64-px tiles with feathered overlaps
    tiled = upscaler(image, size)
    assert tiled.size == whole.size == size
    assert _diff(whole, tiled) < 1.0


def test_upscale_job_uses_the_configured_esrgan(tmp_path: Path, tiny_models_config) -> None:
    path = write_tiny_esrgan(tmp_path / "x4.safetensors", scale=4)
    engine = EngineSettings(device="cpu", upscaler=str(path), preview_every=0)
    registry = ModelRegistry(tiny_models_config, engine)
    runner = Runner(registry, engine, GenerationSettings())
    assert runner.upscaler.name == "spandrel:x4.safetensors"
    source = io.BytesIO()
    _noise(64, 64, seed=3).save(source, format="PNG")
    job = Upscale(job_id="esrgan", prompt="a castle", image=source.getvalue(), steps=4, strength=0.3, seed=5)
    out = runner.run(job, on_progress=lambda _p: None, cancelled=lambda: False)
    assert out[0].image.size == (128, 128)
