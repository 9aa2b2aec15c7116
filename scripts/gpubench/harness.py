"""The bench's model, settings and the two sides it compares.

- bare diffusers: StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline made with
  `from_pipe` from the engine's own loaded pipelines (the same modules, so the same weights,
  dtype, SDPA processors and channels_last; nothing is loaded twice), a DPM++ 2M Karras scheduler
  (the engine's default sampler), called the way diffusers documents the ensemble of experts:
  base with `denoising_end`, `output_type="latent"`, refiner with `denoising_start`, PIL out.
- the engine: `Runner(registry, engine, generation).run(job, on_progress, cancelled)` in this
  process, and the LocalEngineClient (worker process, pipe, PNG encoding) end to end.

Both sides get a prompt and a negative never used before (the engine caches recent prompt
embeddings; a bench repeating one prompt would measure that cache), the same seeds, steps, cfg
and size. Jobs are built only from the job dataclasses' fields.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

log = logging.getLogger("gpu-bench")

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
NEGATIVE = "blurry, low quality"
SAMPLER = "dpmpp_2m_karras"  # the engine's default; one UNet evaluation per step, like Euler
CFG = 7.0
MODEL = "sdxl"
SECOND_MODEL = "sdxl-b"  # the same folders under another name: a second model for switch timing


@dataclass(frozen=True)
class Profile:
    device: torch.device
    model: str  # "full": the real SDXL architecture (engine.fullsize) · "tiny": engine.tiny
    size: int
    steps: int
    dtypes: tuple[str, ...]  # the last one is the main dtype (batches, client, switch, extras, compile)
    batches: tuple[int, ...]
    reps: int
    compile: bool
    budget: float
    high_noise_frac: float = 0.8

    @property
    def main_dtype(self) -> str:
        return self.dtypes[-1]

    def describe(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "model": self.model,
            "size": self.size,
            "steps": self.steps,
            "dtypes": list(self.dtypes),
            "batches": list(self.batches),
            "reps": self.reps,
            "compile": self.compile,
            "budget_s": self.budget,
            "high_noise_frac": self.high_noise_frac,
            "sampler": SAMPLER,
            "cfg": CFG,
        }


def gpu_profile(device: torch.device, quick: bool) -> Profile:
    # Planned on an H100-class GPU at ~3 s per 1024²/30-step image: about 7.5 minutes with two
    # repetitions (the budget skips what would not fit, keeping time for compile, the last section).
    return Profile(device, "full", 1024, 30, ("fp16", "bf16"), (1, 2, 4), 1 if quick else 2, True, 470.0)


def cpu_profile(device: torch.device, quick: bool) -> Profile:
    # The same code on the tiny model: 256², 2 steps (base 1 + refiner 1 at the 0.8 hand-off).
    return Profile(device, "tiny", 256, 2, ("fp32",), (1, 2, 4), 1 if quick else 2, True, 300.0)


def prepare_model(profile: Profile, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """Build the model the profile names under `workdir`; returns (folder, facts for the report)."""
    if profile.model == "full":
        from engine.fullsize import build_fullsize_sdxl

        info = build_fullsize_sdxl(workdir / "sdxl-full", device=profile.device, dtype=torch.float16)
        return info.path, {
            "seconds": info.seconds,
            "bytes": info.bytes,
            "parameters": info.parameters,
            "device": info.device,
        }
    import time

    from engine.tiny import build_tiny_sdxl

    started = time.perf_counter()
    build_tiny_sdxl(workdir / "sdxl-tiny")
    path = workdir / "sdxl-tiny"
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path, {"seconds": time.perf_counter() - started, "bytes": size, "parameters": {}, "device": "cpu"}


def model_table(model_dir: Path) -> dict[str, dict[str, Any]]:
    folders = {"base": str(model_dir / "base"), "refiner": str(model_dir / "refiner")}
    return {MODEL: {**folders, "default": True}, SECOND_MODEL: dict(folders)}


def engine_settings(profile: Profile, dtype: str, **overrides: Any) -> Any:
    from config.settings import EngineSettings

    # Engine defaults otherwise (previews every 5 steps, channels_last, no fused QKV): what members get.
    values: dict[str, Any] = {
        "device": profile.device.type,
        "dtype": dtype,
        "high_noise_frac": profile.high_noise_frac,
        "start_timeout": 1200,
    }
    return EngineSettings(**(values | overrides))


def full_settings(profile: Profile, dtype: str, model_dir: Path) -> Any:
    """Settings for the LocalEngineClient (which needs the whole Settings object)."""
    from config.settings import load_settings

    engine = engine_settings(profile, dtype).model_dump()
    return load_settings(engine=engine, models=model_table(model_dir), logging={"level": "WARNING"})


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """diffusers ≥ 0.40 names it `dtype` (and warns about `torch_dtype`)."""
    from diffusers.utils import deprecation_utils

    name = "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"
    return {name: dtype}


def dpm_karras(pipe: Any) -> Any:
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
    )


class BareSDXL:
    """Plain diffusers on the loaded model's modules (see the module docstring)."""

    def __init__(self, model: Any, high_noise_frac: float) -> None:
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

        dtype = dtype_kwarg(model.dtype)  # from_pipe casts to fp32 unless told otherwise
        self.base = StableDiffusionXLPipeline.from_pipe(model.base, scheduler=dpm_karras(model.base), **dtype)
        self.refiner = None
        if model.refiner is not None:
            self.refiner = StableDiffusionXLImg2ImgPipeline.from_pipe(
                model.refiner, scheduler=dpm_karras(model.refiner), **dtype
            )
        for pipe in (self.base, self.refiner):
            if pipe is not None:
                pipe.set_progress_bar_config(disable=True)
        self.frac = high_noise_frac
        self.device = model.device

    def run(
        self, prompt: str, negative: str, seed: int, *, size: int, steps: int, count: int = 1, refiner: bool = True
    ) -> tuple[list[Image.Image], dict[str, float]]:
        """Images and the phase times (base; refiner including its decode) in seconds."""
        import time

        from engine.jobs import image_seeds

        generators = [torch.Generator("cpu").manual_seed(s) for s in image_seeds(seed, count)]
        common = {
            "prompt": prompt,
            "negative_prompt": negative,
            "num_inference_steps": steps,
            "guidance_scale": CFG,
            "num_images_per_prompt": count,
            "generator": generators,
        }
        use_refiner = refiner and self.refiner is not None
        with torch.inference_mode():
            started = time.perf_counter()
            out = self.base(
                **common,
                width=size,
                height=size,
                denoising_end=self.frac if use_refiner else None,
                output_type="latent" if use_refiner else "pil",
            ).images
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            base_done = time.perf_counter()
            if use_refiner:
                assert self.refiner is not None
                out = self.refiner(**common, image=out, denoising_start=self.frac).images
            finished = time.perf_counter()
        return list(out), {"base": base_done - started, "refiner": finished - base_done if use_refiner else 0.0}

    def run_many(self, texts: list[tuple[str, str, int]], *, size: int, steps: int) -> list[Image.Image]:
        """One diffusers call for several prompts (its own batching: prompt lists, a generator
        per image), base → refiner: what the batched engine call is compared with."""
        generators = [torch.Generator("cpu").manual_seed(seed) for _, _, seed in texts]
        common = {
            "prompt": [p for p, _, _ in texts],
            "negative_prompt": [n for _, n, _ in texts],
            "num_inference_steps": steps,
            "guidance_scale": CFG,
            "generator": generators,
        }
        with torch.inference_mode():
            if self.refiner is None:
                return list(self.base(**common, width=size, height=size).images)
            latents = self.base(**common, width=size, height=size, denoising_end=self.frac, output_type="latent").images
            return list(self.refiner(**common, image=latents, denoising_start=self.frac).images)


