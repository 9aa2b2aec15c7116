"""Sections that run only when their modules are there: the img2img upscale with and without an
ESRGAN pre-pass (spandrel), a ControlNet job (diffusers' ControlNetModel), a job with three LoRAs
(peft), and the peak memory with all of it loaded at once.

The ControlNet job runs on both sides: a random ControlNet is written as a diffusers folder and
loaded by the engine's own code (`[controlnets.edges]`, engine.control), and the bare pipeline
(`from_pipe` on the engine's base) uses that same loaded ControlNet, so nothing is held twice. The
LoRAs run through diffusers on the engine's own modules (loaded into the shared UNet with
`load_lora_weights`, so the in-process Runner runs with them too). Order: ControlNet first
(`ControlNetModel.from_unet` needs a UNet without LoRA layers), then the LoRAs, then both
together; `cleanup` restores the model before compile.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import replace
from typing import Any

import torch

from .harness import CFG, dpm_karras, dtype_kwarg, free_device_memory, noise_image, run_job
from .record import PeakMemory, Row, SectionResult, median, timed
from .sections import Bench, Skip, pair

LORA_RANK = 32  # a common rank for published SDXL style LoRAs
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_COUNT = 3


def _png(image: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def upscale(bench: Bench, result: SectionResult) -> None:
    """The engine's ×2 upscale job (Lanczos, then low-strength img2img) and, with spandrel, the
    same job with a random Real-ESRGAN ×4 pre-pass, plus the ESRGAN pass alone."""
    from config.settings import GenerationSettings
    from engine.jobs import Upscale
    from engine.pipelines import Runner

    loaded = bench.use_dtype(bench.profile.main_dtype)
    device, size, reps = bench.device, bench.profile.size, max(1, bench.profile.reps)
    generation = GenerationSettings()
    section = f"upscale {loaded.dtype}"
    image = noise_image(size, seed=3)
    data = _png(image)

    def job(side: str) -> Any:
        prompt, negative, seed = bench.jobs.texts(side)
        return Upscale(
            job_id=f"bench-{side}-{seed}",
            prompt=prompt,
            negative=negative,
            seed=seed,
            image=data,
            steps=generation.upscale_steps,
            strength=generation.upscale_strength,
            factor=2,
        )

    lanczos = [timed(device, lambda: run_job(loaded.runner, job("upscale")))[1] for _ in range(reps + 1)]
    what = f"{size}² → {2 * size}², {generation.upscale_steps} steps × strength {generation.upscale_strength}"
    result.rows.append(
        Row(
            section,
            f"upscale job, Lanczos + img2img ({what})",
            runner=median(lanczos[1:]),
            note=f"first {lanczos[0]:.2f} s",
        )
    )

    try:
        import spandrel  # noqa: F401  (needs torchvision)

        from engine.upscale import SpandrelUpscaler
    except Exception as exc:  # ImportError, or torchvision failing to import beside this torch
        result.rows.append(Row(section, "ESRGAN pre-pass", note=f"skipped: spandrel unusable ({type(exc).__name__})"))
        return
    from engine.tiny_esrgan import esrgan_parameters, esrgan_state_dict, write_tiny_esrgan

    full = bench.profile.model == "full"
    shape = {"num_filters": 64, "num_blocks": 23} if full else {"num_filters": 8, "num_blocks": 1}
    path = write_tiny_esrgan(bench.workdir / "esrgan-x4.safetensors", scale=4, **shape)
    esrgan = SpandrelUpscaler(str(path), device=device)
    params = esrgan_parameters(esrgan_state_dict(scale=4, **shape))
    alone = [timed(device, lambda: esrgan(image, (2 * size, 2 * size)))[1] for _ in range(reps + 1)]
    result.rows.append(
        Row(
            section,
            f"ESRGAN ×4 pass alone, {size}² in, Lanczos to {2 * size}²",
            runner=median(alone[1:]),
            note=f"random Real-ESRGAN {params / 1e6:.1f} M params, fp32, tiles of {esrgan.tile}",
        )
    )
    with_esrgan = Runner(loaded.registry, loaded.registry.engine, generation, upscaler=esrgan)
    times = [timed(device, lambda: run_job(with_esrgan, job("upscale-esrgan")))[1] for _ in range(reps)]
    result.rows.append(Row(section, "upscale job, ESRGAN + img2img", runner=median(times)))


def controlnet(bench: Bench, result: SectionResult) -> None:
    """A random ControlNet made from the base UNet (`from_unet`), base + ControlNet with the
    refiner hand-off, bare and through the engine's Runner (a control job with the map given as
    is: the same call), kept loaded for the LoRA section's all-at-once memory figure."""
    try:
        from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    except ImportError as exc:
        raise Skip(f"this diffusers has no SDXL ControlNet ({exc})") from None
    from config.addons import ControlNetSettings
    from engine.control import controlnet_for
    from engine.fullsize import creation_context

    loaded = bench.use_dtype(bench.profile.main_dtype)
    model, device, profile = loaded.model, bench.device, bench.profile
    section = f"controlnet {loaded.dtype}"
    # Created on the device in the model's dtype (no fp32 copy in CPU RAM), weights from the UNet.
    with creation_context(device, model.dtype):
        made = ControlNetModel.from_unet(model.base.unet)
    made = made.to(device=device, dtype=model.dtype).eval().requires_grad_(False)
    with torch.no_grad():
        # from_unet zero-initialises the zero-convolutions: such a ControlNet would change nothing.
        for conv in [*made.controlnet_down_blocks, made.controlnet_mid_block]:
            conv.weight.normal_(0.0, 0.02)
    folder = bench.workdir / "controlnet"
    save = functools.partial(made.save_pretrained, folder, safe_serialization=True)
    _, save_s = timed(device, save)
    del made, save
    free_device_memory(device)
    # The engine loads it as an operator's [controlnets.edges] (engine.control), onto the device.
    loaded.registry.controlnets = {"edges": ControlNetSettings(model=str(folder))}
    (net, _), load_s = timed(device, lambda: controlnet_for(loaded.registry, model, "edges"))
    pipe = StableDiffusionXLControlNetPipeline.from_pipe(
        model.base, controlnet=net, scheduler=dpm_karras(model.base), **dtype_kwarg(model.dtype)
    )
    pipe.set_progress_bar_config(disable=True)
    control = noise_image(profile.size, seed=5)
    bench.extras["controlnet"] = (net, pipe, control)
    params = sum(p.numel() for p in net.parameters())

    times, runner, peak = [], [], 0.0
    for _ in range(profile.reps + 1):  # the sides alternate; the first job of each warms it up
        bare, top = run_controlnet(bench, 1)
        times, peak = times + bare, max(peak, top)
        runner += run_controlnet_engine(bench, 1)
    result.rows.append(
        Row(
            section,
            "text2img + ControlNet (scale 0.5), base → refiner, batch 1",
            bare=median(times[1:]),
            runner=median(runner[1:]),
            note=f"first {times[0]:.2f} s; ControlNet {params / 1e6:.0f} M params",
        )
    )
    result.rows.append(
        Row(
            section, "ControlNet written, then loaded by the engine", value=save_s + load_s, note=f"load {load_s:.2f} s"
        )
    )
    result.rows.append(Row(section, "peak memory, base + refiner + ControlNet", value=peak, unit="GiB"))


