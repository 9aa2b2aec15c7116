"""Device, precision and speed settings for the SDXL pipelines.

Designed for CUDA (where the published SDXL speedups are: bf16/fp16, SDPA attention,
channels_last, fused QKV, regional torch.compile), and unit-tested on CPU by inspecting the
configuration it produces. Everything here is idempotent per module: the base, its img2img view
and the refiner share modules (text_encoder_2, VAE, UNet), and each shared module is set up once.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from config.settings import EngineSettings

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_DONE_FLAG = "_atelier_accel"


class AccelError(RuntimeError):
    """The configured device or precision cannot be used on this machine."""


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(engine: EngineSettings) -> torch.device:
    """`engine.device`: auto → cuda if available, else mps, else cpu. An explicit device that is
    not there is an error (silently running a GPU config on the CPU would look like a hang)."""
    wanted = engine.device
    if wanted == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise AccelError(
            "engine.device = cuda but CUDA is not available (no NVIDIA GPU or driver, or a CPU-only torch); "
            'set engine.device = "auto" or "cpu"'
        )
    if wanted == "mps" and not _mps_available():
        raise AccelError('engine.device = mps but Apple MPS is not available; set engine.device = "auto" or "cpu"')
    return torch.device(wanted)


def resolve_dtype(engine: EngineSettings, device: torch.device | str) -> torch.dtype:
    """`engine.dtype` for `device`.

    auto: bf16 on CUDA when the GPU supports it (Ampere and later), else fp16; fp16 on MPS; fp32 on CPU.
    fp16 on the CPU falls back to fp32 with a warning (half-precision CPU kernels are missing or slow);
    bf16 on a CUDA GPU without bf16 falls back to fp16 with a warning.
    """
    device = torch.device(device)
    wanted = engine.dtype
    if wanted == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    dtype = DTYPES[wanted]
    if device.type == "cpu" and dtype == torch.float16:
        log.warning("engine.dtype = fp16 is not usable on the CPU; using fp32 (set engine.dtype = fp32 or auto)")
        return torch.float32
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        log.warning("this GPU has no bf16 support; using fp16 (the VAE is upcast to fp32 for decoding)")
        return torch.float16
    return dtype


def configure_torch(engine: EngineSettings, device: torch.device) -> None:
    """Process-wide torch settings: CPU threads, TF32 matmuls and cuDNN autotuning on CUDA."""
    if engine.torch_threads:
        torch.set_num_threads(engine.torch_threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


@dataclass
class AccelReport:
    """What apply_optimizations did, for logs and tests."""

    device: str
    dtype: torch.dtype
    applied: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"{self.device}/{str(self.dtype).removeprefix('torch.')}"
        if self.applied:
            text += " + " + ", ".join(self.applied)
        return text


def _first_time(module: torch.nn.Module | None, step: str) -> bool:
    """True once per (module, step): shared modules are optimized only by the first pipeline."""
    if module is None:
        return False
    done: set[str] = module.__dict__.setdefault(_DONE_FLAG, set())
    if step in done:
        return False
    done.add(step)
    return True


def _set_sdpa(module: Any) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    module.set_attn_processor(AttnProcessor2_0())


def compile_unet(unet: Any) -> str:
    """Regional compilation (each repeated transformer block once, reused: seconds instead of
    minutes) when the model supports it, else the whole UNet compiled in place."""
    if getattr(unet, "_repeated_blocks", None) and hasattr(unet, "compile_repeated_blocks"):
        unet.compile_repeated_blocks(fullgraph=True)
        return "compile(regional)"
    unet.compile()
    return "compile(whole unet)"


def apply_optimizations(
    pipe: Any, engine: EngineSettings, device: torch.device | str, dtype: torch.dtype
) -> AccelReport:
    """Set up a loaded pipeline (already on `device` in `dtype`) for speed.

    - SDPA attention (`AttnProcessor2_0`) on the UNet and the VAE,
    - channels_last memory format on the UNet and the VAE (`engine.channels_last`),
    - fused QKV projections (`engine.fuse_qkv`),
    - regional torch.compile of the UNet (`engine.compile`; warm the size buckets with `warmup`),
    - VAE precision: kept in the pipeline's dtype (a fp32 VAE under a bf16/fp16 UNet crashes
      diffusers' decode); with fp16 and a VAE whose config says `force_upcast` (the original SDXL
      VAE, which overflows in fp16) diffusers upcasts it to fp32 around each decode/encode, and
      `decode_dtype` tells a caller that decodes latents itself to do the same. The fp16-fix VAE
      (`force_upcast = false`) decodes in fp16.
    """
    device = torch.device(device)
    report = AccelReport(device=str(device), dtype=dtype)
    unet: Any = getattr(pipe, "unet", None)
    vae: Any = getattr(pipe, "vae", None)

    for name, module in (("unet", unet), ("vae", vae)):
        if _first_time(module, "sdpa"):
            _set_sdpa(module)
            report.applied.append(f"sdpa({name})")

    if engine.channels_last:
        for name, module in (("unet", unet), ("vae", vae)):
            if _first_time(module, "channels_last"):
                module.to(memory_format=torch.channels_last)
                report.applied.append(f"channels_last({name})")

    if engine.fuse_qkv:
        fuse_unet = _first_time(unet, "fuse_qkv")
        fuse_vae = _first_time(vae, "fuse_qkv")
        if fuse_unet or fuse_vae:
            pipe.fuse_qkv_projections(unet=fuse_unet, vae=fuse_vae)
            report.applied.append("fused_qkv")

    if engine.compile:
        if _first_time(unet, "compile"):
            report.applied.append(compile_unet(unet))
        if device.type != "cuda":
            log.info("engine.compile on %s: expect long first calls; warm the sizes up (engine.warmup)", device)

    if vae is not None and dtype == torch.float16:
        if vae.config.get("force_upcast", True):
            report.applied.append("vae_upcast_fp32")
        else:
            report.applied.append("vae_fp16_fix")
    log.info("pipeline %s: %s", type(pipe).__name__, report)
    return report


def decode_dtype(pipe: Any) -> torch.dtype:
    """The dtype the VAE must decode in: fp32 for an fp16 VAE that needs upcasting (the original
    SDXL VAE produces NaNs/black images in fp16), else the VAE's own dtype."""
    vae = pipe.vae
    if vae.dtype == torch.float16 and vae.config.get("force_upcast", True):
        return torch.float32
    return vae.dtype