@dataclass
class Loaded:
    """One dtype's registry, its default model and both sides ready to run."""

    dtype: str
    registry: Any
    model: Any
    runner: Any
    bare: BareSDXL
    load_seconds: float


def load(profile: Profile, dtype: str, model_dir: Path, **engine_overrides: Any) -> Loaded:
    import time

    from engine.models import ModelRegistry
    from engine.pipelines import Runner

    settings = engine_settings(profile, dtype, **engine_overrides)
    registry = ModelRegistry(model_table(model_dir), settings)
    started = time.perf_counter()
    model = registry.get(MODEL)
    if profile.device.type == "cuda":
        torch.cuda.synchronize(profile.device)
    seconds = time.perf_counter() - started
    from config.settings import GenerationSettings

    runner = Runner(registry, settings, GenerationSettings())
    return Loaded(dtype, registry, model, runner, BareSDXL(model, profile.high_noise_frac), seconds)


@dataclass
class Jobs:
    """Distinct prompts, job ids and seeds for every job of the run."""

    profile: Profile
    counter: itertools.count[int] = field(default_factory=itertools.count)

    def texts(self, side: str) -> tuple[str, str, int]:
        n = next(self.counter)
        return f"{PROMPT}, study {side} {n}", f"{NEGATIVE}, draft {side} {n}", 1000 + n

    def batch(self, side: str, count: int) -> list[Any]:
        """`count` queued jobs of one shape: their own prompts, negatives and seeds."""
        return [self.text2img(side) for _ in range(count)]

    def text2img(self, side: str, *, count: int = 1, refiner: bool = True) -> Any:
        from engine.jobs import Text2Img

        prompt, negative, seed = self.texts(side)
        return Text2Img(
            job_id=f"bench-{side}-{seed}",
            prompt=prompt,
            negative=negative,
            steps=self.profile.steps,
            cfg=CFG,
            seed=seed,
            sampler=SAMPLER,
            width=self.profile.size,
            height=self.profile.size,
            count=count,
            refiner=refiner,
        )


def run_job(runner: Any, job: Any) -> list[Any]:
    return runner.run(job, on_progress=lambda _progress: None, cancelled=lambda: False)


def noise_image(size: int, seed: int = 0) -> Image.Image:
    """A random RGB image (an input for img2img, ControlNet and upscalers)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def free_device_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


__all__ = [
    "MODEL",
    "SECOND_MODEL",
    "BareSDXL",
    "Jobs",
    "Loaded",
    "Profile",
    "cpu_profile",
    "engine_settings",
    "free_device_memory",
    "full_settings",
    "gpu_profile",
    "load",
    "model_table",
    "noise_image",
    "prepare_model",
    "run_job",
]