def run_controlnet_engine(bench: Bench, reps: int) -> list[float]:
    """The same job as `run_controlnet`'s through the engine's Runner: the noise image given as the
    map (`control_as_is`), scale 0.5, the ControlNet over the whole base part (guidance 0–1, as
    diffusers' default the bare call uses)."""
    _net, _pipe, control = bench.extras["controlnet"]
    loaded, device = bench.current(), bench.device
    times = []
    for _ in range(reps):
        job = replace(
            bench.jobs.text2img("controlnet-engine"),
            control="edges",
            control_as_is=True,
            control_image=_png(control),
            control_strength=0.5,
            control_guidance_end=1.0,
        )
        times.append(timed(device, lambda job=job: run_job(loaded.runner, job))[1])
    return times


def run_controlnet(bench: Bench, reps: int) -> tuple[list[float], float]:
    _net, pipe, control = bench.extras["controlnet"]
    loaded, profile, device = bench.current(), bench.profile, bench.device
    refiner = loaded.bare.refiner
    times, top = [], 0.0
    for _ in range(reps):
        prompt, negative, seed = bench.jobs.texts("controlnet")
        common = {
            "prompt": prompt,
            "negative_prompt": negative,
            "num_inference_steps": profile.steps,
            "guidance_scale": CFG,
        }

        def job(common: dict[str, Any] = common, seed: int = seed) -> Any:
            generator = torch.Generator("cpu").manual_seed(seed)
            with torch.inference_mode():
                latents = pipe(
                    **common,
                    image=control,
                    controlnet_conditioning_scale=0.5,
                    width=profile.size,
                    height=profile.size,
                    denoising_end=profile.high_noise_frac if refiner else None,
                    output_type="latent" if refiner else "pil",
                    generator=generator,
                ).images
                if refiner is None:
                    return latents
                return refiner(
                    **common, image=latents, denoising_start=profile.high_noise_frac, generator=generator
                ).images

        with PeakMemory(device) as peak:
            times.append(timed(device, job)[1])
        top = max(top, peak.gib)
    return times, top


