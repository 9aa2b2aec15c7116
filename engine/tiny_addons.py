"""Add-ons fitting the tiny SDXL (engine.tiny): LoRAs, an embedding, a ControlNet, estimators.

`build_tiny_addons(PATH)` writes, next to the ``PATH/base`` that `engine.tiny.build_tiny_sdxl`
made, one random-weight file or folder per kind of add-on the bot loads, each in the format real
ones are published in, so tests and the offline demo exercise the same loading code:

- a LoRA in kohya keys (SGM block names, as kohya's SDXL trainer writes) over the UNet's attention
  and both text encoders; the same kind of LoRA in diffusers keys (peft, as diffusers' training
  scripts write); a "draft" LoRA standing in for SDXL-Lightning / LCM-LoRA (kohya keys, diffusers
  block names, UNet only);
- an SDXL textual-inversion embedding (``clip_l`` and ``clip_g`` tensors);
- a diffusers ControlNet folder made from the base's UNet;
- a transformers depth estimator (Depth Anything) and pose estimator (VitPose) folders.

Random add-ons would change nothing if drawn at the usual init scales (LoRA up weights and the
ControlNet's zero-convolutions start at zero), so each one is drawn strong enough that, with the
same seed, 4 steps and no refiner, it changes the image by a mean absolute difference of more
than 4 on 0–255 (the contract's bar; tests/engine/test_tiny_addons.py measures it).
Everything is safetensors; the same seed gives the same bytes.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Where each add-on goes, relative to the tiny model's folder (the one source of truth).
LORA_KOHYA = "lora/tiny-style.safetensors"
LORA_DIFFUSERS = "lora/tiny-style-diffusers.safetensors"
LORA_DRAFT = "lora/tiny-draft.safetensors"
EMBEDDING = "embeddings/tiny-token.safetensors"
EMBEDDING_TOKEN = "<tiny-token>"  # how a prompt uses it when configured as [embeddings.tiny-token]
CONTROLNET = "controlnet"
DEPTH_ANNOTATOR = "annotators/depth"
POSE_ANNOTATOR = "annotators/pose"
ADDONS = (LORA_KOHYA, LORA_DIFFUSERS, LORA_DRAFT, EMBEDDING, CONTROLNET, DEPTH_ANNOTATOR, POSE_ANNOTATOR)

LORA_RANK = 4
# Std of the LoRA up weights (down weights are unit-gain): 7–10 mean |diff| on the tiny model.
LORA_UP_STD = 1.0
# peft's own init (init_lora_weights=False) gives ~4 mean |diff|, too close to the bar: scale it.
DIFFUSERS_LORA_GAIN = 2.5
# The LoRAs touch the attention projections, as most style LoRAs do.
UNET_TARGETS = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$")
TEXT_TARGETS = re.compile(r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.weight$")
EMBEDDING_VECTORS = 2
# The tiny encoders' hidden states have norms ~6; an embedding vector must dominate its position's
# hidden state to move the UNet's cross-attention, and 64 does (16 barely shows).
EMBEDDING_NORM = 64.0
# 2^(4-1) = 8: the conditioning embedding must downsample by the VAE's factor (see FACTS.md).
CONTROLNET_COND_CHANNELS = (16, 32, 96, 256)
# Gain of the randomised zero-convolutions (1 = variance-preserving).
CONTROLNET_GAIN = 1.0
# The conditioning embedding (control image → features) is redrawn whole: its last conv starts at
# zero, and at PyTorch's default init the image's structure fades out over its 8 convolutions, so
# the ControlNet would steer by its UNet copy alone. Gain 2 per SiLU layer keeps the structure.
CONTROLNET_COND_GAIN = 2.0
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
DEPTH_SIZE = 56  # a multiple of the backbone's patch 14; real Depth Anything uses 518
POSE_SIZE = (64, 48)  # (height, width); real VitPose uses (256, 192)
COCO_KEYPOINTS = 17


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Draw module inits (which use the global RNG) from `seed`, leaving the caller's RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _save(state: Mapping[str, torch.Tensor], file: Path) -> None:
    from safetensors.torch import save_file

    file.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in state.items()}, str(file), metadata={"format": "pt"})


def _lora_pair(weight: torch.Tensor, gen: torch.Generator, up_std: float) -> dict[str, torch.Tensor]:
    """Kohya's three tensors for one Linear; alpha = rank, so the scale alpha/rank is 1."""
    out_features, in_features = weight.shape
    return {
        "lora_down.weight": torch.randn(LORA_RANK, in_features, generator=gen) / in_features**0.5,
        "lora_up.weight": torch.randn(out_features, LORA_RANK, generator=gen) * up_std / LORA_RANK**0.5,
        "alpha": torch.tensor(float(LORA_RANK)),
    }