_FP32_VAE = "_atelier_fp32_vae"
_copy_lock = threading.Lock()


def decode_vae(pipe: Any) -> Any:
    """The VAE to decode (and encode) with, in `decode_dtype(pipe)`.

    Usually the pipeline's own VAE. For an fp16 VAE that needs upcasting it is an fp32 copy kept
    beside the shared one (made once, about 330 MB for SDXL's VAE): the shared VAE is never cast
    in place, so whoever else uses it meanwhile (the refiner, an img2img encode, another thread)
    never sees its dtype change, and no decode pays for casting 80 M parameters twice. The copy
    follows the VAE's device and its tiling/slicing switches.
    """
    vae = pipe.vae
    if decode_dtype(pipe) == vae.dtype:
        return vae
    with _copy_lock:
        upcast = vae.__dict__.get(_FP32_VAE)
        if upcast is None:
            upcast = copy.deepcopy(vae).to(dtype=torch.float32)
            upcast.__dict__.pop(_FP32_VAE, None)
            vae.__dict__[_FP32_VAE] = upcast
    device = next(vae.parameters()).device
    if next(upcast.parameters()).device != device:
        upcast.to(device)
    for switch in ("use_tiling", "use_slicing"):
        if hasattr(vae, switch):
            setattr(upcast, switch, getattr(vae, switch))
    return upcast


def attached_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules this file keeps beside `module` (the fp32 VAE copy), to move along with it."""
    extra = module.__dict__.get(_FP32_VAE)
    return [extra] if extra is not None else []


@torch.inference_mode()
def decode_latents(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents (as a pipeline returns with `output_type="latent"`) → images in [-1, 1], decoded in
    `decode_dtype(pipe)` as diffusers' SDXL pipeline does it, without touching the shared VAE."""
    vae = decode_vae(pipe)
    config = vae.config
    latents = latents.to(device=next(vae.parameters()).device, dtype=vae.dtype)
    mean = getattr(config, "latents_mean", None)
    std = getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        latents = latents * std_t / config.scaling_factor + mean_t
    else:
        latents = latents / config.scaling_factor
    return vae.decode(latents, return_dict=False)[0]


def warmup(pipe_fn: Callable[[int, int], object], sizes: Iterable[tuple[int, int]]) -> dict[tuple[int, int], float]:
    """Run `pipe_fn(width, height)` once per size bucket, so a compiled UNet has its graphs ready
    (torch.compile recompiles on every new height/width/batch/prompt length). Returns the seconds
    each size took; a failing size is logged and skipped, not fatal."""
    seconds: dict[tuple[int, int], float] = {}
    for width, height in dict.fromkeys(sizes):
        started = time.perf_counter()
        try:
            pipe_fn(width, height)
        except Exception:
            log.exception("warm-up at %dx%d failed", width, height)
            continue
        seconds[(width, height)] = time.perf_counter() - started
        log.info("warm-up %dx%d: %.1f s", width, height, seconds[(width, height)])
    return seconds


__all__ = [
    "AccelError",
    "AccelReport",
    "apply_optimizations",
    "attached_modules",
    "compile_unet",
    "configure_torch",
    "decode_dtype",
    "decode_latents",
    "decode_vae",
    "resolve_device",
    "resolve_dtype",
    "warmup",
]