def random_lora(unet_config: Any, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A LoRA over the UNet's attention projections: peft's LoraConfig injected into a UNet
    skeleton on the meta device gives the exact keys and shapes (no memory), filled with random
    values at the scale of a trained LoRA's small update."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    with init_empty_weights():
        skeleton = UNet2DConditionModel.from_config(unet_config)
        skeleton.add_adapter(
            LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights=False, target_modules=LORA_TARGETS)
        )
    shapes = get_peft_model_state_dict(skeleton)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, tensor in shapes.items():
        std = 1.0 / math.sqrt(tensor.shape[1]) if "lora_A" in key else 0.01
        state[key] = (torch.randn(tuple(tensor.shape), generator=generator) * std).to(dtype)
    return state


def lora(bench: Bench, result: SectionResult) -> None:
    """Three random rank-32 LoRAs loaded with `load_lora_weights` and active together; the same
    jobs on both sides; with the ControlNet too when its section ran."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise Skip("peft is not installed") from None
    from diffusers import StableDiffusionXLPipeline

    loaded = bench.use_dtype(bench.profile.main_dtype)
    device, reps = bench.device, bench.profile.reps
    section = f"lora {loaded.dtype}"
    folders, size_mb = [], 0.0
    for i in range(LORA_COUNT):
        state = random_lora(loaded.model.base.unet.config, seed=i, dtype=loaded.model.dtype)
        size_mb = sum(t.numel() * t.element_size() for t in state.values()) / 1e6
        folder = bench.workdir / f"lora-{i}"
        StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=state, safe_serialization=True)
        folders.append(folder)
    names = [f"bench-lora-{i}" for i in range(LORA_COUNT)]
    pipe = loaded.bare.base  # shares the UNet with the engine's model

    def load_all() -> None:
        for folder, name in zip(folders, names, strict=True):
            pipe.load_lora_weights(folder, adapter_name=name)
        pipe.set_adapters(names, adapter_weights=[0.7] * LORA_COUNT)

    bench.extras["loras"] = names
    _, seconds = timed(device, load_all)
    result.rows.append(
        Row(
            section,
            f"load {LORA_COUNT} LoRAs (rank {LORA_RANK}, {size_mb:.0f} MB each)",
            value=seconds,
            note="pipe.load_lora_weights + set_adapters",
        )
    )
    pair(bench, 1)  # warm-up with the adapters in place
    times, _, peaks = pair(bench, reps)
    off = bench.baseline
    result.rows.append(
        Row(
            section,
            f"text2img with {LORA_COUNT} LoRAs active (unfused), base → refiner",
            bare=median(times["bare"]),
            runner=median(times["runner"]),
            note=f"no LoRA: bare {off.get('bare', float('nan')):.3f} s, Runner {off.get('runner', float('nan')):.3f} s",
        )
    )
    result.rows.append(
        Row(section, f"peak memory, base + refiner + {LORA_COUNT} LoRAs", value=max(peaks.values()), unit="GiB")
    )
    if "controlnet" in bench.extras:
        times, peak = run_controlnet(bench, max(1, reps))
        result.rows.append(Row(section, f"text2img + ControlNet + {LORA_COUNT} LoRAs", bare=median(times)))
        result.rows.append(
            Row(
                section,
                f"peak memory, base + refiner + ControlNet + {LORA_COUNT} LoRAs",
                value=peak,
                unit="GiB",
                note=PeakMemory(device).kind,
            )
        )


def cleanup(bench: Bench) -> None:
    """Unload the LoRAs and drop the ControlNet: the compile section measures the plain model."""
    loaded = bench.loaded
    if loaded is None:
        return
    if bench.extras.pop("loras", None):
        loaded.bare.base.unload_lora_weights()
    bench.extras.pop("controlnet", None)
    leftover = [name for name, _ in loaded.model.base.unet.named_modules() if "lora" in name.lower()]
    if leftover:
        raise RuntimeError(f"LoRA layers left in the UNet after unloading: {leftover[:3]}")
    free_device_memory(bench.device)


__all__ = ["cleanup", "controlnet", "lora", "random_lora", "upscale"]
