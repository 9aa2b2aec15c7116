"""The tiny model's add-ons load through diffusers' own loaders and visibly change the image.

The contract's bar: with the same seed, 4 steps and no refiner, the LoRA at weight 1, the
embedding in a prompt and the ControlNet at strength 1 each change the image by a mean absolute
difference of more than 4 on 0–255; at weight / strength 0 the image is exactly the plain one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from engine.tiny_addons import (
    CONTROLNET,
    DEPTH_ANNOTATOR,
    EMBEDDING,
    EMBEDDING_TOKEN,
    LORA_DIFFUSERS,
    LORA_DRAFT,
    LORA_KOHYA,
    POSE_ANNOTATOR,
    build_tiny_addons,
)

BAR = 4.0  # mean |diff| on 0–255
SIZE = 128
PROMPT = "a cat sitting on a windowsill"


def _build_next_to(base: Path, folder: Path) -> Path:
    """The add-ons in `folder`, reading the session's tiny base through a link (no copy)."""
    (folder / "base").symlink_to(base, target_is_directory=True)
    build_tiny_addons(folder)
    return folder


@pytest.fixture(scope="module")
def addons_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_next_to(tiny_model_dir / "base", tmp_path_factory.mktemp("tiny-addons"))


@pytest.fixture
def pipe(tiny_model_dir: Path) -> Any:
    """A fresh base pipeline per test: LoRAs and embeddings change it in place."""
    from diffusers import StableDiffusionXLPipeline

    from engine.models import quiet_progress

    with quiet_progress():
        pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir / "base", use_safetensors=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _render(pipeline: Any, prompt: str = PROMPT, **kwargs: Any) -> np.ndarray:
    generator = torch.Generator().manual_seed(1)
    result = pipeline(
        prompt,
        height=SIZE,
        width=SIZE,
        num_inference_steps=4,
        generator=generator,
        output_type="np",
        **kwargs,
    )
    return result.images[0] * 255.0


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def _keys(file: Path) -> list[str]:
    with safe_open(str(file), "pt") as handle:
        return list(handle.keys())


def test_every_addon_is_written_as_safetensors(addons_dir: Path) -> None:
    for relative in (LORA_KOHYA, LORA_DIFFUSERS, LORA_DRAFT, EMBEDDING):
        assert (addons_dir / relative).is_file(), relative
    assert (addons_dir / CONTROLNET / "diffusion_pytorch_model.safetensors").is_file()
    for folder in (DEPTH_ANNOTATOR, POSE_ANNOTATOR):
        for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
            assert (addons_dir / folder / name).is_file(), f"{folder}/{name}"
    weights = [f for f in addons_dir.rglob("*") if f.is_file() and "base" not in f.relative_to(addons_dir).parts]
    assert not [f for f in weights if f.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]


def test_kohya_lora_uses_kohya_keys_for_unet_and_both_text_encoders(addons_dir: Path) -> None:
    keys = _keys(addons_dir / LORA_KOHYA)
    modules = {key.split(".")[0] for key in keys}
    assert all(m.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for m in modules)
    for module in modules:
        assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"} <= set(keys)
    # SGM block names, as kohya's SDXL trainer writes them, and transformers-4 CLIP names.
    assert any(m.startswith("lora_unet_input_blocks_") for m in modules)
    assert any(m.startswith("lora_te1_text_model_encoder_layers_") for m in modules)
    assert any(m.startswith("lora_te2_text_model_encoder_layers_") for m in modules)


@pytest.mark.parametrize("relative", [LORA_KOHYA, LORA_DIFFUSERS])
def test_style_lora_changes_the_image_at_weight_1_and_nothing_at_0(pipe: Any, addons_dir: Path, relative: str) -> None:
    plain = _render(pipe)
    pipe.load_lora_weights(str(addons_dir / relative), adapter_name="style")
    styled = _render(pipe)
    pipe.set_adapters(["style"], adapter_weights=[0.0])
    off = _render(pipe)
    print(f"{relative}: mean |diff| at weight 1 = {_diff(styled, plain):.2f}")
    assert _diff(styled, plain) > BAR
    assert np.array_equal(off, plain)