def _kohya_lora(targets: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """targets: kohya module name (``lora_unet_…``) → the weight it adapts (for its shape)."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name in sorted(targets):  # sorted: the draws must not depend on dict order
        for suffix, tensor in _lora_pair(targets[name], gen, LORA_UP_STD).items():
            state[f"{name}.{suffix}"] = tensor
    return state


def _unet_targets(unet: Any, *, sgm_names: bool) -> dict[str, torch.Tensor]:
    """The UNet's attention projections under kohya names: SGM block names or diffusers ones."""
    from engine.single_file import UNET_PREFIX, unet_to_original

    state = unet.state_dict()
    original = {}
    if sgm_names:
        # unet_to_original only renames, so each tensor object tells which diffusers key it was.
        by_tensor = {id(value): key for key, value in unet_to_original(state, unet.config).items()}
        original = {key: by_tensor[id(value)][len(UNET_PREFIX) :] for key, value in state.items()}
    return {
        "lora_unet_" + original.get(key, key).removesuffix(".weight").replace(".", "_"): value
        for key, value in state.items()
        if UNET_TARGETS.search(key)
    }


def _text_targets(text_encoder: Any, prefix: str) -> dict[str, torch.Tensor]:
    """A text encoder's attention projections under kohya names (``lora_te1_text_model_…``)."""
    # Kohya names follow transformers 4's CLIP layout, where both encoders nest a `text_model`;
    # transformers 5's CLIPTextModel dropped that level, and diffusers maps such files anyway.
    return {
        prefix + ("text_model." + key.removeprefix("text_model.")).removesuffix(".weight").replace(".", "_"): value
        for key, value in text_encoder.state_dict().items()
        if TEXT_TARGETS.search(key)
    }


def _diffusers_lora(unet: Any, seed: int, file: Path) -> None:
    """A LoRA the way diffusers' SDXL training scripts save one (peft state → diffusers keys)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    unet = copy.deepcopy(unet)  # add_adapter wraps the layers in place
    # lora_alpha = r: the file does not record alpha, and diffusers then loads it with alpha = r.
    config = LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_RANK,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        init_lora_weights=False,  # False: B random too (True would make it zero, a no-op)
    )
    with _seeded(seed):
        unet.add_adapter(config)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    state = {
        key: value * DIFFUSERS_LORA_GAIN if key.endswith(".lora.up.weight") else value for key, value in state.items()
    }
    StableDiffusionXLPipeline.save_lora_weights(
        file.parent, unet_lora_layers=state, weight_name=file.name, safe_serialization=True
    )


def _embedding(text_encoder: Any, text_encoder_2: Any, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, encoder in (("clip_l", text_encoder), ("clip_g", text_encoder_2)):
        vectors = torch.randn(EMBEDDING_VECTORS, encoder.config.hidden_size, generator=gen)
        state[key] = vectors / vectors.norm(dim=1, keepdim=True) * EMBEDDING_NORM
    return state


def _controlnet(unet: Any, seed: int, folder: Path) -> None:
    from diffusers import ControlNetModel

    with _seeded(seed):
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONTROLNET_COND_CHANNELS)
    # from_unet zero-initialises the zero-convolutions (so training starts as a no-op): redraw them.
    embedding = controlnet.controlnet_cond_embedding
    gains = [(conv, CONTROLNET_GAIN) for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]]
    gains += [(conv, CONTROLNET_COND_GAIN) for conv in [embedding.conv_in, *embedding.blocks]]
    gains.append((embedding.conv_out, CONTROLNET_GAIN))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for conv, gain in gains:
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * gain / fan_in**0.5)
            conv.bias.zero_()
    controlnet.save_pretrained(folder, safe_serialization=True)


def _write_json(file: Path, data: Mapping[str, Any]) -> None:
    file.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _depth_estimator(seed: int, folder: Path) -> None:
    """Depth Anything on a tiny DINOv2; the processor config mirrors the hub's Depth-Anything-V2 one."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=DEPTH_SIZE,
        patch_size=14,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=14,
        reassemble_hidden_size=16,
        neck_hidden_sizes=[8, 16, 16, 16],
        fusion_hidden_size=16,
        head_hidden_size=8,
        depth_estimation_type="relative",
    )
    with _seeded(seed):
        model = DepthAnythingForDepthEstimation(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    # Written as JSON rather than through DPTImageProcessor: without torchvision transformers would
    # save its PIL fallback class name, and real folders name DPTImageProcessor.
    processor = {
        "image_processor_type": "DPTImageProcessor",
        "do_resize": True,
        "size": {"height": DEPTH_SIZE, "width": DEPTH_SIZE},
        "keep_aspect_ratio": True,
        "ensure_multiple_of": 14,
        "resample": 3,  # bicubic
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
        "do_pad": False,
    }
    _write_json(folder / "preprocessor_config.json", processor)


def _pose_estimator(seed: int, folder: Path) -> None:
    """VitPose (top-down, 17 COCO keypoints) on a tiny ViT; processor config as on the hub."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation

    backbone = VitPoseBackboneConfig(
        image_size=list(POSE_SIZE),
        patch_size=[8, 8],
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        out_indices=[2],
    )
    config = VitPoseConfig(backbone_config=backbone, num_labels=COCO_KEYPOINTS)
    with _seeded(seed):
        model = VitPoseForPoseEstimation(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    processor = {
        "image_processor_type": "VitPoseImageProcessor",
        "do_affine_transform": True,
        "size": {"height": POSE_SIZE[0], "width": POSE_SIZE[1]},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": IMAGENET_MEAN,
        "image_std": IMAGENET_STD,
        "normalize_factor": 200.0,
    }
    _write_json(folder / "preprocessor_config.json", processor)


def build_tiny_addons(path: Path, seed: int = 0) -> None:
    """Write the add-ons (see the module docstring) under `path`, which holds the tiny `base`."""
    from diffusers import StableDiffusionXLPipeline

    from engine.models import quiet_progress

    path = Path(path)
    started = time.perf_counter()
    for relative in ADDONS:
        target = path / relative
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    with quiet_progress():
        base = StableDiffusionXLPipeline.from_pretrained(path / "base", use_safetensors=True)
        unet, text_encoder, text_encoder_2 = base.unet, base.text_encoder, base.text_encoder_2

        style = _unet_targets(unet, sgm_names=True)
        style |= _text_targets(text_encoder, "lora_te1_") | _text_targets(text_encoder_2, "lora_te2_")
        _save(_kohya_lora(style, seed + 10), path / LORA_KOHYA)
        _diffusers_lora(unet, seed + 11, path / LORA_DIFFUSERS)
        _save(_kohya_lora(_unet_targets(unet, sgm_names=False), seed + 12), path / LORA_DRAFT)
        _save(_embedding(text_encoder, text_encoder_2, seed + 13), path / EMBEDDING)
        _controlnet(unet, seed + 14, path / CONTROLNET)
        _depth_estimator(seed + 16, path / DEPTH_ANNOTATOR)
        _pose_estimator(seed + 17, path / POSE_ANNOTATOR)
    # safetensors writes its files 0600; the bot may run as another user (as in engine.tiny).
    for relative in ADDONS:
        target = path / relative
        for weights in target.rglob("*.safetensors") if target.is_dir() else [target]:
            weights.chmod(0o644)
    log.info("tiny add-ons written to %s in %.1f s", path, time.perf_counter() - started)


def tiny_styling(path: Path) -> dict[str, Any]:
    """Config tables using the add-ons under `path`, as `config.settings.load_settings(**...)`
    takes them: two LoRAs (kohya and diffusers keys; the second fits the model named `tiny`
    only), the embedding, and a style using the first LoRA. For the demo, tests and benches."""
    path = Path(path)
    return {
        "loras": {
            "tiny-style": {
                "file": str(path / LORA_KOHYA),
                "weight": 0.8,
                "trigger": "tiny style",
                "description": "random kohya-format LoRA (UNet and both text encoders)",
            },
            "tiny-style-diffusers": {
                "file": str(path / LORA_DIFFUSERS),
                "models": ["tiny"],
                "description": "random diffusers-format LoRA (UNet)",
            },
        },
        "embeddings": {EMBEDDING_TOKEN.strip("<>"): {"file": str(path / EMBEDDING), "description": "random embedding"}},
        "styles": {
            "tiny-poster": {
                "prompt": "poster of {prompt}, bold shapes",
                "negative": "blurry",
                "loras": ["tiny-style:0.5"],
                "steps": 3,
                "description": "a poster look, with tiny-style at 0.5",
            }
        },
    }


def tiny_draft(path: Path) -> dict[str, Any]:
    """A [models.<name>] table's draft keys for the draft LoRA under `path`."""
    return {"draft_lora": str(Path(path) / LORA_DRAFT), "draft_steps": 4}


__all__ = [
    "ADDONS",
    "CONTROLNET",
    "DEPTH_ANNOTATOR",
    "EMBEDDING",
    "EMBEDDING_TOKEN",
    "LORA_DIFFUSERS",
    "LORA_DRAFT",
    "LORA_KOHYA",
    "POSE_ANNOTATOR",
    "build_tiny_addons",
    "tiny_draft",
    "tiny_styling",
]
