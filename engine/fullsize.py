"""A random-weight SDXL with the REAL architecture, for timing and memory figures without weights.

`build_fullsize_sdxl(PATH)` writes

- ``PATH/base``: a diffusers StableDiffusionXLPipeline folder: the SDXL 1.0 base UNet (2.57 B
  parameters), the VAE, CLIP-L and OpenCLIP bigG text encoders,
- ``PATH/refiner``: a StableDiffusionXLImg2ImgPipeline folder: the SDXL 1.0 refiner UNet (2.26 B),
  the same bigG encoder and VAE (as the published refiner repository ships them),

with the published configs shipped beside this file (engine/sdxl_configs/*.json) and the project's
own offline CLIP tokenizers padded to the real vocabulary (49408 ids, BOS and EOS last). Weights
are safetensors written by `save_pretrained`, fp16 by default (11.5 GB for base + refiner), and load
through engine.models exactly like the real ones. Random weights give real timings and memory;
the images are noise.

Building is fast where it matters: on CUDA every module is created directly on the GPU in the
target dtype (no fp32 copy in CPU RAM, no download); on a CPU it works too, slowly (~20 GB of RAM
would be too much for fp32, so modules are created in the target dtype there as well).
`parameter_counts()` builds the same modules on the meta device to check sizes at no cost.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.tiny import BOS, EOS, assemble_pipelines, load_tokenizers, save_pipeline, tokenizer_files

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).with_name("sdxl_configs")
# Component → shipped config file (the published SDXL 1.0 base/refiner configs).
CONFIG_FILES: dict[str, str] = {
    "unet": "unet_base.json",
    "refiner_unet": "unet_refiner.json",
    "vae": "vae.json",
    "text_encoder": "text_encoder.json",
    "text_encoder_2": "text_encoder_2.json",
    "scheduler": "scheduler.json",
}
VOCAB_SIZE = 49408  # CLIP's: 256 bytes, 256 with </w>, 48894 merges, BOS, EOS
# Published parameter counts (checked by tests/engine/test_fullsize.py against the configs).
PUBLISHED_PARAMS: dict[str, int] = {
    "unet": 2_567_463_684,
    "refiner_unet": 2_259_526_660,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}

Configs = dict[str, dict[str, Any]]
TokenizerFiles = tuple[dict[str, int], list[tuple[str, str]]]


def load_configs() -> Configs:
    """The shipped SDXL configs, one dict per component (fresh copies: callers may edit them)."""
    return {name: json.loads((CONFIG_DIR / file).read_text(encoding="utf-8")) for name, file in CONFIG_FILES.items()}


def fullsize_tokenizer_files(vocab_size: int = VOCAB_SIZE) -> TokenizerFiles:
    """engine.tiny's CLIP-layout vocab and merges, padded with unused filler tokens to `vocab_size`
    so the embedding tables have the real shape; BOS and EOS stay the two highest ids (CLIP pools
    the text features at argmax(ids), which must be the EOS position)."""
    vocab, merges = tokenizer_files()
    tokens = [token for token in vocab if token not in (BOS, EOS)]
    fillers = vocab_size - len(tokens) - 2
    if fillers < 0:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {len(tokens) + 2} tokens of the merges")
    # Never produced by the BPE (no merge leads to them, and '<' '|' split them apart): they only
    # occupy ids, as the unused rows of a real CLIP embedding would for a given prompt.
    tokens += [f"<|filler{i}|>" for i in range(fillers)]
    tokens += [BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}, merges


@contextmanager
def creation_context(device: torch.device | str, dtype: torch.dtype) -> Iterator[None]:
    """New parameters are created on `device` in `dtype`: a module's own random init then runs
    there (on a GPU: milliseconds for billions of parameters, and never an fp32 copy in RAM).
    Process-wide while it lasts (torch's default dtype): use it from one thread."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _text_config(config: Mapping[str, Any]) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{key: value for key, value in config.items() if key != "architectures"})


def build_modules(configs: Configs, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    """The five weighted components, randomly initialised, on `device` in `dtype`, eval mode.
    Each is drawn from its own seed so that adding one never changes the others."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    makers = {
        "text_encoder": lambda: CLIPTextModel(_text_config(configs["text_encoder"])),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(_text_config(configs["text_encoder_2"])),
        "vae": lambda: AutoencoderKL.from_config(configs["vae"]),
        "unet": lambda: UNet2DConditionModel.from_config(configs["unet"]),
        "refiner_unet": lambda: UNet2DConditionModel.from_config(configs["refiner_unet"]),
    }
    modules: dict[str, Any] = {}
    generator_state = torch.random.get_rng_state()
    try:
        for offset, (name, make) in enumerate(makers.items()):
            torch.manual_seed(seed + offset)  # seeds CUDA too
            with creation_context(device, dtype):
                module = make()
            # An init may still pick fp32 explicitly; cast only then (a cast of a diffusers model
            # logs a warning each time, and costs a copy).
            if any(p.dtype != dtype for p in module.parameters()):
                module.to(dtype=dtype)
            modules[name] = module.eval().requires_grad_(False)
    finally:
        torch.random.set_rng_state(generator_state)
    return modules


def parameter_counts(configs: Configs | None = None) -> dict[str, int]:
    """Parameters per component, counted on the meta device (no memory, about a second)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        modules = build_modules(configs or load_configs(), "meta", torch.float32)
    return {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}


def build_fullsize_pipelines(
    configs: Configs | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> tuple[Any, Any, TokenizerFiles]:
    """(StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline, (vocab, merges)) in memory;
    the refiner shares the base's text_encoder_2, tokenizer_2 and VAE."""
    from diffusers import EulerDiscreteScheduler

    configs = configs or load_configs()
    vocab_size = configs["text_encoder"]["vocab_size"]
    if configs["text_encoder_2"]["vocab_size"] != vocab_size:
        raise ValueError("both text encoders must share the tokenizer's vocabulary size")
    vocab, merges = fullsize_tokenizer_files(vocab_size)
    modules = build_modules(configs, device, dtype, seed)
    scheduler = functools.partial(EulerDiscreteScheduler.from_config, configs["scheduler"])
    base, refiner = assemble_pipelines(modules, load_tokenizers(vocab, merges), scheduler)
    return base, refiner, (vocab, merges)


@dataclass(frozen=True)
class BuildInfo:
    path: Path
    seconds: float
    bytes: int
    parameters: dict[str, int]
    device: str
    dtype: str


def default_build_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def build_fullsize_sdxl(
    path: Path | str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    configs: Configs | None = None,
) -> BuildInfo:
    """Write base/ and refiner/ under `path` (see the module docstring); replaces what was there.
    `configs` (default: the shipped ones) lets tests build the same layout at a small size."""
    import shutil

    from engine.models import quiet_progress

    path = Path(path)
    device = torch.device(device) if device is not None else default_build_device()
    started = time.perf_counter()
    # no_grad, not inference_mode: the modules are plain parameters, saved then dropped.
    with quiet_progress(), torch.no_grad():
        base, refiner, (vocab, merges) = build_fullsize_pipelines(configs, device=device, dtype=dtype, seed=seed)
        parameters = {
            "unet": sum(p.numel() for p in base.unet.parameters()),
            "refiner_unet": sum(p.numel() for p in refiner.unet.parameters()),
            "vae": sum(p.numel() for p in base.vae.parameters()),
            "text_encoder": sum(p.numel() for p in base.text_encoder.parameters()),
            "text_encoder_2": sum(p.numel() for p in base.text_encoder_2.parameters()),
        }
        for name in ("base", "refiner"):
            if (path / name).exists():
                shutil.rmtree(path / name)
        path.mkdir(parents=True, exist_ok=True)
        save_pipeline(base, path / "base", vocab, merges)
        save_pipeline(refiner, path / "refiner", vocab, merges)
    del base, refiner
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # safetensors writes its files 0600; the bot may run as another user (a container, a service).
    for weights in path.rglob("*.safetensors"):
        weights.chmod(0o644)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    seconds = time.perf_counter() - started
    log.info("full-size random SDXL written to %s in %.1f s (%.1f GB)", path, seconds, size / 1e9)
    return BuildInfo(path, seconds, size, parameters, str(device), str(dtype).removeprefix("torch."))


def fullsize_model_command(path: str) -> int:
    """`atelier tiny-model --full-size PATH`: build it and say where it went and how to use it."""
    target = Path(path)
    device = default_build_device()
    if device.type == "cpu":
        print("no CUDA GPU: building on the CPU (a few minutes, ~12 GB of RAM and disk)", file=sys.stderr)
    try:
        info = build_fullsize_sdxl(target, device=device)
    except OSError as exc:
        print(f"atelier: cannot write the full-size model to {target}: {exc}", file=sys.stderr)
        return 1
    total = sum(info.parameters.values())
    print(
        f"full-size random SDXL written to {target} in {info.seconds:.1f} s on {info.device} "
        f"({info.bytes / 1e9:.1f} GB, {total / 1e9:.2f} B parameters, {info.dtype}; random weights: images are noise)"
    )
    print("use it with:")
    print("  [models.sdxl-random]")
    print(f'  base = "{(target / "base").resolve()}"')
    print(f'  refiner = "{(target / "refiner").resolve()}"')
    return 0


__all__ = [
    "CONFIG_DIR",
    "PUBLISHED_PARAMS",
    "VOCAB_SIZE",
    "BuildInfo",
    "build_fullsize_pipelines",
    "build_fullsize_sdxl",
    "build_modules",
    "creation_context",
    "fullsize_model_command",
    "fullsize_tokenizer_files",
    "load_configs",
    "parameter_counts",
]