def test_kohya_lora_reaches_both_text_encoders(pipe: Any, addons_dir: Path) -> None:
    plain = _render(pipe)
    pipe.load_lora_weights(str(addons_dir / LORA_KOHYA), adapter_name="style")
    for encoder in ("text_encoder", "text_encoder_2"):
        weights = {"unet": 0.0, "text_encoder": 0.0, "text_encoder_2": 0.0} | {encoder: 1.0}
        pipe.set_adapters(["style"], adapter_weights=[weights])
        changed = _diff(_render(pipe), plain)
        print(f"kohya LoRA, {encoder} only: mean |diff| = {changed:.2f}")
        assert changed > 1.0, encoder


def test_diffusers_lora_has_diffusers_keys(addons_dir: Path) -> None:
    keys = _keys(addons_dir / LORA_DIFFUSERS)
    assert keys and all(key.startswith("unet.") for key in keys)
    assert any(key.endswith(".to_q.lora.down.weight") for key in keys)


def test_draft_lora_loads_and_changes_the_image(pipe: Any, addons_dir: Path) -> None:
    keys = _keys(addons_dir / LORA_DRAFT)
    assert all(key.startswith("lora_unet_") for key in keys)  # UNet only
    assert any(key.startswith("lora_unet_down_blocks_") for key in keys)  # diffusers block names
    plain = _render(pipe)
    pipe.load_lora_weights(str(addons_dir / LORA_DRAFT), adapter_name="draft")
    drafted = _render(pipe)
    print(f"draft LoRA: mean |diff| = {_diff(drafted, plain):.2f}")
    assert _diff(drafted, plain) > BAR


def test_embedding_in_the_prompt_changes_the_image(pipe: Any, addons_dir: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(addons_dir / EMBEDDING))
    assert state["clip_l"].shape[1] == pipe.text_encoder.config.hidden_size
    assert state["clip_g"].shape[1] == pipe.text_encoder_2.config.hidden_size
    plain = _render(pipe)
    pipe.load_textual_inversion(
        state["clip_l"], token=EMBEDDING_TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        state["clip_g"], token=EMBEDDING_TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    assert np.array_equal(_render(pipe), plain)  # loaded but unused: nothing changes
    with_token = _render(pipe, f"{PROMPT}, {EMBEDDING_TOKEN}")
    print(f"embedding: mean |diff| = {_diff(with_token, plain):.2f}")
    assert _diff(with_token, plain) > BAR


def _control_image(shape: str) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), "black")
    draw = ImageDraw.Draw(image)
    if shape == "box":
        draw.rectangle((30, 30, 90, 90), outline="white", width=3)
    else:
        draw.ellipse((10, 50, 120, 100), outline="white", width=3)
    return image


def test_controlnet_follows_its_strength_and_its_image(pipe: Any, addons_dir: Path) -> None:
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    controlnet = ControlNetModel.from_pretrained(addons_dir / CONTROLNET, use_safetensors=True)
    controlled = StableDiffusionXLControlNetPipeline.from_pipe(pipe, controlnet=controlnet)
    controlled.set_progress_bar_config(disable=True)
    plain = _render(pipe)
    box = _control_image("box")
    full = _render(controlled, image=box, controlnet_conditioning_scale=1.0)
    off = _render(controlled, image=box, controlnet_conditioning_scale=0.0)
    other = _render(controlled, image=_control_image("ellipse"), controlnet_conditioning_scale=1.0)
    print(f"ControlNet: mean |diff| at 1.0 = {_diff(full, plain):.2f}; box vs ellipse = {_diff(full, other):.2f}")
    assert _diff(full, plain) > BAR
    assert np.array_equal(off, plain)
    assert _diff(full, other) > 1.0  # the control image itself steers the result


def test_build_is_deterministic_and_leaves_the_global_rng_alone(
    tiny_model_dir: Path, addons_dir: Path, tmp_path: Path
) -> None:
    rng = torch.random.get_rng_state()
    again = _build_next_to(tiny_model_dir / "base", tmp_path)
    assert torch.equal(torch.random.get_rng_state(), rng)

    def digests(root: Path) -> dict[str, str]:
        return {
            str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in root.rglob("*")
            if f.is_file() and "base" not in f.relative_to(root).parts
        }

    assert digests(again) == digests(addons_dir)
